"""Decoded monitor records -> events of the schema (pipeline/events.py), enriched from /proc.

Enrichment: wall-clock time, exe, root and mnt_ns (cached per pid), absolute paths (relative names joined
to the directory the kernel resolved), file type (.pem by content), decoded open flags,
library name and version, and the decoded exit status. Redaction comes later, after the
user filters (so globs match real paths): see pipeline/redact.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import time

from crypto_tracer.host import classify
from crypto_tracer.pipeline.clock import WallClock
from crypto_tracer.pipeline.events import FILE_OPEN, LIB_LOAD, PROCESS_EXEC, PROCESS_EXIT
from crypto_tracer.probes.monitor import EV_EXEC, EV_EXIT, EV_FILE, EV_LIB
from crypto_tracer.host.proc import ProcessCache, outer_view

_ACCMODE = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")
_FLAG_BITS = (  # x86-64/generic values; O_SYNC includes O_DSYNC's bit, so it is checked first
    (0o4010000, "O_SYNC"), (0o20200000, "O_TMPFILE"), (0o100, "O_CREAT"), (0o200, "O_EXCL"),
    (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"), (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"),
    (0o10000, "O_DSYNC"), (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"),
    (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
    (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"),
)
_flag_cache: dict[int, str] = {}
PEM_CACHE_SECONDS = 2.0


def decode_open_flags(flags: int) -> str:
    text = _flag_cache.get(flags)
    if text is None:
        names, rest = [_ACCMODE[flags & 3]], flags & ~3
        for bits, name in _FLAG_BITS:
            if rest & bits == bits:
                names.append(name)
                rest &= ~bits
        if rest:
            names.append(hex(rest))
        text = _flag_cache[flags] = "|".join(names)
    return text


def decode_exit(code: int) -> tuple[int | None, str | None]:
    """Raw task->exit_code -> (exit status, signal name); a killed process has no exit status."""
    sig = code & 0x7F
    if sig:
        try:
            return None, signal.Signals(sig).name
        except ValueError:
            return None, f"SIG{sig}"
    return (code >> 8) & 0xFF, None


class Enricher:
    def __init__(self, clock: WallClock):
        self.clock = clock
        self.procs = ProcessCache()
        self._pem_types: dict[str, tuple[float, str | None]] = {}

    def __call__(self, rec) -> dict | None:
        """One event of a decoded record (probes/monitor.decode), or None when user space decides
        it is not a crypto event. Paths are in the process's own view, as the kernel walks them
        (see host/proc.py)."""
        kind, pid = rec.kind, rec.pid
        if kind == EV_EXEC:
            self.procs.forget(pid)  # a new image: nothing cached of the old one holds
        sent = rec.view
        if sent[0] is not None or sent[1] is not None:
            self.procs.update(pid, *sent)
        exe, root, mnt_ns = self.procs.view(pid)
        if kind == EV_FILE:
            name, base = rec.name, rec.base
            path = name if name.startswith("/") or base is None else os.path.normpath(os.path.join(base, name))
            ftype = self._file_type(path, pid, root)
            if ftype is None:
                return None
            return FILE_OPEN.build(timestamp=self.clock.iso(rec.ts), pid=pid, ppid=rec.ppid, uid=rec.uid,
                                   process=rec.comm, exe=exe, root=root, mnt_ns=mnt_ns, file=path, file_type=ftype,
                                   flags=decode_open_flags(rec.flags), result=rec.result)
        if kind == EV_LIB:
            path = rec.path
            name = classify.library_name(path)
            if name is None:
                return None
            version = (classify.library_version(f"/proc/{pid}/root{path}", name)
                       or classify.library_version(outer_view(path, root), name))
            return LIB_LOAD.build(timestamp=self.clock.iso(rec.ts), pid=pid, ppid=rec.ppid, uid=rec.uid,
                                  process=rec.comm, exe=exe, root=root, mnt_ns=mnt_ns, library=path, library_name=name,
                                  version=version)
        if kind == EV_EXEC:
            argv = rec.argv
            return PROCESS_EXEC.build(timestamp=self.clock.iso(rec.ts), pid=pid, ppid=rec.ppid, uid=rec.uid,
                                      process=rec.comm, exe=exe, root=root, mnt_ns=mnt_ns,
                                      cmdline=shlex.join(argv) if argv else None)
        if kind == EV_EXIT:
            exit_code, sig = decode_exit(rec.exit_code)
            self.procs.forget(pid)
            return PROCESS_EXIT.build(timestamp=self.clock.iso(rec.ts), pid=pid, ppid=rec.ppid, uid=rec.uid,
                                      process=rec.comm, exe=exe, root=root, mnt_ns=mnt_ns, exit_code=exit_code,
                                      signal=sig)
        return None

    def _file_type(self, path: str, pid: int, root: str | None) -> str | None:
        if not path.lower().endswith(".pem"):
            return classify.type_from_name(path)
        outer = outer_view(path, root)  # one cache entry per file, whatever the root
        now = time.monotonic()
        hit = self._pem_types.get(outer)
        if hit and hit[0] > now:
            return hit[1]
        ftype = classify.file_type(path, read_path=f"/proc/{pid}/root{path}")
        if ftype == "pem":  # the process may be gone; try the path from our own root
            ftype = classify.file_type(path, read_path=outer)
        if ftype != "pem":  # content unknown (e.g. a file being created): ask again next time
            if len(self._pem_types) > 4096:
                self._pem_types.clear()
            self._pem_types[outer] = (now + PEM_CACHE_SECONDS, ftype)
        return ftype
