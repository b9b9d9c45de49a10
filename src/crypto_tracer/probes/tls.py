"""The Python side of bpf/tls.bpf.c: what to attach where, and how to decode its records.

``TlsTracer`` finds the TLS libraries of the processes of interest, hooks each library
file once (or once per --pid process), follows new processes and newly mapped libraries,
and hands the raw records to the handlers registered with ``on()``.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from crypto_tracer.engine import UPROBE_MULTI_UNSUPPORTED, AttachError
from crypto_tracer.host import discovery
from crypto_tracer.host.discovery import BORINGSSL, GNUTLS, GO, NSS, OPENSSL, TlsLibrary
from crypto_tracer.host.proc import AF_INET, AF_INET6, address_text
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log
from crypto_tracer.bpf.cstruct import CEnum, CStruct
from crypto_tracer.probes.common import (CT_EV_LIB_LOAD, CT_EV_PROCESS_EXEC, CT_HEADER, HEADER, PID_SPAN, TYPE_SPAN, ProcessFilter,
                                         add_to_pid_set)

# The constants and records of tls.bpf.c (checked against its BTF by tests/unit/test_bpf_layouts.py).
# enum tls_lib
CT_LIB_OPENSSL, CT_LIB_GNUTLS, CT_LIB_NSS, CT_LIB_GO, CT_LIB_BORINGSSL = 1, 2, 3, 4, 5
LIBS = CEnum.from_module("tls_lib", globals(), "CT_LIB_")
LIB_NAMES = {CT_LIB_OPENSSL: OPENSSL, CT_LIB_GNUTLS: GNUTLS, CT_LIB_NSS: NSS, CT_LIB_GO: GO,
             CT_LIB_BORINGSSL: BORINGSSL}
LIB_KIND_IDS = {v: k for k, v in LIB_NAMES.items()}
# enum tls_func, by the symbol each id hooks (the C name: F_ + the symbol upper-cased, gnutls
# without "_record")
FUNC_IDS = {"SSL_read": 1, "SSL_read_ex": 2, "SSL_peek": 3, "SSL_peek_ex": 4, "SSL_write": 5, "SSL_write_ex": 6,
            "gnutls_record_recv": 7, "gnutls_record_send": 8,
            "PR_Read": 9, "PR_Recv": 10, "PR_Write": 11, "PR_Send": 12, "PR_Writev": 13, "SSL_write_ex2": 14,
            "SSL_do_handshake": 20, "SSL_connect": 21, "SSL_accept": 22, "gnutls_handshake": 23}
# Go crypto/tls (bpf/go_tls.h): events name them Write and Read, the tls.Conn methods a program calls
# (the hooks are (*Conn).writeRecordLocked, which Write calls, and (*Conn).Read)
F_GO_WRITE, F_GO_READ = 15, 16
FUNCS = CEnum("tls_func", {**{"F_" + f.upper().replace("_RECORD_", "_"): v for f, v in FUNC_IDS.items()},
                           "F_GO_WRITE": F_GO_WRITE, "F_GO_READ": F_GO_READ})
FUNC_NAMES = {**{v: k for k, v in FUNC_IDS.items()}, F_GO_WRITE: "Write", F_GO_READ: "Read"}
WRITE_FUNCS = frozenset([FUNC_IDS[f] for f in ("SSL_write", "SSL_write_ex", "SSL_write_ex2", "gnutls_record_send",
                                                "PR_Write", "PR_Send", "PR_Writev")] + [F_GO_WRITE])
HANDSHAKE_FUNCS = frozenset(("SSL_do_handshake", "SSL_connect", "SSL_accept", "gnutls_handshake"))
COOKIE_LAYOUT, COOKIE_SPLIT, COOKIE_BORINGSSL = 0x100, 0x200, 0x400  # enum tls_cookie: bits above the function id
COOKIE_QUIC_SHIFT, QUIC_SLOTS = 20, 16  # the library's quic_layouts slot: cookie bits 20-23 (0: none)
QUIC_CONNECTION, QUIC_XSO = 0x80, 0x81  # OpenSSL 3.5's QUIC objects (struct ssl_st's type)
COOKIE_NSS_SHIFT, NSS_SLOTS = 24, 16  # NSPR functions: the NSS build's nss_layouts slot in bits 24-27 (0: none)
COOKIE = CEnum("tls_cookie", {"CT_COOKIE_LAYOUT": COOKIE_LAYOUT, "CT_COOKIE_SPLIT": COOKIE_SPLIT,
                              "CT_COOKIE_BORINGSSL": COOKIE_BORINGSSL, "CT_COOKIE_QUIC_SHIFT": COOKIE_QUIC_SHIFT,
                              "CT_QUIC_SLOTS": QUIC_SLOTS, "CT_QUIC_CONNECTION": QUIC_CONNECTION,
                              "CT_QUIC_XSO": QUIC_XSO, "CT_COOKIE_NSS_SHIFT": COOKIE_NSS_SHIFT,
                              "CT_NSS_SLOTS": NSS_SLOTS})
# enum tls_bssl_cookie: the cookie of bssl_keylog (BoringSSL's ssl_log_secret) says where
# ssl->s3->client_random is: s3's offset in bits 0-15, client_random's in s3 in 16-31, bit 32 set
BSSL_RANDOM_SHIFT, BSSL_VALID_SHIFT = 16, 32
BSSL_COOKIE = CEnum("tls_bssl_cookie", {"CT_BSSL_RANDOM_SHIFT": BSSL_RANDOM_SHIFT,
                                        "CT_BSSL_VALID_SHIFT": BSSL_VALID_SHIFT})
BSSL_LOG_SECRET = "ssl_log_secret"  # TlsLibrary.functions/offsets name of bssl::ssl_log_secret


def bssl_cookie(s3: int, client_random: int) -> int:
    """bssl_keylog's cookie for ssl->s3 at s3 and s3->client_random at client_random."""
    return s3 | client_random << BSSL_RANDOM_SHIFT | 1 << BSSL_VALID_SHIFT
