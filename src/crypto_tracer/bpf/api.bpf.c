// SPDX-License-Identifier: GPL-2.0
/* crypto-tracer profile: crypto API calls counted in the kernel.
 *
 * Every hooked function bumps one entry of `api_counts`, keyed by
 * (tgid, function id, algorithm): a program doing a million digests costs a million map
 * updates and no ring-buffer record. User space reads the map at the end.
 *
 * The uprobe cookie says what to read (user space has the same table, probes/api.py):
 *   bits  0-15 function id
 *   bits 16-23 argument kind: none, C string, pointer to a NID (EVP_MD / EVP_CIPHER start
 *              with their NID in OpenSSL 1.1 and 3.x; NULL: taken from the context), NID by
 *              value, or a byte count
 *   bits 24-31 argument index (1-6)
 * Return probes: handshakes count only successful SSL_do_handshake returns (1); SSL_read/
 * SSL_write add their return value as bytes, the _ex variants the size_t their 4th argument
 * points to (stashed at entry by pid_tgid). SSL_write_ex2 (3.3+) is hooked too; Debian's 3.5
 * SSL_write_ex tail-jumps into it: a nested entry with the same size_t * is the same call, counted
 * once under the outer function's name.
 * Uprobes are attached per profiled pid, so no other process ever traps here.
 */
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

#define CT_API_ARG_LEN 32

enum ct_arg_kind {
	CT_ARG_NONE = 0,
	CT_ARG_STR = 1,
	CT_ARG_NID_PTR = 2,
	CT_ARG_NID = 3,
	CT_ARG_SIZE = 4,
	/* like CT_ARG_NID_PTR, but a NULL EVP_MD/EVP_CIPHER means "re-initialise the context
	 * with its algorithm" (e.g. a new IV per TLS record): read the algorithm from the
	 * context (argument 1), whose first member points to it in OpenSSL 1.1.1 and 3.x */
	CT_ARG_NID_PTR_OR_CTX = 5,
	/* the key type name of an OpenSSL 3.x EVP_PKEY_CTX (argument 1): `const char *keytype`
	 * at offset 24 (after operation, libctx, propquery); user space uses it for 3.x only */
	CT_ARG_PKEY_CTX_TYPE = 6,
};
#define CT_PKEY_CTX_KEYTYPE_OFF 24

/* Never called, never loaded: puts the enum into the BTF, where tests/unit/test_bpf_layouts.py
 * checks probes/api.py's copy. */
struct api_btf_anchor {
	enum ct_arg_kind kind;
};

static __attribute__((used, noinline)) int api_btf_anchor(struct api_btf_anchor *a)
{
	return 0;
}

struct api_key {
	__u32 tgid;
	__u16 func;
	__u16 kind; /* CT_ARG_STR: arg is a string; CT_ARG_NID*: arg starts with an s32 NID */
	char arg[CT_API_ARG_LEN];
};

struct api_val {
	__u64 count;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct api_key);
	__type(value, struct api_val);
} api_counts SEC(".maps");

/* SSL_read_ex/SSL_write_ex(2): the size_t *out argument and the cookie, from entry to return. */
struct ex_call {
	__u64 out;
	__u64 cookie;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct ex_call);
} ex_stash SEC(".maps");

/* Argument n (1-5). Read with the CORE variant: a direct ctx access at a variable offset
 * (the compiler folds the switch into one) is rejected by the verifier. */
static __always_inline __u64 arg_n(struct pt_regs *ctx, __u32 n)
{
	switch (n) {
	case 1: return PT_REGS_PARM1_CORE(ctx);
	case 2: return PT_REGS_PARM2_CORE(ctx);
	case 3: return PT_REGS_PARM3_CORE(ctx);
	case 4: return PT_REGS_PARM4_CORE(ctx);
	case 5: return PT_REGS_PARM5_CORE(ctx);
	default: return 0;
	}
}

