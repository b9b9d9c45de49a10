"""/proc: the one place that reads and parses it (stat, status, cmdline, maps, exe, root, fds,
net/tcp{,6}), turns kernel address families into text, and maps paths between the reader's view
and each process's own view (own_view; ProcessCache keeps (exe, root, mnt_ns) per pid).

Readers return None (or empty) for a process that is gone or unreadable, never raise OSError.
"""

from __future__ import annotations

import ipaddress
import os
import re

AF_INET, AF_INET6 = 2, 10  # the kernel's address families, as BPF records carry them

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
TCP_LISTEN = 10
TCP_ESTABLISHED = 1  # also a connected UDP socket's state in /proc/net/udp{,6}


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


def readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def list_pids() -> list[int]:
    pids = []
    with os.scandir("/proc") as it:
        for entry in it:
            if entry.name.isdigit():
                pids.append(int(entry.name))
    return sorted(pids)


def root_path(pid: int, path: str) -> str:
    """A path as process pid sees it, readable from here (through its root, e.g. a container's)."""
    return f"/proc/{pid}/root{path}"


# --- stat, status, cmdline, exe ------------------------------------------------------------------

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


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, starttime ticks) of pid, None if gone."""
    data = read_bytes(f"/proc/{pid}/stat", 4096)
    return parse_stat(data) if data else None


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


def read_cmdline_args(pid: int) -> list[str] | None:
    """The arguments; [] for a kernel thread or zombie, None if gone."""
    data = read_bytes(f"/proc/{pid}/cmdline", 64 * 1024)
    if data is None:
        return None
    return [a.decode(errors="replace") for a in data.rstrip(b"\0").split(b"\0")] if data else []


def read_cmdline(pid: int) -> str | None:
    """The arguments joined by spaces; None if gone or empty."""
    args = read_cmdline_args(pid)
    return " ".join(args) if args else None


def read_exe(pid: int) -> str | None:
    """The executable of a live process as seen from here (the host's view for a chrooted one),
    without the kernel's ' (deleted)' mark; None if gone."""
    exe = readlink(f"/proc/{pid}/exe")
    return exe.removesuffix(" (deleted)") if exe is not None else None


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


# --- views: root, mount namespace, paths as the process sees them --------------------------------
#
# /proc links (exe, maps, fd) print a path from the top of the reader's mount tree: for a chrooted
# process that is the host's view ("/srv/jail/usr/lib/..."), and for a process in another mount
# namespace seen from inside a chroot, a path the reader cannot open. own_view makes it the
# process's own path (what it would open itself); root_path(pid, own) then reaches the file from
# here through /proc/PID/root, whatever the reader's root.

def own_view(path: str | None, root: str | None) -> str | None:
    """A path as seen from the top of the mount tree -> as the process with that root sees it.
    A path outside the root (an exe of a process that chrooted after it started) stays as is."""
    if not path or not root or root == "/":
        return path
    if path == root:
        return "/"
    if path.startswith(root) and path[len(root)] == "/":
        return path[len(root):]
    return path


def outer_view(path: str | None, root: str | None) -> str | None:
    """The reverse of own_view: where a path of the process lies from the top of the mount tree."""
    if not path or not root or root == "/":
        return path
    return root + path if path != "/" else root


def read_root(pid: int) -> str | None:
    """pid's root directory as the top of its mount tree sees it ("/srv/jail" for a chroot)."""
    return readlink(f"/proc/{pid}/root")


def read_mnt_ns(pid: int) -> int | None:
    """The inode of pid's mount namespace ('mnt:[4026531841]')."""
    link = readlink(f"/proc/{pid}/ns/mnt")
    try:
        return int(link[5:-1]) if link else None
    except ValueError:
        return None


def read_view(pid: int) -> tuple[str | None, str | None, int | None]:
    """(exe in the process's own view, root, mnt_ns) of a live process, from /proc."""
    root = read_root(pid)
    return own_view(read_exe(pid), root), root, read_mnt_ns(pid)


MAX_CACHED_PROCESSES = 16384


class ProcessCache:
    """(exe, root, mnt_ns) by pid. The kernel's records seed it; exits evict; else /proc is read once.

    Bounded: `files` and `libs` see no exits, so the cache is emptied when it gets full
    (entries are cheap to read again)."""

    def __init__(self):
        self._views: dict[int, tuple[str | None, str | None, int | None]] = {}

    def view(self, pid: int) -> tuple[str | None, str | None, int | None]:
        try:
            return self._views[pid]
        except KeyError:
            pass
        view = read_view(pid)
        self._remember(pid, view)
        return view

    def exe(self, pid: int) -> str | None:
        return self.view(pid)[0]

    def _remember(self, pid: int, view: tuple) -> None:
        if len(self._views) >= MAX_CACHED_PROCESSES:
            self._views.clear()
        self._views[pid] = view

    def update(self, pid: int, exe: str | None, root: str | None, mnt_ns: int | None) -> None:
        """What the kernel sent with a record: None = not sent (unchanged)."""
        if exe is None and root is None:
            return
        old = self._views.get(pid)
        if old is None:
            old = read_view(pid) if exe is None or root is None else (None, None, None)
        if root is None:
            root, mnt_ns = old[1], old[2]
        self._remember(pid, (exe if exe is not None else old[0], root, mnt_ns))

    def forget(self, pid: int) -> None:
        self._views.pop(pid, None)


# --- maps, fds ----------------------------------------------------------------------------------

# A shared library's file name: its stem, then a version (libgnutls-3.so) or the hash auditwheel
# gives a library bundled in a wheel (pycurl.libs/libssl-8b66dd34.so.3), then .so and a version.
LIBRARY_NAME = r"(lib[a-z0-9_]+?)(?:-[0-9][0-9.]*|-[0-9a-f]{8})?\.so"
MAPS_LIBRARY_RE = re.compile(rb" (/[^\n]*/" + LIBRARY_NAME.encode() + rb"[^\n/]*?)( \(deleted\))?$", re.M)


def read_maps(pid: int) -> bytes | None:
    return read_bytes(f"/proc/{pid}/maps", 16 << 20)


# Python extension modules of the stable ABI: where wheels bundle a TLS stack of their own (curl_cffi)
MAPS_ABI3_RE = re.compile(rb" (/[^\n]*/[^\n/]+\.abi3\.so)( \(deleted\))?$", re.M)


def mapped_abi3_modules(maps: bytes):
    """(path, deleted) of each mapping of a Python stable-ABI extension module (*.abi3.so)."""
    for m in MAPS_ABI3_RE.finditer(maps):
        yield m.group(1).decode(errors="replace"), m.group(2) is not None


def mapped_libraries(maps: bytes):
    """(path, deleted) of each shared-library mapping ("/.../libNAME[-VER].so*"), in maps order,
    repeated once per mapping (a file is usually mapped several times)."""
    for m in MAPS_LIBRARY_RE.finditer(maps):
        yield m.group(1).decode(errors="replace"), m.group(3) is not None


def socket_inode(link: str) -> int | None:
    """The inode of an fd link 'socket:[123]', else None."""
    return int(link[8:-1]) if link.startswith("socket:[") else None


def socket_inodes(pid: int) -> list[int]:
    """Inodes of pid's sockets."""
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


# --- addresses, /proc/net/tcp{,6} ---------------------------------------------------------------

_ADDRESS_TEXTS: dict[tuple[int, bytes], str | None] = {}


def address_text(family: int, raw: bytes) -> str | None:
    """An address (network byte order) as text; IPv4-mapped IPv6 prints as IPv4; None for a
    family that is neither AF_INET nor AF_INET6. Cached: a host talks to few peers, and every
    TLS record and hello segment names two addresses (ipaddress takes ~5 us)."""
    key = (family, raw)
    text = _ADDRESS_TEXTS.get(key, "")
    if text != "":
        return text
    if family == AF_INET:
        text = str(ipaddress.IPv4Address(raw[:4]))
    elif family == AF_INET6:
        addr = ipaddress.IPv6Address(raw[:16])
        text = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    else:
        text = None
    if len(_ADDRESS_TEXTS) >= 65536:
        _ADDRESS_TEXTS.clear()
    _ADDRESS_TEXTS[key] = text
    return text


def tcp_address(text: str | bytes) -> bytes:
    """A /proc/net/tcp{,6} hex address -> network byte order (4 or 16 bytes). The kernel prints
    each 32-bit word in host (little-endian) order."""
    raw = bytes.fromhex(text.decode() if isinstance(text, bytes) else text)
    if len(raw) == 4:
        return raw[::-1]
    return b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))


def tcp_rows(data: bytes):
    """(local addr, local port, remote addr, remote port, state, inode) per socket line of
    /proc/net/tcp or tcp6 (udp and udp6 have the same lines); addresses in network order, family
    by length (4 or 16)."""
    for line in data.split(b"\n")[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        la, lp = parts[1].split(b":")
        ra, rp = parts[2].split(b":")
        yield (tcp_address(la), int(lp, 16), tcp_address(ra), int(rp, 16), int(parts[3], 16),
               int(parts[9]))


def family_of(raw: bytes) -> int:
    return AF_INET if len(raw) == 4 else AF_INET6


def parse_tcp_table(data: bytes) -> dict[int, dict]:
    """socket inode -> {local_addr, local_port, remote_addr, remote_port, state} from /proc/net/tcp{,6}."""
    out = {}
    for la, lp, ra, rp, state, inode in tcp_rows(data):
        if not inode:
            continue
        out[inode] = {"local_addr": address_text(family_of(la), la), "local_port": lp,
                      "remote_addr": address_text(family_of(ra), ra), "remote_port": rp,
                      "state": TCP_STATES.get(state, format(state, "02X"))}
    return out