COOKIE_LAYOUTS = {discovery.FLAT_SSL: COOKIE_LAYOUT, discovery.SPLIT_SSL: COOKIE_SPLIT}
CNT_CTRL_DROPPED = 4  # after bpf/common.h's counters
TLS_COUNTERS = CEnum("tls_counter", {"CT_CNT_CTRL_DROPPED": CNT_CTRL_DROPPED})
READ_BATCH = 2048  # records handled per read of the ring
READ_BYTES = 4 << 20  # about this many bytes of records per poll
COUNTERS = ("seen", "kernel_filtered", "dropped", "submitted", "control_dropped")  # by slot: common.h, then tls_counter

CONN = CStruct("conn", "family B pad x lport H rport H pad2 2x laddr 16s raddr 16s")
TLS_DATA_REC = CStruct("tls_data_rec", ("h", CT_HEADER),
                       "ssl Q length Q offset Q chunk_len I fd i lib B func B truncated B pad x", ("c", CONN),
                       "pad3 4x stream_id q", until="data")
TLS_HS_REC = CStruct("tls_hs_rec", ("h", CT_HEADER),
                     "ssl Q fd i result i lib B func B role B ok B version I", ("c", CONN))
TLS_CTRL_REC = CStruct("tls_ctrl_rec", ("h", CT_HEADER), "name 32s")
TLS_CONFIG = CStruct("tls_config", "capture_data I max_payload I")
# keys/calibrate_quic_worker.py's layout as tls.bpf.c reads it
QUIC_LAYOUT = CStruct("quic_layout", "xso_conn I xso_stream I stream_id I qc_default_xso I bio_hops I bio_ptr0 I "
                      "bio_ptr1 I bio I bio_num I peer_hops I peer_ptr0 I peer_ptr1 I peer I tls I")
# keys/calibrate_nss_worker.py's offsets as tls.bpf.c reads them, and what it sends (CT_EV_TLS_PEER)
NSS_LAYOUT = CStruct("nss_layout", "fd I peer_cert I next_proto I cert_der I")
PEER_ALPN_MAX = 256  # CT_PEER_ALPN_MAX (the struct's size is checked against BTF)
TLS_PEER_REC = CStruct("tls_peer_rec", ("h", CT_HEADER), f"ssl Q alpn_len I cert_len I alpn {PEER_ALPN_MAX}s",
                       until="cert")
GO_KEYLOG_REC = CStruct("go_keylog_rec", ("h", CT_HEADER),
                        "conn Q fd i pad0 I", ("c", CONN),
                        "label_len I random_len I secret_len I unread I label_addr Q label 48s client_random 32s "
                        "secret 64s")
