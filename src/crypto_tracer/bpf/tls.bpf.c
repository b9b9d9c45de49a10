// SPDX-License-Identifier: GPL-2.0
/* crypto-tracer tls: TLS plaintext from OpenSSL (libssl, static copies), GnuTLS and NSS.
 *
 * Data calls are hooked twice: the entry stashes {ssl, buf, len pointer} by pid_tgid, the
 * return copies what the call really transferred (a write is emitted only when it
 * succeeded: node retries SSL_write with the same buffer during the handshake).
 * Payloads go out in variable-size chunks of up to CT_TLS_CHUNK bytes, each with its
 * offset in the call, up to max_payload; the true length is always sent, so a cut is
 * visible (truncated) and never silent.
 *
 * The fd comes from the syscalls made inside the call (read/write/send/recv tracepoints
 * while a stash exists), cached per (tgid, ssl). Libraries that do no I/O inside the call
 * (node's memory BIOs) are bound by the first socket write of the thread right after one
 * of its TLS calls. The 4-tuple is read from the socket behind the fd (CO-RE), so it is
 * also known for connections opened before the tool started.
 *
 * The uprobe cookie carries the function id (low byte) and which OpenSSL object layout the
 * library has (CT_COOKIE_LAYOUT: 1.1.1-3.1, CT_COOKIE_SPLIT: 3.2+, see ossl_fields), and the slot
 * of its QUIC object layout (bits 20-23, see quic_data).
 *
 * Go's crypto/tls has its own programs (go_tls.h): entry and RET uprobes, never a uretprobe.
 */
#include "common.h"
#include <bpf/bpf_endian.h>

/* Library ids (records' lib, tls_keys_on_return's lib_kind); enums, so the BTF carries them. */
enum tls_lib {
	CT_LIB_OPENSSL = 1,
	CT_LIB_GNUTLS = 2,
	CT_LIB_NSS = 3,
	CT_LIB_GO = 4,
	CT_LIB_BORINGSSL = 5, /* OpenSSL's API, its own SSL object: F_SSL_* with CT_COOKIE_BORINGSSL */
};

#include "tls_keys.h"

#define CT_TLS_CHUNK 30720   /* data bytes per record: the record fits a 32 KiB per-CPU slot */
#define CT_TLS_MAX_CHUNKS 4096
/* Cookie bits above the function id (low byte). */
enum tls_cookie {
	CT_COOKIE_LAYOUT = 0x100, /* OpenSSL 1.1.1-3.1: struct ssl_st */
	CT_COOKIE_SPLIT = 0x200,  /* OpenSSL 3.2+: struct ssl_connection_st, checked per object */
	CT_COOKIE_BORINGSSL = 0x400, /* BoringSSL: no OpenSSL layout applies (role/version unknown) */
	CT_COOKIE_QUIC_SHIFT = 20, /* bits 20-23: the library's slot in quic_layouts (0: none) */
	CT_QUIC_SLOTS = 16,
	CT_QUIC_CONNECTION = 0x80, /* struct ssl_st's type of OpenSSL 3.5's QUIC objects */
	CT_QUIC_XSO = 0x81,
	CT_COOKIE_NSS_SHIFT = 24, /* bits 24-27 (NSPR functions): the NSS build's slot in nss_layouts (0: none) */
	CT_NSS_SLOTS = 16,
};
enum tls_counter {
	CT_CNT_CTRL_DROPPED = 4, /* exec/library/process/NSS peer records lost (not part of the event accounting) */
};

#define AF_INET 2
#define AF_INET6 10
#define PROT_EXEC 0x4
#define PR_DESC_LAYERED 4

/* Function ids (cookie low byte); probes/tls.py FUNC_IDS, checked against this BTF. */
enum tls_func {
	F_SSL_READ = 1, F_SSL_READ_EX, F_SSL_PEEK, F_SSL_PEEK_EX, F_SSL_WRITE, F_SSL_WRITE_EX,
	F_GNUTLS_RECV, F_GNUTLS_SEND,
	F_PR_READ, F_PR_RECV, F_PR_WRITE, F_PR_SEND, F_PR_WRITEV, F_SSL_WRITE_EX2,
	F_GO_WRITE, F_GO_READ, /* Go crypto/tls: (*Conn).writeRecordLocked, (*Conn).Read */
	F_SSL_DO_HANDSHAKE = 20, F_SSL_CONNECT, F_SSL_ACCEPT, F_GNUTLS_HANDSHAKE,
};

static __always_inline bool func_has_count_ptr(__u32 f)
{
	return f == F_SSL_READ_EX || f == F_SSL_PEEK_EX || f == F_SSL_WRITE_EX || f == F_SSL_WRITE_EX2;
}

static __always_inline bool func_is_write(__u32 f)
{
	return f == F_SSL_WRITE || f == F_SSL_WRITE_EX || f == F_SSL_WRITE_EX2 || f == F_GNUTLS_SEND ||
	       f == F_PR_WRITE || f == F_PR_SEND || f == F_PR_WRITEV || f == F_GO_WRITE;
}

static __always_inline __u32 func_lib(__u32 f)
{
	if (f == F_GNUTLS_RECV || f == F_GNUTLS_SEND || f == F_GNUTLS_HANDSHAKE)
		return CT_LIB_GNUTLS;
	if (f >= F_PR_READ && f <= F_PR_WRITEV)
		return CT_LIB_NSS;
	if (f == F_GO_WRITE || f == F_GO_READ)
		return CT_LIB_GO;
	return CT_LIB_OPENSSL;
}

static __always_inline __u32 cookie_lib(__u32 cookie)
{
	return cookie & CT_COOKIE_BORINGSSL ? CT_LIB_BORINGSSL : func_lib(cookie & 0xff);
}

struct tls_config {
	__u32 capture_data; /* 0: data programs only feed tls_keys_on_return */
	__u32 max_payload;  /* bytes copied per call at most */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tls_config);
} tls_config SEC(".maps");

struct conn {
	__u8 family; /* 0: unknown */
	__u8 pad;
	__u16 lport;
	__u16 rport;
	__u16 pad2;
	__u8 laddr[16];
	__u8 raddr[16];
};

/* One record per chunk of one call (CT_EV_TLS_DATA). */
struct tls_data_rec {
	struct ct_header h;
	__u64 ssl;
	__u64 length;  /* bytes the call transferred */
	__u64 offset;  /* of this chunk in the call */
	__u32 chunk_len;
	__s32 fd;      /* -1: unknown */
	__u8 lib;
	__u8 func;
	__u8 truncated;
	__u8 pad;
	struct conn c;
	__u32 pad3;
	__s64 stream_id; /* QUIC stream id; -1: none (TCP) or unknown */
	__u8 data[CT_TLS_CHUNK];
};

