"""crypto-tracer profile against real workloads with known numbers of TLS handshakes, digests and
cipher operations; --name before the process starts; children with and without
--follow-children; SIGINT mid-profile; an idle process; node's static OpenSSL."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from tests.harness import Tracer, free_port, make_cert, need_root, need_tool, run_tracer, static_node

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
PORT = free_port()

# A workload with known counts: n_tls handshakes against its own server thread (each counted
# on both sides), n_dig SHA-512/224 digests, n_ciph AES-192-CBC encrypt inits. It waits for a line
# on stdin before working, so the profiler is attached first.
WORKLOAD = r"""
import ctypes as C, hashlib, os, socket, ssl, sys, threading, time
cert, key, port, n_tls, n_dig, n_ciph = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
print("ready", flush=True)
sys.stdin.readline()
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
sctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
def serve():
    for _ in range(n_tls):
        c, _ = srv.accept()
        with sctx.wrap_socket(c, server_side=True) as s:
            s.sendall(s.recv(100) * 2)
threading.Thread(target=serve, daemon=True).start()
cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
cctx.check_hostname = False
cctx.verify_mode = ssl.CERT_NONE
for _ in range(n_tls):
    with cctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        s.sendall(b"hello")
        s.recv(100)
        time.sleep(0.3)  # open for longer than SOCKET_SAMPLE_SECONDS, so the profiler's /proc sampling sees it
for _ in range(n_dig):
    hashlib.new("sha512_224", b"d").digest()  # hashlib's import does not use it: exact counts
lib = C.CDLL("libcrypto.so.3")
lib.EVP_CIPHER_CTX_new.restype = C.c_void_p
lib.EVP_aes_192_cbc.restype = C.c_void_p
ctx = lib.EVP_CIPHER_CTX_new()
for _ in range(n_ciph):
    lib.EVP_EncryptInit_ex(C.c_void_p(ctx), C.c_void_p(lib.EVP_aes_192_cbc()), None, b"k" * 24, b"i" * 16)
print("done", flush=True)
"""

# Digests in a child process (exec) and in a forked child; the parent does none. The children work once
# the file argv[1] exists: the test creates it when the profiler has hooked them.
PARENT = r"""
import hashlib, os, subprocess, sys, time
go = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
wait_go = f"import os, time\nwhile not os.path.exists({go!r}): time.sleep(0.01)\n"
child = subprocess.Popen([sys.executable, "-c",
    "import hashlib\n" + wait_go + "for _ in range(400): hashlib.new('sha512_224', b'c').digest()"])
pid = os.fork()
if pid == 0:
    exec(wait_go)
    for _ in range(300):
        hashlib.sha256(b"f").digest()
    os._exit(0)
print(child.pid, pid, flush=True)
child.wait()
os.waitpid(pid, 0)
"""


def calls(section, function, algorithm=None):
    return sum(c["count"] for c in section["api_calls"]
               if c["function_name"] == function and (algorithm is None or c["algorithm"] == algorithm))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("profile"), "profile.test", days=30, rsa_bits=2048,
                     cert_name="server.crt", key_name="server.key")


# The workloads' key exchange is X25519 on every OpenSSL (3.5 would pick X25519MLKEM768, whose other
# derive calls change the counts). Set through OpenSSL's config: Python 3.11.2's set_ecdh_curve
# refuses X25519.
X25519_ONLY = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Groups = X25519
"""


def start_workload(script, *args, exe=None):
    conf = os.path.join(tempfile.gettempdir(), "ct-profile-x25519.cnf")
    with open(conf, "w") as f:
        f.write(X25519_ONLY)
    proc = subprocess.Popen([exe or sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, OPENSSL_CONF=conf))
    assert proc.stdout.readline().strip() == "ready"
    return proc


def run_to_done(work):
    """Release a workload waiting for 'go' on stdin and wait until it says 'done'."""
    work.stdin.write("go\n")
    work.stdin.flush()
    assert work.stdout.readline().strip() == "done"


def wait_hooked(tracer, pid, timeout=15):
    """Wait until the profiler (run with -v) has attached its API probes to pid's libcrypto."""
    assert tracer.wait_stderr(re.compile(rf"api probes: \d+ on \S*libcrypto\S* for pid {pid}$"), timeout), \
        f"libcrypto of pid {pid} not hooked:\n{tracer.stderr}"


