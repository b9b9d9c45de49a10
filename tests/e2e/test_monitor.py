"""monitor / libs / files on the real kernel, with real workloads and exact field values."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.helpers import parse_stream, run_workload, stats_from
from tests.harness import Tracer, make_cert, need_root, need_tool

pytestmark = pytest.mark.ebpf

ISO_US = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture(autouse=True)
def _root():
    need_root()


class Gated:
    """A Python workload that waits for 'go' on stdin, so the tracer can filter on its pid."""

    def __init__(self, code: str, cwd=None, user=None):
        argv = [sys.executable, "-c", "import sys; sys.stdin.readline()\n" + textwrap.dedent(code)]
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=cwd)
        self.pid = self.proc.pid

    def go(self, timeout=60) -> str:
        out, err = self.proc.communicate("go\n", timeout=timeout)
        assert self.proc.returncode == 0, err
        return out


def make_cert_and_key(d) -> tuple[str, str]:
    return make_cert(d, "ct-test", days=2, cert_name="server.crt", key_name="server-key.pem")


def test_file_open_events_have_exact_fields(tmp_path):
    cert, key = make_cert_and_key(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "trust.pem").write_text(open(cert).read())
    w = Gated(f"""
        import os
        os.close(os.open({cert!r}, os.O_RDONLY))                       # absolute
        os.close(os.open("server-key.pem", os.O_RDONLY | os.O_CLOEXEC))  # relative to the cwd
        d = os.open("sub", os.O_RDONLY | os.O_DIRECTORY)
        os.close(os.open("trust.pem", os.O_RDONLY, dir_fd=d))           # relative to a dirfd
        try:
            os.open("missing.crt", os.O_RDONLY)                          # fails: ENOENT
        except FileNotFoundError:
            pass
        os.close(os.open("new.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        os.close(os.open("notes.txt", os.O_WRONLY | os.O_CREAT, 0o600))  # not a crypto file
    """, cwd=tmp_path)
    t = Tracer(["monitor", "--pid", str(w.pid)])
    w.go()  # it has exited: all its events are submitted, and stop() drains them
    out, err, rc = t.stop()
    assert rc == 0, err
    events = parse_stream(out)
    assert {e["pid"] for e in events} == {w.pid}
    opens = [(e["file"], e["file_type"], e["flags"], e["result"] >= 0 if e["result"] >= 0 else e["result"])
             for e in events if e["event_type"] == "file_open"]
    d = str(tmp_path)
    assert opens == [
        # Python's os.open adds O_CLOEXEC itself (PEP 446)
        (cert, "certificate", "O_RDONLY|O_CLOEXEC", True),
        (f"{d}/server-key.pem", "private_key", "O_RDONLY|O_CLOEXEC", True),
        (f"{d}/sub/trust.pem", "certificate", "O_RDONLY|O_CLOEXEC", True),
        (f"{d}/missing.crt", "certificate", "O_RDONLY|O_CLOEXEC", -2),
        (f"{d}/new.key", "private_key", "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC", True),
    ], opens
    first = next(e for e in events if e["event_type"] == "file_open")
    assert list(first) == ["event_type", "timestamp", "pid", "ppid", "uid", "process", "exe", "root", "mnt_ns", "file",
                           "file_type", "flags", "result"]
    assert first["root"] == "/" and first["mnt_ns"] == int(os.readlink("/proc/self/ns/mnt")[5:-1])
    assert first["ppid"] == os.getpid() and first["uid"] == 0 and first["process"].startswith("python")
    assert first["exe"] == os.path.realpath(sys.executable) or first["exe"].startswith("/home/ROOT")
    assert ISO_US.match(first["timestamp"])
    # wall clock, not boot-relative: within a minute of now
    from datetime import datetime, timezone

    ts = datetime.strptime(first["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - ts).total_seconds()) < 60
    exits = [e for e in events if e["event_type"] == "process_exit"]
    assert len(exits) == 1 and exits[0]["exit_code"] == 0 and exits[0]["signal"] is None


def test_libraries_linked_at_startup_and_dlopened_are_seen():
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()[1]
    t = Tracer(["libs", "--name", "openssl"])
    run_workload("openssl version >/dev/null")
    out, err, rc = t.stop()
    assert rc == 0, err
    events = parse_stream(out)
    assert events and all(e["event_type"] == "lib_load" and e["process"] == "openssl" for e in events)
    names = {e["library_name"]: e for e in events}
    assert set(names) == {"libssl", "libcrypto"}
    for e in names.values():
        assert e["version"] == version
        assert os.path.exists(e["library"]) and os.path.basename(e["library"]).startswith(e["library_name"] + ".so")

    # python loads libssl with dlopen (import ssl -> _ssl module -> libssl/libcrypto)
    t = Tracer(["libs", "--name", "python"])
    r = run_workload(f"{sys.executable} -c 'import ssl; print(ssl.OPENSSL_VERSION)'")
    out, err, rc = t.stop()
    pids = {e["pid"] for e in parse_stream(out) if e["library_name"] == "libssl"}
    assert pids, f"no libssl load by python: {out}\n{err}"


def test_exec_and_exit_events():
    w = Gated("""
        import subprocess, threading, time, os, signal
        subprocess.run(["sh", "-c", "exit 3"])
        p = subprocess.Popen(["sleep", "30"])
        while open(f"/proc/{p.pid}/cmdline").read() != "sleep\\x0030\\x00":  # killed once it has exec'd
            time.sleep(0.005)
        p.kill(); p.wait()
        code = "import threading,time,sys\\n" \\
               "ts=[threading.Thread(target=time.sleep,args=(0.2,)) for _ in range(4)]\\n" \\
               "[t.start() for t in ts]; [t.join() for t in ts]; sys.exit(7)"
        t = subprocess.Popen([__import__("sys").executable, "-c", code]); t.wait()
        forked = os.fork()
        if forked == 0:
            os._exit(5)  # a fork that never execs and opens nothing
        os.waitpid(forked, 0)
        print(t.pid, forked)
    """)
    t = Tracer(["monitor"])
    threaded_pid, forked_pid = map(int, w.go().split())  # it has exited: stop() drains its events
    out, err, rc = t.stop()
    assert rc == 0, err
    events = [e for e in parse_stream(out) if e["ppid"] == w.pid or e["pid"] == threaded_pid]
    execs = {e["cmdline"]: e for e in events if e["event_type"] == "process_exec"}
    assert "sh -c 'exit 3'" in execs and "sleep 30" in execs
    sh = execs["sh -c 'exit 3'"]
    assert sh["ppid"] == w.pid and sh["exe"] in ("/usr/bin/dash", "/bin/dash", "/usr/bin/sh", "/bin/sh", "/usr/bin/bash")
    exits = {e["pid"]: e for e in events if e["event_type"] == "process_exit"}
    assert exits[sh["pid"]]["exit_code"] == 3 and exits[sh["pid"]]["signal"] is None
    sleeper = execs["sleep 30"]["pid"]
    assert exits[sleeper]["exit_code"] is None and exits[sleeper]["signal"] == "SIGKILL"
    # a process with 5 threads exits once, with its code
    assert [e["exit_code"] for e in events if e["event_type"] == "process_exit" and e["pid"] == threaded_pid] == [7]
    # a fork gone before /proc could be read still has its exe (sent by the kernel at exit)
    from crypto_tracer.pipeline.redact import redact

    assert exits[forked_pid]["exit_code"] == 5
    assert exits[forked_pid]["exe"] == redact(os.path.realpath(sys.executable))


def test_uid_file_and_library_filters(tmp_path):
    need_tool("setpriv")
    cert, _ = make_cert_and_key(tmp_path)
    os.chmod(tmp_path, 0o755)
    os.chmod(cert, 0o644)
    t = Tracer(["monitor", "--uid", "65534", "--file", "*.crt"])
    run_workload(f"cat {cert} >/dev/null; setpriv --reuid=nobody --regid=nogroup --clear-groups cat {cert} >/dev/null")
    out, err, rc = t.stop()
    events = parse_stream(out)
    assert [(e["event_type"], e["uid"], e["file"]) for e in events if e["file"] == cert] == [("file_open", 65534, cert)]
    assert all(e["event_type"] == "file_open" and e["uid"] == 65534 for e in events)

    t = Tracer(["monitor", "--library", "libcrypto", "--name", "openssl"])
    run_workload(f"openssl x509 -in {cert} -noout")
    out, err, rc = t.stop()
    events = parse_stream(out)
    assert [e["library_name"] for e in events] == ["libcrypto"]

    t = Tracer(["files", "--name", "cat"])
    run_workload(f"cat {cert} > /dev/null")
    out, err, rc = t.stop()
    events = parse_stream(out)
    assert events and {e["event_type"] for e in events} == {"file_open"}
    assert cert in {e["file"] for e in events}


@pytest.mark.parametrize("fmt", ["json-array", "json-pretty"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_array_formats_are_valid_after_a_signal(tmp_path, fmt, sig):
    cert, _ = make_cert_and_key(tmp_path)
    path = tmp_path / "out.json"
    t = Tracer(["monitor", "--name", "cat", "-f", fmt, "-o", str(path)])
    run_workload(f"cat {cert} >/dev/null")  # cat has exited: stop() drains its events
    out, err, rc = t.stop(sig)
    assert rc == 0, err
    events = json.loads(path.read_text())
    assert cert in {e.get("file") for e in events}
    assert (path.stat().st_mode & 0o777) == 0o600


def test_summary_format_and_duration(tmp_path):
    cert, _ = make_cert_and_key(tmp_path)
    t = Tracer(["monitor", "--name", "cat", "-f", "summary", "-d", "2"])
    run_workload(f"cat {cert} {cert} >/dev/null")
    out, err, rc = t.wait()
    assert rc == 0, err
    assert "Crypto Activity Summary" in out and "file_open:" in out
    assert f"{cert} [certificate] (2 opens)" in out


def test_redaction_and_no_redact(tmp_path):
    home = "/root/ct-redact-test"
    os.makedirs(home, exist_ok=True)
    try:
        cert, _ = make_cert_and_key(home)
        for args, expected in ((["monitor"], "/home/ROOT/ct-redact-test/server.crt"),
                               (["monitor", "--no-redact"], cert)):
            t = Tracer(args + ["--name", "cat", "--file", "*server.crt"])
            run_workload(f"cat {cert} >/dev/null")
            out, err, rc = t.stop()
            assert [e["file"] for e in parse_stream(out)] == [expected]
    finally:
        subprocess.run(["rm", "-rf", home])


def _flood(path: str, n: int) -> Gated:
    return Gated(f"""
        import os
        for _ in range({n}):
            os.close(os.open({path!r}, os.O_RDONLY))
    """)


def test_flood_accounting_is_exact(tmp_path):
    """produced = output + filtered + dropped, exactly, with and without drops."""
    cert, _ = make_cert_and_key(tmp_path)
    n = 20000
    for mapsize, expect_drops in (("8M", False), ("16K", True)):
        w = _flood(cert, n)
        out_path = tmp_path / f"flood-{mapsize}.json"
        t = Tracer(["files", "--pid", str(w.pid), "--mapsize", mapsize, "-o", str(out_path)])
        if expect_drops:  # the reader stopped while the flood runs: the 16 KiB ring must overflow
            os.kill(t.proc.pid, signal.SIGSTOP)
        w.go()
        if expect_drops:
            os.kill(t.proc.pid, signal.SIGCONT)
        _, err, rc = t.stop()
        assert rc == 0, err
        s = stats_from(err)
        events = parse_stream(out_path.read_text())
        assert s["output"] == len(events)
        assert s["processed"] == s["output"] + s["filtered"] + s["dropped"], s
        mine = [e for e in events if e["pid"] == w.pid and e["file"] == cert]
        assert len(mine) + s["dropped"] == n, (len(mine), s)
        if expect_drops:
            assert s["dropped"] > 0
            assert "WARNING: Ring buffer backpressure detected" in err
        else:
            assert s["dropped"] == 0, s


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_full_disk_keeps_what_was_written_valid(tmp_path, small_tmpfs):
    cert, _ = make_cert_and_key(tmp_path)
    w = _flood(cert, 5000)  # ~2 MB of events into 64 KB
    path = small_tmpfs / "out.json"
    t = Tracer(["files", "--pid", str(w.pid), "-f", "json-array", "-o", str(path)])
    w.go()
    out, err, rc = t.wait(timeout=60)
    assert rc == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    events = json.loads(path.read_text())
    assert events and all(e["file"] == cert for e in events)


def test_read_only_output_is_a_clear_error(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mnt)], check=True)
    try:
        from tests.harness import run_tracer

        r = run_tracer(["monitor", "-d", "1", "-o", str(mnt / "x.json")])
        assert r.returncode == 1
        assert "cannot open output" in r.stderr and "Read-only file system" in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_demo_shows_its_workload():
    from tests.harness import run_tracer

    r = run_tracer(["demo", "-d", "4"])
    assert r.returncode == 0, r.stderr
    events = parse_stream(r.stdout)
    kinds = {e["event_type"] for e in events}
    assert kinds == {"process_exec", "process_exit", "file_open", "lib_load"}
    assert {e["file_type"] for e in events if e["event_type"] == "file_open"} >= {"certificate", "private_key"}
    assert any(e["event_type"] == "process_exit" and e["exit_code"] == 3 for e in events)


def test_tracefs_is_mounted_when_absent():
    """In a private mount namespace without tracefs, the tool mounts it and runs."""
    need_tool("unshare")
    from tests.harness import REPO, tracer_cmd

    cmd = " ".join(tracer_cmd())
    script = ("umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
              "test -e /sys/kernel/tracing/events && echo STILL-MOUNTED; "
              f"{cmd} monitor -d 1 -q -o /dev/null; echo rc=$?; "
              "test -d /sys/kernel/tracing/events && echo MOUNTED")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    assert "STILL-MOUNTED" not in r.stdout
    assert "rc=0" in r.stdout and "MOUNTED" in r.stdout, r.stdout + r.stderr


def test_verbose_shows_libbpf_log_and_per_second_figures():
    from tests.harness import run_tracer

    r = run_tracer(["monitor", "-v", "-d", "2", "-o", "/dev/null"])
    assert r.returncode == 0, r.stderr
    assert "[DEBUG] libbpf:" in r.stderr
    assert re.search(r"\[DEBUG\] \d+ events/s received", r.stderr)


def test_bpf_load_failure_exits_5(tmp_path):
    """A corrupt BPF object (copy of the package) gives one clear message and exit 5."""
    import shutil

    from tests.harness import REPO, tracer_cmd

    pkg = tmp_path / "crypto_tracer"
    shutil.copytree(os.path.join(REPO, "src", "crypto_tracer"), pkg)
    (pkg / "bpf" / "monitor.bpf.o").write_bytes(b"\x7fELF not really an object")
    r = subprocess.run(tracer_cmd() + ["monitor", "-d", "1"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 5, r.stderr
    assert "BPF object" in r.stderr and "Traceback" not in r.stderr


def test_cap_bpf_and_cap_perfmon_suffice_and_host_wide_accounting_is_exact():
    """No other capability needed; and with no filter at all the statistics add up exactly
    (opens in flight while probes attach or detach are not half-counted)."""
    need_tool("setpriv")
    from tests.harness import REPO, tracer_cmd

    caps = "-all,+bpf,+perfmon"
    r = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
                        *tracer_cmd(), "monitor", "-d", "2", "-o", "/dev/null"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    assert r.returncode == 0, r.stderr
    s = stats_from(r.stderr)
    assert s["processed"] > 0
    assert s["processed"] == s["filtered"] + s["output"] + s["dropped"], s