/* CT_EV_TLS_HANDSHAKE */
struct tls_hs_rec {
	struct ct_header h;
	__u64 ssl;
	__s32 fd;
	__s32 result;  /* the function's return value */
	__u8 lib;
	__u8 func;
	__u8 role;     /* 0 unknown, 1 client, 2 server */
	__u8 ok;       /* 1 success, 0 failure */
	__u32 version; /* protocol version (0x0304 = TLS 1.3), 0 unknown */
	struct conn c;
};

/* CT_EV_TLS_PEER: what an NSS connection's sslSocket holds after its handshake (TLS 1.3 sends
 * them encrypted): the negotiated ALPN and the peer certificate's DER, sent just before the
 * connection's tls_handshake record. Lengths are the library's; bytes are copied when they fit. */
#define CT_PEER_ALPN_MAX 256
#define CT_PEER_CERT_MAX 8192 /* a power of two; a leaf certificate is 1-2 KB, a longer one is reported by length only */

struct tls_peer_rec {
	struct ct_header h;
	__u64 ssl;
	__u32 alpn_len;
	__u32 cert_len;
	__u8 alpn[CT_PEER_ALPN_MAX];
	__u8 cert[CT_PEER_CERT_MAX];
};

/* CT_EV_PROCESS_EXEC and CT_EV_LIB_LOAD: control records for discovery. */
struct tls_ctrl_rec {
	struct ct_header h;
	char name[32];
};

struct stash {
	__u64 ssl;
	__u64 buf;
	__u64 count_ptr; /* size_t * of the _ex variants */
	__s32 fd;
	__u32 cookie;
	__u8 filtered;
	__u8 nested; /* calls of other objects in progress inside this one (QUIC: its inner TLS object) */
};

struct ssl_key {
	__u32 tgid;
	__u32 pad;
	__u64 ssl;
};

/* pid_tgid -> the call in progress. LRU: a thread killed inside a call leaves its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct stash);
} data_stash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct stash);
} hs_stash SEC(".maps");

/* (tgid, ssl) -> fd */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, __s32);
} ssl_fd SEC(".maps");

/* pid_tgid -> ssl whose fd is unknown: bound by the thread's next socket write. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} pending_bind SEC(".maps");

/* (tgid, session) already announced by a tls_handshake record (NSS: first data call). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, __u8);
} sessions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tls_data_rec);
} data_scratch SEC(".maps");

/* Where one libssl build keeps a QUIC object's facts, learned by keys/calibrate_quic_worker.py on
 * that file (probes/tls.py QUIC_LAYOUT). A path is up to two pointer hops, then an offset. */
struct quic_layout {
	__u32 xso_conn;       /* stream object: its QUIC_CONNECTION * */
	__u32 xso_stream;     /* stream object: its QUIC_STREAM * */
	__u32 stream_id;      /* QUIC_STREAM: uint64_t id */
	__u32 qc_default_xso; /* connection: its default stream object (NULL: none) */
	__u32 bio_hops;       /* connection -> the network BIO * */
	__u32 bio_ptr0;
	__u32 bio_ptr1;
	__u32 bio;
	__u32 bio_num;        /* BIO: its fd */
	__u32 peer_hops;      /* connection -> the peer's BIO_ADDR */
	__u32 peer_ptr0;
	__u32 peer_ptr1;
	__u32 peer;
	__u32 tls;            /* connection: its inner TLS object (SSL_CONNECTION *), whose secrets keys read */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CT_QUIC_SLOTS);
	__type(key, __u32);
	__type(value, struct quic_layout);
} quic_layouts SEC(".maps");

/* Where one libssl3 (NSS) build keeps a connection's facts, learned by keys/calibrate_nss_worker.py
 * on that file (probes/tls.py NSS_LAYOUT): offsets in its sslSocket and in CERTCertificate. */
struct nss_layout {
	__u32 fd;         /* sslSocket: its PRFileDesc * (the SSL layer): proves a descriptor's secret is one */
	__u32 peer_cert;  /* sslSocket: sec.peerCert, a CERTCertificate * */
	__u32 next_proto; /* sslSocket: xtnData.nextProto, a SECItem */
	__u32 cert_der;   /* CERTCertificate: derCert, a SECItem */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CT_NSS_SLOTS);
	__type(key, __u32);
	__type(value, struct nss_layout);
} nss_layouts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tls_peer_rec);
} peer_scratch SEC(".maps");

/* ct_output without a wake-up per record: user space polls on a 100 ms timer and is woken
 * early only once the ring holds a 64th of its size (a wake-up costs the traced process a few
 * microseconds; a bulk transfer's 16 KB records once woke the reader ~25,000 times a second).
 * Drops are counted as in ct_output. */
static __always_inline int tls_output(void *data, __u64 size)
{
	__u64 flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >
		      bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) / 64 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_output(&events, data, size, flags)) {
		ct_count(CT_CNT_DROPPED);
		return -1;
	}
	ct_count(CT_CNT_SUBMITTED);
	return 0;
}

/* --- process images ---------------------------------------------------------------------- */

/* ppid, uid and exe of each process image with TLS events, sent before its first one (image.h). */
#include "image.h"

/* --- sockets --------------------------------------------------------------------------- */

