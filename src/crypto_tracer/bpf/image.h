/* SPDX-License-Identifier: GPL-2.0 */
/* A process image announced once into the object's ring: an event's process may be gone before
 * user space reads /proc (a short curl run), so the first event of each image is preceded by one
 * CT_EV_TLS_PROCESS record with its ppid, uid, exe (in the process's own view, as monitor's
 * events) and mount namespace and the identity of the image: (tgid, start_ns, exec_id) differs for a reused pid
 * (another start) and after an exec (another exec_id), so a stale exe is never joined.
 * Used by tls.bpf.c (TLS events) and tc_capture.bpf.c (socket owners, tls -m handshake);
 * probes/common.py decodes it. The includer must not include paths.h itself.
 */
#ifndef CT_IMAGE_H
#define CT_IMAGE_H

#include "common.h"

struct ct_proc_rec {
	struct ct_header h;
	__u32 ppid;
	__u32 exe_len;  /* bytes of the exe's components in data (leaf first, NUL-separated); 0: none */
	__u64 start_ns; /* the process's start_boottime (/proc/PID/stat's starttime, in ns) */
	__u64 exec_id;  /* task->self_exec_id: incremented at each exec, shared by the image's threads */
	__u32 mnt_ns;   /* its mount namespace's inode (a container's differs from the host's) */
	__u32 pad;
	char data[CT_PATH_BUF + CT_NAME_MAX];
};

struct ct_image_key {
	__u32 tgid;
	__u32 pad;
	__u64 start_ns;
	__u64 exec_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_proc_rec);
} proc_scratch SEC(".maps");

#define CT_PATH_AREA_SIZE sizeof(struct ct_proc_rec)
static void *ct_path_area(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&proc_scratch, &zero);
}
#include "paths.h"

/* Images already announced. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ct_image_key);
	__type(value, __u8);
} images SEC(".maps");

/* The last image each CPU announced or found announced: the usual case costs one array lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_image_key);
} last_image SEC(".maps");

/* The current task's image: direct loads through the BTF task pointer (no helper call: this
 * runs on every TLS data call). */
static __always_inline void ct_image_key(struct task_struct *task, struct ct_image_key *key)
{
	key->tgid = bpf_get_current_pid_tgid() >> 32;
	key->pad = 0;
	key->start_ns = task->group_leader->start_boottime;
	key->exec_id = task->self_exec_id;
}

/* Announce the current task's image if not yet done; a lost record counts in drop_counter and
 * is tried again at the next event. */
static __always_inline void ct_note_image(struct task_struct *task, struct ct_image_key *key, __u32 drop_counter)
{
	__u32 zero = 0;
	__u8 one = 1;
	struct ct_image_key *last = bpf_map_lookup_elem(&last_image, &zero);

	if (!last || (last->tgid == key->tgid && last->start_ns == key->start_ns && last->exec_id == key->exec_id))
		return;
	*last = *key;
	if (bpf_map_lookup_elem(&images, key))
		return;
	struct ct_proc_rec *r = bpf_map_lookup_elem(&proc_scratch, &zero);
	if (!r)
		return;
	ct_fill_header(&r->h, CT_EV_TLS_PROCESS);
	r->ppid = BPF_CORE_READ(task, real_parent, tgid);
	r->exe_len = 0;
	r->start_ns = key->start_ns;
	r->exec_id = key->exec_id;
	r->mnt_ns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	r->pad = 0;
	struct path root = {};
	BPF_CORE_READ_INTO(&root, task, fs, root);
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	if (exe) {
		struct ct_path_result p = ct_walk_path(BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(exe, f_path.mnt),
						       &root, offsetof(struct ct_proc_rec, data));
		r->exe_len = p.len;
	}
	__u32 size = offsetof(struct ct_proc_rec, data) + r->exe_len;
	if (size > sizeof(*r))
		return;
	if (bpf_ringbuf_output(&events, r, size, BPF_RB_NO_WAKEUP)) {
		ct_count(drop_counter);
		last->exec_id = ~0ULL; /* not announced: try again with the next event */
		return;
	}
	bpf_map_update_elem(&images, key, &one, BPF_ANY);
}

static __always_inline void ct_note_current_image(__u32 drop_counter)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct ct_image_key key;
	ct_image_key(task, &key);
	ct_note_image(task, &key, drop_counter);
}

#endif /* CT_IMAGE_H */
