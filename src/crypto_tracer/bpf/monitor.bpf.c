// SPDX-License-Identifier: GPL-2.0
/* monitor: process exec/exit, crypto file opens and crypto library mappings.
 *
 * Everything is filtered here before it is copied: the process filter (pid, uid, comm,
 * pid set) and whether a path is a crypto file or library at all. The classification
 * tables (extensions, exact file names, library names, trust-store directories) are
 * written by user space from classify.py at start-up, so there is one source of truth.
 */
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

#define FNAME_MAX 256
#define CT_PATH_BUF 4096
#define CT_NAME_MAX 256
#define ARGS_MAX 4096
#define AT_FDCWD -100
#define PROT_EXEC 0x4
#define FNV_INIT 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define TRUST_PREFIXES 8
#define TRUST_PREFIX_LEN 40

struct mon_config {
	__u32 follow_children; /* add children of pid_set members to pid_set */
	__u32 self_tgid;       /* crypto-tracer itself: its own /proc reads are not events */
	__u64 self_root_dentry; /* crypto-tracer's own root (set by learn_self_root): `root` */
	__u64 self_root_mnt;    /* fields are walked up to it, as its /proc/PID/root reads */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mon_config);
} mon_config SEC(".maps");

/* FNV-1a of a lower-cased extension including its dot (".pem") -> file class */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u32);
} ext_classes SEC(".maps");

/* FNV-1a of an exact base name ("id_rsa") -> file class */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u32);
} name_classes SEC(".maps");

/* FNV-1a of a library stem ("libssl" of libssl.so.3) -> 1 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u32);
} lib_stems SEC(".maps");

struct trust_prefix {
	__u32 len;
	char s[TRUST_PREFIX_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TRUST_PREFIXES);
	__type(key, __u32);
	__type(value, struct trust_prefix);
} trust_prefixes SEC(".maps");

struct open_args {
	__u64 fname;
	__s32 dfd;
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct open_args);
} open_stash SEC(".maps");

struct lib_seen_key {
	__u64 mm; /* changes at exec, so a new image reports its libraries again */
	__u64 ino;
	__u32 dev;
	__u32 tgid;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lib_seen_key);
	__type(value, __u8);
} lib_seen SEC(".maps");

/* Process images whose exe and root user space already got, with the root sent (a chroot,
 * setns or unshare changes it: then the root is sent again). */
struct image_view {
	__u64 root_dentry;
	__u64 root_mnt;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct lib_seen_key); /* mm and tgid; ino/dev unused (0) */
	__type(value, struct image_view);
} image_sent SEC(".maps");

/* --- records ---------------------------------------------------------------------------- */

/* In every record, after the header: what the data ends with. Paths are in the process's
 * own view (walks stop at its root). The exe is sent once per process image, the root (in
 * the view of the top of the process's mount tree) and mount namespace once per image and
 * again when the root changes, so user space knows them for processes already gone. */
struct ct_view {
	__u32 exe_len;  /* bytes of the exe's components (0 = already sent, or unknown) */
	__u32 root_len; /* 0 = unchanged since sent; else 1 + bytes of the root's components */
	__u32 mnt_ns;   /* mount namespace inode, sent with the root */
	__u32 pad;
};

#define VIEW_BUF (2 * (CT_PATH_BUF + CT_NAME_MAX))

struct exec_rec { /* data: args, exe, root */
	struct ct_header h;
	struct ct_view v;
	__u32 ppid;
	__u32 args_len;
	char data[ARGS_MAX + VIEW_BUF];
};

struct exit_rec { /* data: exe, root (a fork that never reported anything still has them) */
	struct ct_header h;
	struct ct_view v;
	__u32 ppid;
	__u32 exit_code; /* raw task->exit_code: (status << 8) | signal */
	char data[VIEW_BUF];
};

struct file_rec { /* data: name, base directory, exe, root */
	struct ct_header h;
	struct ct_view v;
	__u32 ppid;
	__s32 result;
	__u32 flags;
	__u32 fclass;
	__u32 name_len;   /* raw file name, NUL included */
	__u32 base_parts; /* components of the base directory, when the name is relative */
	__u32 base_len;
	__u32 has_base;   /* the base directory was resolved (it may be "/": no components) */
	char data[FNAME_MAX + CT_PATH_BUF + CT_NAME_MAX + VIEW_BUF];
};

