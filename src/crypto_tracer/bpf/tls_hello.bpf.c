// SPDX-License-Identifier: GPL-2.0
/* crypto-tracer: the TLS handshake messages of every TCP connection, seen by TC (clsact
 * ingress and egress on every interface), for the handshake facts user space reads from them
 * (probes/tls_hello.py): version, cipher suite, key-exchange group, SNI, ALPN, resumption and,
 * for TLS 1.2, the certificate. QUIC's hellos travel in Initial packets whose keys any observer can
 * derive: UDP datagrams starting with one are copied (up to QUIC_MAX bytes: quic_initial() below),
 * and, for user space that has the handshake secrets, those starting with a Handshake packet.
 *
 * Only segments that start a ClientHello or ServerHello record (content type 22, version 3.x,
 * handshake type 1 or 2) are copied, plus the next few segments of the same flow and direction
 * (a hello split over segments, TLS 1.2's Certificate and ServerKeyExchange, TLS 1.3's encrypted
 * flights) while the `follow` map holds that direction, at most FOLLOW_SEGMENTS segments and
 * FOLLOW_BYTES bytes: a data segment costs the header loads and a few byte compares (one hash
 * lookup more when it does not start with an application-data record header). User space deletes
 * the follow entry as soon as it has read what it needs.
 *
 * TLS 1.3 encrypts everything after ServerHello in application-data records (23 3 3), which
 * user space decrypts where the hooked library gave the handshake secrets (pipeline/tls13_flight.py).
 * Where it wants them (hello_iface.flights), a ServerHello arms its flow's bucket in
 * `hello_flight_armed` (by the ports, both directions) for FLIGHT_WINDOW_NS; a segment that
 * starts with 23 3 3 pays the follow lookup only while its bucket is armed: bulk data of other
 * connections keeps its exit without a hash lookup (one array load more, inlined).
 *
 * The records go to the ring buffer user space gives us (map reuse: the tls object's own
 * ring), so a hello is read before the handshake return it precedes.
 * On lo every packet passes egress and then ingress: only egress is hooked there.
 */
#include "common.h"
#include <bpf/bpf_endian.h>

#define HELLO_MAX (16 * 1024) /* bytes of one segment's payload copied: hellos, a certificate chain */
#define FOLLOW_SEGMENTS 8      /* segments copied after a hello's first, per direction */
#define FOLLOW_BYTES (32 * 1024) /* bytes copied after a hello's segment, per direction */
#define FLIGHT_BUCKETS 4096
#define FLIGHT_WINDOW_NS (2ULL * 1000000000) /* a flight (and the peer's answer) within 2 s of its ServerHello */
#define TC_ACT_UNSPEC (-1)
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define QUIC_MAX 2048          /* bytes of a QUIC Initial datagram copied (clients pad them to 1200+) */
#define QUIC_V1 0x00000001
#define QUIC_V2 0x6b3343cf

struct hello_iface {
	__u32 l2_len;      /* 14 on Ethernet-like devices (and lo), 0 on raw IP devices */
	__u32 egress_only; /* lo (user space attaches no ingress program there either) */
	__u32 attached;
	__u32 flights; /* user space reads TLS 1.3's encrypted flights: follow 23 3 3 segments */
};

/* One direction of a TCP connection: the sender first. */
struct hello_flow {
	__u32 family;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* CT_EV_TLS_HELLO: this head (ct_header without a process: TC runs in no process's context),
 * then cap_len bytes of the segment's TCP payload. */
struct hello_rec {
	struct ct_header h;
	__u32 ifindex;
	__u32 egress;
	struct hello_flow f;
	__u32 seq;         /* TCP sequence number of the payload's first byte (UDP: 0) */
	__u32 payload_len; /* of the segment (pre-GSO on lo: can exceed the MTU) */
	__u32 cap_len;
	__u32 proto;       /* IPPROTO_UDP: data is a UDP datagram starting with a QUIC Initial or Handshake packet */
	__u8 data[HELLO_MAX];
};

/* by ifindex: an array, whose lookup the verifier inlines (a hash lookup per packet costs more) */
#define HELLO_IFINDEX_MAX 4096
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HELLO_IFINDEX_MAX);
	__type(key, __u32);
	__type(value, struct hello_iface);
} hello_ifaces SEC(".maps");

struct hello_follow_val {
	__u32 segments; /* still to copy */
	__u32 bytes;
};

/* direction -> what is still to copy (user space deletes the entry when it is done) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct hello_flow);
	__type(value, struct hello_follow_val);
} hello_follow SEC(".maps");

/* (sport ^ dport) % FLIGHT_BUCKETS -> when a ServerHello last passed (ns): see the top */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLIGHT_BUCKETS);
	__type(key, __u32);
	__type(value, __u64);
} hello_flight_armed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hello_rec);
} hello_scratch SEC(".maps");

