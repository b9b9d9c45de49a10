"""Which process owns each TCP connection, for `tls -m handshake` (packets carry no process):
tc_capture.bpf.c's connect()/accept() tracepoints, which record a socket's 4-tuple -> pid, comm,
uid, ppid and process image (start time, exec count) in its `flows` map when the syscall returns
in the owner's context, seeded at start with the connections open then (from /proc). Only those
tracepoints are attached (no TC program of that object): a data call costs nothing.

The exe comes from the image's CT_EV_TLS_PROCESS record (bpf/image.h), sent once per process image
into the ring this object shares with the handshake classifier, before the connect() returns, so
it is read before the connection's hellos: a client gone before we look (a curl run) keeps its
exe, and a pid reused by another process (another start time) or after an exec (another exec
count) never gets a stale one. A connection missing from the map (a socket handed to another
process is still its creator's) has no owner: null, never a guess."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from crypto_tracer.host import proc
from crypto_tracer.probes import tc_capture
from crypto_tracer.probes.common import decode_image

RING_SIZE = 4096  # without a shared ring: nothing is written to it (no TC program, no images announced)
MAX_IMAGES = 32768  # images remembered (the kernel's `images` map holds 16384)
CNT_PROC_DROPPED = 5  # tc_capture.bpf.c CAP_CNT_PROC_DROPPED
_NS_PER_TICK = 1_000_000_000 // proc._CLK_TCK


def _thread_comms(pid: int) -> set[str]:
    """The names of the process's threads (a connect() from a named thread carries that name)."""
    import os

    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    return {(proc.read_bytes(f"/proc/{pid}/task/{t}/comm", 64) or b"").decode("utf-8", "replace").strip()
            for t in tids[:256]}


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    comm: str
    ppid: int | None
    uid: int | None
    exe: str | None
    mnt_ns: int | None = None  # its mount namespace's inode: which container


class SocketOwners:
    def __init__(self):
        self.obj = None
        self._images: dict[tuple[int, int, int], tuple[str | None, int | None]] = {}  # -> (exe, mnt_ns)
        self._seeded: dict[bytes, Owner] = {}

    def start(self, ring=None) -> None:
        """ring: a loaded object's ringbuf map to announce process images into (None: none)."""
        from crypto_tracer.engine import BpfObject, num_possible_cpus

        self.obj = BpfObject.from_package("tc_capture")
        self.obj.map("cap_scratch").set_max_entries(num_possible_cpus())
        events = self.obj.map("events")
        if ring is None:
            events.set_max_entries(RING_SIZE)
        else:
            events.set_max_entries(ring.max_entries)
            events.reuse_fd(ring.fd)
        self.obj.load()
        if ring is not None:
            self.obj.map("announce_images").update(b"\0\0\0\0", struct.pack("<I", 1))
        flows = self.obj.map("flows")
        for key, value in tc_capture.existing_flows().items():  # connections opened before the run
            flows.update(key, value)
            pid, _n, comm, *_ = tc_capture.FLOW_PROC.unpack_from(value)
            self._seeded[key] = self._from_proc(pid, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))
        self.obj.attach_tracepoint("cap_connect_enter", "syscalls", "sys_enter_connect")
        self.obj.attach_tracepoint("cap_connect_exit", "syscalls", "sys_exit_connect")
        self.obj.attach_tracepoint("cap_accept4_exit", "syscalls", "sys_exit_accept4")
        self.obj.attach_tracepoint("cap_accept_exit", "syscalls", "sys_exit_accept")

    def learn(self, raw: bytes) -> None:
        """A CT_EV_TLS_PROCESS record from the shared ring: the exe of one process image."""
        image, _uid, _ppid, exe, mnt_ns = decode_image(raw)
        if len(self._images) >= MAX_IMAGES:  # bounded: the oldest half goes (dicts keep insertion order)
            for old in list(self._images)[:MAX_IMAGES // 2]:
                del self._images[old]
        self._images[image] = exe, mnt_ns

    @staticmethod
    def _from_proc(pid: int, comm: str, start_ns: int | None = None) -> Owner:
        """A live process's ppid, uid, exe and mount namespace from /proc, only while pid still names
        that process (its comm or a thread's, and its start time when known): else only pid and comm."""
        stat = proc.read_stat(pid)
        if stat is None or (start_ns is not None and stat[2] != start_ns // _NS_PER_TICK) \
                or (stat[0] != comm and comm not in _thread_comms(pid)):
            return Owner(pid, comm, None, None, None)
        uid, _gid = proc.read_status_ids(pid)
        exe, _root, mnt_ns = proc.read_view(pid)
        if proc.read_stat(pid) != stat:  # exited (or exec'd) while we read
            return Owner(pid, comm, None, None, None)
        return Owner(pid, comm, stat[1], uid, exe, mnt_ns)

    def owner(self, local: tuple[str, int], remote: tuple[str, int]) -> Owner | None:
        """The process of the socket whose local end is `local`, connected to `remote`."""
        try:
            family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
            la, ra = socket.inet_pton(family, local[0]), socket.inet_pton(family, remote[0])
        except (OSError, TypeError):
            return None
        key = tc_capture.FLOW_KEY.pack(family, local[1], remote[1], la.ljust(16, b"\0"), ra.ljust(16, b"\0"))
        value = self.obj.map("flows").lookup(key) if self.obj is not None else None
        if value is None:
            return None
        pid, _n, comm, _opt, uid, ppid, start_ns, exec_id = tc_capture.FLOW_PROC.unpack_from(value)
        comm = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not start_ns:  # seeded from /proc at start
            seeded = self._seeded.get(key)
            return seeded if seeded is not None and seeded.pid == pid else Owner(pid, comm, None, None, None)
        image = (pid, start_ns, exec_id)
        if image in self._images:
            return Owner(pid, comm, ppid, uid, *self._images[image])
        # its record lost (ring full) or announced before a restart of our cache: /proc, if still that process
        live = self._from_proc(pid, comm, start_ns)
        return Owner(pid, comm, ppid, uid, live.exe, live.mnt_ns)

    def counters(self) -> dict:
        return {"images_dropped": self.obj.counter_totals(CNT_PROC_DROPPED + 1)[CNT_PROC_DROPPED]
                if self.obj is not None else 0}

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None