static __always_inline struct file *fd_file(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = NULL;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

/* The sock behind fd, or NULL when fd is not a socket (socket->file points back to the file). */
static __always_inline struct sock *fd_sock(int fd)
{
	struct file *f = fd_file(fd);
	struct socket *sock;

	if (!f)
		return NULL;
	sock = BPF_CORE_READ(f, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != f)
		return NULL;
	return BPF_CORE_READ(sock, sk);
}

static __always_inline void fill_conn_sk(struct conn *c, struct sock *sk)
{
	__u16 family;

	c->family = 0;
	if (!sk)
		return;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family == AF_INET) {
		__builtin_memset(c->laddr, 0, 16);
		__builtin_memset(c->raddr, 0, 16);
		bpf_core_read(c->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(c->raddr, 4, &sk->__sk_common.skc_daddr);
	} else if (family == AF_INET6) {
		bpf_core_read(c->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(c->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	} else {
		return;
	}
	c->family = family;
	c->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	c->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
}

static __always_inline void fill_conn(struct conn *c, int fd)
{
	fill_conn_sk(c, fd_sock(fd));
}

/* --- nested syscalls: the fd of the TLS call in progress ---------------------------------- */

static __always_inline void note_fd(int fd, bool is_write)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	struct ct_filter *f = bpf_map_lookup_elem(&filter, &zero);

	/* --pid: the uprobes are attached for that process only, so no other has a call in
	 * progress or a pending bind (skips the three lookups for everyone else's I/O) */
	if (f && f->pid && f->pid != id >> 32)
		return;
	struct stash *st = bpf_map_lookup_elem(&data_stash, &id);

	if (!st)
		st = bpf_map_lookup_elem(&hs_stash, &id);
	if (st) {
		if (st->fd < 0)
			st->fd = fd;
		return;
	}
	if (!is_write)
		return;
	__u64 *ssl = bpf_map_lookup_elem(&pending_bind, &id);
	if (!ssl)
		return;
	struct ssl_key key = {.tgid = id >> 32, .ssl = *ssl};
	bpf_map_delete_elem(&pending_bind, &id);
	if (fd_sock(fd))
		bpf_map_update_elem(&ssl_fd, &key, &fd, BPF_NOEXIST);
}


/* The fd of a finished call: seen inside it, else cached, else left for pending_bind. */
static __always_inline int resolve_fd(struct stash *st, __u32 tgid)
{
	struct ssl_key key = {.tgid = tgid, .ssl = st->ssl};
	__u64 id = bpf_get_current_pid_tgid();
	__s32 *cached = bpf_map_lookup_elem(&ssl_fd, &key);

	if (st->fd >= 0) {
		if (cached && *cached == st->fd)
			return st->fd; /* the steady state: no socket walk, no map update */
		if (fd_sock(st->fd)) {
			bpf_map_update_elem(&ssl_fd, &key, &st->fd, BPF_ANY);
			return st->fd;
		}
	}
	if (cached)
		return *cached;
	bpf_map_update_elem(&pending_bind, &id, &st->ssl, BPF_ANY);
	return -1;
}

/* --- data calls ----------------------------------------------------------------------- */

/* NSS: only PRFileDesc's of the SSL layer (a layered descriptor, identity != NSPR's 0). */
static __always_inline bool nss_is_ssl_fd(__u64 prfd)
{
	__u64 methods = 0;
	__s32 file_type = 0, identity = 0;

	bpf_probe_read_user(&methods, sizeof(methods), (void *)prfd);
	bpf_probe_read_user(&identity, sizeof(identity), (void *)(prfd + 40));
	if (!methods)
		return false;
	bpf_probe_read_user(&file_type, sizeof(file_type), (void *)methods);
	return file_type == PR_DESC_LAYERED && identity != 0;
}

/* OpenSSL 3.5+ QUIC: is the object of this call a QUIC connection or stream (3.2+ libraries only)? */
static __always_inline bool quic_object(struct stash *st)
{
	__u32 type = 0;

	if (!(st->cookie & CT_COOKIE_SPLIT) || bpf_probe_read_user(&type, sizeof(type), (void *)st->ssl))
		return false;
	return type == CT_QUIC_CONNECTION || type == CT_QUIC_XSO;
}

SEC("uprobe")
int BPF_KPROBE(tls_data_enter, void *ssl, void *buf, __u64 num, void *count_ptr)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 cookie = bpf_get_attach_cookie(ctx);
	__u32 func = cookie & 0xff;
	struct stash st = {.ssl = (__u64)ssl, .buf = (__u64)buf, .fd = -1, .cookie = cookie};
	char comm[CT_COMM_LEN];

	if (func == F_SSL_WRITE_EX2) /* (ssl, buf, num, uint64_t flags, size_t *written) */
		st.count_ptr = PT_REGS_PARM5(ctx);
	else if (func_has_count_ptr(func))
		st.count_ptr = (__u64)count_ptr;
	if (func == F_PR_WRITEV) /* (fd, PRIOVec *iov, PRInt32 iov_size, timeout) */
		st.count_ptr = num;
	if (func_lib(func) == CT_LIB_NSS && !nss_is_ssl_fd((__u64)ssl))
		return 0;
	/* A hooked function that calls another one with the same arguments (OpenSSL 3.3+:
	 * SSL_write_ex -> SSL_write_ex2, a tail jump in Debian's 3.5) is one call: the outer
	 * stash is kept, and the first of the two returns emits it, the second finds nothing.
	 * SSL_write_ex's size_t *written is SSL_write_ex2's 5th argument, so it is the same pointer. */
	struct stash *outer = bpf_map_lookup_elem(&data_stash, &id);
	if (outer && outer->ssl == st.ssl && outer->buf == st.buf && outer->count_ptr == st.count_ptr)
		return 0;
	/* A QUIC object's call makes calls of its own (OpenSSL 3.5 calls SSL_read on the connection's
	 * inner TLS object): they are skipped, and their returns leave the outer call's stash alone. */
	if (outer && outer->nested < 255 && quic_object(outer)) {
		outer->nested++;
		return 0;
	}
	bpf_get_current_comm(comm, sizeof(comm));
	st.filtered = !ct_process_wanted(id >> 32, (__u32)bpf_get_current_uid_gid(), comm);
	bpf_map_update_elem(&data_stash, &id, &st, BPF_ANY);
	return 0;
}

struct chunk_ctx {
	__u64 ssl;
	__u64 buf;
	__u32 func;
	__u32 lib;
	__u64 length;
	__u64 captured;
	__u64 base;    /* offset of the current buffer in the call (PR_Writev segments) */
	__u64 seg_len; /* bytes to copy from the current buffer */
	__s32 fd;
	__u8 truncated;
	struct conn c;
	__s64 stream_id;
};

static long emit_chunk(__u32 index, struct chunk_ctx *cc)
{
	__u32 zero = 0;
	struct tls_data_rec *rec = bpf_map_lookup_elem(&data_scratch, &zero);
	__u64 offset = (__u64)index * CT_TLS_CHUNK;
	__u32 n;

	if (!rec || offset >= cc->seg_len)
		return 1;
	n = cc->seg_len - offset > CT_TLS_CHUNK ? CT_TLS_CHUNK : cc->seg_len - offset;
	barrier_var(n);
	if (n > CT_TLS_CHUNK)
		return 1;
	ct_fill_header(&rec->h, CT_EV_TLS_DATA);
	rec->ssl = cc->ssl;
	rec->length = cc->length;
	rec->offset = cc->base + offset;
	rec->chunk_len = n;
	rec->fd = cc->fd;
	rec->lib = cc->lib;
	rec->func = cc->func;
	rec->truncated = cc->truncated;
	rec->c = cc->c;
	rec->pad3 = 0;
	rec->stream_id = cc->stream_id;
	ct_count(CT_CNT_SEEN);
	if (bpf_probe_read_user(rec->data, n, (void *)(cc->buf + offset)))
		n = 0; /* unreadable (paged out): the record still says how long the call was */
	rec->chunk_len = n;
	barrier_var(n);
	if (n > CT_TLS_CHUNK)
		return 1;
	tls_output(rec, offsetof(struct tls_data_rec, data) + n);
	return 0;
}

/* PR_Writev: the segments one after the other, offsets counted across the call. */
#define CT_MAX_IOV 8
static __always_inline void emit_iovec(struct chunk_ctx *cc, __u64 iov_count)
{
	struct { __u64 base; __s32 len; __s32 pad; } iov;

	for (int i = 0; i < CT_MAX_IOV; i++) {
		if (i >= iov_count || cc->base >= cc->captured)
			return;
		if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(cc->buf + i * 16)))
			return;
		if (iov.len <= 0)
			continue;
		__u64 seg_buf = iov.base, len = iov.len;
		struct chunk_ctx seg = *cc;
		seg.buf = seg_buf;
		seg.seg_len = cc->captured - cc->base < len ? cc->captured - cc->base : len;
		bpf_loop((seg.seg_len + CT_TLS_CHUNK - 1) / CT_TLS_CHUNK, emit_chunk, &seg, 0);
		cc->base += len;
	}
}

