"""The Python side of bpf/tc_capture.bpf.c: the packet filter's map value, the clsact hooks on each interface
(and their cleanup, also after a crash), and the ring of records: each packet arrives as a complete
pcapng Enhanced Packet Block (sinks/pcapng.PacketSink writes it as it is), a ClientHello's packet
after a cap_hello record with its client_random.

Cleanup: every run writes /run/crypto-tracer/tc-capture-<pid>.json naming what it attached.
A later start removes what a dead run left behind: its filters (by their handle and
priority) and the clsact qdisc when that run had created it.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

from crypto_tracer.bpf.cstruct import CStruct
from crypto_tracer.engine.ringread import BUSY_BIT, DISCARD_BIT, HEADER_SIZE, DirectRing
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.pipeline.filters.connections import MAX_HOSTS, MAX_PORTS, PacketFilter
from crypto_tracer.host import proc
from crypto_tracer.log import log

SNAPLEN = 256 * 1024  # lo carries pre-GSO packets of ~107 KB
STATE_DIR = "/run/crypto-tracer"
TC_HANDLE = 0xC7
TC_PRIORITY = 0xC7
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
LINKTYPE_ETHERNET, LINKTYPE_RAW = 1, 101

# The structs of tc_capture.bpf.c (checked against its BTF by tests/unit/test_bpf_layouts.py).
# A packet record is a pcapng EPB (sinks/pcapng.py writes the same layout for its own packets).
CAP_REC = CStruct("cap_rec", "block_type I block_len I if_id I ts_high I ts_low I cap_len I orig_len I",
                  until="data")
CAP_HELLO = CStruct("cap_hello", "type I pad 4x client_random 32s")
EPB_TYPE, CAP_HELLO_TYPE = 6, 0xC7C7C7C7  # the first byte tells them apart: 0x06 / 0xC7
HELLO_RANDOM = slice(CAP_HELLO.offset("client_random"), CAP_HELLO.end("client_random"))
CAP_CNT_TRUNCATED = 4  # counters[4] of the object (after the common four)
CAP_HOST = CStruct("cap_host", "family I addr 16s")
CONFIG = CStruct("cap_config", f"snaplen I proto I nports I nhosts I ports {MAX_PORTS * 'H'}",
                 *[(f"hosts[{i}]", CAP_HOST) for i in range(MAX_HOSTS)], "epoch_offset q").struct
IFACE = CStruct("cap_iface", "l2_len I egress_only I if_id I").struct


# --- the packet filter (pipeline/filters/connections.compile_packet_filter) --------------------------

def config_value(packet_filter: PacketFilter, snaplen: int, epoch_offset: int = 0) -> bytes:
    """struct cap_config for the packet filter; epoch_offset: CLOCK_REALTIME - CLOCK_MONOTONIC in ns
    (the kernel stamps each packet with the wall clock)."""
    f = packet_filter
    ports = f.ports + [0] * (MAX_PORTS - len(f.ports))
    hosts = []
    for h in f.hosts + [None] * (MAX_HOSTS - len(f.hosts)):
        hosts += [0, b""] if h is None else [socket.AF_INET if h.version == 4 else socket.AF_INET6, h.packed]
    return CONFIG.pack(snaplen, f.proto, len(f.ports), len(f.hosts), *ports, *hosts, epoch_offset)


# --- interfaces and TC hooks ---------------------------------------------------------------

@dataclass
class Interface:
    name: str
    ifindex: int
    arphrd: int

    @property
    def has_l2(self) -> bool:
        return self.arphrd in (ARPHRD_ETHER, ARPHRD_LOOPBACK)

    @property
    def linktype(self) -> int:
        return LINKTYPE_ETHERNET if self.has_l2 else LINKTYPE_RAW


def interface(name: str) -> Interface:
    try:
        ifindex = socket.if_nametoindex(name)
    except OSError:
        raise TracerError(f"no network interface '{name}'", ExitStatus.BAD_ARGS, "list them with: ip link") from None
    try:
        with open(f"/sys/class/net/{name}/type") as f:
            arphrd = int(f.read())
    except (OSError, ValueError):
        arphrd = ARPHRD_ETHER
    return Interface(name, ifindex, arphrd)


def _tc(ifindex: int, handle: int = TC_HANDLE, priority: int = TC_PRIORITY):
    from crypto_tracer.engine import TcHook

    return TcHook(ifindex, handle, priority)


def _create_qdisc(ifindex: int) -> bool:
    """Add the clsact qdisc; False when it was there already (then it is not ours to remove)."""
    from crypto_tracer.engine import AttachError

    try:
        return _tc(ifindex).create()
    except AttachError as exc:
        raise TracerError(str(exc), ExitStatus.NO_PRIVILEGES if exc.errno == errno.EPERM else ExitStatus.BPF_FAILURE,
                          "pcapng capture needs CAP_NET_ADMIN") from None


def _other_filters(ifindex: int) -> bool:
    """Whether the interface's clsact still holds filters (ours are detached first): another capture
    (tls's handshake classifier, a later pcapng run) uses the qdisc we created, which must then
    stay. Without tc(8): no."""
    import shutil
    import subprocess

    if not shutil.which("tc"):
        return False
    try:
        name = socket.if_indextoname(ifindex)
    except OSError:
        return False
    for direction in ("ingress", "egress"):
        try:
            out = subprocess.run(["tc", "filter", "show", "dev", name, direction], capture_output=True, text=True,
                                 check=False, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        if out.strip():
            return True
    return False


def _remove(ifindex: int, created_qdisc: bool, handle: int = TC_HANDLE, priority: int = TC_PRIORITY) -> None:
    """Detach our filters; remove the qdisc if we created it and no other capture's filters are on it."""
    hook = _tc(ifindex, handle, priority)
    hook.detach()
    if created_qdisc and not _other_filters(ifindex):
        hook.destroy()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cleanup_leftovers(prefix: str = "tc-capture", handle: int = TC_HANDLE, priority: int = TC_PRIORITY,
                      what: str = "TC capture") -> int:
    """Remove what dead runs attached (state files prefix-PID.json, filters handle/priority: also
    probes/tls_hello.py's); returns how many interfaces were cleaned."""
    cleaned = 0
    for path in glob.glob(os.path.join(STATE_DIR, f"{prefix}-*.json")):
        try:
            with open(path) as f:
                state = json.load(f)
            if _alive(int(state["pid"])) and int(state["pid"]) != os.getpid():
                continue
            for ifc in state["interfaces"]:
                _remove(int(ifc["ifindex"]), bool(ifc["created_qdisc"]), handle, priority)
                cleaned += 1
            os.unlink(path)
            log.info("removed the %s left behind by crypto-tracer pid %s", what, state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return cleaned


class TcState:
    """What one run attached, in STATE_DIR/<prefix>-<pid>.json, so that cleanup_leftovers() can
    remove it after a crash: each interface and whether we created its clsact qdisc. Used by the
    pcapng capture and by probes/tls_hello.py, each with its own prefix, handle and priority."""

    def __init__(self, prefix: str, handle: int, priority: int, what: str):
        self.path = os.path.join(STATE_DIR, f"{prefix}-{os.getpid()}.json")
        self.handle, self.priority, self.what = handle, priority, what
        self.interfaces: list[dict] = []

    def __len__(self) -> int:
        return len(self.interfaces)

    def __contains__(self, ifindex: int) -> bool:
        return any(i["ifindex"] == ifindex for i in self.interfaces)

    def add(self, ifc: Interface, created_qdisc: bool) -> None:
        """Recorded before the programs are attached, so a crash in between is cleaned too."""
        self.interfaces.append({"ifindex": ifc.ifindex, "name": ifc.name, "created_qdisc": created_qdisc})
        self._save()

    def forget(self, ifindex: int) -> None:
        """An interface deleted meanwhile (its filters went with it)."""
        self.interfaces = [i for i in self.interfaces if i["ifindex"] != ifindex]
        self._save()

    def _save(self) -> None:
        try:
            os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
            with open(self.path, "w") as f:
                json.dump({"pid": os.getpid(), "interfaces": self.interfaces}, f)
        except OSError as exc:
            log.warning("cannot record the TC state in %s (%s): a crash would leave filters behind",
                        STATE_DIR, exc.strerror)

    def remove_all(self) -> None:
        """Our filters, and each qdisc we made that no other capture uses; then the state file."""
        for ifc in reversed(self.interfaces):
            _remove(ifc["ifindex"], ifc["created_qdisc"], self.handle, self.priority)
            log.debug("%s: detached from %s (qdisc ours: %s)", self.what, ifc["name"], ifc["created_qdisc"])
        self.interfaces.clear()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --- connections that existed before the capture ------------------------------------------

FLOW_KEY = CStruct("flow_key", "family I lport H rport H laddr 16s raddr 16s").struct
FLOW_PROC = CStruct("flow_proc", "pid I comment_len I comm 16s comment_opt 48s uid I ppid I start_ns Q exec_id Q").struct
OPT_COMMENT = 1


def flow_proc(pid: int, comm: bytes) -> bytes:
    """A flows-map value: the process and its packets' opt_comment, as note_socket() builds them
    (uid/ppid 0 and start_ns 0: seeded from /proc, its image unknown to the kernel)."""
    comm = bytes(c if c < 0x80 else 0x3F for c in comm.split(b"\0", 1)[0][:15])  # UTF-8: '?' for the rest
    text = b"pid=%d comm=%s" % (pid, comm)
    opt = struct.pack("<HH", OPT_COMMENT, len(text)) + text + b"\0" * (-len(text) % 4)
    return FLOW_PROC.pack(pid, len(opt), comm, opt, 0, 0, 0, 0)


def existing_flows() -> dict[bytes, bytes]:
    """flows-map entries for the TCP connections and connected UDP sockets (QUIC clients) open
    now: 4-tuple -> owning pid and comm."""
    sockets: dict[int, bytes] = {}  # socket inode -> flows key
    for name in ("tcp", "tcp6", "udp", "udp6"):
        data = proc.read_bytes(f"/proc/net/{name}", 64 << 20)
        try:
            for la, lport, ra, rport, state, inode in proc.tcp_rows(data or b""):
                # a connected UDP socket says ESTABLISHED (1), an unconnected one CLOSE (7)
                if state == proc.TCP_LISTEN or (name.startswith("udp") and state != proc.TCP_ESTABLISHED):
                    continue
                family = proc.family_of(la)
                if family == proc.AF_INET6 and la[:12] == ra[:12] == b"\0" * 10 + b"\xff\xff":
                    family, la, ra = proc.AF_INET, la[12:], ra[12:]
                sockets[inode] = FLOW_KEY.pack(family, lport, rport, la, ra)
        except (ValueError, IndexError):
            continue
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()[:15]
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = proc.socket_inode(link)
            if inode in sockets:
                out[sockets[inode]] = flow_proc(int(pid), comm)
    return out


# --- packets -------------------------------------------------------------------------------

def client_hello_random(frame: bytes, has_l2: bool) -> bytes | None:
    """The client_random of a TLS ClientHello starting this TCP packet's payload, else None."""
    pos = 0
    if has_l2:
        if len(frame) < 14:
            return None
        ethertype = int.from_bytes(frame[12:14], "big")
        pos = 14
    else:
        ethertype = 0x0800 if frame[:1] and frame[0] >> 4 == 4 else 0x86DD
    if ethertype == 0x0800 and len(frame) >= pos + 20 and frame[pos + 9] == socket.IPPROTO_TCP:
        pos += (frame[pos] & 0x0F) * 4
    elif ethertype == 0x86DD and len(frame) >= pos + 40 and frame[pos + 6] == socket.IPPROTO_TCP:
        pos += 40
    else:
        return None
    if len(frame) < pos + 20:
        return None
    pos += (frame[pos + 12] >> 4) * 4
    # TLS record: handshake (22), version 3.x; handshake: ClientHello (1); then version (2), random (32)
    hello = frame[pos:pos + 43]
    if len(hello) == 43 and hello[0] == 22 and hello[1] == 3 and hello[5] == 1:
        return hello[11:43]
    return None


READ_BATCH = 4096  # records per read of the ring (libbpf's reader; PacketRing reads all there is)


class PacketRing(DirectRing):
    """DirectRing (its mapping, the data area once) with the loop cut to what each of ~100,000
    records/s needs (about 0.35 instead of 0.6 us a record here): everything committed is read at once (its records are held for a second
    anyway), and the rare busy or discarded header is tested on one combined mask."""

    def read(self, limit: int = 0) -> list[bytes]:
        data, words, page, mask = self._data_map, self._words, self._page, self._mask
        area_end = page + mask + 1  # the data area is mapped once: a record may wrap around
        cons = self._cons[0]
        prod = self._prod[0]
        out: list[bytes] = []
        append = out.append
        while cons < prod:
            pos = page + (cons & mask)
            header = words[pos >> 2]
            if header & _BUSY_OR_DISCARD:
                if header & BUSY_BIT:  # reserved, not committed yet: stop here, in order
                    break
                cons += ((header & ~_BUSY_OR_DISCARD) + HEADER_SIZE + 7) & ~7
                continue
            pos += HEADER_SIZE
            end = pos + header
            if end <= area_end:
                append(data[pos:end])
            else:  # headers are 8-aligned, never split; the record's two parts are joined
                append(data[pos:area_end] + data[page:page + end - area_end])
            cons += (header + HEADER_SIZE + 7) & ~7
        self._cons[0] = cons  # one aligned 8-byte store
        return out


_BUSY_OR_DISCARD = BUSY_BIT | DISCARD_BIT


class TcCapture:
    """Captures packets on interfaces with TC; records go to handler(list of raw records), one list
    per read of the ring. The packets of interfaces[i] say interface id i (their IDB in the pcapng)."""

    def __init__(self, interfaces: list[Interface], packet_filter: PacketFilter,
                 handler: Callable[[list[bytes]], None], snaplen: int = SNAPLEN, mapsize: int | None = None,
                 epoch_offset: int = 0):
        self.interfaces = interfaces
        self.filter = packet_filter
        self.handler = handler
        self.epoch_offset = epoch_offset
        self.snaplen = min(snaplen, SNAPLEN)
        self.mapsize = mapsize or (32 << 20)
        self.obj = None
        self.rb = None
        self.state = TcState("tc-capture", TC_HANDLE, TC_PRIORITY, "capture")

    def start(self) -> None:
        from crypto_tracer.engine import BpfObject, num_possible_cpus, ring_reader

        cleanup_leftovers()
        self.obj = BpfObject.from_package("tc_capture")
        self.obj.map("cap_scratch").set_max_entries(num_possible_cpus())
        self.obj.map("events").set_max_entries(self.mapsize)
        self.obj.load()
        zero = struct.pack("<I", 0)
        self.obj.map("cap_config").update(zero, config_value(self.filter, self.snaplen, self.epoch_offset))
        for if_id, ifc in enumerate(self.interfaces):
            self.obj.map("cap_ifaces").update(struct.pack("<I", ifc.ifindex),
                                              IFACE.pack(14 if ifc.has_l2 else 0, int(ifc.arphrd == ARPHRD_LOOPBACK),
                                                         if_id))
        flows = self.obj.map("flows")
        for key, owner in existing_flows().items():  # connections opened before the capture
            flows.update(key, owner)
        self.obj.attach_tracepoint("cap_connect_enter", "syscalls", "sys_enter_connect")
        self.obj.attach_tracepoint("cap_connect_exit", "syscalls", "sys_exit_connect")
        self.obj.attach_tracepoint("cap_accept4_exit", "syscalls", "sys_exit_accept4")
        self.obj.attach_tracepoint("cap_accept_exit", "syscalls", "sys_exit_accept")
        events = self.obj.map("events")
        # lists of records: no ctypes call per packet
        self.rb = PacketRing(events.fd, events.max_entries) if DirectRing.supported else \
            ring_reader(events, READ_BATCH)
        for ifc in self.interfaces:
            self._attach(ifc)

    def _attach(self, ifc: Interface) -> None:
        from crypto_tracer.engine import AttachError

        created = _create_qdisc(ifc.ifindex)
        self.state.add(ifc, created)
        hook = _tc(ifc.ifindex)
        # lo: every packet passes egress, then ingress again; an ingress program there would only
        # return (~100 ns a packet), so none is attached (the kernel's egress_only stays as a guard)
        directions = (("tc_egress", True),) if ifc.arphrd == ARPHRD_LOOPBACK else \
            (("tc_ingress", False), ("tc_egress", True))
        for prog, egress in directions:
            try:
                hook.attach(self.obj.program(prog), egress)
            except AttachError as exc:
                if exc.errno == errno.EEXIST:
                    raise TracerError(f"another crypto-tracer capture is running on {ifc.name}", ExitStatus.ERROR,
                                      "stop it first (one pcapng capture per interface)") from None
                raise TracerError(f"attaching the TC capture to {ifc.name} failed: {exc.strerror}",
                                  ExitStatus.BPF_FAILURE) from None
        log.debug("capture: attached to %s (ifindex %d, qdisc %s)", ifc.name, ifc.ifindex,
                  "created" if created else "already there")

    def set_epoch_offset(self, epoch_offset: int) -> None:
        """The wall clock moved against CLOCK_MONOTONIC (WallClock.resync): stamp from now on with it."""
        if epoch_offset != self.epoch_offset and self.obj is not None:
            self.epoch_offset = epoch_offset
            self.obj.map("cap_config").update(struct.pack("<I", 0),
                                              config_value(self.filter, self.snaplen, epoch_offset))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms (the kernel wakes us only when the ring fills), then hand every
        record in the ring to the handler."""
        if timeout_ms:
            self.rb.wait(timeout_ms)
        return self.drain()

    @property
    def epoll_fd(self) -> int:
        """Readable when the kernel signals packets (for a caller's own select)."""
        return self.rb.epoll_fd

    def drain(self) -> int:
        n, handler = 0, self.handler
        while self.rb is not None and (raws := self.rb.read(READ_BATCH)):
            handler(raws)
            n += len(raws)
        return n

    def counters(self) -> dict:
        """seen, kernel_filtered, dropped, submitted (packets and hello records), truncated."""
        if self.obj is None:
            return {"seen": 0, "kernel_filtered": 0, "dropped": 0, "submitted": 0, "truncated": 0}
        from crypto_tracer.engine import COUNTER_NAMES

        return self.obj.counters(COUNTER_NAMES + ("truncated",))

    def detach(self) -> None:
        """Remove every filter and qdisc we added (the ring can still be drained)."""
        self.state.remove_all()

    def close(self) -> None:
        self.detach()
        if self.rb is not None:
            self.rb.close()
            self.rb = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None
