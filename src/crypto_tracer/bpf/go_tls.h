/* SPDX-License-Identifier: GPL-2.0 */
/* Go crypto/tls (amd64 register ABI, Go 1.18+), included by tls.bpf.c after its chunk emitter.
 *
 * No uretprobe ever on Go code (the runtime moves goroutine stacks and walks return addresses:
 * a uretprobe's trampoline address crashes it). User space (host/gobin.py) places:
 *   go_write       (*Conn).writeRecordLocked(typ, data) after its stack check: c=RAX, typ=BL,
 *                  data=RCX/RDI; application data (typ 23) is emitted there, once per call.
 *   go_read_enter  (*Conn).Read(b) after its stack check: c=RAX, b=RBX; stashed by (tgid, g).
 *   go_read_ret    every RET of (*Conn).Read: n=RAX; the stash of the same goroutine (R14 is the
 *                  current g: a goroutine that blocked and resumed on another thread keeps it).
 *                  Every record type notes the goroutine's connection for go_keylog (go_conn).
 *   go_keylog      (*Config).writeKeyLog(label, clientRandom, secret) after its stack check:
 *                  label=RBX/RCX, clientRandom=RDI/RSI, secret=R9/R10; called for every secret
 *                  even without a KeyLogWriter (the nil check is inside).
 * "After the stack check": a call that must grow its stack runs morestack and jumps back to the
 * entry, so an entry probe can fire twice for one call; the instruction after the check's jbe
 * fires once.
 *
 * fd: tls.Conn.conn (net.Conn interface, data word at +8) -> *net.TCPConn -> *netFD (+0) ->
 * poll.FD.Sysfd (+16), the same from Go 1.18 to 1.27. It is used only when it names a TCP socket
 * of the calling process (else fd and addresses are unknown, never guessed); the 4-tuple comes
 * from the kernel's socket, cached per (tgid, fd) while the fd holds the same open file (go_sock).
 */
#ifndef CT_GO_TLS_H
#define CT_GO_TLS_H

#define GO_RECORD_APPLICATION_DATA 23
#define IPPROTO_TCP_ 6

struct go_key {
	__u32 tgid;
	__u32 pad;
	__u64 g; /* the goroutine (runtime.g pointer, R14) */
};

struct go_read_stash {
	__u64 conn;
	__u64 buf;
	__u32 cookie;
	__u8 filtered;
};

/* (tgid, goroutine) -> the Read in progress (conn 0: none). LRU: idle goroutines' entries age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_key);
	__type(value, struct go_read_stash);
} go_stash SEC(".maps");

/* (tgid, goroutine) -> the *tls.Conn it last wrote a record of (any type): writeKeyLog, which is
 * given no connection, runs on the goroutine doing that connection's handshake, after its first
 * record (ClientHello, ServerHello) went through writeRecordLocked. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_key);
	__type(value, __u64);
} go_conn SEC(".maps");

/* CT_EV_TLS_KEYLINE: one key log line as Go's writeKeyLog was given it. */
enum ct_keyline_unread {
	CT_KEYLINE_LABEL_UNREAD = 1, /* user space reads it from the process (it never changes) */
	CT_KEYLINE_DATA_UNREAD = 2,  /* client_random or secret: the line is dropped, never guessed */
};

struct go_keylog_rec {
	struct ct_header h;
	__u64 conn;       /* the *tls.Conn of the handshake (0: unknown) */
	__s32 fd;         /* -1: unknown */
	__u32 pad0;
	struct conn c;
	__u32 label_len;  /* as given (only the first CT_GO_LABEL_LEN bytes are copied) */
	__u32 random_len;
	__u32 secret_len;
	__u32 unread;     /* CT_KEYLINE_*_UNREAD: a read failed (a page the process never touched yet) */
	__u64 label_addr; /* the label's address: a constant string, which user space can read later */
	char label[48];
	__u8 client_random[32];
	__u8 secret[64];
};

/* amd64 registers (other architectures: the programs exist but see nothing; gobin refuses them) */
#if defined(__TARGET_ARCH_x86)
#define GO_REG(ctx, r) ((ctx)->r)
#else
#define GO_REG(ctx, r) 0UL
#endif
#define go_reg_g(ctx) GO_REG(ctx, r14)

struct go_sock_key {
	__u32 tgid;
	__s32 fd;
};

/* What makes a cached 4-tuple still this fd's: the same open file of the same program (mm: an
 * exec makes a new one while the old still exists) of the same process (the leader's start time:
 * pids are reused). An explicit close or dup2/dup3 onto the fd deletes the entry (tls_key_close/dup*),
 * so a file freed and reallocated at the same address under the same fd is not mistaken. */