/* The start of UAPI struct __sk_buff (stable: no CO-RE). Read through this rather than vmlinux.h's
 * copy, whose preserve_access_index would make libbpf load and parse the kernel's BTF (a ~9 MB
 * peak of the tool's RSS) for relocations that can never change. */
struct hello_skb {
	__u32 len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority,
		ingress_ifindex, ifindex;
};

/* Copies the payload at `payload` (len bytes, at most max) of the flow `f` into a record and sends
 * it: the one sender of the TCP and QUIC paths. */
static __always_inline int hello_send(struct __sk_buff *skb, __u32 egress, __u32 ifindex, struct hello_flow *f,
				      __u32 payload, __u32 len, __u32 max, __u32 seq, __u32 proto)
{
	__u32 zero = 0;
	struct hello_rec *rec = bpf_map_lookup_elem(&hello_scratch, &zero);
	if (!rec)
		return TC_ACT_UNSPEC;
	rec->payload_len = len;
	if (len > max)
		len = max;
	if (len == 0)
		return TC_ACT_UNSPEC;
	barrier_var(len);
	if (len > HELLO_MAX)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, payload, rec->data, len))
		return TC_ACT_UNSPEC;
	__builtin_memset(&rec->h, 0, sizeof(rec->h));
	rec->h.ts_ns = bpf_ktime_get_ns();
	rec->h.type = CT_EV_TLS_HELLO;
	rec->ifindex = ifindex;
	rec->egress = egress;
	rec->f = *f;
	rec->seq = seq;
	rec->cap_len = len;
	rec->proto = proto;
	/* no wake-up: the handshake record that follows wakes the reader */
	if (bpf_ringbuf_output(&events, rec, offsetof(struct hello_rec, data) + len, BPF_RB_NO_WAKEUP)) {
		ct_count(CT_CNT_DROPPED);
		return TC_ACT_UNSPEC;
	}
	ct_count(CT_CNT_SUBMITTED);
	return TC_ACT_UNSPEC;
}

/* QUIC (RFC 9000/9001, v2 RFC 9369): a UDP datagram whose first packet is a long-header Initial
 * (its keys come from the client's first Destination Connection ID, so user space can decrypt the
 * CRYPTO frames holding the ClientHello and ServerHello: pipeline/quic_initial.py). Where user space
 * reads encrypted flights (hello_iface.flights: it has the handshake traffic secrets of hooked
 * libraries), datagrams that start with a Handshake packet too (EncryptedExtensions, Certificate:
 * the rest of a server's flight after its first datagram, which starts with its Initial and carries
 * Handshake packets coalesced). Any other datagram (1-RTT: short header) costs one load and a few
 * compares. No follow state: Initial and Handshake packets exist only during a handshake (a handful
 * of datagrams per connection), each copied up to QUIC_MAX bytes. */
static __always_inline int quic_initial(struct __sk_buff *skb, __u32 egress, __u32 ifindex, struct hello_flow *fl,
				   __u32 l4, __u32 end, __u32 flights)
{
	__u8 h[13]; /* UDP header, the packet's first byte, its version */
	if (bpf_skb_load_bytes(skb, l4, h, sizeof(h)))
		return TC_ACT_UNSPEC;
	if ((h[8] & 0xc0) != 0xc0) /* long header, fixed bit */
		return TC_ACT_UNSPEC;
	__u32 version = ((__u32)h[9] << 24) | ((__u32)h[10] << 16) | ((__u32)h[11] << 8) | h[12];
	__u8 type = (h[8] >> 4) & 3; /* Initial: 0 in v1, 1 in v2; Handshake: 2 in v1, 3 in v2 */
	if (version == QUIC_V2)
		type = (type + 3) & 3; /* v2's types, rotated to v1's */
	else if (version != QUIC_V1)
		return TC_ACT_UNSPEC;
	if (type != 0 && !(type == 2 && flights))
		return TC_ACT_UNSPEC;
	ct_count(CT_CNT_SEEN);
	__u32 payload = l4 + 8;
	if (payload >= end)
		return TC_ACT_UNSPEC;
	fl->sport = ((__u16)h[0] << 8) | h[1];
	fl->dport = ((__u16)h[2] << 8) | h[3];
	return hello_send(skb, egress, ifindex, fl, payload, end - payload, QUIC_MAX, 0, IPPROTO_UDP);
}

