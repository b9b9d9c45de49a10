"""The Python side of bpf/tls_hello.bpf.c: the TLS handshake messages of every TCP connection
and the Initial datagrams of QUIC connections (pipeline/quic_initial.py decrypts them),
from a TC classifier on every interface, written into the ring buffer of another object (the tls
tracer's: one ring keeps a connection's hellos before its handshake record).

Interfaces, state files and cleanup after a crash are probes/tc_capture.py's, with our own
filter handle/priority and state-file prefix, so a pcapng capture and this run side by side.
Needs CAP_NET_ADMIN (and CAP_BPF): without it, start() raises HelloUnavailable and the caller
goes on without packet facts.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from crypto_tracer.bpf.cstruct import CStruct
from crypto_tracer.host.links import LinkWatcher
from crypto_tracer.log import log
from crypto_tracer.probes import tc_capture
from crypto_tracer.probes.common import CT_EV_TLS_HELLO, CT_HEADER

TC_HANDLE = 0xC8  # tc_capture's is 0xC7
TC_PRIORITY = 0xC8
STATE_PREFIX = "tls-hello"
OWN_RING = 4 << 20  # without a tracer's ring: room for ~250 16 KB certificate segments between reads

# The structs of tls_hello.bpf.c (checked against its BTF by tests/unit/test_bpf_layouts.py).
HELLO_FLOW = CStruct("hello_flow", "family I sport H dport H saddr 16s daddr 16s")
HELLO_REC = CStruct("hello_rec", ("h", CT_HEADER), "ifindex I egress I", ("f", HELLO_FLOW),
                    "seq I payload_len I cap_len I proto I", until="data")
HELLO_IFACE = CStruct("hello_iface", "l2_len I egress_only I attached I flights I")
IPPROTO_UDP = 17  # hello_rec.proto of a QUIC Initial datagram
IFINDEX_MAX = 4096  # HELLO_IFINDEX_MAX: hello_ifaces is an array by ifindex
_HEAD = HELLO_REC.struct
_FLOW0, _FLOW1 = HELLO_REC.span("f.family", "f.daddr")
_TYPE = CT_EV_TLS_HELLO.to_bytes(4, "little")


class HelloUnavailable(Exception):
    """The TC classifier cannot run here (no CAP_NET_ADMIN, no clsact...): packet facts stay null."""


@dataclass(slots=True)
class Segment:
    ts_ns: int
    egress: bool
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    payload_len: int
    data: bytes
    flow: bytes  # the follow map's key (this direction)
    udp: bool = False  # a UDP datagram starting with a QUIC Initial packet (seq 0), not a TCP segment


def decode(raw: bytes) -> Segment:
    (ts, _type, _pid, _tid, _uid, _comm, _ifindex, egress, family, sport, dport, saddr, daddr, seq, payload_len,
     cap_len, proto) = _HEAD.unpack_from(raw, 0)
    src = tc_capture.proc.address_text(family, saddr)
    dst = tc_capture.proc.address_text(family, daddr)
    return Segment(ts, bool(egress), (src, sport), (dst, dport), seq, payload_len,
                   raw[_HEAD.size:_HEAD.size + cap_len], raw[_FLOW0:_FLOW1], proto == IPPROTO_UDP)


def all_interfaces() -> list[tc_capture.Interface]:
    out = []
    for _index, name in socket.if_nameindex():
        try:
            out.append(tc_capture.interface(name))
        except Exception:  # gone meanwhile
            continue
    return out


class HelloCapture:
    """Loads tls_hello.bpf.o onto `ring` (a loaded object's ringbuf map; None: its own) and attaches
    it to every interface present at start, and to those created later when follow_links() is
    called (or only to `interfaces`). flights:
    copy TLS 1.3's encrypted flights too (for pipeline/tls13_flight.py, where secrets are known)."""

    def __init__(self, ring, interfaces: list[tc_capture.Interface] | None = None, flights: bool = False):
        self.ring = ring
        self.flights = flights
        self.interfaces = interfaces
        self.obj = None
        self.state = tc_capture.TcState(STATE_PREFIX, TC_HANDLE, TC_PRIORITY, "tls_hello")
        self.links: LinkWatcher | None = None

    def start(self) -> None:
        from crypto_tracer.engine import BpfObject
        from crypto_tracer.errors import TracerError

        tc_capture.cleanup_leftovers(STATE_PREFIX, TC_HANDLE, TC_PRIORITY, "TC handshake classifier")
        try:
            self.obj = BpfObject.from_package("tls_hello")
            events = self.obj.map("events")
            if self.ring is None:  # a ring of our own (tls -m handshake), of OWN_RING bytes
                events.set_max_entries(OWN_RING)
            else:
                events.set_max_entries(self.ring.max_entries)
                events.reuse_fd(self.ring.fd)
            self.obj.load()
        except TracerError as exc:
            self.close()
            raise HelloUnavailable(str(exc).splitlines()[0]) from None
        if self.interfaces is None:  # every interface: those of now, then each one created later
            self.links = LinkWatcher()  # subscribed before the scan, so none falls between
        try:
            for ifc in self.interfaces if self.interfaces is not None else all_interfaces():
                self._attach(ifc)
        except HelloUnavailable:
            self.close()
            raise
        if not len(self.state):
            self.close()
            raise HelloUnavailable("no interface took the TC classifier")
        log.debug("tls_hello: on %s", ", ".join(a["name"] for a in self.state.interfaces))

    def _attach(self, ifc: tc_capture.Interface) -> None:
        from crypto_tracer.engine import AttachError, TcHook

        if ifc.ifindex >= IFINDEX_MAX:
            log.debug("tls_hello: %s not watched (ifindex %d)", ifc.name, ifc.ifindex)
            return
        loopback = ifc.arphrd == tc_capture.ARPHRD_LOOPBACK
        self.obj.map("hello_ifaces").update(struct.pack("<I", ifc.ifindex), HELLO_IFACE.struct.pack(
            14 if ifc.has_l2 else 0, int(loopback), 1, int(self.flights)))
        hook = TcHook(ifc.ifindex, TC_HANDLE, TC_PRIORITY)
        try:
            created = hook.create()
        except AttachError as exc:
            if exc.errno == errno.EPERM:
                raise HelloUnavailable("adding a clsact qdisc needs CAP_NET_ADMIN") from None
            log.debug("tls_hello: no clsact on %s: %s", ifc.name, exc)
            return
        self.state.add(ifc, created)
        try:
            if not loopback:  # lo: each packet passes egress, then ingress
                hook.attach(self.obj.program("hello_ingress"), False)
            hook.attach(self.obj.program("hello_egress"), True)
        except AttachError as exc:
            if exc.errno == errno.EPERM:  # (the qdisc was there already)
                raise HelloUnavailable("attaching a TC classifier needs CAP_NET_ADMIN") from None
            log.debug("tls_hello: attaching on %s failed: %s", ifc.name, exc)

    def follow_links(self) -> None:
        """Attach to the interfaces created since the last call (a container's veth, a tun):
        one non-blocking read of the link notifications, called from the poll loop."""
        if self.links is None or self.obj is None:
            return
        for index, name, present in self.links.read():
            known = index in self.state
            if not present:  # its filters went with it; the index may come back for another link
                if known:
                    self.state.forget(index)
                    if index < IFINDEX_MAX:
                        self.obj.map("hello_ifaces").update(struct.pack("<I", index), HELLO_IFACE.struct.pack(0, 0, 0, 0))
                continue
            if known:
                continue
            try:
                ifc = tc_capture.interface(name)
            except Exception:  # gone meanwhile, or renamed
                continue
            if ifc.ifindex != index:
                continue
            try:
                self._attach(ifc)
            except HelloUnavailable as exc:
                log.warning("new interface %s not watched: %s", name, exc)
                continue
            log.debug("tls_hello: new interface %s watched", name)

    def done(self, flow: bytes) -> None:
        """Stop copying this direction's segments (its handshake messages are read)."""
        if self.obj is not None:
            self.obj.map("hello_follow").delete(flow)

    def counters(self) -> dict:
        return self.obj.counters() if self.obj is not None else {"seen": 0, "kernel_filtered": 0, "dropped": 0,
                                                                  "submitted": 0}

    def attached(self) -> int:
        """Interfaces our classifiers are on."""
        return len(self.state)

    def detach(self) -> None:
        self.state.remove_all()

    def close(self) -> None:
        self.detach()
        if self.links is not None:
            self.links.close()
            self.links = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None


def start_for(tracer, on_segment: Callable[[bytes], None], flights: bool = False) -> HelloCapture | None:
    """The classifier on the tls tracer's ring, its records to on_segment; None (one warning)
    when it cannot run."""
    capture = HelloCapture(tracer.map("events"), flights=flights)
    try:
        capture.start()
    except HelloUnavailable as exc:
        log.warning("handshake facts from packets are off (%s): cipher, group, sni, alpn and resumed stay null", exc)
        return None
    tracer.on(CT_EV_TLS_HELLO, on_segment)
    return capture