KEYLINE_LABEL_UNREAD, KEYLINE_DATA_UNREAD = 1, 2  # enum ct_keyline_unread (go_tls.h)
DATA = TLS_DATA_REC.after("h")  # struct tls_data_rec after its header, up to data[]
HANDSHAKE = TLS_HS_REC.after("h")
DATA_OFFSET = TLS_DATA_REC.size  # 128

GO_DATA_PROGRAMS = ("go_write", "go_read_enter", "go_read_ret")  # bpf/go_tls.h: uprobes only, never uretprobes
GO_KEY_PROGRAMS = ("go_keylog",)
# Syscall tracepoints (tls.bpf.c): library loads and the key sweep at exit, in every mode; the fd ones
# end Go connections: attached with the first Go program.
KEY_SYSCALL_PROGRAMS = ("tls_key_mmap", "tls_key_exit_group")
# Each TLS object's socket, from the socket I/O inside its calls: plaintext capture, and a key log
# filtered by connection.
SOCKET_PROGRAMS = ("tls_sock_send", "tls_sock_recv")
GO_FD_PROGRAMS = ("tls_key_close", "tls_key_dup3") + (("tls_key_dup2",) if os.uname().machine == "x86_64" else ())
UPROBE_PROGRAMS = ("tls_data_enter", "tls_data_return", "tls_hs_enter", "tls_hs_return", "tls_free", "tls_new_return",
                   "bssl_keylog", "tls_nss_close") + GO_DATA_PROGRAMS + GO_KEY_PROGRAMS


class _NoUprobeMulti(Exception):
    """The kernel refused a uprobe_multi link (before Linux 6.6): use one link per probe."""


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
    stream_id: int | None = None  # QUIC streams only


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
    # a port of 0 is none: a TCP socket gives its local port back when it closes (inet_put_port), so
    # a write after the peer's reset reads 0 there
    return address_text(family, laddr), lport or None, address_text(family, raddr), rport or None


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


_DATA_RECORD = TLS_DATA_REC.struct  # one unpack of every field
# The hot path of `tls` unpacks only what changes from call to call (ts, length, offset,
# chunk_len; truncated is the byte at DATA_TRUNCATED) and looks the rest up by the raw
# bytes DATA_KEY_SPANS cover (type, pid, tid, uid, comm; fd, lib, func, truncated, conn).
DATA_CHANGING = TLS_DATA_REC.unpacker("h.ts_ns", "length", "offset", "chunk_len")  # "<Q40xQQI"
DATA_TRUNCATED = TLS_DATA_REC.offset("truncated")  # 74
DATA_KEY_SPANS = (TLS_DATA_REC.span("h.type", "h.comm"), TLS_DATA_REC.span("fd", "stream_id"))  # (8, 40), (68, 128)
_COMMS: dict[bytes, str] = {}
_DIRECTIONS = {f: ("write" if f in WRITE_FUNCS else "read") for f in FUNC_NAMES}


def decode_data(raw: bytes) -> TlsData:
    (ts, _type, pid, tid, uid, comm, ssl, length, offset, chunk_len, fd, lib, func, truncated, family, lport,
     rport, laddr, raddr, stream_id) = _DATA_RECORD.unpack_from(raw, 0)
    name = _COMMS.get(comm)
    if name is None:
        if len(_COMMS) > 4096:
            _COMMS.clear()
        name = _COMMS[comm] = _comm(comm)
    la, lport, ra, rport = _conn(family, lport, rport, laddr, raddr)
    return TlsData(ts, pid, tid, uid, name, LIB_NAMES.get(lib, str(lib)), FUNC_NAMES.get(func, str(func)),
                   _DIRECTIONS.get(func, "read"), fd if fd >= 0 else None, la, lport, ra, rport,
                   length, offset, bool(truncated), ssl, raw[DATA_OFFSET:DATA_OFFSET + chunk_len],
                   stream_id if stream_id >= 0 else None)


_PEER = TLS_PEER_REC.after("h")


