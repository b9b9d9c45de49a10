"""The process's own view of paths (host/proc.py) and the monitor records' view trailer, without a kernel."""

from __future__ import annotations

import os

from crypto_tracer.host import proc
from crypto_tracer.probes import monitor
from crypto_tracer.host.proc import ProcessCache, outer_view, own_view
from crypto_tracer.pipeline.redact import redact_event


def test_own_view_and_outer_view():
    assert own_view("/srv/jail/usr/bin/cat", "/srv/jail") == "/usr/bin/cat"
    assert own_view("/srv/jail", "/srv/jail") == "/"
    assert own_view("/srv/jailbreak/x.pem", "/srv/jail") == "/srv/jailbreak/x.pem"  # not under the root
    assert own_view("/usr/sbin/sshd", "/run/sshd") == "/usr/sbin/sshd"  # exe of a process that chrooted later
    assert own_view("/usr/bin/cat", "/") == "/usr/bin/cat"
    assert own_view("/usr/bin/cat", None) == "/usr/bin/cat" and own_view(None, "/srv/jail") is None
    assert outer_view("/tmp/x.pem", "/srv/jail") == "/srv/jail/tmp/x.pem"
    assert outer_view("/", "/srv/jail") == "/srv/jail"
    assert outer_view("/tmp/x.pem", "/") == "/tmp/x.pem"


def test_read_view_of_this_process():
    exe, root, ns = proc.read_view(os.getpid())
    assert exe == os.path.realpath("/proc/self/exe") and root == "/"
    assert ns == os.stat("/proc/self/ns/mnt").st_ino


def test_cache_keeps_what_the_kernel_sent_and_takes_a_new_root():
    c = ProcessCache()
    pid = 2 ** 22 + 1  # beyond pid_max: /proc has nothing, so nothing is read from it
    c.update(pid, "/usr/bin/cat", "/", 4026531841)
    c.update(pid, None, None, None)  # nothing sent: unchanged
    assert c.view(pid) == ("/usr/bin/cat", "/", 4026531841)
    c.update(pid, None, "/srv/jail", 4026531841)  # chroot after exec: the root alone is sent again
    assert c.view(pid) == ("/usr/bin/cat", "/srv/jail", 4026531841)
    c.forget(pid)
    c.update(pid, None, "/srv/jail", 7)  # exe not sent and not cached: /proc (gone here) -> unknown
    assert c.view(pid) == (None, "/srv/jail", 7)


def record(kind, own: bytes, data: bytes, exe: bytes, root: bytes | None, ns: int) -> bytes:
    head = monitor.HEADER.pack(123, kind, 10, 10, 0, b"cat")
    view = monitor.VIEW.pack(len(exe), 0 if root is None else len(root) + 1, ns if root is not None else 0, 0)
    return head + view + own + data + exe + (root or b"")


def test_decode_view_trailer():
    # components leaf first, NUL-terminated; root "/" has none, so it is sent as length 1
    exe, jail = b"cat\0bin\0usr\0", b"jail\0srv\0"
    raw = record(monitor.EV_EXIT, monitor.EXIT.pack(1, 0), b"", exe, jail, 99)
    assert monitor.decode(raw).view == ("/usr/bin/cat", "/srv/jail", 99)
    raw = record(monitor.EV_EXIT, monitor.EXIT.pack(1, 0), b"", exe, b"", 99)
    assert monitor.decode(raw).view == ("/usr/bin/cat", "/", 99)
    raw = record(monitor.EV_EXIT, monitor.EXIT.pack(1, 0), b"", b"", None, 0)
    assert monitor.decode(raw).view == (None, None, None)
    # a relative name opened in the process's root: the base is "/" (no components)
    name = b"tmp/x.pem\0"
    own = monitor.FILE.pack(1, 3, 0, 1, len(name), 0, 0, 1)
    rec = monitor.decode(record(monitor.EV_FILE, own, name, b"", None, 0))
    assert (rec.view, rec.name, rec.base, rec.flags, rec.result) == ((None, None, None), "tmp/x.pem", "/", 0, 3)


def test_root_is_redacted_like_the_other_paths():
    ev = {"exe": "/usr/bin/cat", "root": "/root/jail", "mnt_ns": 1, "file": "/home/alice/k.pem"}
    assert redact_event(ev) == {"exe": "/usr/bin/cat", "root": "/home/ROOT/jail", "mnt_ns": 1,
                                "file": "/home/USER/k.pem"}


def test_library_files_are_in_the_process_own_view():
    """maps paths printed from outside the process's root (a chroot, or another mount namespace
    seen from inside a chroot) are made its own, and reached through /proc/PID/root."""
    from crypto_tracer.host import discovery

    maps = (b"7f0000000000-7f0000001000 r-xp 00000000 08:01 12 /var/tmp/r/root/usr/lib/libssl.so.3\n"
            b"7f0000001000-7f0000002000 r--p 00001000 08:01 12 /var/tmp/r/root/usr/lib/libssl.so.3\n"
            b"7f0000002000-7f0000003000 r-xp 00000000 08:01 13 /var/tmp/r/root/usr/lib/libz.so.1 (deleted)\n")
    assert discovery.library_files(42, maps, "/var/tmp/r/root") == [
        ("/usr/lib/libssl.so.3", "/proc/42/root/usr/lib/libssl.so.3", False),
        ("/usr/lib/libz.so.1", "/proc/42/root/usr/lib/libz.so.1", True)]
    assert discovery.library_files(42, maps, "/")[0] == (
        "/var/tmp/r/root/usr/lib/libssl.so.3", "/proc/42/root/var/tmp/r/root/usr/lib/libssl.so.3", False)
