// SPDX-License-Identifier: GPL-2.0
/* crypto-tracer tls -m pcapng: packets captured by TC (clsact ingress and egress).
 *
 * The capture filter (protocol, ports, hosts) is applied here, before anything is copied.
 * A packet is copied up to the snap length (256 KiB: lo carries pre-GSO packets of
 * ~107 KB) from a per-CPU slot into the ring buffer with its exact size.
 * On lo every packet passes egress and then ingress: only egress is kept there.
 *
 * Each packet record IS a pcapng Enhanced Packet Block, complete (interface id, wall-clock
 * timestamp, direction flags, "pid=N comm=X" comment, trailing length), so that user space
 * writes the records as they come, without decoding them (at ~100,000 packets/s a few
 * microseconds of Python per packet cost a third of a core). A ClientHello's packet is
 * preceded by a cap_hello record with its client_random: user space writes that session's
 * Decryption Secrets Block there, before the packet. Byte order: the host's, as the writer's.
 *
 * Process identity: connect() and accept() returns (syscall tracepoints, process context)
 * record the socket's 4-tuple -> pid/comm in an LRU map; each packet looks up its sender
 * (egress) or receiver (ingress) there.
 */
#include "common.h"
#include "image.h"
#include <bpf/bpf_endian.h>

#define CAP_MAX (256 * 1024)
#define CAP_OPTS_MAX 128 /* EPB options after the packet: flags 8, comment 4 + 36, end 4, length 4; room
                          * for the verifier's view of the masked offsets */
#define CAP_CNT_TRUNCATED 4 /* counters[4]: packets cut at the snap length */
#define CAP_CNT_PROC_DROPPED 5 /* counters[5]: process image records lost (socket owners) */
#define EPB_TYPE 6
#define CAP_HELLO_TYPE 0xC7C7C7C7 /* never a pcapng block type we write */
#define OPT_COMMENT 1
#define EPB_FLAGS 2
#define CAP_PORTS 8
#define CAP_HOSTS 8
#define TC_ACT_UNSPEC (-1)
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define EINPROGRESS 115

struct cap_host {
	__u32 family; /* AF_INET: addr[0..4) */
	__u8 addr[16];
};

/* The capture filter: every non-empty part must match (ports: either end; hosts: either end). */
struct cap_config {
	__u32 snaplen;
	__u32 proto; /* 0 any, 6 tcp, 17 udp */
	__u32 nports;
	__u32 nhosts;
	__u16 ports[CAP_PORTS];
	struct cap_host hosts[CAP_HOSTS];
	__s64 epoch_offset; /* CLOCK_REALTIME - CLOCK_MONOTONIC, kept current by user space */
};

struct cap_iface {
	__u32 l2_len;      /* 14 on Ethernet-like devices (and lo), 0 on raw IP devices */
	__u32 egress_only; /* lo: each packet would otherwise be seen twice */
	__u32 if_id;       /* its Interface Description Block's index in the pcapng */
};

struct flow_key {
	__u32 family;
	__u16 lport;
	__u16 rport;
	__u8 laddr[16];
	__u8 raddr[16];
};

#define CAP_COMMENT_MAX 48 /* opt_comment "pid=N comm=X": 4 + at most 35, padded; room for the verifier */

/* The process of a connection, and its packets' comment option, built once per connection.
 * uid .. exec_id: as at connect()/accept(), for tls -m handshake (probes/socket_owner.py), which
 * joins the exe from the image's CT_EV_TLS_PROCESS record by (pid, start_ns, exec_id);
 * start_ns 0: seeded from /proc at start. */
struct flow_proc {
	__u32 pid;
	__u32 comment_len; /* bytes of comment_opt in use (header and padding included); 0: none */
	char comm[CT_COMM_LEN];
	__u8 comment_opt[CAP_COMMENT_MAX];
	__u32 uid;
	__u32 ppid;
	__u64 start_ns;
	__u64 exec_id;
};

/* A packet: a pcapng Enhanced Packet Block. This 28-byte head, cap_len bytes of the packet
 * from its L2 header, zeros to a multiple of 4, the options (epb_flags; opt_comment
 * "pid=N comm=X" when the process is known; opt_endofopt) and block_len again. */
struct cap_rec {
	__u32 block_type; /* EPB_TYPE */
	__u32 block_len;
	__u32 if_id;
	__u32 ts_high; /* wall clock, ns (the IDBs say if_tsresol 9) */
	__u32 ts_low;
	__u32 cap_len;
	__u32 orig_len;
	__u8 data[CAP_MAX + CAP_OPTS_MAX];
};