def decode_peer(raw: bytes) -> tuple[int, int, bytes | None, bytes | None]:
    """(pid, ssl, ALPN, peer certificate DER) of a CT_EV_TLS_PEER record; None: none, or not all of it copied."""
    pid = HEADER.unpack_from(raw, 0)[2]
    ssl, alpn_len, cert_len, alpn = _PEER.unpack_from(raw, HEADER.size)
    der = raw[TLS_PEER_REC.size:TLS_PEER_REC.size + cert_len]
    return pid, ssl, alpn[:alpn_len] or None, der if cert_len and len(der) == cert_len else None


def decode_handshake(raw: bytes) -> TlsHandshake:
    ts, _type, pid, tid, uid, comm = HEADER.unpack_from(raw, 0)
    (ssl, fd, result, lib, func, role, ok, version, family, lport, rport, laddr,
     raddr) = HANDSHAKE.unpack_from(raw, HEADER.size)
    la, lp, ra, rp = _conn(family, lport, rport, laddr, raddr)
    return TlsHandshake(ts, pid, tid, uid, _comm(comm), LIB_NAMES.get(lib, str(lib)),
                        FUNC_NAMES.get(func, str(func)), {1: "client", 2: "server"}.get(role),
                        fd if fd >= 0 else None, la, lp, ra, rp, "success" if ok else "failure", result,
                        TLS_VERSIONS.get(version), ssl)


@dataclass(slots=True)
class GoKeyLine:
    """One secret as Go's (*Config).writeKeyLog or BoringSSL's ssl_log_secret got it: the line
    their key log would have."""
    pid: int
    comm: str
    ssl: int  # the *tls.Conn (Go) or SSL* (BoringSSL) whose handshake this is (0: unknown)
    fd: int | None
    connection: tuple | None  # (local_addr, local_port, remote_addr, remote_port) when known
    label: str | None  # None: the kernel could not read it; at label_addr (label_len bytes, 0: up to a NUL)
    client_random: bytes
    secret: bytes
    label_addr: int = 0
    label_len: int = 0

    def line(self) -> tuple[str, str, str] | None:
        """(label, client_random hex, secret hex); None when the record is not a whole line."""
        if not self.label or len(self.client_random) != 32 or not self.secret:
            return None
        return self.label, self.client_random.hex(), self.secret.hex()


_GO_KEYLOG = GO_KEYLOG_REC.after("h")


def decode_go_keyline(raw: bytes) -> GoKeyLine:
    _ts, _type, pid, _tid, _uid, comm = HEADER.unpack_from(raw, 0)
    (conn, fd, _pad0, family, lport, rport, laddr, raddr, label_len, random_len, secret_len, unread, label_addr,
     label, random, secret) = _GO_KEYLOG.unpack_from(raw, HEADER.size)
    ok = label_len <= 48 and random_len == 32 and 0 < secret_len <= 64 and not unread & KEYLINE_DATA_UNREAD
    la, lp, ra, rp = _conn(family, lport, rport, laddr, raddr)
    text = None if unread & KEYLINE_LABEL_UNREAD else label[:label_len].decode("ascii", "replace")
    return GoKeyLine(pid, _comm(comm), conn, fd if fd >= 0 else None, (la, lp, ra, rp) if la else None,
                     text if ok else "", random if ok else b"", secret[:secret_len] if ok else b"",
                     label_addr, label_len)


