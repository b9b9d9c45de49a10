/* SPDX-License-Identifier: GPL-2.0 */
/* Shared by every crypto-tracer BPF object: the record header, the kernel-side
 * accounting counters, the process filter and a ring-buffer reserve that counts drops.
 *
 * Accounting (per object, per CPU, summed by user space):
 *   seen = kernel_filtered + dropped + submitted
 * and in user space: submitted = user_filtered + written.
 */
#ifndef CT_COMMON_H
#define CT_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define CT_COMM_LEN 16

/* Every record starts with this header (40 bytes). */
struct ct_header {
	__u64 ts_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC; user space adds the wall-clock offset */
	__u32 type;  /* CT_EV_* */
	__u32 pid;   /* tgid */
	__u32 tid;
	__u32 uid;
	char comm[CT_COMM_LEN];
};

/* Record types, one numbering for all objects. */
enum ct_event_type {
	CT_EV_PROCESS_EXEC = 1,
	CT_EV_PROCESS_EXIT = 2,
	CT_EV_FILE_OPEN = 3,
	CT_EV_LIB_LOAD = 4,
	CT_EV_API_CALL = 5,
	CT_EV_TLS_HANDSHAKE = 6,
	CT_EV_TLS_DATA = 7,
	CT_EV_TLS_KEYS = 8,
	CT_EV_PACKET = 9,
	CT_EV_CONNECT = 10,
	CT_EV_TLS_KEYLINE = 11, /* one key log line (Go's writeKeyLog) */
	CT_EV_TLS_OBJECT = 12,  /* an SSL object created or freed (bpf/tls_keys.h) */
	CT_EV_TLS_PROCESS = 13, /* ppid and exe of a process image with TLS events (tls.bpf.c) */
	CT_EV_TLS_HELLO = 14,   /* a TCP segment carrying TLS hello messages (tls_hello.bpf.c) */
	CT_EV_TLS_PEER = 15,    /* an NSS connection's ALPN and peer certificate (tls.bpf.c) */
};

enum ct_counter {
	CT_CNT_SEEN = 0,
	CT_CNT_KFILTERED = 1,
	CT_CNT_DROPPED = 2,
	CT_CNT_SUBMITTED = 3,
	CT_CNT_MAX = 8,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void ct_count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &which);
	if (v)
		*v += 1;
}

/* The process filter, written by user space into config map slot 0.
 * pid 0 = any; uid (u32)-1 = any; name_len 0 = any (else a case-insensitive substring of comm);
 * use_pid_set: only tgids present in the `pid_set` map (profile --follow-children). */
struct ct_filter {
	__u32 pid;
	__u32 uid;
	__u32 name_len;
	__u32 use_pid_set;
	char name[CT_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_filter);
} filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} pid_set SEC(".maps");

static __always_inline char ct_lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

struct ct_comm_match {
	char comm[CT_COMM_LEN];
	char needle[CT_COMM_LEN];
	__u32 len;
	__u32 found;
};

/* Does the needle match comm at position start? (one bpf_loop step) */
static long ct_comm_match_at(__u32 start, struct ct_comm_match *m)
{
	if (start + m->len > CT_COMM_LEN - 1)
		return 1;
	for (int j = 0; j < CT_COMM_LEN - 1; j++) {
		if (j >= m->len)
			break;
		if (ct_lower(m->comm[(start + j) & (CT_COMM_LEN - 1)]) != m->needle[j])
			return 0;
	}
	m->found = 1;
	return 1;
}

/* Case-insensitive: does comm contain needle[0..len)? The outer loop runs under bpf_loop,
 * so the verifier checks one position, not all of them (shorter load, faster start-up). */
static __always_inline bool ct_comm_contains(const char *comm, const char *needle, __u32 len)
{
	if (len == 0)
		return true;
	if (len > CT_COMM_LEN - 1)
		return false;
	struct ct_comm_match m = {.len = len};
	__builtin_memcpy(m.comm, comm, CT_COMM_LEN);
	__builtin_memcpy(m.needle, needle, CT_COMM_LEN);
	bpf_loop(CT_COMM_LEN - 1, ct_comm_match_at, &m, 0);
	return m.found;
}

/* True when the current task passes the process filter. */
static __always_inline bool ct_process_wanted(__u32 tgid, __u32 uid, const char *comm)
{
	__u32 zero = 0;
	struct ct_filter *f = bpf_map_lookup_elem(&filter, &zero);
	if (!f)
		return true;
	if (f->pid && f->pid != tgid)
		return false;
	if (f->uid != (__u32)-1 && f->uid != uid)
		return false;
	if (f->use_pid_set && !bpf_map_lookup_elem(&pid_set, &tgid))
		return false;
	if (f->name_len && !ct_comm_contains(comm, f->name, f->name_len))
		return false;
	return true;
}

/* Fill a header for the current task. */
/* Path walks (paths.h): here, so a record can size its path area before including paths.h. */
#define CT_PATH_DEPTH 32
#define CT_NAME_MAX 256
#define CT_PATH_BUF 4096 /* bytes of components one walk may write */

static __always_inline void ct_fill_header(struct ct_header *h, __u32 type)
{
	__u64 id = bpf_get_current_pid_tgid();
	h->ts_ns = bpf_ktime_get_ns();
	h->type = type;
	h->pid = id >> 32;
	h->tid = (__u32)id;
	h->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* The ring buffer every object writes to (user space may resize it before load). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

/* Reserve a record; a full ring is counted as a drop, never ignored. */
static __always_inline void *ct_reserve(__u64 size)
{
	void *rec = bpf_ringbuf_reserve(&events, size, 0);
	if (!rec)
		ct_count(CT_CNT_DROPPED);
	return rec;
}

static __always_inline void ct_submit(void *rec)
{
	bpf_ringbuf_submit(rec, 0);
	ct_count(CT_CNT_SUBMITTED);
}

/* Copy a variable-size record from scratch memory; counts a drop on failure. */
static __always_inline int ct_output(void *data, __u64 size)
{
	if (bpf_ringbuf_output(&events, data, size, 0)) {
		ct_count(CT_CNT_DROPPED);
		return -1;
	}
	ct_count(CT_CNT_SUBMITTED);
	return 0;
}

#endif /* CT_COMMON_H */
