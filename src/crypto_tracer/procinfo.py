"""Process facts from /proc, cached per pid, for enriching kernel events."""

from __future__ import annotations

import os


MAX_CACHED_PROCESSES = 16384


def read_exe(pid: int) -> str | None:
    """The executable of a live process, without the kernel's ' (deleted)' mark; None if gone."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


class ProcessCache:
    """exe by pid. Exec events seed it; exits evict; others read /proc once.

    Bounded: `files` and `libs` see no exits, so the cache is emptied when it gets full
    (entries are cheap to read again)."""

    def __init__(self):
        self._exe: dict[int, str | None] = {}

    def exe(self, pid: int) -> str | None:
        try:
            return self._exe[pid]
        except KeyError:
            pass
        path = read_exe(pid)
        self._remember(pid, path)
        return path

    def _remember(self, pid: int, exe: str | None) -> None:
        if len(self._exe) >= MAX_CACHED_PROCESSES:
            self._exe.clear()
        self._exe[pid] = exe

    def set_exe(self, pid: int, exe: str | None) -> None:
        self._remember(pid, exe)

    def forget(self, pid: int) -> None:
        self._exe.pop(pid, None)


def read_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