def finish(tracer, timeout=40):
    out, err, rc = tracer.wait(timeout)
    assert rc == 0, err
    return json.loads(out)


def test_known_counts(certs):
    need_root()
    cert, key = certs
    n_tls, n_dig, n_ciph = 3, 500, 40
    work = start_workload(WORKLOAD, cert, key, PORT, n_tls, n_dig, n_ciph)
    tracer = Tracer(["profile", "-p", str(work.pid), "-d", "30"])
    try:
        run_to_done(work)
        doc = finish(tracer)
    finally:
        work.kill()
        work.wait()
    assert doc["profile_version"] and doc["target"] == {"pid": work.pid, "name": None, "follow_children": False}
    assert doc["partial"] is True  # the workload exited before the 30 s were over
    assert doc["duration_seconds"] < 25
    [s] = doc["processes"]
    p = s["process"]
    assert p["pid"] == work.pid and p["ppid"] == os.getpid() and p["uid"] == os.getuid() and p["gid"] == os.getgid()
    assert p["exe"] == os.path.realpath(sys.executable).replace("/root/", "/home/ROOT/", 1)
    assert p["cmdline"].endswith(f"{cert} {key} {PORT} {n_tls} {n_dig} {n_ciph}")
    assert p["start_time"].startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    assert s["exit"] == {"time": s["exit"]["time"], "exit_code": -9, "signal": None} or s["exit"]["exit_code"] == 0
    # API counts, exact
    assert calls(s, "SSL_do_handshake") == 2 * n_tls  # client and server side
    assert calls(s, "SSL_new") == 2 * n_tls
    assert calls(s, "SSL_CTX_use_certificate_chain_file") == 1
    assert calls(s, "SSL_CTX_use_PrivateKey_file") == 1
    assert calls(s, "EVP_DigestInit_ex", "SHA512-224") == n_dig
    assert calls(s, "EVP_EncryptInit_ex", "AES-192-CBC") == n_ciph
    assert calls(s, "EVP_CipherInit_ex", "AES-192-CBC") == 0  # the nested call is counted once
    # one (EC)DHE per side, each two calls: libssl asks for the secret's length first (key=NULL)
    assert calls(s, "EVP_PKEY_derive", "X25519") == 4 * n_tls  # the key type read from the EVP_PKEY_CTX
    signs = calls(s, "EVP_DigestSignInit_ex", "SHA256")  # CertificateVerify and HMAC-based Finished
    assert signs and signs % n_tls == 0
    tls = s["tls"]
    assert tls["handshakes"] == 2 * n_tls
    assert tls["bytes_written"] == tls["bytes_read"] == n_tls * (5 + 10)
    assert tls["write_calls"] == tls["read_calls"] == 2 * n_tls
    # Python calls SSL_write_ex; OpenSSL 3.3+'s SSL_write_ex -> SSL_write_ex2 is one call, counted once
    assert calls(s, "SSL_write_ex") == 2 * n_tls and calls(s, "SSL_write_ex2") == 0
    assert any(peer["remote_addr"] == "127.0.0.1" and peer["remote_port"] == PORT for peer in tls["peers"])
    # connections counted in the kernel: made as a client and accepted by the server thread
    assert tls["connections"] == [{"role": "client", "remote_addr": "127.0.0.1", "remote_port": PORT, "count": n_tls},
                                  {"role": "server", "remote_addr": "127.0.0.1", "local_port": PORT, "count": n_tls}]
    # files and libraries
    files = {f["path"]: f for f in s["files_accessed"]}
    assert files[cert]["type"] == "certificate" and files[cert]["access_count"] == 1
    assert files[key]["type"] == "private_key" and files[key]["access_count"] == 1
    assert files[cert]["flags"] == ["O_RDONLY"]
    assert files[cert]["certificate"]["subject"] == "CN=profile.test"
    assert files[cert]["certificate"]["days_left"] in (29, 30)
    assert files[key]["key"]["algorithm"] == "RSA" and files[key]["key"]["key_size"] == 2048
    libs = {lib["path"]: lib for lib in s["libraries"]}
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()[1]
    assert libs[LIBSSL]["version"] == version and libs[LIBSSL]["mapped_before_profile"] is True
    assert libs[LIBCRYPTO]["name"] == "libcrypto"
    st = s["statistics"]
    assert st["api_calls_made"] == sum(c["count"] for c in s["api_calls"])
    assert st["files_accessed"] == 2 and st["file_opens"] == 2
    assert doc["statistics"]["events_dropped"] == 0 and doc["statistics"]["api_counts_dropped"] == 0


