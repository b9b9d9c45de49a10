"""The agent unit's least privilege works: crypto-tracer run as systemd would start it from
packaging/crypto-tracer-agent.service (root narrowed to the unit's capability bounding set, no_new_privs)
still traces another user's process completely, and every syscall it makes passes the unit's
SystemCallFilter=. PID 1 here is not systemd, so setpriv applies the same restrictions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from tests import harness
from tests import systemd_unit as su
from tests.e2e.helpers import parse_stream
from tests.harness import Tracer, make_cert, need_root, need_tool, wait_until

pytestmark = pytest.mark.ebpf

NOBODY = 65534
PYTHON = "/usr/bin/python3"


@pytest.fixture(autouse=True)
def _root():
    need_root()
    need_tool("setpriv", "strace", "systemd-analyze")


@pytest.fixture
def nobody_dir():
    """A directory of nobody's, with a private key only nobody may read (mode 0600)."""
    d = tempfile.mkdtemp(prefix="ct-unit-", dir="/var/tmp")
    try:
        _, key = make_cert(d, "ct-unit", cert_name="c.crt", key_name="k.pem")
        for p in (d, key, os.path.join(d, "c.crt")):
            os.chown(p, NOBODY, NOBODY)
        yield d, key
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _child_of(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    return int(children[0]) if children else 0


def test_monitor_under_the_units_restrictions(tmp_path, nobody_dir, monkeypatch):
    d, key = nobody_dir
    summary = str(tmp_path / "strace.txt")
    wrapped = su.setpriv_prefix() + su.strace_prefix(summary)
    original = harness.tracer_cmd
    monkeypatch.setattr(harness, "tracer_cmd", lambda: wrapped + original())
    tracer = Tracer(["monitor", "-u", str(NOBODY), "-d", "0"], timeout=120)
    try:
        # the tracer (python, strace's child) has exactly the unit's capabilities and no_new_privs
        py = wait_until(lambda: _child_of(tracer.proc.pid), 10, "the traced crypto-tracer")
        with open(f"/proc/{py}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        assert status["NoNewPrivs"] == "1"
        r = subprocess.run(["capsh", f"--decode={status['CapEff']}"], capture_output=True, text=True, check=True)
        effective = sorted(r.stdout.strip().split("=", 1)[1].upper().split(","))
        assert effective == sorted(su.bounding_caps())

        # another user's process: loads libssl and opens its own 0600 key
        code = f"import ssl; open({key!r}).read()"
        w = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, "-c", code],
                           capture_output=True, text=True, timeout=60, cwd=d)
        assert w.returncode == 0, w.stderr

        def seen():
            evs = parse_stream(tracer.out)
            return any(e["event_type"] == "file_open" and e["file"] == key for e in evs) and evs
        events = wait_until(seen, 30, "the key's file_open")
    finally:
        py = _child_of(tracer.proc.pid)
        if py:
            os.kill(py, signal.SIGINT)
        result = tracer.wait(120)
    assert result.rc == 0, result.err
    events = parse_stream(result.out)
    exe = os.path.realpath(PYTHON)
    opened = [e for e in events if e["event_type"] == "file_open" and e["file"] == key]
    assert opened and opened[0]["uid"] == NOBODY
    # CAP_DAC_READ_SEARCH: the key's content was read to classify it; CAP_SYS_PTRACE: nobody's exe was read
    assert opened[0]["file_type"] == "private_key"
    assert opened[0]["exe"] == exe
    libs = [e for e in events if e["event_type"] == "lib_load" and e["library_name"] == "libssl"]
    assert libs and libs[0]["exe"] == exe and libs[0]["pid"] == opened[0]["pid"]
    execs = [e for e in events if e["event_type"] == "process_exec" and e["pid"] == opened[0]["pid"]]
    assert execs and execs[0]["cmdline"].startswith(f"{PYTHON} -c ")

    used = su.syscalls_used(summary)
    assert {"bpf", "perf_event_open"} <= used
    assert used - su.allowed_syscalls() == set(), "syscalls the unit's SystemCallFilter= would refuse"


def test_snapshot_under_the_units_restrictions(tmp_path, nobody_dir):
    """The agent's periodic snapshot reads other users' /proc/PID/exe, root and maps (CAP_SYS_PTRACE) and
    their key files (CAP_DAC_READ_SEARCH): all of it is there under the unit's restrictions."""
    import json

    d, key = nobody_dir
    code = f"import ssl, sys; f = open({key!r}); print('ready', flush=True); sys.stdin.readline()"
    holder = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, "-c",
                               code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=d)
    try:
        assert holder.stdout.readline() == "ready\n"
        summary = str(tmp_path / "strace.txt")
        r = subprocess.run(su.setpriv_prefix() + su.strace_prefix(summary) + harness.tracer_cmd()
                           + ["snapshot", "-f", "json-pretty"], capture_output=True, text=True, timeout=120,
                           env=harness.tracer_env())
    finally:
        holder.communicate("\n", timeout=30)
    assert r.returncode == 0, r.stderr
    procs = [p for p in json.loads(r.stdout)["processes"] if p["pid"] == holder.pid]
    assert len(procs) == 1
    p = procs[0]
    assert (p["uid"], p["exe"], p["root"]) == (NOBODY, os.path.realpath(PYTHON), "/")
    libssl = [lib for lib in p["libraries"] if lib["name"] == "libssl"]
    assert libssl and libssl[0]["version"]  # read through /proc/PID/root
    files = {f["path"]: f for f in p["open_crypto_files"]}
    assert files[key]["type"] == "private_key", files
    assert su.syscalls_used(summary) - su.allowed_syscalls() == set()


def test_packet_capture_under_the_units_restrictions(tmp_path, monkeypatch):
    """TC attach and detach on lo (what the handshake posture and pcapng need: CAP_NET_ADMIN) work under
    the unit's restrictions, with syscalls its filter allows."""
    summary = str(tmp_path / "strace.txt")
    wrapped = su.setpriv_prefix() + su.strace_prefix(summary)
    original = harness.tracer_cmd
    monkeypatch.setattr(harness, "tracer_cmd", lambda: wrapped + original())
    pcap = str(tmp_path / "x.pcapng")
    tracer = Tracer(["tls", "-m", "pcapng", "-w", pcap, "-i", "lo", "-d", "2"], timeout=120)
    result = tracer.wait(120)
    assert result.rc == 0, result.err
    assert os.path.getsize(pcap) > 0
    used = su.syscalls_used(summary)
    assert {"bpf", "sendto", "recvfrom"} & used
    assert used - su.allowed_syscalls() == set()
