/* SPDX-License-Identifier: GPL-2.0 */
/* Kernel path helpers: turn a (dentry, vfsmount) or an fd into path components.
 *
 * Components are written leaf first, each NUL-terminated, into buf; user space reverses
 * them and joins with '/'. The walk crosses mount points and stops at the root of the
 * task's mount tree, so paths are as the process sees them (container paths in containers).
 */
#ifndef CT_PATHS_H
#define CT_PATHS_H

#include "common.h"

#define CT_PATH_DEPTH 32
#define CT_NAME_MAX 256
#define CT_PATH_BUF 4096 /* components area; must be a power of two */

struct ct_path_result {
	__u32 len;   /* bytes used in buf */
	__u32 parts; /* components written */
};

static __always_inline struct mount *ct_real_mount(struct vfsmount *vfsmnt)
{
	return (struct mount *)((void *)vfsmnt - bpf_core_field_offset(struct mount, mnt));
}

/* buf must have at least CT_PATH_BUF + CT_NAME_MAX bytes. */
static __always_inline struct ct_path_result ct_walk_path(struct dentry *dentry, struct vfsmount *vfsmnt, char *buf)
{
	struct ct_path_result r = {};
	struct mount *mnt = ct_real_mount(vfsmnt);
	__u32 off = 0;

	for (int i = 0; i < CT_PATH_DEPTH; i++) {
		struct dentry *parent = BPF_CORE_READ(dentry, d_parent);
		struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);

		if (dentry == mnt_root) {
			struct mount *mnt_parent = BPF_CORE_READ(mnt, mnt_parent);
			if (mnt_parent == mnt)
				break; /* root of the mount tree */
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = mnt_parent;
			continue;
		}
		if (dentry == parent)
			break; /* filesystem root that is not a mount root (detached) */
		const unsigned char *name = BPF_CORE_READ(dentry, d_name.name);
		if (off > CT_PATH_BUF - 1)
			break;
		int n = bpf_probe_read_kernel_str(buf + (off & (CT_PATH_BUF - 1)), CT_NAME_MAX, name);
		if (n <= 0)
			break;
		off += n;
		r.parts++;
		dentry = parent;
	}
	r.len = off > CT_PATH_BUF ? CT_PATH_BUF : off;
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
