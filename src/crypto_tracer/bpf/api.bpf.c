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
 *              with their NID in OpenSSL 1.1 and 3.x), NID by value, or a byte count
 *   bits 24-31 argument index (1-6)
 * Return probes: handshakes count only successful SSL_do_handshake returns (1); SSL_read/
 * SSL_write add their return value as bytes, the _ex variants the size_t their 4th argument
 * points to (stashed at entry by pid_tgid).
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
};

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

/* SSL_read_ex/SSL_write_ex: the size_t *out argument, from entry to return. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u64);
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
	case CT_ARG_STR:
		if (arg && bpf_probe_read_user_str(key.arg, sizeof(key.arg), (void *)arg) > 0)
			key.kind = CT_ARG_STR;
		else
			__builtin_memset(key.arg, 0, sizeof(key.arg));
		break;
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
	__u64 out = PT_REGS_PARM4(ctx);
	bpf_map_update_elem(&ex_stash, &id, &out, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int api_ex_ret(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 *out = bpf_map_lookup_elem(&ex_stash, &id);
	if (!out)
		return 0;
	__u64 ptr = *out, bytes = 0;
	bpf_map_delete_elem(&ex_stash, &id);
	if ((int)PT_REGS_RC(ctx) != 1 || !ptr || bpf_probe_read_user(&bytes, sizeof(bytes), (void *)ptr))
		return 0;
	struct api_key key = {};
	key_init(&key, bpf_get_attach_cookie(ctx) & 0xffff);
	bump(&key, bytes);
	return 0;
}