struct lib_rec { /* data: library, exe, root */
	struct ct_header h;
	struct ct_view v;
	__u32 ppid;
	__u32 parts;
	__u32 len;
	__u32 dev;
	__u64 ino;
	char data[CT_PATH_BUF + CT_NAME_MAX + VIEW_BUF];
};

/* One scratch area per CPU, large enough for any record. */
union scratch {
	struct exec_rec exec;
	struct exit_rec exit;
	struct file_rec file;
	struct lib_rec lib;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, union scratch);
} scratch SEC(".maps");

static __always_inline void *get_scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&scratch, &zero);
}

/* paths.h walks write into this per-CPU scratch area, at offsets into the records. */
#define CT_PATH_AREA_SIZE sizeof(union scratch)
static void *ct_path_area(void)
{
	return get_scratch();
}
#include "paths.h"

static __always_inline __u32 task_ppid(struct task_struct *task)
{
	return BPF_CORE_READ(task, real_parent, tgid);
}

/* The process filter for the current task; counts a kernel-filtered event when it fails. */
static __always_inline bool current_wanted(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	struct mon_config *cfg = bpf_map_lookup_elem(&mon_config, &zero);
	if (cfg && cfg->self_tgid == id >> 32) {
		ct_count(CT_CNT_KFILTERED);
		return false;
	}
	char comm[CT_COMM_LEN];
	bpf_get_current_comm(comm, sizeof(comm));
	if (ct_process_wanted(id >> 32, (__u32)bpf_get_current_uid_gid(), comm))
		return true;
	ct_count(CT_CNT_KFILTERED);
	return false;
}

/* The task's root directory (fs->root); zeroed when unknown (walks then go to the top). */
static __always_inline struct path task_root(struct task_struct *task)
{
	struct path root = {};
	BPF_CORE_READ_INTO(&root, task, fs, root);
	return root;
}

/* Append at `offset` what user space lacks of this process image (struct ct_view): the exe
 * the first time the image reports something (or always, with new_image: at exec), the root
 * and mount namespace then and whenever the root changed. The usual case costs one lookup.
 * Returns the bytes appended. */
static __always_inline __u32 append_view(struct task_struct *task, struct ct_view *v, const struct path *root,
					 __u32 offset, bool new_image)
{
	v->exe_len = 0;
	v->root_len = 0;
	v->mnt_ns = 0;
	v->pad = 0;
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (!mm)
		return 0;
	struct lib_seen_key key = {.mm = (__u64)mm, .tgid = bpf_get_current_pid_tgid() >> 32};
	struct image_view now = {.root_dentry = (__u64)root->dentry, .root_mnt = (__u64)root->mnt};
	struct image_view *sent = new_image ? NULL : bpf_map_lookup_elem(&image_sent, &key);
	if (sent && sent->root_dentry == now.root_dentry && sent->root_mnt == now.root_mnt)
		return 0;
	bool send_exe = !sent;
	bpf_map_update_elem(&image_sent, &key, &now, BPF_ANY);
	__u32 n = 0;
	struct file *exe = send_exe ? BPF_CORE_READ(mm, exe_file) : NULL;
	if (exe) {
		struct ct_path_result p =
			ct_walk_path(BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(exe, f_path.mnt), root, offset);
		n = p.len;
	}
	v->exe_len = n;
	/* The root as the tracer sees it (its /proc/PID/root would say the same): a tracer that
	 * runs in a chroot sees the processes of that chroot at "/". */
	struct path top = {};
	__u32 zero = 0;
	struct mon_config *cfg = bpf_map_lookup_elem(&mon_config, &zero);
	if (cfg) {
		top.dentry = (struct dentry *)cfg->self_root_dentry;
		top.mnt = (struct vfsmount *)cfg->self_root_mnt;
	}
	struct ct_path_result r = {};
	if (root->dentry)
		r = ct_walk_path(root->dentry, root->mnt, &top, offset + n);
	v->root_len = r.len + 1;
	v->mnt_ns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	return n + r.len;
}

/* Learns the tracer's own root directory, before any other program is attached: user space
 * calls getppid() once right after attaching this one. */
