"""The /proc scanner behind ``snapshot`` (and ``profile``'s process facts): no eBPF, no subprocesses.

Per process it reads ``stat``, ``maps`` and the ``fd`` links; everything else (status,
cmdline, sockets, container, the executable's ELF symbols) only for processes that use
crypto. Files are read through ``/proc/PID/fd/N`` and libraries through ``/proc/PID/root``,
so processes in other mount namespaces (containers) are classified by their own files. Paths
are in the process's own view (a chrooted process's /proc links, which show the host's view,
are made relative to its root: procinfo.own_view), with the root beside them.
Per-file work (library versions, ELF symbols, certificate parsing) is cached by
(device, inode, mtime).
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass, field

from crypto_tracer import classify
from crypto_tracer.procinfo import own_view, read_mnt_ns, read_root

# Exported functions that show an executable carries a TLS library inside it (statically linked).
STATIC_TLS_SYMBOLS: dict[bytes, str] = {
    b"SSL_write": "openssl", b"SSL_read": "openssl", b"SSL_write_ex": "openssl", b"SSL_read_ex": "openssl",
    b"gnutls_record_send": "gnutls", b"gnutls_record_recv": "gnutls",
    b"wolfSSL_write": "wolfssl", b"mbedtls_ssl_write": "mbedtls",
}

_MAPS_LIB_RE = re.compile(rb" (/[^\n]*/lib[a-z0-9_]+(?:-[0-9][0-9.]*)?\.so[^\n/]*?)(?: \(deleted\))?$", re.M)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


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

def read_bytes(path: str, limit: int = 1 << 20) -> bytes | None:
    """Up to limit bytes of a file. /proc files come a page per read(): read until EOF."""
    try:
        with open(path, "rb", buffering=0) as f:
            chunks, size = [], 0
            while size < limit:
                chunk = f.read(min(limit - size, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
    except OSError:
        return None


def parse_stat(data: bytes) -> tuple[str, int, int] | None:
    """(comm, ppid, starttime in clock ticks) from /proc/PID/stat; comm may contain ')'."""
    lp, rp = data.find(b"("), data.rfind(b")")
    if lp < 0 or rp < 0:
        return None
    rest = data[rp + 2:].split()
    try:
        return data[lp + 1:rp].decode(errors="replace"), int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def read_status_ids(pid: int) -> tuple[int | None, int | None]:
    """Real uid and gid from /proc/PID/status."""
    data = read_bytes(f"/proc/{pid}/status", 8192)
    uid = gid = None
    if data:
        for line in data.split(b"\n"):
            if line.startswith(b"Uid:"):
                uid = int(line.split()[1])
            elif line.startswith(b"Gid:"):
                gid = int(line.split()[1])
                break
    return uid, gid


def read_cmdline(pid: int) -> str | None:
    data = read_bytes(f"/proc/{pid}/cmdline", 64 * 1024)
    if not data:
        return None
    return " ".join(a.decode(errors="replace") for a in data.rstrip(b"\0").split(b"\0"))


def readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


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


_boot_time: float | None = None
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_time_epoch(start_ticks: int) -> float:
    """Wall-clock start of a process from its stat starttime (ticks since boot)."""
    global _boot_time
    if _boot_time is None:
        import time

        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        _boot_time = time.time() - uptime
    return _boot_time + start_ticks / _CLK_TCK


def root_path(pid: int, path: str) -> str:
    """A path as process pid sees it, readable from here (through its root, e.g. a container's)."""
    return f"/proc/{pid}/root{path}"


# --- per-process scan ------------------------------------------------------------------------

class Unreadable(Exception):
    """The process's maps or fds are not readable by us (another user's process)."""


def crypto_libraries(pid: int, maps: bytes | None = None, root: str | None = None) -> list[dict]:
    """Crypto libraries mapped by pid: [{path, name, version}], in its own view (root: its root,
    read when not given), version read through its root."""
    if root is None:
        root = read_root(pid)
    if maps is None:
        maps = read_bytes(f"/proc/{pid}/maps", 16 << 20)
        if maps is None:
            return []
    out, seen = [], set()
    for m in _MAPS_LIB_RE.finditer(maps):
        path = own_view(m.group(1).decode(errors="replace"), root)
        if path in seen:
            continue
        seen.add(path)
        name = classify.library_name(path)
        if name:
            out.append({"path": path, "name": name, "version": classify.library_version(root_path(pid, path), name)})
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


def socket_inodes(pid: int) -> list[int]:
    """Inodes of pid's sockets (no file classification: cheap enough to sample often)."""
    out = []
    try:
        with os.scandir(f"/proc/{pid}/fd") as it:
            for entry in it:
                target = readlink(entry.path)
                if target and target.startswith("socket:["):
                    out.append(int(target[8:-1]))
    except OSError:
        pass
    return out


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
    return proc


# --- statically linked TLS: the executable's exported symbols --------------------------------

_static_cache: dict[tuple[int, int, int], dict | None] = {}


def static_tls(path: str) -> dict | None:
    """{library, symbols, version} if the ELF file at path defines (exports) a TLS API, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _static_cache:
        symbols = defined_dynamic_symbols(path, STATIC_TLS_SYMBOLS)
        result = None
        if symbols:
            family = STATIC_TLS_SYMBOLS[symbols[0].encode()]
            version = classify.library_version(path, "libcrypto") if family == "openssl" else None
            result = {"library": family, "symbols": symbols, "version": version}
        _static_cache[key] = result
    return _static_cache[key]


def defined_dynamic_symbols(path: str, wanted) -> list[str]:
    """Which of `wanted` (bytes names) the ELF64 file at path defines in .dynsym (imports excluded)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return []
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQII", table, i * shentsize) for i in range(shnum)]
            dynsym = next((s for s in sections if s[1] == 11), None)  # SHT_DYNSYM
            if dynsym is None:
                return []
            strtab = sections[dynsym[6]]  # sh_link
            f.seek(strtab[4])
            strings = f.read(strtab[5])
            offsets = {}
            for name in wanted:
                pos = strings.find(b"\0" + name + b"\0")
                if pos >= 0:
                    offsets[pos + 1] = name
            if not offsets:
                return []
            f.seek(dynsym[4])
            symbols = f.read(dynsym[5])
    except (OSError, struct.error, IndexError):
        return []
    found = []
    for st_name, _info, _other, st_shndx, _value, _size in struct.iter_unpack("<IBBHQQ", symbols):
        if st_name in offsets and st_shndx != 0:  # SHN_UNDEF = an import
            found.append(offsets[st_name].decode())
    return sorted(found)


# --- TCP sockets, one table per network namespace -------------------------------------------

def _hex_addr(text: str) -> str:
    import ipaddress

    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def parse_tcp_table(data: bytes) -> dict[int, dict]:
    """socket inode -> {local_addr, local_port, remote_addr, remote_port, state} from /proc/net/tcp{,6}."""
    out = {}
    for line in data.split(b"\n")[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        inode = int(parts[9])
        if not inode:
            continue
        local, remote = parts[1].decode(), parts[2].decode()
        la, lp = local.split(":")
        ra, rp = remote.split(":")
        out[inode] = {"local_addr": _hex_addr(la), "local_port": int(lp, 16), "remote_addr": _hex_addr(ra),
                      "remote_port": int(rp, 16), "state": TCP_STATES.get(int(parts[3], 16), parts[3].decode())}
    return out


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
                    table.update(parse_tcp_table(data))
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


def list_pids() -> list[int]:
    pids = []
    with os.scandir("/proc") as it:
        for entry in it:
            if entry.name.isdigit():
                pids.append(int(entry.name))
    return sorted(pids)


def process_info(pid: int) -> dict | None:
    """The profile's process facts, all from /proc: pid, ppid, name, exe (in its own view), root,
    mnt_ns, cmdline, uid, gid, start_time (ISO-8601 UTC). None if the process is gone."""
    stat = read_bytes(f"/proc/{pid}/stat", 4096)
    parsed = parse_stat(stat) if stat else None
    if parsed is None:
        return None
    from crypto_tracer.clock import iso_from_ns

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


def symbol_file_offsets(path: str, names) -> dict[str, int]:
    """File offsets (what uprobes take) of the functions in `names` that the ELF64 file at path
    defines in .dynsym: st_value converted through its section (value - sh_addr + sh_offset)."""
    wanted = [n.encode() for n in names]
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return {}
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQII", table, i * shentsize) for i in range(shnum)]
            dynsym = next((s for s in sections if s[1] == 11), None)
            if dynsym is None:
                return {}
            strtab = sections[dynsym[6]]
            f.seek(strtab[4])
            strings = f.read(strtab[5])
            f.seek(dynsym[4])
            symbols = f.read(dynsym[5])
    except (OSError, struct.error, IndexError):
        return {}
    offsets = {}
    for name in wanted:
        pos = strings.find(b"\0" + name + b"\0")
        if pos >= 0:
            offsets[pos + 1] = name.decode()
    out = {}
    for st_name, info, _other, shndx, value, _size in struct.iter_unpack("<IBBHQQ", symbols):
        name = offsets.get(st_name)
        if name and shndx != 0 and shndx < len(sections) and (info & 0xF) in (2, 10):  # FUNC, IFUNC
            _n, _t, _fl, sh_addr, sh_offset = sections[shndx][:5]
            out[name] = value - sh_addr + sh_offset
    return out
