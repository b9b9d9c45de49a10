"""The /proc scanner behind ``snapshot`` (and ``profile``'s process facts): no eBPF, no subprocesses.

Per process it reads ``stat``, ``maps`` and the ``fd`` links; everything else (status,
cmdline, sockets, container, the executable's ELF symbols) only for processes that use
crypto. Files are read through ``/proc/PID/fd/N`` and libraries through ``/proc/PID/root``,
so processes in other mount namespaces (containers) are classified by their own files. Paths
are in the process's own view (a chrooted process's /proc links, which show the host's view,
are made relative to its root: host.proc.own_view), with the root beside them.
Per-file work (library versions, ELF symbols, certificate parsing) is cached by
(device, inode, mtime).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from crypto_tracer.host import classify, discovery, proc
from crypto_tracer.host.discovery import static_tls
from crypto_tracer.host.proc import (list_pids, mapped_abi3_modules, own_view, parse_stat, read_bytes, read_cmdline,
                                     read_mnt_ns, read_root, read_status_ids, readlink, root_path, start_time_epoch)


@dataclass
class ProcessCrypto:
    """What one process uses; paths are as the process sees them (not redacted), root is its
    root directory as the top of its mount tree sees it."""
    pid: int
    name: str
    ppid: int | None
    start_ticks: int | None
    libraries: list[dict] = field(default_factory=list)  # {path, name, version}
    files: list[dict] = field(default_factory=list)  # {path, type, fd, read_path}
    socket_inodes: list[int] = field(default_factory=list)
    exe: str | None = None
    root: str | None = None
    static_tls: dict | None = None

    @property
    def uses_crypto(self) -> bool:
        return bool(self.libraries or self.files or self.static_tls)


# --- small /proc readers ---------------------------------------------------------------------

_user_cache: dict[int, str | None] = {}


def user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    if uid not in _user_cache:
        import pwd

        try:
            _user_cache[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _user_cache[uid] = None
    return _user_cache[uid]


# --- per-process scan ------------------------------------------------------------------------

class Unreadable(Exception):
    """The process's maps or fds are not readable by us (another user's process)."""


def crypto_libraries(pid: int, maps: bytes | None = None, root: str | None = None) -> list[dict]:
    """Crypto libraries mapped by pid: [{path, name, version}], in its own view (root: its root,
    read when not given), version read through its root."""
    out = []
    for path, read_path, _deleted in discovery.library_files(pid, maps, root):
        name = classify.library_name(path)
        if name:
            out.append({"path": path, "name": name, "version": classify.library_version(read_path, name)})
    return out


def scan_fds(pid: int, root: str | None = None) -> tuple[list[dict], list[int]]:
    """Open crypto files [{path, type, fd, read_path}] (path in pid's own view, given its root)
    and socket inodes of pid. Raises Unreadable when the fd directory cannot be listed."""
    files, sockets = [], []
    base = f"/proc/{pid}/fd"
    try:
        entries = list(os.scandir(base))
    except PermissionError:
        raise Unreadable(pid) from None
    except OSError:  # the process exited
        return files, sockets
    seen = set()
    for entry in entries:
        target = readlink(entry.path)
        if not target:
            continue
        if target[0] != "/":
            if target.startswith("socket:["):
                sockets.append(int(target[8:-1]))
            continue
        if target.endswith(" (deleted)"):
            target = target[:-10]
        target = own_view(target, root)
        if target in seen or classify.type_from_name(target) is None or not _is_regular(entry.path):
            continue
        seen.add(target)
        ftype = classify.file_type(target, read_path=entry.path)
        if ftype:
            files.append({"path": target, "type": ftype, "fd": int(entry.name), "read_path": entry.path})
    return files, sockets


def _is_regular(path: str) -> bool:
    """Only regular files are read: opening a FIFO named x.pem would block the scan."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def scan_process(pid: int) -> ProcessCrypto | None:
    """Crypto use of one process, or None if it vanished. Raises Unreadable."""
    stat = read_bytes(f"/proc/{pid}/stat", 4096)
    parsed = parse_stat(stat) if stat else None
    if parsed is None:
        return None
    name, ppid, start_ticks = parsed
    maps = read_bytes(f"/proc/{pid}/maps", 16 << 20)
    if maps is None:
        if os.path.exists(f"/proc/{pid}"):
            raise Unreadable(pid)
        return None
    if not maps:  # kernel threads have no memory map: nothing to see
        return None
    root = read_root(pid)
    files, sockets = scan_fds(pid, root)
    proc = ProcessCrypto(pid=pid, name=name, ppid=ppid, start_ticks=start_ticks,
                         libraries=crypto_libraries(pid, maps, root), files=files, socket_inodes=sockets)
    proc.root = root
    proc.exe = own_view(readlink(f"/proc/{pid}/exe"), root)
    if proc.exe:
        proc.static_tls = static_tls(f"/proc/{pid}/exe")
        if proc.static_tls is not None:
            proc.static_tls = dict(proc.static_tls, path=proc.exe)
    if proc.static_tls is None:  # a Python module with its own TLS stack (curl_cffi: BoringSSL)
        for path, deleted in dict.fromkeys(mapped_abi3_modules(maps)):
            own = own_view(path, root)
            info = None if deleted else static_tls(root_path(pid, own))
            if info is not None:
                proc.static_tls = dict(info, path=own)
                break
    return proc


# --- TCP sockets, one table per network namespace -------------------------------------------

class TcpTables:
    """TCP sockets per network namespace, each namespace's tables read once."""

    def __init__(self):
        self._by_ns: dict[str, dict[int, dict]] = {}

    def sockets(self, pid: int, inodes: list[int]) -> list[dict]:
        if not inodes:
            return []
        ns = readlink(f"/proc/{pid}/ns/net") or f"pid:{pid}"
        table = self._by_ns.get(ns)
        if table is None:
            table = {}
            for name in ("tcp", "tcp6"):
                data = read_bytes(f"/proc/{pid}/net/{name}", 64 << 20)
                if data:
                    table.update(proc.parse_tcp_table(data))
            self._by_ns[ns] = table
        return [dict(table[i]) for i in sorted(inodes) if i in table]


# --- containers ------------------------------------------------------------------------------

_CONTAINER_ID_RE = re.compile(r"([0-9a-f]{64})")


def host_mount_ns() -> str | None:
    return readlink("/proc/1/ns/mnt") or readlink("/proc/self/ns/mnt")


def container_info(pid: int, host_mnt: str | None) -> dict | None:
    """{mount_ns, cgroup, id, root} when pid runs in another mount namespace than the host (pid 1)."""
    mnt = readlink(f"/proc/{pid}/ns/mnt")
    if mnt is None or host_mnt is None or mnt == host_mnt:
        return None
    data = read_bytes(f"/proc/{pid}/cgroup", 8192) or b""
    cgroup = None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("0::"):  # cgroup v2
            cgroup = line[3:]
            break
        cgroup = cgroup or line.split(":", 2)[-1]
    m = _CONTAINER_ID_RE.search(cgroup or "")
    return {"mount_ns": mnt, "cgroup": cgroup, "id": m.group(1) if m else None, "root": f"/proc/{pid}/root"}


def process_info(pid: int) -> dict | None:
    """The profile's process facts, all from /proc: pid, ppid, name, exe (in its own view), root,
    mnt_ns, cmdline, uid, gid, start_time (ISO-8601 UTC). None if the process is gone."""
    stat = read_bytes(f"/proc/{pid}/stat", 4096)
    parsed = parse_stat(stat) if stat else None
    if parsed is None:
        return None
    from crypto_tracer.pipeline.clock import iso_from_ns

    name, ppid, start_ticks = parsed
    uid, gid = read_status_ids(pid)
    root = read_root(pid)
    return {"pid": pid, "ppid": ppid, "name": name, "exe": own_view(readlink(f"/proc/{pid}/exe"), root),
            "root": root, "mnt_ns": read_mnt_ns(pid), "cmdline": read_cmdline(pid), "uid": uid, "gid": gid,
            "start_time": iso_from_ns(int(start_time_epoch(start_ticks) * 1e9))}


def pids_named(name: str, exclude: int | None = None) -> list[int]:
    """Processes whose command name (comm) contains name, case-insensitive (like the kernel filter)."""
    needle = name.lower()[:15]
    out = []
    for pid in list_pids():
        if pid == exclude:
            continue
        stat = read_bytes(f"/proc/{pid}/stat", 4096)
        parsed = parse_stat(stat) if stat else None
        if parsed and needle in parsed[0].lower():
            out.append(pid)
    return out
