"""The agent's systemd unit, read the way the tests need it: its settings, the capability bounding set as
setpriv takes it, the syscalls its SystemCallFilter= lets through (expanded by systemd-analyze itself),
and the syscalls a command really makes (strace). PID 1 here is not systemd, so the unit cannot be
started: the tests run the tool under the same restrictions instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from tests.harness import REPO

UNIT = os.path.join(REPO, "packaging", "crypto-tracer-agent.service")


def settings(path: str = UNIT) -> dict[str, list[str]]:
    """Key -> every value it is given, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, value = line.split("=", 1)
                out.setdefault(key.strip(), []).append(value.strip())
    return out


def bounding_caps() -> list[str]:
    return settings()["CapabilityBoundingSet"][0].split()


def setpriv_prefix() -> list[str]:
    """Run a command as root with exactly the unit's capabilities (root's permitted set is the bounding set)
    and no_new_privs, as systemd would start it."""
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in bounding_caps())
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--no-new-privs"]


def unit_for_verify(directory: str) -> str:
    """The unit with ExecStart= pointing at this checkout's crypto-tracer (verify checks that it exists)."""
    exe = shutil.which("crypto-tracer", path=os.path.dirname(sys.executable)) or shutil.which("crypto-tracer")
    assert exe, "crypto-tracer is not installed in the venv"
    with open(UNIT) as f:
        text = f.read().replace("/usr/local/bin/crypto-tracer", exe)
    path = os.path.join(directory, os.path.basename(UNIT))
    with open(path, "w") as f:
        f.write(text)
    return path


def _expand(name: str, seen: set[str] | None = None) -> set[str]:
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    r = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True)
    out: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            out |= _expand(word, seen)
    return out


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines allow, applied in order as systemd does: the first (an allow
    list) sets the list, a later '~' line removes from it, a later plain line adds to it."""
    allowed: set[str] = set()
    for value in settings()["SystemCallFilter"]:
        deny = value.startswith("~")
        names: set[str] = set()
        for word in value.lstrip("~").split():
            names |= _expand(word)
        allowed = allowed - names if deny else allowed | names
    return allowed


def strace_prefix(summary: str) -> list[str]:
    """strace -f -c: the syscalls of a command and its threads and children, summed, written to summary."""
    return ["strace", "-f", "-qq", "-c", "-U", "name", "-o", summary, "--"]


def syscalls_used(summary: str) -> set[str]:
    names = set()
    with open(summary) as f:
        for line in f:
            word = line.strip()
            if re.fullmatch(r"[a-z_0-9]+", word) and word not in ("syscall", "total"):
                names.add(word)
    return names