struct go_sock_val {
	__u64 file;
	__u64 mm;
	__u64 start;
	struct conn c;
};

/* (tgid, fd) -> the connected TCP socket's 4-tuple, so that a call costs one fd-table lookup
 * instead of the socket walk and address reads. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_sock_key);
	__type(value, struct go_sock_val);
} go_sock SEC(".maps");

/* fd and 4-tuple of a *tls.Conn (fd -1 and family 0 when unknown). fd: tls.Conn.conn -> netFD ->
 * Sysfd, read per call (the Conn's address is reused after GC); it counts only when it is a TCP
 * socket of the calling process. */
static __always_inline int go_conn_fill(__u64 conn, struct conn *c, bool *fresh)
{
	__u64 tcpconn = 0, netfd = 0;
	__s64 sysfd = -1;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct go_sock_val v = {}, *cached;
	struct socket *sock;
	struct sock *sk;
	struct file *f;

	c->family = 0;
	if (bpf_probe_read_user(&tcpconn, sizeof(tcpconn), (void *)(conn + 8)) || !tcpconn)
		return -1;
	if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)tcpconn) || !netfd)
		return -1;
	if (bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(netfd + 16)) || sysfd < 0 || sysfd > 0x7fffffff)
		return -1;
	f = fd_file((int)sysfd);
	if (!f)
		return -1;
	struct go_sock_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = (__s32)sysfd};
	v.file = (__u64)f;
	v.mm = (__u64)BPF_CORE_READ(task, mm);
	v.start = BPF_CORE_READ(task, group_leader, start_time);
	cached = bpf_map_lookup_elem(&go_sock, &key);
	if (cached && cached->file == v.file && cached->mm == v.mm && cached->start == v.start) {
		*c = cached->c;
		return (int)sysfd;
	}
	sock = BPF_CORE_READ(f, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != f)
		return -1;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP_)
		return -1;
	fill_conn_sk(c, sk);
	if (!c->family)
		return -1;
	if (c->rport && fresh) { /* connected: its 4-tuple stays until close. Only the data path
				  * caches it: a socket cached by go_keylog (plaintext modes hook it too, for
				  * TLS 1.3's handshake facts) would never be announced at its first data call. */
		v.c = *c;
		bpf_map_update_elem(&go_sock, &key, &v, BPF_ANY);
		*fresh = true; /* first sight of this connection's socket */
	}
	return (int)sysfd;
}

/* close(fd), dup2/dup3 onto fd: the cached 4-tuple of (tgid, fd) is no longer the fd's. */
static __always_inline void go_sock_forget(int fd)
{
	struct go_sock_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};

	bpf_map_delete_elem(&go_sock, &key);
}

/* One call's plaintext, chunked like the other libraries' (tls_data_return). */
static __always_inline void go_emit(__u64 conn, __u64 buf, __u64 length, __u32 func)
{
	__u32 zero = 0;
	struct tls_config *cfg = bpf_map_lookup_elem(&tls_config, &zero);
	struct chunk_ctx cc = {};

	if (!cfg || !cfg->capture_data || !length)
		return;
	bool fresh = false;

	ct_note_current_image(CT_CNT_CTRL_DROPPED);
	cc.fd = go_conn_fill(conn, &cc.c, &fresh);
	if (fresh) { /* Go has no hooked handshake: the connection is announced at its first data call
		      * (role and version null here; the hello packets' facts fill them in user space) */
		struct stash st = {.ssl = conn, .cookie = func};
		emit_handshake(&st, func, cc.fd, &cc.c, 1, 1, 0, 0);
	}
	cc.ssl = conn;
	cc.buf = buf;
	cc.func = func;
	cc.lib = CT_LIB_GO;
	cc.length = length;
	cc.captured = length;
	if (cc.captured > cfg->max_payload) {
		cc.captured = cfg->max_payload;
		cc.truncated = 1;
	}
	if (cc.captured == 0) { /* max_payload 0: metadata only */
		struct tls_data_rec *rec = bpf_map_lookup_elem(&data_scratch, &zero);
		if (!rec)
			return;
		ct_fill_header(&rec->h, CT_EV_TLS_DATA);
		rec->ssl = conn;
		rec->length = length;
		rec->offset = 0;
		rec->chunk_len = 0;
		rec->fd = cc.fd;
		rec->lib = CT_LIB_GO;
		rec->func = func;
		rec->truncated = 1;
		rec->c = cc.c;
		ct_count(CT_CNT_SEEN);
		tls_output(rec, offsetof(struct tls_data_rec, data));
		return;
	}
	cc.seg_len = cc.captured;
	__u32 chunks = (cc.captured + CT_TLS_CHUNK - 1) / CT_TLS_CHUNK;
	if (chunks > CT_TLS_MAX_CHUNKS)
		chunks = CT_TLS_MAX_CHUNKS;
	bpf_loop(chunks, emit_chunk, &cc, 0);
}