/* Sent just before the packet of a TLS ClientHello (the same CPU, so always before it). */
struct cap_hello {
	__u32 type; /* CAP_HELLO_TYPE */
	__u32 pad;
	__u8 client_random[32];
};

/* Never called, never loaded: puts struct cap_hello (only a local variable otherwise) into the
 * BTF, where tests/unit/test_bpf_layouts.py checks probes/tc_capture.py's copy. */
static __attribute__((used, noinline)) int cap_btf_anchor(struct cap_hello *h)
{
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cap_config);
} cap_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct cap_iface);
} cap_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_proc);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __s32);
} connect_fd SEC(".maps");

/* Slot 0, nonzero: each socket owner's process image is announced into `events` (image.h), as
 * probes/socket_owner.py wants; 0 (pcapng, whose ring holds only packet blocks): never. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} announce_images SEC(".maps");

/* One slot per CPU (user space sets max_entries to the number of possible CPUs). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cap_rec);
} cap_scratch SEC(".maps");

/* --- packets ------------------------------------------------------------------------------ */

static __always_inline bool addr_eq(const __u8 *a, const __u8 *b, __u32 n)
{
	for (int i = 0; i < 16; i++) {
		if (i >= n)
			break;
		if (a[i] != b[i])
			return false;
	}
	return true;
}

static __always_inline bool host_match(struct cap_config *cfg, __u32 family, const __u8 *a, const __u8 *b)
{
	__u32 n = family == AF_INET ? 4 : 16;
	for (int i = 0; i < CAP_HOSTS; i++) {
		if (i >= cfg->nhosts)
			break;
		struct cap_host *h = &cfg->hosts[i];
		if (h->family == family && (addr_eq(h->addr, a, n) || addr_eq(h->addr, b, n)))
			return true;
	}
	return false;
}

static __always_inline bool port_match(struct cap_config *cfg, __u16 sport, __u16 dport)
{
	for (int i = 0; i < CAP_PORTS; i++) {
		if (i >= cfg->nports)
			break;
		if (cfg->ports[i] == sport || cfg->ports[i] == dport)
			return true;
	}
	return false;
}

/* ct_output without a wake-up per packet: user space reads the ring on a 20 ms timer (packets
 * wait up to 1 s for their keys anyway) and is woken early only when the ring is an eighth
 * full. A wake-up per packet is paid by the sending task (loopback: the traced process). */
static __always_inline int cap_output(void *data, __u64 size)
{
	__u64 flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) / 8 ?
		      BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_output(&events, data, size, flags)) {
		ct_count(CT_CNT_DROPPED);
		return -1;
	}
	ct_count(CT_CNT_SUBMITTED);
	return 0;
}

/* The EPB's options at b (CAP_OPTS_MAX bytes of room): epb_flags, the connection's comment when
 * its process is known, opt_endofopt; returns their length with the trailing block_len. */
static __always_inline __u32 put_options(__u8 *b, __u32 egress, struct flow_proc *fp)
{
	*(__u32 *)b = EPB_FLAGS | (4 << 16);
	*(__u32 *)(b + 4) = egress ? 2 : 1; /* outbound : inbound */
	__u32 x = 8;
	if (fp && fp->comment_len) {
		__builtin_memcpy(b + 8, fp->comment_opt, CAP_COMMENT_MAX);
		x += fp->comment_len & 60;
	}
	*(__u32 *)(b + x) = 0; /* opt_endofopt */
	return x + 8;
}

/* A TLS ClientHello at the start of this TCP payload: its client_random goes out first. */
static __always_inline void note_hello(struct cap_rec *rec, __u32 l4, __u32 len)
{
	l4 &= 0x1ff;
	if (l4 + 13 > len)
		return;
	__u32 pay = l4 + (rec->data[l4 + 12] >> 4) * 4;
	if (pay + 43 > len)
		return;
	__u8 *p = rec->data + pay;
	/* TLS record: handshake (22), version 3.x; handshake: ClientHello (1); version (2), random */
	if (p[0] != 22 || p[1] != 3 || p[5] != 1)
		return;
	struct cap_hello hello = {.type = CAP_HELLO_TYPE};
	__builtin_memcpy(hello.client_random, p + 11, 32);
	/* not counted as submitted (that counts packets); its loss means a late DSB: counted as a drop */
	if (bpf_ringbuf_output(&events, &hello, sizeof(hello), BPF_RB_NO_WAKEUP))
		ct_count(CT_CNT_DROPPED);
}

