"""The Python side of bpf/monitor.bpf.c: load, configure, attach, and decode its records.

``decode`` turns a record into a named tuple (ExecRecord, ExitRecord, FileRecord, LibRecord);
pipeline/enrich.Enricher makes events of them (exe, absolute paths, classification).
"""

from __future__ import annotations

import os
import struct
from collections import namedtuple

from crypto_tracer.host import classify
from crypto_tracer.bpf.cstruct import CStruct
from crypto_tracer.engine import BpfObject, RingBuffer
from crypto_tracer.probes.common import (CT_EV_FILE_OPEN, CT_EV_LIB_LOAD, CT_EV_PROCESS_EXEC, CT_EV_PROCESS_EXIT,
                                         CT_HEADER, HEADER, ProcessFilter,  # noqa: F401 (ProcessFilter: API)
                                         add_to_pid_set, path_from_parts)

# record types (bpf/common.h enum ct_event_type)
EV_EXEC, EV_EXIT, EV_FILE, EV_LIB = CT_EV_PROCESS_EXEC, CT_EV_PROCESS_EXIT, CT_EV_FILE_OPEN, CT_EV_LIB_LOAD

# The records of monitor.bpf.c up to their data[] (checked against its BTF by
# tests/unit/test_bpf_layouts.py); EXEC etc. unpack the fields after the header and the view.
CT_VIEW = CStruct("ct_view", "exe_len I root_len I mnt_ns I pad I")  # root_len: 1 + bytes; 0 = unchanged
EXEC_REC = CStruct("exec_rec", ("h", CT_HEADER), ("v", CT_VIEW), "ppid I args_len I", until="data")
EXIT_REC = CStruct("exit_rec", ("h", CT_HEADER), ("v", CT_VIEW), "ppid I exit_code I", until="data")
FILE_REC = CStruct("file_rec", ("h", CT_HEADER), ("v", CT_VIEW), "ppid I result i flags I fclass I name_len I "
                   "base_parts I base_len I has_base I", until="data")
LIB_REC = CStruct("lib_rec", ("h", CT_HEADER), ("v", CT_VIEW), "ppid I parts I len I dev I ino Q", until="data")
VIEW = CT_VIEW.struct
EXEC, EXIT, FILE, LIB = (r.tail("ppid") for r in (EXEC_REC, EXIT_REC, FILE_REC, LIB_REC))
OWN = EXEC_REC.offset("ppid")  # header and view
FILE_V = FILE_REC.tail("v.exe_len")  # ct_view + file fields: one unpack in the hot path
NO_VIEW = (None, None, None)
EXEC_DATA, EXIT_DATA, FILE_DATA, LIB_DATA = (r.size for r in (EXEC_REC, EXIT_REC, FILE_REC, LIB_REC))
MON_CONFIG = CStruct("mon_config", "follow_children I self_tgid I self_root_dentry Q self_root_mnt Q")
TRUST_PREFIX = CStruct("trust_prefix", "len I s 40s").struct
FNV_INIT, FNV_PRIME, MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1

PROGRAMS_BY_TYPE = {
    "process_exec": ("handle_exec",),
    "process_exit": ("handle_exit",),
    "file_open": ("enter_openat", "enter_open", "enter_openat2", "exit_openat", "exit_open", "exit_openat2"),
    "lib_load": ("enter_mmap",),
}


def fnv1a(data: bytes) -> int:
    h = FNV_INIT
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


class MonitorProbe:
    """Loads monitor.bpf.o for the given event types and process filter."""

    def __init__(self, event_types=None, proc_filter: ProcessFilter | None = None,
                 ringbuf_size: int | None = None, follow_children: bool = False):
        self.event_types = tuple(event_types or PROGRAMS_BY_TYPE)
        self.proc_filter = proc_filter or ProcessFilter()
        self.follow_children = follow_children
        self.obj = BpfObject.from_package("monitor")
        wanted = {p for t in self.event_types for p in PROGRAMS_BY_TYPE[t]} | {"learn_self_root"}
        if follow_children:
            wanted.add("handle_fork")
        for prog in self.obj.programs():
            prog.set_autoload(prog.name in wanted)
        if ringbuf_size:
            self.obj.map("events").set_max_entries(ringbuf_size)
        self.ring: RingBuffer | None = None

    def load(self) -> None:
        self.obj.load()
        self._write_tables()
        self.proc_filter.write(self.obj)
        self.obj.map("mon_config").update(b"\0\0\0\0", MON_CONFIG.struct.pack(int(self.follow_children), os.getpid(), 0, 0))

    def _write_tables(self) -> None:
        """The kernel's copy of host/classify.py's tables (hashes of names and extensions)."""
        one = struct.pack("<I", 1)
        ext, names, stems = self.obj.map("ext_classes"), self.obj.map("name_classes"), self.obj.map("lib_stems")
        for suffix in classify.SUFFIX_TYPES:
            ext.update(struct.pack("<Q", fnv1a(suffix.encode())), one)
        for name in classify.EXACT_NAMES:
            names.update(struct.pack("<Q", fnv1a(name.encode())), one)
        for stem in classify.CRYPTO_LIBRARIES:
            stems.update(struct.pack("<Q", fnv1a(stem.encode())), one)
        prefixes = self.obj.map("trust_prefixes")
        for i, prefix in enumerate(classify.TRUST_STORE_DIRS[:8]):
            prefixes.update(struct.pack("<I", i), TRUST_PREFIX.pack(len(prefix), prefix.encode()))

    def add_pids(self, pids) -> None:
        """Members of the pid set (with use_pid_set); children join it in the kernel."""
        add_to_pid_set(self.obj, pids)

    def attach(self) -> None:
        # First the tracer's own root (events' `root` fields are relative to it), then the rest.
        self.obj.attach("learn_self_root")
        os.getppid()
        for prog in self.obj.programs():
            if prog.autoload and prog.name != "learn_self_root":
                self.obj.attach(prog.name)

    def open_ring(self, handler) -> RingBuffer:
        self.ring = RingBuffer()
        self.ring.add(self.obj.map("events"), handler)
        return self.ring

    def pid_set(self) -> list[int]:
        """The tgids in the pid set now (with follow_children: forks the kernel added)."""
        return [struct.unpack("<I", raw)[0] for raw in list(self.obj.map("pid_set").keys())]

    def counters(self) -> dict[str, int]:
        return self.obj.counters()

    def detach(self) -> None:
        """Remove every probe (the ring stays readable for a last drain)."""
        self.obj.detach()

    def close(self) -> None:
        if self.ring:
            self.ring.close()
            self.ring = None
        self.obj.close()