/* The TLS object inside an OpenSSL 3.5 QUIC connection: type 0, its user_ssl (0x40, see ossl_fields)
 * is the connection (type 0x80). Its handshake is the connection's, run from calls that are not
 * hooked (SSL_accept_connection, the QUIC event loop). */
static __always_inline bool quic_inner(struct stash *st)
{
	struct { __s32 type; __s32 pad; __u64 ptr[8]; } head = {};  /* the first 0x48 bytes */
	__u32 type = 0;

	if (!(st->cookie & CT_COOKIE_SPLIT) || (st->cookie >> CT_COOKIE_QUIC_SHIFT) == 0 ||
	    bpf_probe_read_user(&head, sizeof(head), (void *)st->ssl) || head.type != 0 || head.ptr[7] == st->ssl)
		return false;
	return !bpf_probe_read_user(&type, sizeof(type), (void *)head.ptr[7]) && type == CT_QUIC_CONNECTION;
}

static __always_inline __u64 read_ptr(__u64 addr)
{
	__u64 v = 0;

	if (addr)
		bpf_probe_read_user(&v, sizeof(v), (void *)addr);
	return v;
}

/* Up to two pointer hops from base, then the offset. */
static __always_inline __u64 quic_path(__u64 base, __u32 hops, __u32 ptr0, __u32 ptr1, __u32 off)
{
	if (hops > 0)
		base = read_ptr(base + ptr0);
	if (hops > 1 && base)
		base = read_ptr(base + ptr1);
	return base ? base + off : 0;
}

/* The object whose secrets tls_keys_read reads: for an OpenSSL 3.5+ QUIC connection or stream, the
 * connection's inner TLS object (the handshake runs there; same layout as the build's plain TLS
 * objects), found at the calibrated offset and checked (type 0, its user_ssl the connection); 0 when
 * that cannot be had (no keys rather than a read of the wrong object), and for the other QUIC objects
 * (listener, domain). A TLS object (type 0), or any object of a library before 3.2: itself. */
static __always_inline __u64 keys_object(__u64 ssl, __u32 cookie)
{
	struct { __s32 type; __s32 pad; __u64 ptr[8]; } head = {};  /* the first 0x48 bytes */
	__u32 type = 0;

	if (!(cookie & CT_COOKIE_SPLIT) || bpf_probe_read_user(&type, sizeof(type), (void *)ssl) || type == 0)
		return ssl;
	if (type != CT_QUIC_CONNECTION && type != CT_QUIC_XSO)
		return 0; /* a QUIC listener or domain: no secrets of its own */
	__u32 slot = (cookie >> CT_COOKIE_QUIC_SHIFT) & (CT_QUIC_SLOTS - 1);
	struct quic_layout *ql = slot ? bpf_map_lookup_elem(&quic_layouts, &slot) : NULL;
	if (!ql || !ql->tls)
		return 0;
	__u64 qc = type == CT_QUIC_XSO ? read_ptr(ssl + ql->xso_conn) : ssl;
	__u64 inner = qc ? read_ptr(qc + ql->tls) : 0;
	if (!inner || bpf_probe_read_user(&head, sizeof(head), (void *)inner) || head.type != 0 ||
	    (head.ptr[7] != qc && head.ptr[6] != qc))
		return 0;
	return inner;
}

/* A QUIC object's stream id, the UDP fd of its connection and the 4-tuple: the local end from the
 * socket, the remote from the connection's peer address (the server's socket is unconnected).
 * Without a learned layout all of it is unknown (fd: the calls' own syscalls, as for TCP).
 * Returns the connection object (the object itself when unknown). */
static __always_inline __u64 quic_data(struct stash *st, __s32 *fdp, struct conn *c, __s64 *stream_id,
					__u32 tgid)
{
	__u32 slot = (st->cookie >> CT_COOKIE_QUIC_SHIFT) & (CT_QUIC_SLOTS - 1);
	struct quic_layout *ql = slot ? bpf_map_lookup_elem(&quic_layouts, &slot) : NULL;
	struct { __u16 family; __u16 port; __u32 flow; __u8 addr6[16]; } sa = {};
	__u64 qc = st->ssl, xso = st->ssl, stream, bio;
	__u32 type = 0;
	__s32 fd = -1;

	*stream_id = -1;
	c->family = 0;
	if (!ql || !ql->xso_stream) {
		*fdp = resolve_fd(st, tgid);
		return st->ssl;
	}
	bpf_probe_read_user(&type, sizeof(type), (void *)st->ssl);
	if (type == CT_QUIC_XSO)
		qc = read_ptr(xso + ql->xso_conn);
	else
		xso = read_ptr(qc + ql->qc_default_xso);
	stream = xso ? read_ptr(xso + ql->xso_stream) : 0;
	if (stream)
		bpf_probe_read_user(stream_id, sizeof(*stream_id), (void *)(stream + ql->stream_id));
	bio = read_ptr(quic_path(qc, ql->bio_hops, ql->bio_ptr0, ql->bio_ptr1, ql->bio));
	if (!bio || bpf_probe_read_user(&fd, sizeof(fd), (void *)(bio + ql->bio_num)) || !fd_sock(fd))
		fd = -1;
	*fdp = fd;
	if (fd < 0)
		return qc;
	fill_conn(c, fd);
	__u64 peer = quic_path(qc, ql->peer_hops, ql->peer_ptr0, ql->peer_ptr1, ql->peer);
	if (!peer || bpf_probe_read_user(&sa, sizeof(sa), (void *)peer) || sa.family != c->family) {
		c->family = 0; /* the peer is not known: no half-known 4-tuple */
		return qc;
	}
	c->rport = bpf_ntohs(sa.port);
	__builtin_memset(c->raddr, 0, 16);
	if (sa.family == AF_INET)
		__builtin_memcpy(c->raddr, &sa.flow, 4); /* sockaddr_in: the address follows the port */
	else
		__builtin_memcpy(c->raddr, sa.addr6, 16);
	return qc;
}

/* A session whose handshake we did not see end (NSS, node's implicit handshakes inside
 * SSL_read/SSL_write, sessions older than the tool) is announced at its first data call. */
static __always_inline void announce_session(struct stash *st, __u32 tgid, int fd, struct conn *c);
static __always_inline void emit_handshake(struct stash *st, __u32 func, int fd, struct conn *c, int result,
					   __u8 ok, __u8 role, __u32 version);