SEC("tp/syscalls/sys_enter_getppid")
int learn_self_root(void *ctx)
{
	__u32 zero = 0;
	struct mon_config *cfg = bpf_map_lookup_elem(&mon_config, &zero);
	if (!cfg || cfg->self_tgid != bpf_get_current_pid_tgid() >> 32)
		return 0;
	struct path root = task_root((struct task_struct *)bpf_get_current_task());
	cfg->self_root_dentry = (__u64)root.dentry;
	cfg->self_root_mnt = (__u64)root.mnt;
	return 0;
}

/* --- process exec / exit / fork -------------------------------------------------------- */

SEC("tp/sched/sched_process_exec")
int handle_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	ct_count(CT_CNT_SEEN);
	if (!current_wanted())
		return 0;
	struct exec_rec *r = get_scratch();
	if (!r)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	ct_fill_header(&r->h, CT_EV_PROCESS_EXEC);
	r->ppid = task_ppid(task);

	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	__u32 args_len = arg_end > arg_start ? arg_end - arg_start : 0;
	if (args_len > ARGS_MAX)
		args_len = ARGS_MAX;
	if (args_len && bpf_probe_read_user(r->data, args_len, (void *)arg_start))
		args_len = 0;
	r->args_len = args_len;

	struct path root = task_root(task);
	__u32 view_len = append_view(task, &r->v, &root, offsetof(struct exec_rec, data) + args_len, true);
	__u64 size = offsetof(struct exec_rec, data) + args_len + view_len;
	if (size > sizeof(*r))
		size = sizeof(*r);
	ct_output(r, size);
	return 0;
}

SEC("tp/sched/sched_process_exit")
int handle_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	/* sched_process_exit fires per thread: report the process once, when its last thread exits */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	ct_count(CT_CNT_SEEN);
	if (!current_wanted())
		return 0;
	struct exit_rec *r = get_scratch();
	if (!r)
		return 0;
	ct_fill_header(&r->h, CT_EV_PROCESS_EXIT);
	r->ppid = task_ppid(task);
	r->exit_code = BPF_CORE_READ(task, exit_code);
	struct path root = task_root(task);
	__u64 size = offsetof(struct exit_rec, data) + append_view(task, &r->v, &root, offsetof(struct exit_rec, data), false);
	if (size > sizeof(*r))
		size = sizeof(*r);
	ct_output(r, size);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(handle_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 zero = 0;
	struct mon_config *cfg = bpf_map_lookup_elem(&mon_config, &zero);
	if (!cfg || !cfg->follow_children)
		return 0;
	__u32 ptgid = parent->tgid, ctgid = child->tgid;
	if (ptgid == ctgid || !bpf_map_lookup_elem(&pid_set, &ptgid))
		return 0;
	__u8 one = 1;
	bpf_map_update_elem(&pid_set, &ctgid, &one, BPF_ANY);
	return 0;
}

/* --- file opens ------------------------------------------------------------------------- */

/* An open is counted as seen once its outcome is known: here when it is filtered out or
 * cannot be stashed, else at the syscall's exit. So opens in flight while the probes are
 * attached or detached are not half-counted, and seen = filtered + dropped + submitted. */
static __always_inline int stash_open(__u64 fname, __s32 dfd, __u32 flags)
{
	if (!current_wanted()) {
		ct_count(CT_CNT_SEEN);
		return 0;
	}
	struct open_args a = {.fname = fname, .dfd = dfd, .flags = flags};
	__u64 id = bpf_get_current_pid_tgid();
	if (bpf_map_update_elem(&open_stash, &id, &a, BPF_ANY)) {
		ct_count(CT_CNT_SEEN);
		ct_count(CT_CNT_DROPPED); /* stash full: the event is lost, and counted */
	}
	return 0;
}

SEC("tp/syscalls/sys_enter_openat")
int enter_openat(struct trace_event_raw_sys_enter *ctx)
{
	return stash_open(ctx->args[1], (__s32)ctx->args[0], (__u32)ctx->args[2]);
}

SEC("tp/syscalls/sys_enter_open")
int enter_open(struct trace_event_raw_sys_enter *ctx)
{
	return stash_open(ctx->args[0], AT_FDCWD, (__u32)ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_openat2")
int enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};
	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return stash_open(ctx->args[1], (__s32)ctx->args[0], (__u32)how.flags);
}