static __always_inline int capture(struct __sk_buff *skb, __u32 egress)
{
	__u32 zero = 0, ifindex = skb->ifindex;
	struct cap_iface *ifc = bpf_map_lookup_elem(&cap_ifaces, &ifindex);
	struct cap_config *cfg = bpf_map_lookup_elem(&cap_config, &zero);
	if (!ifc || !cfg || (ifc->egress_only && !egress))
		return TC_ACT_UNSPEC;
	ct_count(CT_CNT_SEEN);

	struct flow_key key = {};
	__u32 l3 = ifc->l2_len & 0xff, proto = 0, l4 = 0;
	__u16 eth_proto = bpf_ntohs(skb->protocol);
	__u16 ports[2] = {};
	if (eth_proto == ETH_P_IP) {
		__u8 ip[20];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)))
			goto other;
		key.family = AF_INET;
		proto = ip[9];
		l4 = l3 + (ip[0] & 0xf) * 4;
		__builtin_memcpy(key.laddr, &ip[12], 4);
		__builtin_memcpy(key.raddr, &ip[16], 4);
		if ((ip[6] & 0x1f) || ip[7]) /* a non-first fragment has no ports */
			proto = 0;
	} else if (eth_proto == ETH_P_IPV6) {
		__u8 ip6[40];
		if (bpf_skb_load_bytes(skb, l3, ip6, sizeof(ip6)))
			goto other;
		key.family = AF_INET6;
		proto = ip6[6];
		l4 = l3 + 40;
		__builtin_memcpy(key.laddr, &ip6[8], 16);
		__builtin_memcpy(key.raddr, &ip6[24], 16);
	}
	if (key.family && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			proto = 0;
		key.lport = bpf_ntohs(ports[0]);
		key.rport = bpf_ntohs(ports[1]);
	}
other:
	if (cfg->proto && cfg->proto != proto)
		goto filtered;
	if (cfg->nports && (!key.lport || !port_match(cfg, key.lport, key.rport)))
		goto filtered;
	if (cfg->nhosts && (!key.family || !host_match(cfg, key.family, key.laddr, key.raddr)))
		goto filtered;

	__u32 cpu = bpf_get_smp_processor_id();
	struct cap_rec *rec = bpf_map_lookup_elem(&cap_scratch, &cpu);
	if (!rec)
		return TC_ACT_UNSPEC;
	__u32 len = skb->len;
	__u32 snap = cfg->snaplen;
	if (len > snap)
		len = snap;
	if (len > CAP_MAX)
		len = CAP_MAX;
	if (len == 0)
		return TC_ACT_UNSPEC;
	barrier_var(len);
	if (len > CAP_MAX)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 0, rec->data, len))
		return TC_ACT_UNSPEC;
	if (len < skb->len)
		ct_count(CAP_CNT_TRUNCATED);

	__u64 ts = bpf_ktime_get_ns() + cfg->epoch_offset;
	rec->block_type = EPB_TYPE;
	rec->if_id = ifc->if_id;
	rec->ts_high = ts >> 32;
	rec->ts_low = (__u32)ts;
	rec->cap_len = len;
	rec->orig_len = skb->len;

	struct flow_proc *fp = NULL;
	if (key.lport) {
		/* the local end: the sender on egress, the receiver on ingress */
		if (!egress) {
			__u8 tmp[16];
			__u16 p = key.lport;
			__builtin_memcpy(tmp, key.laddr, 16);
			__builtin_memcpy(key.laddr, key.raddr, 16);
			__builtin_memcpy(key.raddr, tmp, 16);
			key.lport = key.rport;
			key.rport = p;
		}
		fp = bpf_map_lookup_elem(&flows, &key);
	}
	if (proto == IPPROTO_TCP && key.lport)
		note_hello(rec, l4, len);

	/* zeros up to a multiple of 4 (the options overwrite what lies beyond) */
	rec->data[len] = 0;
	rec->data[len + 1] = 0;
	rec->data[len + 2] = 0;
	__u32 o = (len + 3) & ~3U;
	barrier_var(o);
	if (o > CAP_MAX)
		return TC_ACT_UNSPEC;
	__u8 *b = rec->data + o;
	__u32 x = put_options(b, egress, fp);
	__u32 block_len = offsetof(struct cap_rec, data) + o + x;
	*(__u32 *)(b + x - 4) = block_len;
	rec->block_len = block_len;
	cap_output(rec, block_len);
	return TC_ACT_UNSPEC;
filtered:
	ct_count(CT_CNT_KFILTERED);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	return capture(skb, 0);
}

SEC("tc")
int tc_egress(struct __sk_buff *skb)
{
	return capture(skb, 1);
}

/* --- sockets -> processes ----------------------------------------------------------------- */

static __always_inline struct sock *fd_sock(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file *f = NULL;
	struct file **fds;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	if (!f)
		return NULL;
	struct socket *sock = BPF_CORE_READ(f, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != f)
		return NULL;
	return BPF_CORE_READ(sock, sk);
}

