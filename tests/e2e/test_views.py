"""Paths of processes in a chroot or another mount namespace: every path field in the process's
own view, with its root and mount namespace beside it (README, "Paths"). Real kernel, exact values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.helpers import parse_stream
from tests.harness import Tracer, need_root, need_tool, wait_until

pytestmark = pytest.mark.ebpf

PY = os.path.realpath(sys.executable)


@pytest.fixture(autouse=True)
def _root():
    need_root()


def write_key(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path],
                   check=True, capture_output=True)


def mnt_ns(pid) -> int:
    return int(os.readlink(f"/proc/{pid}/ns/mnt")[5:-1])


def make_jail(jail) -> None:
    """A root with /usr/bin/cat and the libraries it links (copies: no mounts to clean up)."""
    cat = os.path.realpath(shutil.which("cat"))
    out = subprocess.run(["ldd", cat], capture_output=True, text=True, check=True).stdout
    files = [cat] + [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    for f in files:
        dest = os.path.join(jail, f.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(os.path.realpath(f), dest)
    if cat != "/usr/bin/cat":
        os.makedirs(os.path.join(jail, "usr/bin"), exist_ok=True)
        shutil.copy(cat, os.path.join(jail, "usr/bin/cat"))


def gated(argv, **kw) -> subprocess.Popen:
    """argv started after 'go' on stdin (the shell waits), so the tracer can filter on its pid."""
    return subprocess.Popen(["sh", "-c", 'read x && exec "$@"', "sh", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def go(p: subprocess.Popen) -> str:
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    return out


def view(e) -> tuple:
    return e["event_type"], e["exe"], e["root"], e["mnt_ns"], e.get("file"), e.get("cmdline")


def test_chrooted_process_paths_are_its_own_with_its_root(tmp_path):
    need_tool("chroot")
    jail = str(tmp_path / "jail")
    make_jail(jail)
    write_key(f"{jail}/tmp/x.pem")
    p = gated(["chroot", jail, "/usr/bin/cat", "/tmp/x.pem", "tmp/x.pem"])  # chroot(1) cds to the new /
    t = Tracer(["monitor", "--pid", str(p.pid)])
    assert "PRIVATE KEY" in go(p)
    out, err, rc = t.stop()
    assert rc == 0, err
    host_ns = mnt_ns(os.getpid())
    events = [view(e) for e in parse_stream(out)]
    chroot_exe = os.path.realpath(shutil.which("chroot"))
    assert events == [
        ("process_exec", chroot_exe, "/", host_ns, None, f"chroot {jail} /usr/bin/cat /tmp/x.pem tmp/x.pem"),
        ("process_exec", "/usr/bin/cat", jail, host_ns, None, "/usr/bin/cat /tmp/x.pem tmp/x.pem"),
        ("file_open", "/usr/bin/cat", jail, host_ns, "/tmp/x.pem", None),
        ("file_open", "/usr/bin/cat", jail, host_ns, "/tmp/x.pem", None),  # relative: cwd walked to its root
        ("process_exit", "/usr/bin/cat", jail, host_ns, None, None),
    ], out
    opens = [e for e in parse_stream(out) if e["event_type"] == "file_open"]
    assert [e["file_type"] for e in opens] == ["private_key", "private_key"]  # read through its root


def test_root_changed_after_exec_is_reported_from_then_on(tmp_path):
    """A process that chroots itself (as daemons do): the kernel sends the new root with its next event."""
    jail = str(tmp_path / "jail")
    write_key(f"{jail}/tmp/x.pem")
    write_key(str(tmp_path / "outside.key"))
    code = (f"import os\nos.close(os.open({str(tmp_path / 'outside.key')!r}, os.O_RDONLY))\n"
            f"os.chroot({jail!r}); os.chdir('/')\nos.close(os.open('/tmp/x.pem', os.O_RDONLY))\n")
    p = gated([PY, "-c", code])
    t = Tracer(["files", "--pid", str(p.pid), "--no-redact"])
    go(p)
    out, err, rc = t.stop()
    assert rc == 0, err
    host_ns = mnt_ns(os.getpid())
    # the exe was sent before the chroot, in the view it had then (python's own start-up opens
    # other certificates, e.g. certifi's: not these)
    mine = (str(tmp_path / "outside.key"), "/tmp/x.pem")
    assert [view(e) for e in parse_stream(out) if e["file"] in mine] == [
        ("file_open", PY, "/", host_ns, str(tmp_path / "outside.key"), None),
        ("file_open", PY, jail, host_ns, "/tmp/x.pem", None),
    ], out


@pytest.fixture
def private_dir(tmp_path):
    """tmp_path as a private mount in this namespace: mounts made under it in a new mount
    namespace stay there (unshare's own --propagation private needs / to be a mount point,
    which it is not in a chroot test root)."""
    d = str(tmp_path)
    subprocess.run(["mount", "--bind", d, d], check=True)
    try:
        subprocess.run(["mount", "--make-private", d], check=True)
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=True)


def test_unshared_mount_namespace_paths_are_its_own(private_dir, tmp_path_factory):
    need_tool("unshare")
    d = private_dir
    os.makedirs(f"{d}/work")
    write_key(f"{d}/hidden/k.pem")  # visible as {d}/work/k.pem inside the namespace only
    with open(f"{d}/work/k.pem", "w") as f:
        f.write("not a key\n")  # what the host sees at that path
    script = f"mount --bind {d}/hidden {d}/work && echo ready && read x && cd {d}/work && exec cat k.pem -"
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the shell runs in its namespace, its mount made, before the tracer starts (so unshare's
    # exec of sh is not in the trace)
    assert p.stdout.readline() == "ready\n", p.stderr.read()
    ns = mnt_ns(p.pid)
    # its root as the kernel shows it to us: "/" on a host; in a test root (a chroot, as the
    # fresh-machine check runs the suite) the chroot's directory in the namespace's own tree
    root = os.readlink(f"/proc/{p.pid}/root")
    result = str(tmp_path_factory.mktemp("out") / "events.json")
    t = Tracer(["monitor", "--pid", str(p.pid), "--no-redact", "-o", result])
    # cat opens k.pem, then reads its stdin until EOF: it stays alive (so the key is read through
    # its root, not the host's file at that path) until the event has been written
    p.stdin.write("go\n")
    p.stdin.flush()
    wait_until(lambda: '"file_open"' in open(result).read() or p.poll() is not None, 20, "cat's file_open event")
    assert p.poll() is None
    out_text, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "PRIVATE KEY" in out_text, err
    _, err, rc = t.stop()
    assert rc == 0, err
    assert ns != mnt_ns(os.getpid())
    events = parse_stream(open(result).read())
    cat = os.path.realpath(shutil.which("cat"))
    assert [view(e) for e in events] == [
        ("process_exec", cat, root, ns, None, "cat k.pem -"),
        ("file_open", cat, root, ns, f"{d}/work/k.pem", None),  # relative: cwd walked across the bind mount
        ("process_exit", cat, root, ns, None, None),
    ], events
    # classified by the file the process opened (a key), not the host's file at that path
    assert next(e for e in events if e["event_type"] == "file_open")["file_type"] == "private_key"


def test_snapshot_and_profile_report_root_and_own_paths(tmp_path):
    need_tool("chroot")
    jail = str(tmp_path / "jail")
    make_jail(jail)
    write_key(f"{jail}/tmp/x.pem")
    # cat holds the key open while it waits on its stdin (a pipe we keep open)
    p = subprocess.Popen(["chroot", jail, "/usr/bin/cat", "-", "/tmp/x.pem"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.readlink(f"/proc/{p.pid}/root") == jail, 10, "cat in its chroot")
        # cat opens its files in order: '-' first, so hold the key with a second reader? No: cat reads '-'
        # until EOF before opening /tmp/x.pem, so the key is not open yet: snapshot sees exe and root only.
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "..", "src"))
        r = subprocess.run([sys.executable, "-m", "crypto_tracer", "profile", "--pid", str(p.pid), "-d", "1",
                            "--no-redact"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        proc = json.loads(r.stdout)["processes"][0]["process"]
        assert (proc["exe"], proc["root"], proc["mnt_ns"]) == ("/usr/bin/cat", jail, mnt_ns(os.getpid()))
    finally:
        p.stdin.close()
        p.wait()