SEC("uretprobe")
int BPF_KRETPROBE(tls_data_return, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32, zero = 0;
	struct stash *stp = bpf_map_lookup_elem(&data_stash, &id);
	struct stash st;
	struct chunk_ctx cc = {};
	__u32 func, lib;

	if (!stp)
		return 0;
	if (stp->nested) { /* the return of a call inside a QUIC object's call */
		stp->nested--;
		return 0;
	}
	st = *stp;
	bpf_map_delete_elem(&data_stash, &id);
	func = st.cookie & 0xff;
	lib = cookie_lib(st.cookie);
	if (st.filtered) {
		if (lib == CT_LIB_GNUTLS ? ret > 0 : (int)ret > 0) {
			ct_count(CT_CNT_SEEN);
			ct_count(CT_CNT_KFILTERED);
		}
		return 0;
	}
	bool quic = quic_object(&st);
	tls_keys_on_return(ctx, quic ? keys_object(st.ssl, st.cookie) : st.ssl, lib);

	struct tls_config *cfg = bpf_map_lookup_elem(&tls_config, &zero);
	if (!cfg || !cfg->capture_data)
		return 0;
	/* Every call, also a failed one (a handshake in progress), learns the fd: node's calls do
	 * no I/O themselves, the socket write that follows binds the SSL* to its fd. A QUIC
	 * object's fd comes from its connection (quic_data), for successful calls only. */
	if (!quic)
		cc.fd = resolve_fd(&st, tgid);
	if (func_has_count_ptr(func)) {
		if ((int)ret != 1 || !st.count_ptr)
			return 0;
		bpf_probe_read_user(&cc.length, sizeof(cc.length), (void *)st.count_ptr);
	} else if (lib == CT_LIB_GNUTLS) {
		if (ret <= 0)
			return 0;
		cc.length = ret;
	} else {
		if ((int)ret <= 0)
			return 0;
		cc.length = (__u32)(int)ret;
	}
	if (!cc.length)
		return 0;
	ct_note_current_image(CT_CNT_CTRL_DROPPED);
	cc.ssl = st.ssl;
	cc.buf = st.buf;
	cc.func = func;
	cc.lib = lib;
	struct stash session = st; /* a QUIC stream's session is its connection */
	if (quic) {
		session.ssl = quic_data(&st, &cc.fd, &cc.c, &cc.stream_id, tgid);
	} else {
		cc.stream_id = -1;
		fill_conn(&cc.c, cc.fd);
	}
	cc.captured = cc.length;
	if (cc.captured > cfg->max_payload) {
		cc.captured = cfg->max_payload;
		cc.truncated = 1;
	}
	announce_session(&session, tgid, cc.fd, &cc.c);
	if (cc.captured == 0) { /* max_payload 0: metadata only */
		cc.captured = 0;
		struct tls_data_rec *rec = bpf_map_lookup_elem(&data_scratch, &zero);
		if (!rec)
			return 0;
		ct_fill_header(&rec->h, CT_EV_TLS_DATA);
		rec->ssl = st.ssl;
		rec->length = cc.length;
		rec->offset = 0;
		rec->chunk_len = 0;
		rec->fd = cc.fd;
		rec->lib = lib;
		rec->func = func;
		rec->truncated = 1;
		rec->c = cc.c;
		rec->pad3 = 0;
		rec->stream_id = cc.stream_id;
		ct_count(CT_CNT_SEEN);
		tls_output(rec, offsetof(struct tls_data_rec, data));
		return 0;
	}
	if (func == F_PR_WRITEV) {
		emit_iovec(&cc, st.count_ptr);
		return 0;
	}
	cc.seg_len = cc.captured;
	__u32 chunks = (cc.captured + CT_TLS_CHUNK - 1) / CT_TLS_CHUNK;
	if (chunks > CT_TLS_MAX_CHUNKS)
		chunks = CT_TLS_MAX_CHUNKS;
	bpf_loop(chunks, emit_chunk, &cc, 0);
	return 0;
}

#include "go_tls.h"

/* --- handshakes ------------------------------------------------------------------------- */

struct ossl_fields {
	__s32 version;
	__s32 rwstate;
	__s32 server;
};

/* version, rwstate and server of an OpenSSL SSL object; false when its layout is not known.
 * 1.1.1-3.1 (CT_COOKIE_LAYOUT): struct ssl_st {int version; method; rbio; wbio; bbio; int rwstate
 * (40); handshake_func; int server (56)}.
 * 3.2+ (CT_COOKIE_SPLIT): the SSL* of a TLS connection is a struct ssl_connection_st {struct ssl_st
 * (int type at 0: 0 for TLS, QUIC objects have others); SSL *user_ssl; int version; rbio; wbio;
 * bbio; int rwstate (version+32); handshake_func; int server (version+48)} (openssl
 * ssl/ssl_local.h). The ssl_st header is 0x38 bytes in 3.2-3.4 and 0x40 in 3.5-3.6, so nothing is
 * assumed: an object counts as a plain TLS connection only when type is 0 and user_ssl at one of
 * those two places points back to the object itself (measured on Debian 13's 3.5.9: user_ssl
 * 0x40, version 0x48, rwstate 0x68, server 0x78). Anything else: unknown (role/version null). */
static __always_inline bool ossl_fields(__u64 ssl, __u32 cookie, struct ossl_fields *f)
{
	__u64 base = 0;

	if (cookie & CT_COOKIE_LAYOUT) {
		bpf_probe_read_user(&f->version, sizeof(f->version), (void *)ssl);
		bpf_probe_read_user(&f->rwstate, sizeof(f->rwstate), (void *)(ssl + 40));
		bpf_probe_read_user(&f->server, sizeof(f->server), (void *)(ssl + 56));
		return true;
	}
	if (!(cookie & CT_COOKIE_SPLIT))
		return false;
	struct { __s32 type; __s32 pad; __u64 ptr[9]; } head = {};  /* the first 0x48 bytes */
	if (bpf_probe_read_user(&head, sizeof(head), (void *)ssl) || head.type != 0)
		return false;
	if (head.ptr[7] == ssl)       /* user_ssl at 0x40 (3.5+) */
		base = ssl + 0x48;
	else if (head.ptr[6] == ssl)  /* user_ssl at 0x38 (3.2-3.4) */
		base = ssl + 0x40;
	else
		return false;
	if (bpf_probe_read_user(&f->version, sizeof(f->version), (void *)base) ||
	    bpf_probe_read_user(&f->rwstate, sizeof(f->rwstate), (void *)(base + 32)) ||
	    bpf_probe_read_user(&f->server, sizeof(f->server), (void *)(base + 48)))
		return false;
	return true;
}

static __always_inline void emit_handshake(struct stash *st, __u32 func, int fd, struct conn *c, int result,
					   __u8 ok, __u8 role, __u32 version)
{
	struct tls_hs_rec rec = {};

	ct_fill_header(&rec.h, CT_EV_TLS_HANDSHAKE);
	rec.ssl = st->ssl;
	rec.fd = fd;
	rec.result = result;
	rec.lib = cookie_lib(st->cookie);
	rec.func = func;
	rec.role = role;
	rec.ok = ok;
	rec.version = version;
	rec.c = *c;
	ct_count(CT_CNT_SEEN);
	tls_output(&rec, sizeof(rec));
}

