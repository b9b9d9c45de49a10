"""Process facts from /proc, cached per pid, for enriching kernel events.

Paths are in the process's own view (what the process itself would open); `root` is its
root directory as the top of its mount tree sees it ("/srv/jail" for a chroot, "/" for a
host process or a container) and `mnt_ns` the inode of its mount namespace.
"""

from __future__ import annotations

import os


MAX_CACHED_PROCESSES = 16384


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


def read_exe(pid: int) -> str | None:
    """The executable of a live process as seen from here (the host's view for a chrooted one),
    without the kernel's ' (deleted)' mark; None if gone."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def read_root(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def read_mnt_ns(pid: int) -> int | None:
    """The inode of pid's mount namespace ('mnt:[4026531841]')."""
    try:
        return int(os.readlink(f"/proc/{pid}/ns/mnt")[5:-1])
    except (OSError, ValueError):
        return None


def read_view(pid: int) -> tuple[str | None, str | None, int | None]:
    """(exe in the process's own view, root, mnt_ns) of a live process, from /proc."""
    root = read_root(pid)
    return own_view(read_exe(pid), root), root, read_mnt_ns(pid)


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


def read_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