static __always_inline bool is_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* c_rehash link names in trust-store directories: 8 hex digits, '.', optional 'r', digits */
static __always_inline bool is_hash_link(const char *base, __u32 len)
{
	if (len < 10 || len > 13)
		return false;
	for (int i = 0; i < 8; i++)
		if (!is_hex(base[i]))
			return false;
	if (base[8] != '.')
		return false;
	for (int i = 9; i < 13; i++) {
		if (i >= len)
			break;
		char c = base[i];
		if (!((c >= '0' && c <= '9') || (i == 9 && c == 'r')))
			return false;
	}
	return true;
}

static __always_inline bool in_trust_store(const char *path)
{
	for (int i = 0; i < TRUST_PREFIXES; i++) {
		__u32 key = i; /* a copy: the loop counter must stay in a register for the verifier */
		struct trust_prefix *p = bpf_map_lookup_elem(&trust_prefixes, &key);
		if (!p || p->len == 0 || p->len > TRUST_PREFIX_LEN)
			return false;
		bool match = true;
		for (int j = 0; j < TRUST_PREFIX_LEN; j++) {
			if (j >= p->len)
				break;
			if (path[j] != p->s[j]) {
				match = false;
				break;
			}
		}
		if (match)
			return true;
	}
	return false;
}

struct scan_state {
	__u64 base_hash;
	__u64 ext_hash;
	__u32 len;
	__u32 base_start;
	__u32 in_ext;
};

/* One character of the name scan; the name is in the per-CPU scratch file record. */
static long scan_char(__u32 i, struct scan_state *st)
{
	struct file_rec *r = get_scratch();
	if (!r || i >= st->len)
		return 1;
	char c = r->data[i & (FNAME_MAX - 1)];
	if (c == 0)
		return 1;
	if (c == '/') {
		st->base_start = i + 1;
		st->base_hash = FNV_INIT;
		st->in_ext = 0;
		return 0;
	}
	st->base_hash = (st->base_hash ^ (__u8)c) * FNV_PRIME;
	if (c == '.') {
		st->ext_hash = (FNV_INIT ^ (__u8)'.') * FNV_PRIME;
		st->in_ext = 1;
	} else if (st->in_ext) {
		st->ext_hash = (st->ext_hash ^ (__u8)ct_lower(c)) * FNV_PRIME;
	}
	return 0;
}

/* Crypto class of the file name in r->data (0 = not a crypto file): by extension, exact
 * base name, or a hash link inside a trust-store directory. bpf_loop keeps the verifier's
 * work constant whatever the name length. */
static __always_inline __u32 classify_name(struct file_rec *r, __u32 len)
{
	struct scan_state st = {.base_hash = FNV_INIT, .len = len};
	bpf_loop(FNAME_MAX, scan_char, &st, 0);

	__u32 *cls;
	if (st.in_ext && (cls = bpf_map_lookup_elem(&ext_classes, &st.ext_hash)))
		return *cls;
	if ((cls = bpf_map_lookup_elem(&name_classes, &st.base_hash)))
		return *cls;
	if (r->data[0] == '/' && st.base_start < FNAME_MAX - 16 && len > st.base_start + 1) {
		__u32 blen = len - 1 - st.base_start; /* len counts the NUL */
		if (is_hash_link(r->data + (st.base_start & (FNAME_MAX - 1)), blen) && in_trust_store(r->data))
			return 1;
	}
	return 0;
}

