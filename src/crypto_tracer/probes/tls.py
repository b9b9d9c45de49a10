"""The user side of tls.bpf.c: what to attach where, and how to decode its records.

``TlsTracer`` finds the TLS libraries of the processes of interest, hooks each library
file once (or once per --pid process), follows new processes and newly mapped libraries,
and hands the raw records to the handlers registered with ``on()``.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from crypto_tracer import discovery
from crypto_tracer.discovery import GNUTLS, NSS, OPENSSL, TlsLibrary
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log

# Record types (bpf/common.h) and the library/function ids of tls.bpf.c.
CT_EV_PROCESS_EXEC, CT_EV_LIB_LOAD, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_DATA, CT_EV_TLS_KEYS = 1, 4, 6, 7, 8
LIB_NAMES = {1: OPENSSL, 2: GNUTLS, 3: NSS}
LIB_KIND_IDS = {v: k for k, v in LIB_NAMES.items()}
FUNC_IDS = {"SSL_read": 1, "SSL_read_ex": 2, "SSL_peek": 3, "SSL_peek_ex": 4, "SSL_write": 5, "SSL_write_ex": 6,
            "gnutls_record_recv": 7, "gnutls_record_send": 8,
            "PR_Read": 9, "PR_Recv": 10, "PR_Write": 11, "PR_Send": 12, "PR_Writev": 13,
            "SSL_do_handshake": 20, "SSL_connect": 21, "SSL_accept": 22, "gnutls_handshake": 23}
FUNC_NAMES = {v: k for k, v in FUNC_IDS.items()}
WRITE_FUNCS = frozenset(FUNC_IDS[f] for f in ("SSL_write", "SSL_write_ex", "gnutls_record_send", "PR_Write",
                                               "PR_Send", "PR_Writev"))
HANDSHAKE_FUNCS = frozenset(("SSL_do_handshake", "SSL_connect", "SSL_accept", "gnutls_handshake"))
COOKIE_LAYOUT = 0x100

HEADER = struct.Struct("<QIIII16s")  # struct ct_header
DATA = struct.Struct("<QQQIiBBBx" "BxHHxx16s16s")  # struct tls_data_rec up to data[]
HANDSHAKE = struct.Struct("<QiiBBBBI" "BxHHxx16s16s")
DATA_OFFSET = HEADER.size + DATA.size  # 116
CNT_SEEN, CNT_KFILTERED, CNT_DROPPED, CNT_SUBMITTED, CNT_CTRL_DROPPED = 0, 1, 2, 3, 4
AF_INET, AF_INET6 = 2, 10

READ_SYSCALLS = ("sys_enter_read", "sys_enter_readv", "sys_enter_recvfrom", "sys_enter_recvmsg")
WRITE_SYSCALLS = ("sys_enter_write", "sys_enter_writev", "sys_enter_sendto", "sys_enter_sendmsg")


def ensure_tracefs() -> None:
    """Syscall tracepoints need tracefs; mount it when the system has not."""
    for path in ("/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"):
        if os.path.isdir(path):
            return
    ret = os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
    if ret != 0 or not os.path.isdir("/sys/kernel/tracing/events"):
        raise TracerError("tracefs is not mounted and could not be mounted", ExitStatus.KERNEL_FEATURE,
                          "mount it: mount -t tracefs nodev /sys/kernel/tracing")


_ADDRESSES: dict[tuple[int, bytes], str | None] = {}


def address(family: int, raw: bytes) -> str | None:
    """An address as text; IPv4-mapped IPv6 prints as IPv4 (cached: a host talks to few peers)."""
    key = (family, raw)
    text = _ADDRESSES.get(key, "")
    if text == "":
        if len(_ADDRESSES) > 65536:
            _ADDRESSES.clear()
        text = _ADDRESSES[key] = _address(family, raw)
    return text


def _address(family: int, raw: bytes) -> str | None:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == AF_INET6:
        addr = ipaddress.IPv6Address(raw)
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    return None


@dataclass(slots=True)
class TlsData:
    ts_ns: int
    pid: int
    tid: int
    uid: int
    comm: str
    library: str
    function: str
    direction: str
    fd: int | None
    local_addr: str | None
    local_port: int | None
    remote_addr: str | None
    remote_port: int | None
    length: int
    offset: int
    truncated: bool
    ssl: int
    data: bytes


@dataclass(slots=True)
class TlsHandshake:
    ts_ns: int
    pid: int
    tid: int
    uid: int
    comm: str
    library: str
    function: str
    role: str | None
    fd: int | None
    local_addr: str | None
    local_port: int | None
    remote_addr: str | None
    remote_port: int | None
    result: str
    return_value: int
    tls_version: str | None
    ssl: int


TLS_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


def _conn(family, lport, rport, laddr, raddr):
    if family not in (AF_INET, AF_INET6):
        return None, None, None, None
    return address(family, laddr), lport, address(family, raddr), rport


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode_data(raw: bytes) -> TlsData:
    ts, _type, pid, tid, uid, comm = HEADER.unpack_from(raw, 0)
    (ssl, length, offset, chunk_len, fd, lib, func, truncated, family, lport, rport, laddr,
     raddr) = DATA.unpack_from(raw, HEADER.size)
    la, lp, ra, rp = _conn(family, lport, rport, laddr, raddr)
    return TlsData(ts, pid, tid, uid, _comm(comm), LIB_NAMES.get(lib, str(lib)), FUNC_NAMES.get(func, str(func)),
                   "write" if func in WRITE_FUNCS else "read", fd if fd >= 0 else None, la, lp, ra, rp,
                   length, offset, bool(truncated), ssl, raw[DATA_OFFSET:DATA_OFFSET + chunk_len])


def decode_handshake(raw: bytes) -> TlsHandshake:
    ts, _type, pid, tid, uid, comm = HEADER.unpack_from(raw, 0)
    (ssl, fd, result, lib, func, role, ok, version, family, lport, rport, laddr,
     raddr) = HANDSHAKE.unpack_from(raw, HEADER.size)
    la, lp, ra, rp = _conn(family, lport, rport, laddr, raddr)
    return TlsHandshake(ts, pid, tid, uid, _comm(comm), LIB_NAMES.get(lib, str(lib)),
                        FUNC_NAMES.get(func, str(func)), {1: "client", 2: "server"}.get(role),
                        fd if fd >= 0 else None, la, lp, ra, rp, "success" if ok else "failure", result,
                        TLS_VERSIONS.get(version), ssl)


class TlsTracer:
    """Hooks every TLS library of the processes of interest; see the module docstring.

    Usable alone (``tls`` text/json) or by the key-log work with ``capture_data=False``,
    in which case the data programs only run ``tls_keys_on_return``.
    """

    RESCAN_DELAYS = (0.02, 0.2, 1.0)  # after an exec or a library mapping: the loader may not be done

    def __init__(self, pids: Iterable[int] | None = None, uid: int | None = None, name: str | None = None,
                 libssl: Iterable[str] = (), capture_data: bool = True, mapsize: int | None = None,
                 max_payload: int = 1 << 20, object_name: str = "tls"):
        self.pids = sorted(set(pids)) if pids else []
        self.uid = uid
        self.name = name
        self.extra_paths = list(libssl or ())
        self.capture_data = capture_data
        self.mapsize = mapsize
        self.max_payload = max_payload
        self.object_name = object_name
        self.discovery = discovery.Discovery()
        self.libraries: list[TlsLibrary] = []  # hooked, in order
        self.attach_failures: list[str] = []
        self._handlers: dict[int, Callable[[bytes], None]] = {}
        self._library_callbacks: list[Callable[[TlsLibrary], None]] = []
        self._rescans: deque[tuple[float, int]] = deque()
        self.obj = None
        self.rb = None
        self.key_cookie: Callable[[TlsLibrary], int] | None = None  # extra uprobe cookie bits per library

    # --- public interface ----------------------------------------------------------------

    def on(self, record_type: int, handler: Callable[[bytes], None]) -> None:
        """Raw records of record_type (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS...)."""
        self._handlers[record_type] = handler

    def on_library(self, callback: Callable[[TlsLibrary], None]) -> None:
        """Called with each library once it is hooked (also the ones hooked by start())."""
        self._library_callbacks.append(callback)

    def hooked_libraries(self) -> list[tuple[str, str, str | None]]:
        """(path, kind, build_id) of each hooked library file."""
        return [(lib.path, lib.kind, lib.build_id) for lib in self.libraries]

    def start(self) -> None:
        from crypto_tracer.engine import BpfObject, RingBuffer

        ensure_tracefs()
        self.obj = BpfObject.from_package(self.object_name)
        if self.mapsize:
            self.obj.map("events").set_max_entries(self.mapsize)
        self.obj.load()
        self._write_config()
        for prog, calls in (("sys_enter_rd", READ_SYSCALLS), ("sys_enter_wr", WRITE_SYSCALLS)):
            for call in calls:
                self.obj.attach_tracepoint(prog, "syscalls", call)
        self.obj.attach_tracepoint("tls_exec", "sched", "sched_process_exec")
        self.obj.attach_tracepoint("tls_mmap", "syscalls", "sys_enter_mmap")
        self.rb = RingBuffer()
        self.rb.add(self.obj.map("events"), self._dispatch)
        for path in self.extra_paths:
            self._add_extra(path)
        for pid in self.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise TracerError(f"no process with pid {pid}", ExitStatus.ERROR, "check the pid with ps")
        for lib in self.discovery.scan(self.pids or None):
            self._hook(lib)
        log.debug("tls: %d TLS libraries hooked: %s", len(self.libraries),
                  ", ".join(f"{lib.display_path} ({lib.kind})" for lib in self.libraries) or "none")

    def poll(self, timeout_ms: int) -> int:
        n = self.rb.poll(timeout_ms)
        self._run_rescans()
        return n

    def drain(self) -> int:
        return self.rb.drain() if self.rb else 0

    def counters(self) -> dict:
        totals = [0] * 5
        if self.obj is not None:
            cmap = self.obj.map("counters")
            for i in range(5):
                for cpu in cmap.lookup_percpu(struct.pack("<I", i)):
                    totals[i] += struct.unpack("<Q", cpu)[0]
        return {"seen": totals[CNT_SEEN], "kernel_filtered": totals[CNT_KFILTERED],
                "dropped": totals[CNT_DROPPED], "submitted": totals[CNT_SUBMITTED],
                "control_dropped": totals[CNT_CTRL_DROPPED]}

    def detach(self) -> None:
        """Remove every probe (the ring buffer stays readable for drain())."""
        if self.obj is not None:
            for link in reversed(self.obj.links):
                link.destroy()
            self.obj.links.clear()

    def close(self) -> None:
        if self.rb is not None:
            self.rb.close()
            self.rb = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    # --- internals -------------------------------------------------------------------------

    def _write_config(self) -> None:
        pid = self.pids[0] if len(self.pids) == 1 else 0
        name = (self.name or "").lower().encode()[:15]
        uid = 0xFFFFFFFF if self.uid is None else self.uid
        use_set = 1 if len(self.pids) > 1 else 0
        self.obj.map("filter").update(struct.pack("<I", 0),
                                      struct.pack("<IIII16s", pid, uid, len(name), use_set, name))
        for p in self.pids if use_set else ():
            self.obj.map("pid_set").update(struct.pack("<I", p), b"\x01")
        self.obj.map("tls_config").update(struct.pack("<I", 0),
                                          struct.pack("<II", int(self.capture_data),
                                                      min(self.max_payload, 0xFFFFFFFF)))

    def _add_extra(self, path: str) -> None:
        if not os.path.isfile(path):
            raise TracerError(f"--libssl {path}: no such file", ExitStatus.BAD_ARGS)
        elf = discovery.read_elf(path)
        if elf is None:
            raise TracerError(f"--libssl {path}: not an ELF file", ExitStatus.BAD_ARGS)
        lib = self.discovery.examine(path, path)
        if lib is None and (os.stat(path).st_dev, os.stat(path).st_ino) not in self.discovery.seen:
            raise TracerError(f"--libssl {path}: exports no SSL_read/SSL_write, gnutls_record_* or PR_* function",
                              ExitStatus.BAD_ARGS)
        if lib is None:
            known = self.discovery.seen.get((os.stat(path).st_dev, os.stat(path).st_ino))
            if known is None:
                raise TracerError(f"--libssl {path}: not a TLS library this tool can hook", ExitStatus.BAD_ARGS)
            return
        self._hook(lib)

    def _hook(self, lib: TlsLibrary) -> None:
        targets = self.pids or [-1]
        handshake_prog = ("tls_hs_enter", "tls_hs_return")
        key_bits = self.key_cookie(lib) if self.key_cookie else 0  # keys/extractor.py: layout slot
        attached = 0
        for func in lib.functions:
            cookie = FUNC_IDS.get(func, 0) | (COOKIE_LAYOUT if lib.openssl_layout else 0) | key_bits
            if func == "SSL_free":
                progs = (("tls_free", False),)
            elif func in HANDSHAKE_FUNCS:
                progs = ((handshake_prog[0], False), (handshake_prog[1], True))
            else:
                progs = (("tls_data_enter", False), ("tls_data_return", True))
            for pid in targets:
                for prog, ret in progs:
                    try:
                        self.obj.attach_uprobe(prog, lib.path, func_name=func, pid=pid, retprobe=ret,
                                               cookie=cookie)
                        attached += 1
                    except TracerError as exc:
                        self.attach_failures.append(str(exc).splitlines()[0])
                        log.debug("tls: %s", exc)
        if attached:
            self.libraries.append(lib)
            log.debug("tls: hooked %s (%s, %d probes)", lib.display_path, lib.kind, attached)
            for cb in self._library_callbacks:
                cb(lib)
        elif lib.functions:
            log.warning("could not hook %s: %s", lib.display_path,
                        self.attach_failures[-1] if self.attach_failures else "no probe attached")

    def _dispatch(self, raw: bytes) -> None:
        rtype = int.from_bytes(raw[8:12], "little")
        handler = self._handlers.get(rtype)
        if handler is not None:
            handler(raw)
        elif rtype in (CT_EV_PROCESS_EXEC, CT_EV_LIB_LOAD):
            pid = int.from_bytes(raw[12:16], "little")
            if not self.pids or pid in self.pids:
                self._schedule(pid, rtype == CT_EV_PROCESS_EXEC)

    def _schedule(self, pid: int, is_exec: bool) -> None:
        now = time.monotonic()
        # At once: the executable (a static OpenSSL) is mapped at exec, and a library being
        # mapped already has its first segment in the maps. Every moment counts: the process
        # may use the library before its uprobes are in place.
        for lib in self.discovery.scan_pid(pid):
            self._hook(lib)
        for delay in self.RESCAN_DELAYS if is_exec else (0.02, 0.2):
            self._rescans.append((now + delay, pid))

    def _run_rescans(self) -> None:
        if not self._rescans:
            return
        now = time.monotonic()
        due, keep = set(), deque()
        for when, pid in self._rescans:
            (due.add(pid) if when <= now else keep.append((when, pid)))
        self._rescans = keep
        for pid in due:
            for lib in self.discovery.scan_pid(pid):
                self._hook(lib)