class TlsTracer:
    """Hooks every TLS library of the processes of interest; see the module docstring.

    Usable alone (``tls`` text/json) or by the key-log work with ``capture_data=False``,
    in which case the data programs only run ``tls_keys_on_return``.
    """

    RESCAN_DELAYS = (0.02, 0.2, 1.0)  # after an exec or a library mapping: the loader may not be done

    def __init__(self, pids: Iterable[int] | None = None, uid: int | None = None, name: str | None = None,
                 libssl: Iterable[str] = (), capture_data: bool = True, mapsize: int | None = None,
                 max_payload: int = 1 << 20, object_name: str = "tls", connections: bool = True):
        self.pids = sorted(set(pids)) if pids else []
        self.uid = uid
        self.name = name
        self.extra_paths = list(libssl or ())
        self.capture_data = capture_data
        # learn each TLS object's socket from the socket I/O inside its calls (SOCKET_PROGRAMS):
        # plaintext capture always does; the key modes only for a connection filter
        self.connections = capture_data or connections
        self.mapsize = mapsize
        self.max_payload = max_payload
        self.object_name = object_name
        self.discovery = discovery.Discovery()
        self.libraries: list[TlsLibrary] = []  # hooked, in order
        self.attach_failures: list[str] = []
        self._handlers: dict[int, Callable[[bytes], None]] = {}
        self._raw_handlers: dict[bytes, Callable[[bytes], None]] = {}  # the same by raw type bytes
        self._library_callbacks: list[Callable[[TlsLibrary], None]] = []
        self._rescans: deque[tuple[float, int]] = deque()
        self.obj = None
        self.rb = None
        self._more = False  # the last poll left records in the ring
        self.multi = True  # uprobe_multi links; cleared when the kernel refuses them
        self._multi_linked = False  # a uprobe_multi link was made: the kernel has them
        self.key_cookie: Callable[[TlsLibrary], int] | None = None  # extra uprobe cookie bits per library
        self._quic_slots: dict[str, int] = {}  # build-id -> quic_layouts slot
        self._nss_slots: dict[str, int] = {}  # libssl3 path -> nss_layouts slot
        self._go_fd_hooked = False  # GO_FD_PROGRAMS attached

    # --- public interface ----------------------------------------------------------------

    def on(self, record_type: int, handler: Callable[[bytes], None]) -> None:
        """Raw records of record_type (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS...)."""
        self._handlers[record_type] = handler
        self._raw_handlers[record_type.to_bytes(4, "little")] = handler

    def on_library(self, callback: Callable[[TlsLibrary], None]) -> None:
        """Called with each library once it is hooked (also the ones hooked by start())."""
        self._library_callbacks.append(callback)

    def hooked_libraries(self) -> list[tuple[str, str, str | None]]:
        """(path, kind, build_id) of each hooked library file."""
        return [(lib.path, lib.kind, lib.build_id) for lib in self.libraries]

    def start(self) -> None:
        try:
            self._start()
        except _NoUprobeMulti as exc:
            log.debug("tls: uprobe_multi links refused (%s): one link per probe", exc)
            self.close()
            self.discovery = discovery.Discovery()
            self.libraries.clear()
            self.multi = False
            self._start()

    def _start(self) -> None:
        from crypto_tracer.engine import BpfObject, ring_reader
        from crypto_tracer.engine.preflight import ensure_tracefs

        ensure_tracefs()
        self.obj = BpfObject.from_package(self.object_name)
        if self.mapsize:
            self.obj.map("events").set_max_entries(self.mapsize)
        if self.multi:
            for name in UPROBE_PROGRAMS:
                self.obj.program(name).expect_uprobe_multi()
        self.obj.load()
        self._write_config()
        for prog in KEY_SYSCALL_PROGRAMS + (SOCKET_PROGRAMS if self.connections else ()):
            self.obj.attach(prog)
        self.obj.attach_tracepoint("tls_exec", "sched", "sched_process_exec")
        self.rb = ring_reader(self.obj.map("events"), READ_BATCH)  # DirectRing: no ctypes call per record
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
        """Wait up to timeout_ms, then handle what is in the ring: at most 8 batches and about
        READ_BYTES, so a bulk transfer's 30 KB records are handed on (and freed) a few MB at a
        time; when that leaves records behind, the next poll does not wait.

        tls.bpf.c does not wake the reader for every small record (only for big ones or when
        the ring is an eighth full), so what arrived during the wait is consumed here."""
        self.rb.wait(0 if self._more else timeout_ms)
        n, budget, self._more = 0, READ_BYTES, True
        for _ in range(8):
            raws = self.rb.read(READ_BATCH, budget)
            n += self.dispatch_many(raws)
            budget -= sum(map(len, raws))
            if budget <= 0:
                break
            if len(raws) < READ_BATCH:
                self._more = False  # the ring is empty
                break
        self.run_rescans()
        return n

    @property
    def epoll_fd(self) -> int:
        """Readable when the kernel signals records (for a caller's own select)."""
        return self.rb.epoll_fd

    def map(self, name: str):
        """A map of the loaded object (the key extractor writes `keys_layouts`)."""
        return self.obj.map(name)

    def dispatch_many(self, raws: list[bytes]) -> int:
        get = self._raw_handlers.get
        dispatch = self._dispatch
        t0, t1 = TYPE_SPAN
        for raw in raws:
            handler = get(raw[t0:t1])  # the record type's raw bytes: no int conversion per record
            if handler is not None:
                handler(raw)
            else:
                dispatch(raw)
        return len(raws)

    def drain(self) -> int:
        """Handle everything in the ring (after detach(): every submitted record)."""
        n = 0
        if self.rb is not None:
            while raws := self.rb.read(READ_BATCH):
                n += self.dispatch_many(raws)
        return n

    def counters(self) -> dict:
        if self.obj is None:
            return dict.fromkeys(COUNTERS, 0)
        return self.obj.counters(COUNTERS)

    def detach(self) -> None:
        """Remove every probe (the ring buffer stays readable for drain())."""
        if self.obj is not None:
            self.obj.detach()

    def close(self) -> None:
        if self.rb is not None:
            self.rb.close()
            self.rb = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        self._go_fd_hooked = False

    # --- internals -------------------------------------------------------------------------

    def _write_config(self) -> None:
        use_set = len(self.pids) > 1
        ProcessFilter(pid=self.pids[0] if len(self.pids) == 1 else None, uid=self.uid, name=self.name,
                      use_pid_set=use_set).write(self.obj)
        if use_set:
            add_to_pid_set(self.obj, self.pids)
        self.obj.map("tls_config").update(struct.pack("<I", 0),
                                          TLS_CONFIG.struct.pack(int(self.capture_data),
                                                                 min(self.max_payload, 0xFFFFFFFF)))

    def _add_extra(self, path: str) -> None:
        """--libssl PATH: a library or executable with OpenSSL, GnuTLS or NSPR functions, or a Go program."""
        if not os.path.isfile(path):
            raise TracerError(f"--libssl {path}: no such file", ExitStatus.BAD_ARGS)
        if discovery.read_elf(path) is None:
            raise TracerError(f"--libssl {path}: not an ELF file", ExitStatus.BAD_ARGS)
        lib = self.discovery.examine(path, path)
        if lib is None:
            st = os.stat(path)
            if self.discovery.seen.get((st.st_dev, st.st_ino)) is None:
                for shown, reason in self.discovery.go_unhookable:
                    if shown == path:
                        raise TracerError(f"--libssl {path}: Go TLS cannot be hooked: {reason}", ExitStatus.BAD_ARGS)
                raise TracerError(f"--libssl {path}: exports no SSL_read/SSL_write, gnutls_record_* or PR_* "
                                  f"function and is no Go program with crypto/tls", ExitStatus.BAD_ARGS)
            return  # the same file was given twice
        self._hook(lib)

    def _hook(self, lib: TlsLibrary) -> None:
        if lib.kind == GO:
            attached = self._hook_go(lib)
        else:
            attached = self._hook_multi(lib) if self.multi else self._hook_each(lib)
        if attached:
            self.libraries.append(lib)
            log.debug("tls: hooked %s (%s, %d %s)", lib.display_path, lib.kind, attached,
                      "uprobe_multi links" if self.multi else "probes")
            for cb in self._library_callbacks:
                cb(lib)
        elif lib.functions and (self.capture_data or lib.kind in (OPENSSL, GNUTLS)):  # keys: nothing to hook in NSS
            log.warning("could not hook %s: %s", lib.display_path,
                        self.attach_failures[-1] if self.attach_failures else "no probe attached")

    def _hook_go(self, lib: TlsLibrary) -> int:
        """Go crypto/tls: plaintext programs (capture_data) or the key log program, at the offsets
        host/gobin.py found: uprobes only (a uretprobe crashes Go programs)."""
        # keys: go_write too, which tells go_keylog the connection of the handshake
        # (plaintext with a key_cookie: the secrets too, for TLS 1.3's encrypted handshake facts)
        programs = (GO_DATA_PROGRAMS + (GO_KEY_PROGRAMS if self.key_cookie else ())) if self.capture_data else \
            ("go_write",) + GO_KEY_PROGRAMS
        cookies = {"go_write": F_GO_WRITE, "go_read_enter": F_GO_READ, "go_read_ret": F_GO_READ}
        if not self._go_fd_hooked:
            for prog in GO_FD_PROGRAMS:
                self.obj.attach(prog)
            self._go_fd_hooked = True
        attached = 0
        for prog in programs:
            offsets = lib.go_probes.get(prog) or []
            for pid in self.pids or [0]:
                what = f"{prog} {lib.display_path} ({len(offsets)} offsets)"
                try:
                    if self.multi:
                        self.obj.attach_uprobe_multi(prog, lib.path, offsets, [cookies.get(prog, 0)] * len(offsets),
                                                     False, pid, what)
                        self._multi_linked = True
                        attached += 1
                    else:
                        for off in offsets:
                            self.obj.attach_uprobe(prog, lib.path, offset=off, pid=pid if pid else -1,
                                                   cookie=cookies.get(prog, 0))
                            attached += 1
                except AttachError as exc:
                    if self.multi and not self._multi_linked and exc.errno in UPROBE_MULTI_UNSUPPORTED:
                        raise _NoUprobeMulti(exc.strerror) from None
                    self.attach_failures.append(f"{what}: {exc.strerror}")
                except TracerError as exc:
                    self.attach_failures.append(str(exc).splitlines()[0])
        return attached

    def _cookie(self, lib: TlsLibrary, func: str, key_bits: int) -> int:
        if lib.kind == BORINGSSL:  # its key bits (keys/extractor.py) are bssl_keylog's, nothing else's
            return key_bits if func == BSSL_LOG_SECRET else FUNC_IDS.get(func, 0) | COOKIE_BORINGSSL
        if lib.kind == NSS:
            return FUNC_IDS.get(func, 0) | self._nss_slot(lib) << COOKIE_NSS_SHIFT
        return FUNC_IDS.get(func, 0) | COOKIE_LAYOUTS.get(lib.openssl_layout, 0) | key_bits | \
            self._quic_slot(lib, bool(key_bits)) << COOKIE_QUIC_SHIFT

    def _nss_slot(self, lib: TlsLibrary) -> int:
        """The nss_layouts slot of the NSS build whose NSPR this is (its libssl3 sits beside it), when
        that libssl3's sslSocket offsets were learned and verified on it (keys/nss_layout.py); 0: unknown,
        and TLS 1.3's ALPN and peer certificate stay null on NSS's events."""
        ssl3 = os.path.join(os.path.dirname(lib.path), "libssl3.so")
        if not self.capture_data or not os.path.exists(ssl3):
            return 0

        def learn():
            from crypto_tracer.keys.nss_layout import nss_layout_for

            return nss_layout_for(ssl3)

        def store(slot: int, lay: dict) -> None:
            self.obj.map("nss_layouts").update(struct.pack("<I", slot), NSS_LAYOUT.struct.pack(
                lay["fd"], lay["peer_cert"], lay["next_proto"], lay["cert_der"]))

        return self._layout_slot(self._nss_slots, ssl3, NSS_SLOTS, learn, store,
                                 f"{lib.display_path}: NSS's ALPN and peer certificates")

    def _quic_slot(self, lib: TlsLibrary, keys: bool = False) -> int:
        """The quic_layouts slot of an OpenSSL 3.5+ library whose QUIC objects' layout is known
        (keys/quic_layout.py: calibrated on that file, cached by build-id); 0: unknown, and a QUIC
        object's stream id and 4-tuple stay null, and its secrets unread (keys: they are wanted, the
        inner TLS object's offset is in the layout)."""
        if not (self.capture_data or keys) or lib.openssl_layout != discovery.SPLIT_SSL or \
                "SSL_new_listener" not in lib.offsets or ".so" not in os.path.basename(lib.path):
            return 0

        def learn():
            from crypto_tracer.keys.quic_layout import quic_layout_for

            return quic_layout_for(lib.path)

        def store(slot: int, lay: dict) -> None:
            self.obj.map("quic_layouts").update(struct.pack("<I", slot), QUIC_LAYOUT.struct.pack(
                lay["xso_conn"], lay["xso_stream"], lay["stream_id"], lay["qc_default_xso"],
                len(lay["bio_path"]), *(lay["bio_path"] + [0, 0])[:2], lay["bio"], lay["bio_num"],
                len(lay["peer_path"]), *(lay["peer_path"] + [0, 0])[:2], lay["peer"], lay["tls"]))

        return self._layout_slot(self._quic_slots, lib.build_id or lib.path, QUIC_SLOTS, learn, store,
                                 f"{lib.display_path}: QUIC stream ids and 4-tuples")

    @staticmethod
    def _layout_slot(slots: dict, key, capacity: int, learn, store, what: str) -> int:
        """The map slot of a layout learned per build (NSS's sslSocket, OpenSSL's QUIC objects):
        learn() -> (layout or None, why not), once per key; a new layout goes to the next free slot
        (store(slot, layout)). 0: unknown, or every slot taken."""
        slot = slots.get(key)
        if slot is None:
            lay, how = learn()
            slot = 0
            if lay is None:
                log.debug("tls: %s unknown: %s", what, how)
            elif len(set(slots.values()) - {0}) + 1 < capacity:
                slot = len(set(slots.values()) - {0}) + 1
                store(slot, lay)
            slots[key] = slot
        return slot

    def _programs_for(self, func: str) -> tuple[tuple[str, bool], ...]:
        """Key modes (capture_data False) hook only what runs once per connection: handshake
        returns, SSL_new's return and SSL_free; data calls are hooked for plaintext alone."""
        if func == "SSL_free":
            return (("tls_free", False),)
        if func == discovery.NSS_CLOSE:  # plaintext only: the key modes hook nothing in NSS
            return (("tls_nss_close", False),) if self.capture_data else ()
        if func == BSSL_LOG_SECRET:
            return (("bssl_keylog", False),) if self.key_cookie or not self.capture_data else ()
        if func == "SSL_new":
            return () if self.capture_data else (("tls_new_return", True),)
        if func in HANDSHAKE_FUNCS:
            return (("tls_hs_enter", False), ("tls_hs_return", True))
        return (("tls_data_enter", False), ("tls_data_return", True)) if self.capture_data else ()

    def _hook_multi(self, lib: TlsLibrary) -> int:
        key_bits = self.key_cookie(lib) if self.key_cookie else 0  # keys/extractor.py: layout slot
        groups: dict[tuple[str, bool], list[str]] = {}
        for func in lib.functions:
            if func in lib.offsets:
                for key in self._programs_for(func):
                    groups.setdefault(key, []).append(func)
        attached = 0
        for (prog, ret), funcs in groups.items():
            offsets = [lib.offsets[f] for f in funcs]
            cookies = [self._cookie(lib, f, key_bits) for f in funcs]
            for pid in self.pids or [0]:
                what = f"{prog} {lib.display_path}:{','.join(funcs)}"
                try:
                    self.obj.attach_uprobe_multi(prog, lib.path, offsets, cookies, ret, pid, what)
                except AttachError as exc:
                    if not self._multi_linked and exc.errno in UPROBE_MULTI_UNSUPPORTED:
                        raise _NoUprobeMulti(exc.strerror) from None  # nothing hooked yet: fall back
                    self.attach_failures.append(f"{what}: {exc.strerror}")
                    log.debug("tls: attaching %s failed: %s", what, exc.strerror)
                    continue
                self._multi_linked = True
                attached += 1
        return attached

    def _hook_each(self, lib: TlsLibrary) -> int:
        key_bits = self.key_cookie(lib) if self.key_cookie else 0
        attached = 0
        for func in lib.functions:
            for pid in self.pids or [-1]:
                for prog, ret in self._programs_for(func):
                    # by offset when discovery has it (BoringSSL: local symbols, unnamed ssl_log_secret)
                    where = {"offset": lib.offsets[func]} if lib.kind == BORINGSSL else {"func_name": func}
                    try:
                        self.obj.attach_uprobe(prog, lib.path, pid=pid, retprobe=ret,
                                               cookie=self._cookie(lib, func, key_bits), **where)
                        attached += 1
                    except TracerError as exc:
                        self.attach_failures.append(str(exc).splitlines()[0])
                        log.debug("tls: %s", exc)
        return attached

    def _dispatch(self, raw: bytes) -> None:
        rtype = int.from_bytes(raw[TYPE_SPAN[0]:TYPE_SPAN[1]], "little")
        handler = self._handlers.get(rtype)
        if handler is not None:
            handler(raw)
        elif rtype in (CT_EV_PROCESS_EXEC, CT_EV_LIB_LOAD):
            pid = int.from_bytes(raw[PID_SPAN[0]:PID_SPAN[1]], "little")
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

    def run_rescans(self) -> None:
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