/* "pid=N comm=X" into c (CAP_COMMENT_MAX - 4 bytes, zeroed); returns its length (at most 35).
 * Bytes outside ASCII become '?': the comment is UTF-8. */
static __always_inline __u32 put_comment(__u8 *c, __u32 pid, const char *comm)
{
	__u32 nd = 0, v = pid;
#pragma unroll
	for (int i = 0; i < 10; i++) {
		if (v) {
			nd++;
			v /= 10;
		}
	}
	if (!nd)
		nd = 1;
	nd &= 15;
	c[0] = 'p';
	c[1] = 'i';
	c[2] = 'd';
	c[3] = '=';
	v = pid;
#pragma unroll
	for (int i = 0; i < 10; i++) {
		if (i < nd) {
			c[(4 + nd - 1 - i) & 15] = '0' + v % 10;
			v /= 10;
		}
	}
	__u8 *t = c + 4 + nd; /* at most c + 19 */
	t[0] = ' ';
	t[1] = 'c';
	t[2] = 'o';
	t[3] = 'm';
	t[4] = 'm';
	t[5] = '=';
	__u32 n = 0;
#pragma unroll
	for (int i = 0; i < CT_COMM_LEN - 1; i++) {
		char ch = comm[i];
		if (!ch)
			break;
		t[6 + i] = (ch & 0x80) ? '?' : ch;
		n++;
	}
	return 10 + nd + n;
}

static const __u8 v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* Remember which process owns the socket behind fd. */
static __always_inline void note_socket(int fd)
{
	struct sock *sk = fd_sock(fd);
	struct flow_key key = {};
	struct flow_proc proc = {};
	if (!sk)
		return;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family == AF_INET) {
		key.family = AF_INET;
		bpf_core_read(key.laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(key.raddr, 4, &sk->__sk_common.skc_daddr);
	} else if (family == AF_INET6) {
		key.family = AF_INET6;
		bpf_core_read(key.laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(key.raddr, 16, &sk->__sk_common.skc_v6_daddr);
		if (addr_eq(key.laddr, v4_mapped, 12) && addr_eq(key.raddr, v4_mapped, 12)) {
			key.family = AF_INET; /* IPv4 packets on a dual-stack socket */
			__builtin_memcpy(key.laddr, &key.laddr[12], 4);
			__builtin_memcpy(key.raddr, &key.raddr[12], 4);
			__builtin_memset(&key.laddr[4], 0, 12);
			__builtin_memset(&key.raddr[4], 0, 12);
		}
	} else {
		return;
	}
	key.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	key.rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (!key.lport || !key.rport)
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	struct ct_image_key image;
	ct_image_key(task, &image);
	proc.pid = image.tgid;
	bpf_get_current_comm(proc.comm, sizeof(proc.comm));
	proc.uid = (__u32)bpf_get_current_uid_gid();
	proc.ppid = BPF_CORE_READ(task, real_parent, tgid);
	proc.start_ns = image.start_ns;
	proc.exec_id = image.exec_id;
	__u32 zero = 0;
	__u32 *announce = bpf_map_lookup_elem(&announce_images, &zero);
	if (announce && *announce) /* before the flows entry: its record precedes any packet of it */
		ct_note_image(task, &image, CAP_CNT_PROC_DROPPED);
	if (bpf_map_update_elem(&flows, &key, &proc, BPF_ANY))
		return;
	/* the comment its packets carry, formatted once here rather than per packet */
	struct flow_proc *fp = bpf_map_lookup_elem(&flows, &key);
	if (!fp)
		return;
	__u32 n = put_comment(fp->comment_opt + 4, proc.pid, proc.comm);
	*(__u32 *)fp->comment_opt = OPT_COMMENT | (n << 16);
	fp->comment_len = 4 + ((n + 3) & ~3U);
}

SEC("tracepoint/syscalls/sys_enter_connect")
int cap_connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__s32 fd = (__s32)ctx->args[0];
	bpf_map_update_elem(&connect_fd, &id, &fd, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_connect")
int cap_connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__s32 *fd = bpf_map_lookup_elem(&connect_fd, &id);
	if (!fd)
		return 0;
	__s32 f = *fd;
	bpf_map_delete_elem(&connect_fd, &id);
	if (ctx->ret == 0 || ctx->ret == -EINPROGRESS)
		note_socket(f);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int cap_accept4_exit(struct trace_event_raw_sys_exit *ctx)
{
	if (ctx->ret >= 0)
		note_socket((int)ctx->ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int cap_accept_exit(struct trace_event_raw_sys_exit *ctx)
{
	if (ctx->ret >= 0)
		note_socket((int)ctx->ret);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