/* SECItem {SECItemType type; unsigned char *data; unsigned int len}: (data, len); false if unreadable */
static __always_inline bool read_secitem(__u64 addr, __u64 *data, __u32 *len)
{
	return !bpf_probe_read_user(data, sizeof(*data), (void *)(addr + 8)) &&
	       !bpf_probe_read_user(len, sizeof(*len), (void *)(addr + 16));
}

/* NSS: the ALPN and peer certificate of the connection behind this descriptor, read from its
 * sslSocket while the process is certainly alive (a short-lived client may be gone before user
 * space could read it). The SSL layer is found down the descriptor's stack (prio.h: secret at 8,
 * lower at 16): the layer whose secret's fd field points back at it. */
static __always_inline void nss_peer_facts(struct stash *st)
{
	__u32 slot = (st->cookie >> CT_COOKIE_NSS_SHIFT) & (CT_NSS_SLOTS - 1), zero = 0;
	struct nss_layout *lay;
	struct tls_peer_rec *rec;
	__u64 layer = st->ssl, ss = 0, back = 0, cert = 0, data = 0;
	__u32 len = 0;

	if (!slot || !(lay = bpf_map_lookup_elem(&nss_layouts, &slot)))
		return;
	for (int i = 0; i < 4 && layer; i++) {
		if (bpf_probe_read_user(&ss, sizeof(ss), (void *)(layer + 8)))
			return;
		if (ss && !bpf_probe_read_user(&back, sizeof(back), (void *)(ss + lay->fd)) && back == layer)
			break;
		ss = 0;
		if (bpf_probe_read_user(&layer, sizeof(layer), (void *)(layer + 16)))
			return;
	}
	if (!ss || !(rec = bpf_map_lookup_elem(&peer_scratch, &zero)))
		return;
	ct_fill_header(&rec->h, CT_EV_TLS_PEER);
	rec->ssl = st->ssl;
	rec->alpn_len = 0;
	rec->cert_len = 0;
	if (read_secitem(ss + lay->next_proto, &data, &len) && data && len && len < CT_PEER_ALPN_MAX) {
		barrier_var(len);
		len &= CT_PEER_ALPN_MAX - 1;
		if (!bpf_probe_read_user(rec->alpn, len, (void *)data))
			rec->alpn_len = len;
	}
	if (!bpf_probe_read_user(&cert, sizeof(cert), (void *)(ss + lay->peer_cert)) && cert &&
	    read_secitem(cert + lay->cert_der, &data, &len) && data && len) {
		rec->cert_len = len; /* too long to copy: the length alone says so */
		if (len < CT_PEER_CERT_MAX) {
			barrier_var(len); /* the mask below is what the verifier sees (len is below it already) */
			len &= CT_PEER_CERT_MAX - 1;
			if (bpf_probe_read_user(rec->cert, len, (void *)data))
				rec->cert_len = 0;
		}
	}
	__u32 size = rec->cert_len;
	if (size >= CT_PEER_CERT_MAX)
		size = 0;
	barrier_var(size);
	size &= CT_PEER_CERT_MAX - 1;
	/* a control record (no event of its own, outside the event accounting), as process records */
	if (bpf_ringbuf_output(&events, rec, offsetof(struct tls_peer_rec, cert) + size, BPF_RB_NO_WAKEUP))
		ct_count(CT_CNT_CTRL_DROPPED);
}

static __always_inline void announce_session(struct stash *st, __u32 tgid, int fd, struct conn *c)
{
	struct ssl_key key = {.tgid = tgid, .ssl = st->ssl};
	struct ossl_fields of = {};
	__u32 version = 0;
	__u8 one = 1, role = 0;

	if (bpf_map_lookup_elem(&sessions, &key) || bpf_map_update_elem(&sessions, &key, &one, BPF_NOEXIST))
		return; /* already announced */
	if (cookie_lib(st->cookie) == CT_LIB_OPENSSL && ossl_fields(st->ssl, st->cookie, &of)) {
		version = of.version;
		role = of.server ? 2 : 1;
	} else if (cookie_lib(st->cookie) == CT_LIB_GNUTLS) {
		__u32 entity = 0;
		bpf_probe_read_user(&entity, sizeof(entity), (void *)st->ssl);
		role = entity == 1 ? 2 : entity == 2 ? 1 : 0;
	} else if (cookie_lib(st->cookie) == CT_LIB_NSS) {
		nss_peer_facts(st);
	}
	emit_handshake(st, st->cookie & 0xff, fd, c, 1, 1, role, version);
}