static __always_inline int hello(struct __sk_buff *ctx, __u32 egress)
{
	struct hello_skb *sk = (struct hello_skb *)ctx;
	struct __sk_buff *skb = ctx;
	__u32 ifindex = sk->ifindex;
	struct hello_iface *ifc = bpf_map_lookup_elem(&hello_ifaces, &ifindex);
	if (!ifc || !ifc->attached || (ifc->egress_only && !egress))
		return TC_ACT_UNSPEC;

	struct hello_flow f = {};
	__u32 l3 = ifc->l2_len & 0xff, l4, end = sk->len;
	__u16 eth_proto = bpf_ntohs(sk->protocol);
	__u8 proto;
	if (eth_proto == ETH_P_IP) {
		__u8 ip[20];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)) || (ip[9] != IPPROTO_TCP && ip[9] != IPPROTO_UDP) ||
		    (ip[6] & 0x1f) || ip[7])
			return TC_ACT_UNSPEC;
		proto = ip[9];
		f.family = AF_INET;
		l4 = l3 + (ip[0] & 0xf) * 4;
		__u32 tot = (ip[2] << 8) | ip[3]; /* 0 on BIG TCP packets: then the skb's length */
		if (tot && l3 + tot < end)
			end = l3 + tot; /* Ethernet padding of short frames */
		__builtin_memcpy(f.saddr, &ip[12], 4);
		__builtin_memcpy(f.daddr, &ip[16], 4);
	} else if (eth_proto == ETH_P_IPV6) {
		__u8 ip6[40];
		if (bpf_skb_load_bytes(skb, l3, ip6, sizeof(ip6)) || (ip6[6] != IPPROTO_TCP && ip6[6] != IPPROTO_UDP))
			return TC_ACT_UNSPEC;
		proto = ip6[6];
		f.family = AF_INET6;
		l4 = l3 + 40;
		__u32 plen = (ip6[4] << 8) | ip6[5];
		if (plen && l4 + plen < end)
			end = l4 + plen;
		__builtin_memcpy(f.saddr, &ip6[8], 16);
		__builtin_memcpy(f.daddr, &ip6[24], 16);
	} else {
		return TC_ACT_UNSPEC;
	}
	if (proto == IPPROTO_UDP)
		return quic_initial(skb, egress, ifindex, &f, l4, end, ifc->flights);
	struct { __be16 sport, dport; __be32 seq, ack; __u8 off, flags; } tcp;
	if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)))
		return TC_ACT_UNSPEC;
	__u32 payload = l4 + (tcp.off >> 4) * 4;
	if (payload >= end)
		return TC_ACT_UNSPEC; /* no payload: ACKs, SYNs, FINs */
	__u8 head[6];
	if (bpf_skb_load_bytes(skb, payload, head, sizeof(head)))
		return TC_ACT_UNSPEC;
	f.sport = bpf_ntohs(tcp.sport);
	f.dport = bpf_ntohs(tcp.dport);

	__u32 len = end - payload, budget = HELLO_MAX;
	__u32 bucket = (f.sport ^ f.dport) & (FLIGHT_BUCKETS - 1);
	if (head[0] == 22 && head[1] == 3 && (head[5] == 1 || head[5] == 2)) {
		struct hello_follow_val v = {FOLLOW_SEGMENTS, FOLLOW_BYTES};
		bpf_map_update_elem(&hello_follow, &f, &v, BPF_ANY);
		if (head[5] == 2 && ifc->flights) {
			__u64 now = bpf_ktime_get_ns(), *armed = bpf_map_lookup_elem(&hello_flight_armed, &bucket);
			if (armed)
				*armed = now;
		}
	} else {
		/* a segment starting with an application-data record header (the bulk of TLS traffic)
		 * continues no hello flight: no hash lookup, unless a ServerHello of a flow in its
		 * bucket passed lately (a TLS 1.3 flight, which user space wants) */
		if (head[0] == 23 && head[1] == 3 && head[2] == 3) {
			if (!ifc->flights)
				return TC_ACT_UNSPEC;
			__u64 *armed = bpf_map_lookup_elem(&hello_flight_armed, &bucket);
			if (!armed || !*armed || bpf_ktime_get_ns() - *armed > FLIGHT_WINDOW_NS)
				return TC_ACT_UNSPEC;
		}
		struct hello_follow_val *v = bpf_map_lookup_elem(&hello_follow, &f);
		if (!v)
			return TC_ACT_UNSPEC; /* the data path: nothing more */
		budget = v->bytes;
		if (v->segments == 0 || budget == 0) {
			bpf_map_delete_elem(&hello_follow, &f);
			return TC_ACT_UNSPEC;
		}
		__u32 take = len < budget ? len : budget;
		if (take > HELLO_MAX)
			take = HELLO_MAX;
		__sync_fetch_and_add(&v->segments, -1);
		__sync_fetch_and_add(&v->bytes, -take);
	}
	ct_count(CT_CNT_SEEN);
	return hello_send(skb, egress, ifindex, &f, payload, len, budget < HELLO_MAX ? budget : HELLO_MAX,
			  bpf_ntohl(tcp.seq), 0);
}

SEC("tc")
int hello_ingress(struct __sk_buff *skb)
{
	return hello(skb, 0);
}

SEC("tc")
int hello_egress(struct __sk_buff *skb)
{
	return hello(skb, 1);
}

char LICENSE[] SEC("license") = "GPL";
