"""crypto-tracer snapshot against real processes: a TLS server holding its certificate and key,
a process in its own mount namespace with its own libcrypto, node (static OpenSSL), expired and
weak certificates, and an unprivileged run as nobody."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import (STATIC_NODE_OPENSSL, free_port, make_cert, need_root, need_tool, run_tracer,
                           static_node, wait_exec, wait_until)

LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
PORT = free_port()

SERVER = r"""
import socket, ssl, sys, threading, time
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
held = [open(cert, "rb"), open(key, "rb")]  # a server that keeps its certificate and key open
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
conns = []
def accept():
    while True:
        conns.append(srv.accept()[0])
        print("accepted", flush=True)
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
time.sleep(120)
"""


def openssl_version() -> str:
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def write_cert(directory, cn, days_valid, key=None):
    return make_cert(directory, cn, days_valid, key=key, rsa_bits=2048, cert_name=f"{cn}.crt", key_name=f"{cn}.key",
                     valid_since_days=60, serial=4242)


def snapshot(*args, runner=None, env=None):
    res = run_tracer(["snapshot", *args], timeout=30) if runner is None else \
        subprocess.run(runner + ["-m", "crypto_tracer", "snapshot", *args], capture_output=True, text=True,
                       timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    return res


def by_pid(doc, pid):
    found = [p for p in doc["processes"] if p["pid"] == pid]
    assert found, f"pid {pid} not in snapshot"
    return found[0]


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="ct-snap-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_server(workdir):
    cert, key = write_cert(workdir, "server.snapshot.test", 200)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, cert, key, str(PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    client = socket.create_connection(("127.0.0.1", PORT))
    assert proc.stdout.readline().strip() == "accepted"  # the connection is the server's
    yield proc, cert, key, client
    client.close()
    proc.kill()
    proc.wait()


def test_tls_server_with_certificate_and_key(tls_server):
    proc, cert, key, client = tls_server
    doc = json.loads(snapshot().stdout)
    assert doc["snapshot_version"] and doc["scan"]["privileged"] == (os.geteuid() == 0)
    p = by_pid(doc, proc.pid)
    assert p["ppid"] == os.getpid() and p["name"] == os.path.basename(sys.executable)[:15]
    assert p["uid"] == os.getuid()
    assert p["cmdline"].endswith(f"{cert} {key} {PORT}")
    version = openssl_version()
    libs = {lib["path"]: lib for lib in p["libraries"]}
    assert libs[LIBSSL] == {"path": LIBSSL, "name": "libssl", "version": version}
    assert libs[LIBCRYPTO]["version"] == version
    files = {f["path"]: f for f in p["open_crypto_files"]}
    c = files[cert]
    assert c["type"] == "certificate"
    assert c["certificate"]["subject"] == "CN=server.snapshot.test"
    assert c["certificate"]["days_left"] == 200
    assert c["certificate"]["key_algorithm"] == "RSA" and c["certificate"]["key_size"] == 2048
    assert c["certificate"]["self_signed"] is True
    assert c["certificate"]["flags"] == ["not_quantum_safe"]
    assert files[key]["type"] == "private_key"
    assert files[key]["key"] == {"algorithm": "RSA", "key_size": 2048, "encrypted": False, "quantum_safe": False,
                                 "flags": ["not_quantum_safe"]}
    socks = p["tls_sockets"]
    assert {"local_addr": "127.0.0.1", "local_port": PORT, "remote_addr": "0.0.0.0", "remote_port": 0,
            "state": "LISTEN"} in socks
    assert {"local_addr": "127.0.0.1", "local_port": PORT, "remote_addr": "127.0.0.1",
            "remote_port": client.getsockname()[1], "state": "ESTABLISHED"} in socks
    assert p["container"] is None and p["static_tls"] is None
    s = doc["summary"]
    # a library is a path and a version (a chroot or container can hold another build at the same path)
    assert s["total_libraries"] == len(s["libraries"]) == len({(lib["path"], lib["version"] or "")
                                                                  for q in doc["processes"] for lib in q["libraries"]})
    assert s["files_by_type"]["certificate"] >= 1 and s["files_by_type"]["private_key"] >= 1


def test_expired_and_weak_certificates(workdir):
    expired, _ = write_cert(workdir, "expired.test", -3, key=ec.generate_private_key(ec.SECP256R1()))
    weak, _ = make_cert(workdir, "weak.test", 20, rsa_bits=1024, sha1=True, cert_name="weak.pem", key_name="weak.key")
    holder = subprocess.Popen(["sh", "-c", "exec 3<\"$1\" 4<\"$2\"; exec sleep 30", "sh", expired, weak])
    try:
        wait_exec(holder.pid, "sleep")  # its files are open
        doc = json.loads(snapshot().stdout)
        files = {f["path"]: f for f in by_pid(doc, holder.pid)["open_crypto_files"]}
        e = files[expired]["certificate"]
        assert e["days_left"] == -3 and e["flags"] == ["expired", "not_quantum_safe"]
        assert e["key_algorithm"] == "EC" and e["curve"] == "secp256r1"
        w = files[weak]
        assert w["type"] == "certificate"  # a .pem decided by its content
        assert w["certificate"]["subject"] == "CN=weak.test"
        assert w["certificate"]["days_left"] in (19, 20)
        assert w["certificate"]["flags"] == ["expiring_soon", "weak_rsa_key", "not_quantum_safe", "sha1_signature"]
        assert doc["summary"]["file_flags"]["expired"] >= 1
        text = snapshot("-f", "summary").stdout
        assert f"  {expired}: expired" in text
        assert f"  {weak}: expiring_soon, weak_rsa_key, sha1_signature" in text
    finally:
        holder.kill()
        holder.wait()


def test_mount_namespace_with_own_libcrypto(workdir):
    """A process in its own mount namespace maps a libcrypto that exists only there, whose
    version string was changed: the snapshot must read it through /proc/PID/root."""
    need_root()
    need_tool("unshare")
    mnt = os.path.join(workdir, "ns-root")
    os.makedirs(mnt, exist_ok=True)
    patched = os.path.join(workdir, "libcrypto-patched.so.3")
    data = open(LIBCRYPTO, "rb").read()
    real = openssl_version().encode()
    fake = b"3.9.99"[:len(real)].ljust(len(real), b"9")
    with open(patched, "wb") as f:
        f.write(data.replace(b"OpenSSL " + real + b" ", b"OpenSSL " + fake + b" "))
    cert, _ = write_cert(workdir, "ns.test", 90)
    script = (f"mount -t tmpfs none {mnt} && cp {patched} {mnt}/libcrypto.so.3 && cp {cert} {mnt}/inside.crt && "
              f"exec env LD_PRELOAD={mnt}/libcrypto.so.3 sleep 30 3<{mnt}/inside.crt")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        wait_exec(proc.pid, "sleep")
        wait_until(lambda: f"{mnt}/libcrypto.so.3" in open(f"/proc/{proc.pid}/maps").read(), 5,
                   "the preloaded libcrypto to be mapped")
        assert not os.path.exists(f"{mnt}/libcrypto.so.3")  # invisible from the host
        doc = json.loads(snapshot().stdout)
        p = by_pid(doc, proc.pid)
        assert p["libraries"] == [{"path": f"{mnt}/libcrypto.so.3", "name": "libcrypto", "version": fake.decode()}]
        files = {f["path"]: f for f in p["open_crypto_files"]}
        assert files[f"{mnt}/inside.crt"]["certificate"]["subject"] == "CN=ns.test"
        c = p["container"]
        assert c["mount_ns"] == os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert c["root"] == f"/proc/{proc.pid}/root" and c["cgroup"]
    finally:
        proc.kill()
        proc.wait()


def test_node_static_openssl():
    node_exe = static_node()
    port = free_port()
    node = subprocess.Popen([node_exe, "-e", f"require('net').createServer().listen({port}, '127.0.0.1', "
                             "() => console.log('ready')); setTimeout(() => {{}}, 30000)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().strip() == "ready"
        doc = json.loads(snapshot("-f", "json-stream", "--no-redact").stdout)  # the venv may lie under /root
        p = by_pid(doc, node.pid)
        assert p["static_tls"]["library"] == "openssl" and p["static_tls"]["version"] == STATIC_NODE_OPENSSL
        assert "SSL_write" in p["static_tls"]["symbols"]
        assert p["exe"] == os.path.realpath(node_exe)
        assert {"local_addr": "127.0.0.1", "local_port": port, "remote_addr": "0.0.0.0", "remote_port": 0,
                "state": "LISTEN"} in p["tls_sockets"]
        assert doc["summary"]["static_tls_processes"] >= 1
    finally:
        node.kill()
        node.wait()


def _nobody_python(tmp):
    """/root (where the checkout or the venv may live) is private: give nobody a copy of
    crypto_tracer, orjson and cryptography it can read, for the system python3."""
    import cryptography
    import orjson

    import crypto_tracer

    deps = os.path.join(tmp, "deps")
    os.makedirs(deps)
    for mod in (crypto_tracer, orjson, cryptography):
        src = os.path.dirname(mod.__file__)
        shutil.copytree(src, os.path.join(deps, os.path.basename(src)))
    for name in ("cffi", "_cffi_backend", "pycparser"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        src = mod.__file__
        if os.path.basename(src) == "__init__.py":
            shutil.copytree(os.path.dirname(src), os.path.join(deps, name))
        else:
            shutil.copy(src, deps)
    for root, dirs, files in os.walk(tmp):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755)
    return deps


def test_unprivileged_sees_only_its_own_processes(tls_server, workdir):
    need_root()
    need_tool("runuser")
    proc, cert, _, _ = tls_server
    tmp = tempfile.mkdtemp(prefix="ct-nobody-")
    os.chmod(tmp, 0o755)
    try:
        deps = _nobody_python(tmp)
        own_cert, _ = write_cert(tmp, "nobody.test", 50)
        os.chmod(own_cert, 0o644)
        mine = subprocess.Popen(["runuser", "-u", "nobody", "--", "sh", "-c", f"exec sleep 30 3<{own_cert}"])
        try:
            def sleeper():  # runuser execs sh, which execs sleep, or forks it
                if os.readlink(f"/proc/{mine.pid}/exe").endswith("sleep"):
                    return mine.pid
                out = subprocess.run(["pgrep", "-P", str(mine.pid), "-x", "sleep"], capture_output=True, text=True)
                return int(out.stdout.split()[0]) if out.stdout.split() else None

            pid = wait_until(sleeper, 10, "nobody's sleep")
            wait_exec(pid, "sleep")
            import pwd

            outdir = os.path.join(tmp, "out")
            os.mkdir(outdir)
            os.chown(outdir, pwd.getpwnam("nobody").pw_uid, -1)
            out = os.path.join(outdir, "snap.json")
            env = dict(os.environ, PYTHONPATH=deps, HOME=tmp)
            res = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-m", "crypto_tracer",
                                  "snapshot", "-o", out], capture_output=True, text=True, timeout=30, env=env,
                                 cwd=tmp)
            assert res.returncode == 0, res.stderr
            assert re.search(r"\d+ processes of other users could not be read", res.stderr)
            assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
            doc = json.load(open(out))
            assert doc["scan"]["privileged"] is False
            assert doc["scan"]["processes_unreadable"] > 0
            pids = {p["pid"] for p in doc["processes"]}
            assert proc.pid not in pids  # root's TLS server is not readable
            p = by_pid(doc, pid)
            assert p["running_as"] == "nobody"
            assert p["open_crypto_files"][0]["path"] == own_cert
            assert p["open_crypto_files"][0]["certificate"]["days_left"] == 50
        finally:
            mine.kill()
            mine.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_formats_and_speed(tls_server):
    proc = tls_server[0]
    t0 = time.monotonic()
    arr = json.loads(snapshot("-f", "json-array", "-q").stdout)
    assert time.monotonic() - t0 < 5
    assert isinstance(arr, list) and len(arr) == 1 and arr[0]["processes"]
    lines = snapshot("-f", "json-stream").stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["summary"]["total_processes"] >= 1
    text = snapshot("-f", "summary").stdout
    assert text.startswith("Crypto Snapshot Summary\nGenerated: ")
    assert re.search(rf"^  PID {proc.pid}: \S+ \(2 libraries, 2 files\)$", text, re.M)
    assert f"  {LIBSSL} {openssl_version()} (" in text
    assert arr[0]["scan"]["duration_ms"] < 2000


def test_redaction(workdir):
    need_root()
    home = tempfile.mkdtemp(prefix="ct-redact-", dir="/root")
    try:
        cert, _ = write_cert(home, "home.test", 100)
        holder = subprocess.Popen(["sh", "-c", f"exec sleep 30 3<{cert}"])
        try:
            wait_exec(holder.pid, "sleep")
            doc = json.loads(snapshot().stdout)
            paths = [f["path"] for f in by_pid(doc, holder.pid)["open_crypto_files"]]
            assert paths == ["/home/ROOT" + cert[len("/root"):]]
            doc = json.loads(snapshot("--no-redact").stdout)
            assert [f["path"] for f in by_pid(doc, holder.pid)["open_crypto_files"]] == [cert]
        finally:
            holder.kill()
            holder.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)