def test_name_started_before_the_process(certs, tmp_path):
    need_root()
    exe = tmp_path / "ctprofname"
    os.symlink(os.path.realpath(sys.executable), exe)  # comm = ctprofname
    tracer = Tracer(["profile", "-n", "ctprofname", "-d", "6", "-v"])
    work = None
    try:
        work = start_workload(WORKLOAD, *certs, free_port(), 1, 250, 0, exe=str(exe))
        wait_hooked(tracer, work.pid)  # the profiler hooks libcrypto when its load is seen
        run_to_done(work)
        work.wait(timeout=10)
        doc = finish(tracer)
    finally:
        if work:
            work.kill()
            work.wait()
    sections = [s for s in doc["processes"] if s["process"]["pid"] == work.pid]
    assert len(sections) == 1, doc["processes"]
    s = sections[0]
    assert s["process"]["name"] == "ctprofname" and s["started_before_profile"] is False
    assert calls(s, "EVP_DigestInit_ex", "SHA512-224") == 250
    assert s["tls"]["handshakes"] == 2
    assert s["exit"]["exit_code"] == 0 and s["partial"] is True
    assert {lib["name"] for lib in s["libraries"]} >= {"libssl", "libcrypto"}
    assert all(lib["mapped_before_profile"] is False for lib in s["libraries"])


@pytest.mark.parametrize("follow", [True, False])
def test_children(follow, tmp_path):
    need_root()
    go = tmp_path / "go"
    parent = start_workload(PARENT, go)
    args = ["profile", "-p", str(parent.pid), "-d", "20", "-v"] + (["--follow-children"] if follow else [])
    tracer = Tracer(args)
    try:
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child_pid, fork_pid = map(int, parent.stdout.readline().split())
        if follow:
            wait_hooked(tracer, child_pid)
            wait_hooked(tracer, fork_pid)
        go.touch()
        doc = finish(tracer)
    finally:
        parent.kill()
        parent.wait()
    by_pid = {s["process"]["pid"]: s for s in doc["processes"]}
    assert doc["target"]["follow_children"] is follow
    assert calls(by_pid[parent.pid], "EVP_DigestInit_ex", "SHA512-224") == 0
    if not follow:
        assert set(by_pid) == {parent.pid}
        return
    assert set(by_pid) == {parent.pid, child_pid, fork_pid}
    child, forked = by_pid[child_pid], by_pid[fork_pid]
    assert child["process"]["ppid"] == parent.pid and forked["process"]["ppid"] == parent.pid
    assert calls(child, "EVP_DigestInit_ex", "SHA512-224") == 400  # not used by hashlib's import
    assert calls(forked, "EVP_DigestInit_ex", "SHA256") == 300
    assert child["exit"]["exit_code"] == 0 and forked["exit"]["exit_code"] == 0


def test_sigint_mid_profile():
    need_root()
    idle = subprocess.Popen(["sleep", "60"])
    tracer = Tracer(["profile", "-p", str(idle.pid), "-d", "30", "-f", "json-array"])
    try:
        out, err, rc = tracer.stop(timeout=15)  # ready: in the middle of its 30 s
    finally:
        idle.kill()
        idle.wait()
    assert rc == 0, err
    [doc] = json.loads(out)
    assert doc["interrupted"] is True and doc["duration_seconds"] < 10
    [s] = doc["processes"]
    assert s["process"]["name"] == "sleep" and s["partial"] is True and s["exit"] is None