# Decoded records (named tuples: cheap to build on the hot path): the header, ppid and `view`
# = (exe, root, mnt_ns) (see decode), then each record's own fields. FileRecord: `name` as
# passed to open (maybe relative), `base` the directory the kernel resolved it against (or
# None); ExitRecord: the raw task->exit_code (a wait status, decoded by enrich.decode_exit).
RECORD_HEAD = ("kind", "ts", "pid", "tid", "uid", "comm", "ppid", "view")
ExecRecord = namedtuple("ExecRecord", (*RECORD_HEAD, "argv"))
ExitRecord = namedtuple("ExitRecord", (*RECORD_HEAD, "exit_code"))
FileRecord = namedtuple("FileRecord", (*RECORD_HEAD, "name", "base", "flags", "result"))
LibRecord = namedtuple("LibRecord", (*RECORD_HEAD, "path", "dev", "ino"))
_new = tuple.__new__  # builds them in C: FileRecord(...) would run Python code per record
_comms: dict[bytes, str] = {}  # raw comm[16] -> name


def decode_view(raw: bytes, start: int) -> tuple:
    """(exe, root, mnt_ns) from a record's ct_view and the data at start; None for what the
    kernel did not send (already sent for this process image)."""
    exe_len, root_len, mnt_ns, _ = VIEW.unpack_from(raw, HEADER.size)
    exe = path_from_parts(raw[start:start + exe_len]) if exe_len else None
    if not root_len:
        return exe, None, None
    start += exe_len
    return exe, path_from_parts(raw[start:start + root_len - 1]), mnt_ns


def decode(raw: bytes) -> ExecRecord | ExitRecord | FileRecord | LibRecord | None:
    """Decode one record into its named tuple (kind, ts, pid, tid, uid, comm, ppid, view, own fields).

    view is (exe, root, mnt_ns): paths in the process's own view, each None unless the kernel
    sent it with this record (once per process image; the root again when it changed), so
    they are known even for processes already gone."""
    ts, kind, pid, tid, uid, raw_comm = HEADER.unpack_from(raw)
    comm = _comms.get(raw_comm)
    if comm is None:  # a few distinct names: decoded once each
        if len(_comms) >= 4096:
            _comms.clear()
        comm = _comms[raw_comm] = raw_comm.split(b"\0", 1)[0].decode(errors="replace")
    if kind == EV_FILE:
        exe_len, root_len, _ns, _, ppid, result, flags, _cls, name_len, _parts, base_len, has_base = \
            FILE_V.unpack_from(raw, HEADER.size)
        name = raw[FILE_DATA:FILE_DATA + name_len].split(b"\0", 1)[0].decode(errors="replace")
        base = None
        start = FILE_DATA + name_len
        if has_base:  # "/" (the process's root) has no components
            base = path_from_parts(raw[start:start + base_len])
        view = decode_view(raw, start + base_len) if exe_len or root_len else NO_VIEW
        return _new(FileRecord, (kind, ts, pid, tid, uid, comm, ppid, view, name, base, flags, result))
    if kind == EV_LIB:
        ppid, _parts, length, dev, ino = LIB.unpack_from(raw, OWN)
        end = LIB_DATA + length
        return _new(LibRecord, (kind, ts, pid, tid, uid, comm, ppid, decode_view(raw, end),
                                path_from_parts(raw[LIB_DATA:end]), dev, ino))
    if kind == EV_EXEC:
        ppid, args_len = EXEC.unpack_from(raw, OWN)
        args = raw[EXEC_DATA:EXEC_DATA + args_len]
        argv = [a.decode(errors="replace") for a in args.rstrip(b"\0").split(b"\0")] if args else []
        return _new(ExecRecord, (kind, ts, pid, tid, uid, comm, ppid, decode_view(raw, EXEC_DATA + args_len),
                                 argv))
    if kind == EV_EXIT:
        ppid, code = EXIT.unpack_from(raw, OWN)
        return _new(ExitRecord, (kind, ts, pid, tid, uid, comm, ppid, decode_view(raw, EXIT_DATA), code))
    return None