/* Add one call (and bytes) to key; a full map is counted as a drop, never ignored. */
static __always_inline void bump(struct api_key *key, __u64 bytes)
{
	ct_count(CT_CNT_SEEN);
	struct api_val *v = bpf_map_lookup_elem(&api_counts, key);
	if (!v) {
		struct api_val zero = {};
		/* another CPU may insert the same key first (EEXIST): the lookup below finds it */
		bpf_map_update_elem(&api_counts, key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&api_counts, key);
		if (!v) {
			ct_count(CT_CNT_DROPPED);
			return;
		}
	}
	__sync_fetch_and_add(&v->count, 1);
	if (bytes)
		__sync_fetch_and_add(&v->bytes, bytes);
	ct_count(CT_CNT_SUBMITTED);
}

static __always_inline void key_init(struct api_key *key, __u32 func)
{
	key->tgid = bpf_get_current_pid_tgid() >> 32;
	key->func = func;
}

SEC("uprobe")
int api_enter(struct pt_regs *ctx)
{
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u32 kind = (cookie >> 16) & 0xff;
	__u64 arg = arg_n(ctx, (cookie >> 24) & 0xff);
	struct api_key key = {};
	__u64 bytes = 0;
	__s32 nid = 0;

	key_init(&key, cookie & 0xffff);
	switch (kind) {
	case CT_ARG_PKEY_CTX_TYPE:
		if (arg && bpf_probe_read_user(&arg, sizeof(arg), (void *)(arg + CT_PKEY_CTX_KEYTYPE_OFF)))
			arg = 0;
		/* fall through */
	case CT_ARG_STR:
		if (arg && bpf_probe_read_user_str(key.arg, sizeof(key.arg), (void *)arg) > 0)
			key.kind = CT_ARG_STR;
		else
			__builtin_memset(key.arg, 0, sizeof(key.arg));
		break;
	case CT_ARG_NID_PTR_OR_CTX:
		if (!arg) {
			__u64 ctx_ptr = PT_REGS_PARM1_CORE(ctx);
			if (ctx_ptr)
				bpf_probe_read_user(&arg, sizeof(arg), (void *)ctx_ptr);
		}
		/* fall through */
	case CT_ARG_NID_PTR:
		if (arg && bpf_probe_read_user(&nid, sizeof(nid), (void *)arg) == 0) {
			key.kind = CT_ARG_NID;
			__builtin_memcpy(key.arg, &nid, sizeof(nid));
		}
		break;
	case CT_ARG_NID:
		nid = (__s32)arg;
		key.kind = CT_ARG_NID;
		__builtin_memcpy(key.arg, &nid, sizeof(nid));
		break;
	case CT_ARG_SIZE:
		bytes = arg;
		break;
	}
	bump(&key, bytes);
	return 0;
}

/* Return probe counting only successful calls (ret == 1): SSL_do_handshake. */
SEC("uretprobe")
int api_ret_ok(struct pt_regs *ctx)
{
	if ((int)PT_REGS_RC(ctx) != 1)
		return 0;
	struct api_key key = {};
	key_init(&key, bpf_get_attach_cookie(ctx) & 0xffff);
	bump(&key, 0);
	return 0;
}

/* SSL_read / SSL_write: the return value is the byte count when positive. */
SEC("uretprobe")
int api_ret_bytes(struct pt_regs *ctx)
{
	int ret = (int)PT_REGS_RC(ctx);
	if (ret <= 0)
		return 0;
	struct api_key key = {};
	key_init(&key, bpf_get_attach_cookie(ctx) & 0xffff);
	bump(&key, ret);
	return 0;
}