def test_idle_process_gives_empty_lists():
    need_root()
    idle = subprocess.Popen(["sleep", "60"])
    try:
        res = run_tracer(["profile", "-p", str(idle.pid), "-d", "2"], timeout=30)
    finally:
        idle.kill()
        idle.wait()
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    [s] = doc["processes"]
    assert s["libraries"] == [] and s["files_accessed"] == [] and s["api_calls"] == []
    assert s["partial"] is False and doc["partial"] is False and doc["interrupted"] is False
    assert s["statistics"]["total_events"] == 0
    assert 1.5 < doc["duration_seconds"] < 5


def test_node_static_openssl():
    need_root()
    n = 200
    script = ("const c = require('crypto'); process.stdin.once('data', () => { "
              f"for (let i = 0; i < {n}; i++) c.createHash('sha384').update('x').digest(); "
              "console.log('done'); setTimeout(() => process.exit(0), 200); }); console.log('ready');")
    node = subprocess.Popen([static_node(), "-e", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert node.stdout.readline().strip() == "ready"
    tracer = Tracer(["profile", "-p", str(node.pid), "-d", "20"])
    try:
        run_to_done(node)
        doc = finish(tracer)
    finally:
        node.kill()
        node.wait()
    [s] = doc["processes"]
    assert calls(s, "EVP_DigestInit_ex", "SHA384") == n
    assert all(c["library"] == "libcrypto" for c in s["api_calls"] if c["category"] == "digest")


def test_process_in_own_mount_namespace(tmp_path):
    """The libcrypto this process uses exists only in its mount namespace: the probes are
    attached through /proc/PID/root and count its digests."""
    need_root()
    need_tool("unshare")
    mnt = tmp_path / "ns"
    mnt.mkdir()
    digests = "import hashlib, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n" \
              "for _ in range(123): hashlib.new('sha512_224', b'n').digest()\nprint('done', flush=True)"
    script = (f"mount -t tmpfs none {mnt} && cp {LIBCRYPTO} {mnt}/libcrypto.so.3 && "
              f"exec env LD_PRELOAD={mnt}/libcrypto.so.3 {sys.executable} -c \"$0\"")
    work = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, digests],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert work.stdout.readline().strip() == "ready"
    tracer = Tracer(["profile", "-p", str(work.pid), "-d", "20"])
    try:
        run_to_done(work)
        work.wait(timeout=10)
        doc = finish(tracer)
    finally:
        work.kill()
        work.wait()
    [s] = doc["processes"]
    assert f"{mnt}/libcrypto.so.3" in {lib["path"] for lib in s["libraries"]}
    assert not os.path.exists(f"{mnt}/libcrypto.so.3")  # not visible from here
    assert calls(s, "EVP_DigestInit_ex", "SHA512-224") == 123


def test_unprivileged_profile_exits_3():
    """Root without capabilities (securebits noroot): preflight refuses with exit status 3."""
    need_root()
    need_tool("setpriv")
    from tests.harness import REPO

    res = subprocess.run(["setpriv", "--securebits", "+noroot", "--inh-caps", "-all", "--bounding-set", "-all",
                          sys.executable, "-m", "crypto_tracer", "profile", "-p", str(os.getpid()), "-d", "1"],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    assert res.returncode == 3, res.stderr
    assert "Insufficient privileges" in res.stderr and res.stdout == ""


def test_summary_format(certs):
    need_root()
    work = start_workload(WORKLOAD, *certs, free_port(), 1, 20, 0)
    tracer = Tracer(["profile", "-p", str(work.pid), "-d", "20", "-f", "summary"])
    try:
        run_to_done(work)
        out, err, rc = tracer.wait(timeout=40)
    finally:
        work.kill()
        work.wait()
    assert rc == 0, err
    assert out.startswith("Crypto Profile Summary\n")
    assert f"PID {work.pid}: " in out and "TLS: 2 handshakes, 15 bytes read, 15 bytes written" in out
    assert "20  EVP_DigestInit_ex [SHA512-224]" in out


def test_missing_pid_and_name_errors():
    need_root()
    res = run_tracer(["profile", "-p", "4000000", "-d", "1"])
    assert res.returncode == 1 and "not found" in res.stderr
    res = run_tracer(["profile", "-n", "no-such-proc-xyz", "-d", "1"])
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["processes"] == [] and doc["target"]["name"] == "no-such-proc-xyz"