SEC("uprobe")
int BPF_KPROBE(tls_hs_enter, void *ssl)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash st = {.ssl = (__u64)ssl, .fd = -1, .cookie = bpf_get_attach_cookie(ctx)};
	char comm[CT_COMM_LEN];

	struct stash *outer = bpf_map_lookup_elem(&hs_stash, &id);

	/* A QUIC connection's handshake runs its inner TLS object's (SSL_do_handshake): skipped. */
	if (outer && outer->nested < 255 && quic_object(outer)) {
		outer->nested++;
		return 0;
	}
	if (!outer && quic_inner(&st))
		return 0;
	bpf_get_current_comm(comm, sizeof(comm));
	st.filtered = !ct_process_wanted(id >> 32, (__u32)bpf_get_current_uid_gid(), comm);
	/* SSL_connect/SSL_accept call SSL_do_handshake: keep the outer call, it knows the role. */
	bpf_map_update_elem(&hs_stash, &id, &st, BPF_NOEXIST);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(tls_hs_return, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct stash *stp = bpf_map_lookup_elem(&hs_stash, &id);
	struct stash st;
	struct conn c = {};
	__u32 func, version = 0;
	__u8 role = 0, ok;
	int result = (int)ret, fd;

	if (!stp)
		return 0;
	if (stp->nested) {
		stp->nested--;
		return 0;
	}
	st = *stp;
	bpf_map_delete_elem(&hs_stash, &id);
	func = st.cookie & 0xff;
	if (st.filtered) {
		ct_count(CT_CNT_SEEN);
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	tls_keys_on_return(ctx, keys_object(st.ssl, st.cookie), cookie_lib(st.cookie));

	if (func == F_GNUTLS_HANDSHAKE) {
		/* 0 done; GNUTLS_E_AGAIN (-28) / E_INTERRUPTED (-52): not finished yet */
		if (result == -28 || result == -52)
			return 0;
		ok = result == 0;
		__u32 entity = 0; /* session->security_parameters.entity: 1 server, 2 client */
		bpf_probe_read_user(&entity, sizeof(entity), (void *)st.ssl);
		role = entity == 1 ? 2 : entity == 2 ? 1 : 0;
	} else {
		/* 1 done, 0 failed; < 0 is "want read/write" (non-blocking) or a failure:
		 * with the known layout ssl->rwstate (40) says which (1 = SSL_NOTHING: failure). */
		struct ossl_fields of = {};
		bool known = ossl_fields(st.ssl, st.cookie, &of);
		if (result < 0 && (!known || of.rwstate != 1))
			return 0;
		ok = result == 1;
		if (func == F_SSL_CONNECT)
			role = 1;
		else if (func == F_SSL_ACCEPT)
			role = 2;
		if (known) {
			if (!role)
				role = of.server ? 2 : 1;
			if (ok)
				version = of.version;
		}
	}
	if (quic_object(&st)) {
		__s64 stream_id;
		quic_data(&st, &fd, &c, &stream_id, tgid);
	} else {
		fd = resolve_fd(&st, tgid);
		fill_conn(&c, fd);
	}
	ct_note_current_image(CT_CNT_CTRL_DROPPED);
	if (ok) {
		struct ssl_key key = {.tgid = tgid, .ssl = st.ssl};
		__u8 one = 1;
		bpf_map_update_elem(&sessions, &key, &one, BPF_ANY);
	}
	emit_handshake(&st, func, fd, &c, result, ok, role, version);
	return 0;
}

static __always_inline void emit_object(__u64 ssl, __u32 slot, __u32 event)
{
	struct ct_tls_obj_rec rec = {};

	ct_fill_header(&rec.h, CT_EV_TLS_OBJECT);
	rec.ssl = ssl;
	rec.slot = slot;
	rec.event = event;
	if (bpf_ringbuf_output(&events, &rec, sizeof(rec), BPF_RB_NO_WAKEUP))
		ct_count(CT_CNT_CTRL_DROPPED);
}

/* SSL_free: the object is intact here, so its secrets are read one last time (a session shorter
 * than user space's polling, or never polled); then its fd is forgotten (the address is reused by
 * the next connection). */
SEC("uprobe")
int BPF_KPROBE(tls_free, void *ssl)
{
	struct ssl_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .ssl = (__u64)ssl};
	struct ct_keys_done_key pkey = {.ssl = (__u64)ssl, .tgid = key.tgid};
	struct ct_keys_pending_val *pv = bpf_map_lookup_elem(&keys_pending, &pkey);
	int status = tls_keys_on_return(ctx, keys_object((__u64)ssl, bpf_get_attach_cookie(ctx)), CT_LIB_OPENSSL);

	if (pv) {
		emit_object((__u64)ssl, pv->slot, status == CT_KEYS_INCOMPLETE ? CT_OBJ_FREE_INCOMPLETE : CT_OBJ_FREE);
		bpf_map_delete_elem(&keys_pending, &pkey);
	}
	bpf_map_delete_elem(&ssl_fd, &key);
	bpf_map_delete_elem(&sessions, &key);
	return 0;
}

/* NSPR's PR_Close: an NSS connection's descriptor is freed, and the next connection's may get its
 * address: its fd and its announcement are forgotten (as SSL_free does), so that connection gets a
 * tls_handshake record (and its ALPN and certificate) of its own. Called for every NSPR descriptor:
 * two deletes of keys mostly absent. */
SEC("uprobe")
int BPF_KPROBE(tls_nss_close, void *prfd)
{
	struct ssl_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .ssl = (__u64)prfd};

	bpf_map_delete_elem(&ssl_fd, &key);
	bpf_map_delete_elem(&sessions, &key);
	return 0;
}

/* SSL_new's return (key modes only): the object joins keys_pending and user space is told, so it
 * can read the secrets of handshakes that no hooked function returns from (node: inside SSL_write). */
SEC("uretprobe")
int BPF_KRETPROBE(tls_new_return, long ret)
{
	__u32 cookie = bpf_get_attach_cookie(ctx), slot = CT_TLS_KEYS_SLOT(cookie);
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	/* a QUIC connection's secrets are its inner TLS object's: that one is watched */
	__u64 obj = ret && slot ? keys_object((__u64)ret, cookie) : 0;
	struct ct_keys_done_key pkey = {.ssl = obj, .tgid = tgid};
	struct ct_keys_pending_val val = {.slot = slot, .lib_kind = CT_LIB_OPENSSL};
	char comm[CT_COMM_LEN];
	__u8 one = 1;

	if (!obj)
		return 0;
	bpf_get_current_comm(comm, sizeof(comm));
	if (!ct_process_wanted(tgid, (__u32)bpf_get_current_uid_gid(), comm))
		return 0;
	bpf_map_update_elem(&keys_pending, &pkey, &val, BPF_ANY);
	bpf_map_update_elem(&keys_pending_tgid, &tgid, &one, BPF_ANY);
	emit_object(obj, slot, CT_OBJ_NEW);
	return 0;
}

/* BoringSSL's bssl::ssl_log_secret(ssl, label, Span secret): RDI ssl, RSI label (a C string),
 * RDX/RCX the secret's pointer/length. BoringSSL calls it for every secret, key-log callback or
 * not (the check is inside), so each secret leaves as the line SSLKEYLOGFILE would get: the same
 * record as Go's writeKeyLog (CT_EV_TLS_KEYLINE). client_random is ssl->s3->client_random, at the
 * offsets calibration verified on this build (keys/calibrate_bssl_worker.py), carried in the
 * cookie: CT_BSSL_S3 (bits 0-15) and CT_BSSL_RANDOM (16-31) with CT_BSSL_VALID; without them
 * nothing is sent. */
enum tls_bssl_cookie {
	CT_BSSL_RANDOM_SHIFT = 16,
	CT_BSSL_VALID_SHIFT = 32,
};

SEC("uprobe")
int BPF_KPROBE(bssl_keylog, void *ssl, const char *label, void *secret, __u64 secret_len)
{
	__u64 cookie = bpf_get_attach_cookie(ctx), id = bpf_get_current_pid_tgid(), s3 = 0;
	struct go_keylog_rec rec = {};
	struct ssl_key key = {.tgid = id >> 32, .ssl = (__u64)ssl};
	struct stash *hs;
	__s32 *fd;
	long n;

	if (!(cookie >> CT_BSSL_VALID_SHIFT & 1))
		return 0;
	ct_fill_header(&rec.h, CT_EV_TLS_KEYLINE);
	ct_count(CT_CNT_SEEN);
	if (!ct_process_wanted(rec.h.pid, rec.h.uid, rec.h.comm)) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	rec.conn = (__u64)ssl;
	rec.fd = -1;
	/* the fd: the handshake call in progress has seen it, or an earlier call cached it */
	hs = bpf_map_lookup_elem(&hs_stash, &id);
	if (hs && hs->ssl == (__u64)ssl && hs->fd >= 0 && fd_sock(hs->fd))
		rec.fd = hs->fd;
	else if ((fd = bpf_map_lookup_elem(&ssl_fd, &key)))
		rec.fd = *fd;
	if (rec.fd >= 0)
		fill_conn(&rec.c, rec.fd);
	rec.label_addr = (__u64)label;
	n = bpf_probe_read_user_str(rec.label, sizeof(rec.label), label);
	rec.label_len = n > 0 ? n - 1 : 0;
	if (n <= 0)
		rec.unread |= CT_KEYLINE_LABEL_UNREAD; /* label_len 0: user space reads up to the NUL */
	if (bpf_probe_read_user(&s3, sizeof(s3), (void *)((__u64)ssl + (cookie & 0xffff))) || !s3 ||
	    bpf_probe_read_user(rec.client_random, sizeof(rec.client_random),
				(void *)(s3 + (cookie >> CT_BSSL_RANDOM_SHIFT & 0xffff))))
		return 0;
	rec.random_len = sizeof(rec.client_random);
	rec.secret_len = secret_len;
	if (!secret_len || secret_len > sizeof(rec.secret) ||
	    bpf_probe_read_user(rec.secret, secret_len & 127, secret))
		return 0;
	ct_output(&rec, sizeof(rec));
	return 0;
}

