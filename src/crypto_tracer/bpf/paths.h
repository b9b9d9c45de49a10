/* SPDX-License-Identifier: GPL-2.0 */
/* Kernel path helpers: turn a (dentry, vfsmount) or an fd into path components.
 *
 * Components are written leaf first, each NUL-terminated, into a scratch area; user space
 * reverses them and joins with '/'. The walk crosses mount points and stops at the given
 * root (the task's fs->root, as d_path does: paths as the process itself sees them, also
 * in a chroot) or else at the root of the mount tree (container paths in containers).
 * It runs under bpf_loop, so the verifier checks one step, not every depth, inside a global
 * subprogram verified once per program: that keeps load time (start-up) short however many
 * walks a program does.
 *
 * The includer provides `static void *ct_path_area(void)` (per-CPU scratch memory of
 * CT_PATH_AREA_SIZE bytes) before including this file; walks write at an offset into it.
 */
#ifndef CT_PATHS_H
#define CT_PATHS_H

#include "common.h"


struct ct_path_result {
	__u32 len;   /* bytes written */
	__u32 parts; /* components written */
};

struct ct_walk {
	__u64 dentry; /* struct dentry * */
	__u64 mnt;    /* struct mount * */
	__u64 root_dentry; /* stop here (with root_mnt); 0 = walk to the top of the mount tree */
	__u64 root_mnt;    /* struct mount * */
	__u32 pos;    /* next write offset in the area */
	__u32 end;    /* no component starts at or after this offset */
	__u32 parts;
	__u32 pad;
};

static __always_inline struct mount *ct_real_mount(struct vfsmount *vfsmnt)
{
	return (struct mount *)((void *)vfsmnt - bpf_core_field_offset(struct mount, mnt));
}

static long ct_walk_step(__u32 i, struct ct_walk *w)
{
	char *area = ct_path_area();
	if (!area)
		return 1;
	struct dentry *dentry = (struct dentry *)w->dentry;
	struct mount *mnt = (struct mount *)w->mnt;
	struct dentry *parent = BPF_CORE_READ(dentry, d_parent);

	if (w->dentry == w->root_dentry && w->mnt == w->root_mnt)
		return 1; /* the process's root (chroot, container root) */
	if (dentry == BPF_CORE_READ(mnt, mnt.mnt_root)) {
		struct mount *mnt_parent = BPF_CORE_READ(mnt, mnt_parent);
		if (mnt_parent == mnt)
			return 1; /* root of the mount tree */
		w->dentry = (__u64)BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = (__u64)mnt_parent;
		return 0;
	}
	if (dentry == parent)
		return 1; /* filesystem root that is not a mount root (detached) */
	__u32 pos = w->pos;
	if (pos >= w->end || pos > CT_PATH_AREA_SIZE - CT_NAME_MAX)
		return 1;
	int n = bpf_probe_read_kernel_str(area + pos, CT_NAME_MAX, BPF_CORE_READ(dentry, d_name.name));
	if (n <= 0)
		return 1;
	w->pos = pos + n;
	w->parts++;
	w->dentry = (__u64)parent;
	return 0;
}

/* The walk proper, a global (non-inline) subprogram: the verifier checks it once per program
 * with unknown arguments, not once per call site in each caller's state (several walks per
 * program, each with its branches on the root, had made monitor's load ~3x slower).
 * Arguments are plain addresses; returns parts << 16 | bytes written (both bounded). */
__noinline int ct_walk_path_g(__u64 dentry, __u64 vfsmnt, __u64 root_dentry, __u64 root_vfsmnt, __u32 offset)
{
	struct ct_walk w = {
		.dentry = dentry,
		.mnt = (__u64)ct_real_mount((struct vfsmount *)vfsmnt),
		.root_dentry = root_dentry,
		.root_mnt = root_dentry ? (__u64)ct_real_mount((struct vfsmount *)root_vfsmnt) : 0,
		.pos = offset,
		.end = offset + CT_PATH_BUF,
	};
	bpf_loop(CT_PATH_DEPTH, ct_walk_step, &w, 0);
	__u32 len = w.pos - offset;
	if (len > CT_PATH_BUF)
		len = CT_PATH_BUF;
	return (int)((w.parts & 0xff) << 16 | len);
}

/* Walk from (dentry, vfsmnt) up to root (root->dentry NULL: the top of the mount tree),
 * writing at `offset` of the scratch area, at most CT_PATH_BUF bytes of components (plus
 * the last one's overflow, below CT_NAME_MAX). */
static __always_inline struct ct_path_result ct_walk_path(struct dentry *dentry, struct vfsmount *vfsmnt,
							  const struct path *root, __u32 offset)
{
	__u32 v = ct_walk_path_g((__u64)dentry, (__u64)vfsmnt, (__u64)root->dentry, (__u64)root->mnt, offset);
	struct ct_path_result r = {.len = v & 0xffff, .parts = (v >> 16) & 0xff};
	if (r.len > CT_PATH_BUF)
		r.len = CT_PATH_BUF;
	return r;
}

/* The struct file behind fd in the current task, or NULL. */
static __always_inline struct file *ct_fd_file(struct task_struct *task, int fd)
{
	struct files_struct *files = BPF_CORE_READ(task, files);
	struct fdtable *fdt = BPF_CORE_READ(files, fdt);
	unsigned int max_fds = BPF_CORE_READ(fdt, max_fds);
	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

#endif /* CT_PATHS_H */