static __always_inline bool go_wanted(void)
{
	char comm[CT_COMM_LEN];
	__u64 id = bpf_get_current_pid_tgid();

	bpf_get_current_comm(comm, sizeof(comm));
	return ct_process_wanted(id >> 32, (__u32)bpf_get_current_uid_gid(), comm);
}

SEC("uprobe")
int go_write(struct pt_regs *ctx)
{
	__u64 conn = GO_REG(ctx, ax), typ = GO_REG(ctx, bx) & 0xff, buf = GO_REG(ctx, cx), len = GO_REG(ctx, di);
	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = go_reg_g(ctx)};
	__u64 *known = bpf_map_lookup_elem(&go_conn, &key);

	if (!known || *known != conn)
		bpf_map_update_elem(&go_conn, &key, &conn, BPF_ANY);
	__u32 zero = 0;
	struct tls_config *cfg = bpf_map_lookup_elem(&tls_config, &zero);

	if (typ != GO_RECORD_APPLICATION_DATA || !len || len > 0x7fffffff || !cfg || !cfg->capture_data)
		return 0;
	if (!go_wanted()) {
		ct_count(CT_CNT_SEEN);
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	go_emit(conn, buf, len, F_GO_WRITE);
	return 0;
}

/* A goroutine's entry stays in go_stash between its Reads (conn 0: none in progress) and is
 * rewritten in place: a keep-alive connection's reader goroutine makes no map update or delete
 * per call (an LRU update costs ~300 ns). */
SEC("uprobe")
int go_read_enter(struct pt_regs *ctx)
{
	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = go_reg_g(ctx)};
	struct go_read_stash st = {.conn = GO_REG(ctx, ax), .buf = GO_REG(ctx, bx), .cookie = bpf_get_attach_cookie(ctx)};
	struct go_read_stash *stp;

	if (!key.g || !st.conn)
		return 0;
	st.filtered = !go_wanted();
	stp = bpf_map_lookup_elem(&go_stash, &key);
	if (stp)
		*stp = st;
	else
		bpf_map_update_elem(&go_stash, &key, &st, BPF_ANY);
	return 0;
}

SEC("uprobe")
int go_read_ret(struct pt_regs *ctx)
{
	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = go_reg_g(ctx)};
	struct go_read_stash *stp = bpf_map_lookup_elem(&go_stash, &key);
	struct go_read_stash st;
	__s64 n = (__s64)GO_REG(ctx, ax);

	if (!stp || !stp->conn)
		return 0;
	st = *stp;
	stp->conn = 0; /* consumed */
	if (n <= 0 || n > 0x7fffffff)
		return 0;
	if (st.filtered) {
		ct_count(CT_CNT_SEEN);
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	go_emit(st.conn, st.buf, n, F_GO_READ);
	return 0;
}

SEC("uprobe")
int go_keylog(struct pt_regs *ctx)
{
	struct go_keylog_rec rec = {};
	__u64 label = GO_REG(ctx, bx), random = GO_REG(ctx, di), secret = GO_REG(ctx, r9);

	struct go_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .g = go_reg_g(ctx)};
	__u64 *conn = bpf_map_lookup_elem(&go_conn, &key);

	ct_fill_header(&rec.h, CT_EV_TLS_KEYLINE);
	rec.fd = -1;
	if (conn) {
		rec.conn = *conn;
		rec.fd = go_conn_fill(rec.conn, &rec.c, NULL);
	}
	rec.label_len = GO_REG(ctx, cx);
	rec.random_len = GO_REG(ctx, si);
	rec.secret_len = GO_REG(ctx, r10);
	ct_count(CT_CNT_SEEN);
	if (!ct_process_wanted(rec.h.pid, rec.h.uid, rec.h.comm)) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	rec.label_addr = label;
	if (bpf_probe_read_user(rec.label, rec.label_len < sizeof(rec.label) ? rec.label_len & 63 : sizeof(rec.label),
				(void *)label))
		rec.unread |= CT_KEYLINE_LABEL_UNREAD;
	if (bpf_probe_read_user(rec.client_random, sizeof(rec.client_random), (void *)random) ||
	    bpf_probe_read_user(rec.secret, rec.secret_len < sizeof(rec.secret) ? rec.secret_len & 127 : sizeof(rec.secret),
				(void *)secret))
		rec.unread |= CT_KEYLINE_DATA_UNREAD;
	ct_output(&rec, sizeof(rec));
	return 0;
}

#endif