/* --- discovery: new processes and newly mapped TLS libraries ---------------------------- */

static __always_inline void emit_ctrl(__u32 type, const char *name)
{
	struct tls_ctrl_rec rec = {};

	ct_fill_header(&rec.h, type);
	if (!ct_process_wanted(rec.h.pid, rec.h.uid, rec.h.comm))
		return;
	if (name)
		bpf_probe_read_kernel_str(rec.name, sizeof(rec.name), name);
	if (bpf_ringbuf_output(&events, &rec, sizeof(rec), 0))
		ct_count(CT_CNT_CTRL_DROPPED);
}

SEC("tracepoint/sched/sched_process_exec")
int tls_exec(void *ctx)
{
	emit_ctrl(CT_EV_PROCESS_EXEC, NULL);
	return 0;
}

static __always_inline bool has_prefix(const char *s, const char *p, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] != p[i])
			return false;
	return true;
}

/* A Python extension module of the stable ABI (*.abi3.so): the wheels that bundle a TLS stack of
 * their own are built so (curl_cffi: a static BoringSSL), and are mapped by import, long after exec. */
static __always_inline bool abi3_module(const unsigned char *dname)
{
	static const char suffix[8] = ".abi3.so";
	char name[72] = {};
	long n = bpf_probe_read_kernel_str(name, 64, dname);
	__u32 at;

	if (n < 9 || n > 64)
		return false;
	at = (n - 9) & 63; /* the suffix ends before the NUL at n - 1 */
	for (int i = 0; i < 8; i++)
		if (name[at + i] != suffix[i])
			return false;
	return true;
}

/* An executable mapping of a file named libssl*, libgnutls*, libnspr4* or *.abi3.so: the process
 * may have loaded a TLS library (at start or by dlopen); user space re-reads its maps. */
static __always_inline void mmap_seen(__u64 prot, long fd)
{
	char name[16] = {};
	const unsigned char *dname;
	struct file *f;

	if (!(prot & PROT_EXEC) || fd < 0)
		return;
	f = fd_file((int)fd);
	if (!f)
		return;
	dname = BPF_CORE_READ(f, f_path.dentry, d_name.name);
	bpf_probe_read_kernel_str(name, sizeof(name), dname);
	if (has_prefix(name, "libssl", 6) || has_prefix(name, "libgnutls", 9) || has_prefix(name, "libnspr4", 8) ||
	    abi3_module(dname))
		emit_ctrl(CT_EV_LIB_LOAD, (const char *)dname);
}

/* The socket a TLS call talks through: the kernel's socket layer announces each send and receive
 * (sock_sendmsg/sock_recvmsg, whatever the syscall: read, write, send*, recv*, readv, writev) in
 * the calling thread, so the fd is the first argument of the syscall in progress, taken from the
 * thread's saved user registers. Only socket I/O runs these: a syscall tracepoint instead (raw
 * sys_enter, as before) ran on every syscall of the host and put every task on the syscall slow
 * path, ~176 ns a syscall for processes that never touch TLS (bench: dd of one-byte writes).
 * A call made outside a syscall with the socket's fd first (io_uring, splice from a pipe) names
 * some other fd, which resolve_fd() rejects (no socket behind it) or never sees (another thread). */
static __always_inline void sock_io(bool is_write)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());

	note_fd((int)PT_REGS_PARM1_CORE_SYSCALL(regs), is_write);
}

SEC("raw_tp/sock_send_length")
int BPF_PROG(tls_sock_send, struct sock *sk, int ret, int flags)
{
	sock_io(true);
	return 0;
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(tls_sock_recv, struct sock *sk, int ret, int flags)
{
	sock_io(false);
	return 0;
}

/* The syscalls every mode needs: library loads, and the key sweep before a process dies. One perf
 * tracepoint each: no BPF program runs for any other syscall. */
SEC("tp/syscalls/sys_enter_mmap")
int tls_key_mmap(struct trace_event_raw_sys_enter *ctx)
{
	mmap_seen(ctx->args[2], (long)ctx->args[4]);
	return 0;
}

SEC("tp/syscalls/sys_enter_exit_group")
int tls_key_exit_group(struct trace_event_raw_sys_enter *ctx)
{
	tls_keys_sweep();
	return 0;
}

/* close, dup2/dup3 onto an fd: the end of a Go connection's socket (attached with the first Go program) */
SEC("tp/syscalls/sys_enter_close")
int tls_key_close(struct trace_event_raw_sys_enter *ctx)
{
	go_sock_forget((int)ctx->args[0]);
	return 0;
}

SEC("tp/syscalls/sys_enter_dup3")
int tls_key_dup3(struct trace_event_raw_sys_enter *ctx)
{
	go_sock_forget((int)ctx->args[1]);
	return 0;
}

SEC("tp/syscalls/sys_enter_dup2")
int tls_key_dup2(struct trace_event_raw_sys_enter *ctx)
{
	go_sock_forget((int)ctx->args[1]);
	return 0;
}

/* Does nothing: bench/bench_tls.py attaches it where the real probes go, to measure the floor
 * that the uprobe trap alone costs. */
SEC("uprobe")
int tls_empty(void *ctx)
{
	return 0;
}

/* Records and constants user space reads that no map holds: never called, never loaded (and
 * last, so no other function moves), it puts them into the BTF, where
 * tests/unit/test_bpf_layouts.py checks probes/common.py, probes/tls.py and keys/tls_keys.py. */
struct tls_btf_anchor {
	enum ct_event_type type;
	enum ct_counter counters;
	struct tls_hs_rec hs;
	struct tls_ctrl_rec ctrl;
	struct go_keylog_rec go_key;
	enum tls_func func;
	enum tls_lib lib;
	enum tls_cookie cookie;
	enum tls_bssl_cookie bssl_cookie;
	enum tls_counter counter;
	enum tls_keys_const keys;
	enum tls_keys_status keys_status;
	enum tls_obj_event obj_event;
	struct ct_tls_obj_rec obj;
	struct ct_proc_rec proc;
	struct quic_layout quic;
};

static __attribute__((used, noinline)) int tls_btf_anchor(struct tls_btf_anchor *a)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