static __always_inline int finish_open(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct open_args *a = bpf_map_lookup_elem(&open_stash, &id);
	if (!a)
		return 0;
	struct open_args args = *a;
	bpf_map_delete_elem(&open_stash, &id);
	ct_count(CT_CNT_SEEN);

	struct file_rec *r = get_scratch();
	if (!r)
		return 0;
	long n = bpf_probe_read_user_str(r->data, FNAME_MAX, (void *)args.fname);
	if (n <= 0) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	__u32 name_len = n;
	__u32 cls = classify_name(r, name_len);
	if (!cls) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	ct_fill_header(&r->h, CT_EV_FILE_OPEN);
	r->ppid = task_ppid(task);
	r->result = ret;
	r->flags = args.flags;
	r->fclass = cls;
	r->name_len = name_len;
	r->base_parts = 0;
	r->base_len = 0;
	r->has_base = 0;
	struct path root = task_root(task);

	if (r->data[0] != '/') {
		/* relative name: resolve the directory it is relative to (cwd or dirfd) */
		struct dentry *d = NULL;
		struct vfsmount *m = NULL;
		if (args.dfd == AT_FDCWD) {
			d = BPF_CORE_READ(task, fs, pwd.dentry);
			m = BPF_CORE_READ(task, fs, pwd.mnt);
		} else {
			struct file *f = ct_fd_file(task, args.dfd);
			if (f) {
				d = BPF_CORE_READ(f, f_path.dentry);
				m = BPF_CORE_READ(f, f_path.mnt);
			}
		}
		if (d && m) {
			struct ct_path_result p = ct_walk_path(d, m, &root, offsetof(struct file_rec, data) + name_len);
			r->base_parts = p.parts;
			r->base_len = p.len;
			r->has_base = 1;
		}
	}
	__u32 off = name_len + r->base_len;
	if (off > FNAME_MAX + CT_PATH_BUF)
		off = FNAME_MAX + CT_PATH_BUF;
	__u64 size = offsetof(struct file_rec, data) + off +
		     append_view(task, &r->v, &root, offsetof(struct file_rec, data) + off, false);
	if (size > sizeof(*r))
		size = sizeof(*r);
	ct_output(r, size);
	return 0;
}

SEC("tp/syscalls/sys_exit_openat")
int exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return finish_open(ctx->ret);
}

SEC("tp/syscalls/sys_exit_open")
int exit_open(struct trace_event_raw_sys_exit *ctx)
{
	return finish_open(ctx->ret);
}

SEC("tp/syscalls/sys_exit_openat2")
int exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return finish_open(ctx->ret);
}

/* --- library mappings ------------------------------------------------------------------- */

/* Is this base name a crypto library? Its stem (up to the first '.' or '-') is looked up. */
static __always_inline bool is_crypto_library(const char *base, int len)
{
	__u64 h = FNV_INIT;
	for (int i = 0; i < 32; i++) {
		if (i >= len)
			break;
		char c = base[i];
		if (c == 0 || c == '.' || c == '-')
			break;
		h = (h ^ (__u8)c) * FNV_PRIME;
	}
	return bpf_map_lookup_elem(&lib_stems, &h) != NULL;
}

SEC("tp/syscalls/sys_enter_mmap")
int enter_mmap(struct trace_event_raw_sys_enter *ctx)
{
	unsigned long prot = ctx->args[2];
	int fd = (int)ctx->args[4];
	if (!(prot & PROT_EXEC) || fd < 0)
		return 0;
	ct_count(CT_CNT_SEEN);
	if (!current_wanted())
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *f = ct_fd_file(task, fd);
	if (!f) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	struct dentry *d = BPF_CORE_READ(f, f_path.dentry);
	char base[32];
	int blen = bpf_probe_read_kernel_str(base, sizeof(base), BPF_CORE_READ(d, d_name.name));
	if (blen <= 0 || !is_crypto_library(base, blen)) {
		ct_count(CT_CNT_KFILTERED);
		return 0;
	}
	struct lib_seen_key key = {
		.mm = (__u64)BPF_CORE_READ(task, mm),
		.ino = BPF_CORE_READ(d, d_inode, i_ino),
		.dev = BPF_CORE_READ(d, d_sb, s_dev),
		.tgid = bpf_get_current_pid_tgid() >> 32,
	};
	__u8 one = 1;
	if (bpf_map_update_elem(&lib_seen, &key, &one, BPF_NOEXIST)) {
		ct_count(CT_CNT_KFILTERED); /* this image already reported it */
		return 0;
	}
	struct lib_rec *r = get_scratch();
	if (!r)
		return 0;
	ct_fill_header(&r->h, CT_EV_LIB_LOAD);
	r->ppid = task_ppid(task);
	r->dev = key.dev;
	r->ino = key.ino;
	struct path root = task_root(task);
	struct ct_path_result p = ct_walk_path(d, BPF_CORE_READ(f, f_path.mnt), &root, offsetof(struct lib_rec, data));
	r->parts = p.parts;
	__u32 len = p.len;
	if (len > CT_PATH_BUF)
		len = CT_PATH_BUF;
	r->len = len;
	__u64 size = offsetof(struct lib_rec, data) + len +
		     append_view(task, &r->v, &root, offsetof(struct lib_rec, data) + len, false);
	if (size > sizeof(*r))
		size = sizeof(*r);
	ct_output(r, size);
	return 0;
}