/* SSL_read_ex / SSL_write_ex entry: remember where the byte count will be written. */
SEC("uprobe")
int api_ex_enter(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ex_call call = {.cookie = bpf_get_attach_cookie(ctx)};
	/* size_t *out: argument 4, or the one the cookie names (SSL_write_ex2's is the 5th) */
	call.out = arg_n(ctx, (call.cookie >> 24) & 0xff ? (call.cookie >> 24) & 0xff : 4);
	struct ex_call *outer = bpf_map_lookup_elem(&ex_stash, &id);
	if (outer && outer->out == call.out)
		return 0; /* SSL_write_ex -> SSL_write_ex2: one call */
	bpf_map_update_elem(&ex_stash, &id, &call, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int api_ex_ret(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ex_call *call = bpf_map_lookup_elem(&ex_stash, &id);
	if (!call)
		return 0; /* the outer return of a nested call: counted by the inner one */
	__u64 ptr = call->out, cookie = call->cookie, bytes = 0;
	bpf_map_delete_elem(&ex_stash, &id);
	if ((int)PT_REGS_RC(ctx) != 1 || !ptr || bpf_probe_read_user(&bytes, sizeof(bytes), (void *)ptr))
		return 0;
	struct api_key key = {};
	key_init(&key, cookie & 0xffff);
	bump(&key, bytes);
	return 0;
}

/* --- TCP connections of profiled processes, counted by peer ---------------------------------
 * Client side: the SYN_SENT transition, which runs in the connecting task. Server side: the
 * return of accept()/accept4(), reading the peer from the socket behind the new fd. Both are
 * counted in `peers` for tgids in `profiled` only (user space adds every profiled pid). */

#define CT_AF_INET 2
#define CT_AF_INET6 10
#define CT_TCP_SYN_SENT 2
#define CT_ROLE_CLIENT 1
#define CT_ROLE_SERVER 2

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} profiled SEC(".maps");

struct peer_key {
	__u32 tgid;
	__u8 role;   /* CT_ROLE_CLIENT: port = remote port; CT_ROLE_SERVER: port = our local port */
	__u8 pad;
	__u16 family;
	__u16 port;
	__u16 pad2;
	__u8 addr[16]; /* the remote address */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct peer_key);
	__type(value, __u64);
} peers SEC(".maps");

static __always_inline void count_peer(struct peer_key *k)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(&peers, k);
	if (v)
		__sync_fetch_and_add(v, 1);
	else if (bpf_map_update_elem(&peers, k, &one, BPF_NOEXIST))
		ct_count(CT_CNT_DROPPED);
}

SEC("tp/sock/inet_sock_set_state")
int api_tcp_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->newstate != CT_TCP_SYN_SENT || ctx->protocol != IPPROTO_TCP)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&profiled, &tgid))
		return 0;
	struct peer_key k = {.tgid = tgid, .role = CT_ROLE_CLIENT, .family = ctx->family, .port = ctx->dport};
	/* copied with a helper: the verifier refuses loads through a ctx pointer plus offset */
	if (ctx->family == CT_AF_INET)
		bpf_probe_read_kernel(k.addr, 4, ctx->daddr);
	else
		bpf_probe_read_kernel(k.addr, 16, ctx->daddr_v6);
	count_peer(&k);
	return 0;
}

static __always_inline struct sock *fd_sock(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *f = NULL;
	struct socket *sock;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	if (!f)
		return NULL;
	sock = BPF_CORE_READ(f, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != f) /* not a socket */
		return NULL;
	return BPF_CORE_READ(sock, sk);
}

static __always_inline int on_accept(long ret)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (ret < 0 || !bpf_map_lookup_elem(&profiled, &tgid))
		return 0;
	struct sock *sk = fd_sock((int)ret);
	if (!sk)
		return 0;
	struct peer_key k = {.tgid = tgid, .role = CT_ROLE_SERVER};
	k.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (k.family == CT_AF_INET)
		bpf_core_read(k.addr, 4, &sk->__sk_common.skc_daddr);
	else if (k.family == CT_AF_INET6)
		bpf_core_read(k.addr, 16, &sk->__sk_common.skc_v6_daddr);
	else
		return 0;
	k.port = BPF_CORE_READ(sk, __sk_common.skc_num);
	count_peer(&k);
	return 0;
}

SEC("tp/syscalls/sys_exit_accept4")
int api_accept4_exit(struct trace_event_raw_sys_exit *ctx)
{
	return on_accept(ctx->ret);
}

SEC("tp/syscalls/sys_exit_accept")
int api_accept_exit(struct trace_event_raw_sys_exit *ctx)
{
	return on_accept(ctx->ret);
}
