"""The Python side of bpf/common.h, shared by every probe: the record header, the record
types, the counters and the process filter (the `filter` map's slot 0 and the `pid_set` map).
Layouts and constants are checked against the objects' BTF (tests/unit/test_bpf_layouts.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crypto_tracer.bpf.cstruct import CEnum, CStruct

CT_HEADER = CStruct("ct_header", "ts_ns Q type I pid I tid I uid I comm 16s")
HEADER = CT_HEADER.struct
CT_FILTER = CStruct("ct_filter", "pid I uid I name_len I use_pid_set I name 16s")
FILTER = CT_FILTER.struct
TYPE_SPAN = CT_HEADER.span("type", "type")  # raw[8:12]: the record type's bytes
PID_SPAN = CT_HEADER.span("pid", "pid")

# enum ct_event_type: one numbering for all objects
CT_EV_PROCESS_EXEC = 1
CT_EV_PROCESS_EXIT = 2
CT_EV_FILE_OPEN = 3
CT_EV_LIB_LOAD = 4
CT_EV_API_CALL = 5
CT_EV_TLS_HANDSHAKE = 6
CT_EV_TLS_DATA = 7
CT_EV_TLS_KEYS = 8
CT_EV_PACKET = 9
CT_EV_CONNECT = 10
CT_EV_TLS_KEYLINE = 11  # one key log line (Go's writeKeyLog)
CT_EV_TLS_OBJECT = 12  # an SSL object created or freed (bpf/tls_keys.h, keys/pending.py)
CT_EV_TLS_PROCESS = 13  # ppid and exe of a process image with TLS events (tls.bpf.c note_image)
CT_EV_TLS_HELLO = 14  # a TCP segment carrying TLS hello messages (tls_hello.bpf.c, probes/tls_hello.py)
CT_EV_TLS_PEER = 15  # an NSS connection's ALPN and peer certificate (tls.bpf.c nss_peer_facts)
EVENT_TYPES = CEnum.from_module("ct_event_type", globals(), "CT_EV_")

# enum ct_counter: per-CPU accounting slots of the `counters` map
CT_CNT_SEEN = 0
CT_CNT_KFILTERED = 1
CT_CNT_DROPPED = 2
CT_CNT_SUBMITTED = 3
CT_CNT_MAX = 8
COUNTERS = CEnum.from_module("ct_counter", globals(), "CT_CNT_")


@dataclass
class ProcessFilter:
    """pid None = any; uid None = any; name: a case-insensitive substring of comm;
    use_pid_set: only the tgids written to the pid_set map."""

    pid: int | None = None
    uid: int | None = None
    name: str | None = None
    use_pid_set: bool = False

    def pack(self) -> bytes:
        name = (self.name or "").lower().encode()[:15]
        return FILTER.pack(self.pid or 0, 0xFFFFFFFF if self.uid is None else self.uid, len(name),
                           int(self.use_pid_set), name)

    def write(self, obj) -> None:
        """Into a loaded BpfObject's `filter` map."""
        obj.map("filter").update(b"\0\0\0\0", self.pack())


def path_from_parts(data: bytes) -> str:
    """A path walk's components (bpf/paths.h: leaf first, NUL-terminated) as an absolute path."""
    parts = [p for p in data.split(b"\0") if p]
    parts.reverse()
    return "/" + "/".join(p.decode(errors="replace") for p in parts)


# bpf/image.h: a process image announced once before its first event (tls.bpf.c, tc_capture.bpf.c)
CT_PROC_REC = CStruct("ct_proc_rec", ("h", CT_HEADER), "ppid I exe_len I start_ns Q exec_id Q mnt_ns I pad I",
                      until="data")
_PROC = CT_PROC_REC.unpacker("h.pid", "ppid", "exe_len")
_PROC_IMAGE = CT_PROC_REC.unpacker("h.pid", "h.uid", "ppid", "exe_len", "start_ns", "exec_id", "mnt_ns")


def decode_process(raw: bytes) -> tuple[int, int, str | None]:
    """A CT_EV_TLS_PROCESS record: (pid, ppid, exe in the process's own view or None)."""
    pid, ppid, exe_len = _PROC.unpack_from(raw)
    start = CT_PROC_REC.size
    return pid, ppid, path_from_parts(raw[start:start + exe_len]) if exe_len else None


def decode_image(raw: bytes) -> tuple[tuple[int, int, int], int, int, str | None, int | None]:
    """A CT_EV_TLS_PROCESS record: ((pid, start_ns, exec_id): the image, uid, ppid, exe or None,
    mount namespace inode or None)."""
    pid, uid, ppid, exe_len, start_ns, exec_id, mnt_ns = _PROC_IMAGE.unpack_from(raw)
    start = CT_PROC_REC.size
    exe = path_from_parts(raw[start:start + exe_len]) if exe_len else None
    return (pid, start_ns, exec_id), uid, ppid, exe, mnt_ns or None


def add_to_pid_set(obj, pids) -> None:
    m = obj.map("pid_set")
    for pid in pids:
        m.update(struct.pack("<I", pid), b"\1")
