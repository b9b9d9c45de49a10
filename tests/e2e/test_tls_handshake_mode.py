"""tls -m handshake: one tls_handshake event per handshake from packets alone (no library hooks),
with the owning process (connect()/accept() tracepoints), the ClientHello's offer, JA4 and flags.
Clients: curl (OpenSSL), gnutls-cli, Python's ssl, Java (JSSE, which the tool never hooks) against
nginx. JA4 ground truth: ja4plus (the test extra) on the ClientHello bytes this test captures
itself from lo with an AF_PACKET socket."""

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import free_port, need_root, need_tool, wait_until

pytestmark = pytest.mark.ebpf
ETH_P_ALL = 3


@pytest.fixture(scope="module")
def ec_cert(certs):
    need_root()
    need_tool("openssl", "curl", "nginx")
    return certs


class HelloSniffer:
    """The first ClientHello sent to `port` on lo, as the bytes of its TCP payload."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)

    def client_hello(self) -> bytes:
        while True:
            try:
                frame = self.sock.recv(1 << 17)
            except BlockingIOError:
                raise AssertionError("no ClientHello captured") from None
            if frame[12:14] == b"\x08\x00" and frame[23] == 6:  # IPv4, TCP
                ip = 14 + (frame[14] & 0xF) * 4
                tcp = ip + (frame[ip + 12] >> 4) * 4
                payload = frame[tcp:14 + int.from_bytes(frame[16:18], "big")]
                if int.from_bytes(frame[ip + 2:ip + 4], "big") == self.port and payload[:1] == b"\x16" \
                        and payload[5:6] == b"\x01":
                    return payload

    def close(self):
        self.sock.close()


def ja4_reference(payload: bytes) -> str:
    from ja4plus.fingerprinters.ja4 import generate_ja4
    from ja4plus.utils.tls_utils import parse_tls_handshake

    return generate_ja4(parse_tls_handshake(payload))


def run(tmp_path, *extra):
    out = str(tmp_path / "hs.out")
    return tp.Tracer(["tls", "-m", "handshake", "--no-redact", "-o", out, *extra]), out


def subject_of(cert_path):
    from cryptography import x509

    with open(cert_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).subject.rfc4514_string()


def curl_exe():
    return os.path.realpath(shutil.which("curl"))


@pytest.mark.parametrize("tls13", [True, False], ids=["tls13", "tls12"])
def test_curl_nginx(ec_cert, tmp_path, tls13):
    cert, key = ec_cert
    port = free_port()
    if tls13:
        extra = ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384", "--curves", "X25519"]
        want = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "cipher_code": 0x1302,
                "group": "x25519", "alpn": None, "peer_cert_subject": None, "peer_key_type": None,
                "legacy_version": False, "no_forward_secrecy": False, "weak_cipher": False,
                "not_quantum_safe_key_exchange": True}
    else:
        extra = ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-SHA", "--curves", "P-256"]
        want = {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "cipher_code": 0xC009,
                "group": "secp256r1", "alpn": "h2", "peer_cert_subject": subject_of(cert), "peer_key_type": "EC",
                "legacy_version": False, "no_forward_secrecy": False, "weak_cipher": True,
                "not_quantum_safe_key_exchange": True}
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run(tmp_path, "--name", tp.PEER_PREFIX)
        sniff = HelloSniffer(port)
        try:
            # SNI "localhost" over 127.0.0.1 (Debian 13 resolves localhost to ::1 first)
            pid = tp.curl(f"https://localhost:{port}/small", extra=extra + ["--resolve", f"localhost:{port}:127.0.0.1"])
            hello = sniff.client_hello()
        finally:
            sniff.close()
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    events = tp.read_events(out)
    assert len(events) == 1, events  # one per handshake (not one per side)
    ev = events[0]
    assert {k: ev[k] for k in want} == want
    assert (ev["event_type"], ev["pid"], ev["process"], ev["role"]) == ("tls_handshake", pid, "ctpeer-curl", "client")
    # recorded in the kernel at connect(): there for a curl long gone
    assert (ev["uid"], ev["ppid"], ev["exe"]) == (0, os.getpid(), curl_exe())
    assert (ev["local_addr"], ev["remote_addr"], ev["remote_port"]) == ("127.0.0.1", "127.0.0.1", port)
    assert ev["sni"] == "localhost" and ev["alpn_offered"] == ["h2", "http/1.1"]
    assert ev["resumed"] is False
    assert ev["offered_versions"] == (["TLSv1.3"] if tls13 else ["TLSv1.2"])
    assert want["cipher_code"] in ev["offered_ciphers"] and want["group"] in ev["offered_groups"]
    assert ev["ja4"] == ja4_reference(hello)
    assert ev["ja4"].startswith("t13d" if tls13 else "t12d")


PY_THEN_CURL = ("import os, socket, ssl, sys; c = ssl.create_default_context(); c.check_hostname = False; "
                "c.verify_mode = ssl.CERT_NONE; s = c.wrap_socket(socket.create_connection(('127.0.0.1', "
                "int(sys.argv[1]))), server_hostname='py.test'); s.close(); os.execv(sys.argv[2], sys.argv[2:])")


def test_short_lived_clients_keep_their_process(ec_cert, tmp_path):
    """pid, comm, uid, ppid, exe and mount namespace are recorded in the kernel at connect(): right for
    clients gone long before the tool reads their handshakes (it is stopped meanwhile), for another uid,
    for each image of a process that execs (same pid, two exes: never the stale one), and for a client
    in a mount namespace of its own (a container's view)."""
    cert, key = ec_cert
    port = free_port()
    url = f"https://localhost:{port}/small"
    resolve = ["--resolve", f"localhost:{port}:127.0.0.1"]
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run(tmp_path, "--name", tp.PEER_PREFIX)
        tracer.proc.send_signal(signal.SIGSTOP)  # nothing is read until every client has exited
        try:
            pids = [tp.curl(url, extra=resolve) for _ in range(10)]
            nobody = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", tp.peer("curl"),
                                       "-sSk", "-o", os.devnull, *resolve, url])
            assert nobody.wait(30) == 0
            curl = tp.peer("curl")
            both = subprocess.Popen([tp.peer("python"), "-c", PY_THEN_CURL, str(port), curl, "-sSk", "-o", os.devnull,
                                     *resolve, url])
            assert both.wait(30) == 0
            # a client in a mount namespace of its own (as in a container): it prints its inode, then execs curl
            own_ns = subprocess.run(["unshare", "--mount", "sh", "-c", 'stat -Lc %i /proc/self/ns/mnt; exec "$@"', "sh",
                                     curl, "-sSk", "-o", os.devnull, *resolve, url], capture_output=True, text=True,
                                    timeout=30)
            assert own_ns.returncode == 0, own_ns.stderr
        finally:
            tracer.proc.send_signal(signal.SIGCONT)
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    events = [e for e in tp.read_events(out) if e["role"] == "client"]
    got = sorted((e["process"], e["uid"], e["ppid"], e["exe"], e["sni"], e["mnt_ns"]) for e in events
                 if e["pid"] != own_ns_pid(events, pids, nobody, both))
    ns = os.stat("/proc/self/ns/mnt").st_ino
    want = [("ctpeer-curl", 0, os.getpid(), curl_exe(), "localhost", ns) for _ in pids]
    want += [("ctpeer-curl", 65534, os.getpid(), curl_exe(), "localhost", ns),
             ("ctpeer-python", 0, os.getpid(), os.path.realpath(sys.executable), "py.test", ns),
             ("ctpeer-curl", 0, os.getpid(), curl_exe(), "localhost", ns)]
    assert got == sorted(want)
    assert sorted(e["pid"] for e in events if e["pid"] in pids) == sorted(pids)
    other = [e for e in events if e["pid"] == own_ns_pid(events, pids, nobody, both)]
    assert [(e["process"], e["exe"], e["mnt_ns"]) for e in other] == [("ctpeer-curl", curl_exe(),
                                                                        int(own_ns.stdout.split()[0]))]
    assert int(own_ns.stdout.split()[0]) != ns


def spawn_with_pid(pid: int, args) -> subprocess.Popen | None:
    """args started as process `pid` (freed meanwhile), by setting the kernel's last-allocated pid just
    before the fork; None if another process of this busy host took that pid first, every try."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.wait(30)
    return None


def test_a_reused_pid_gets_its_own_process(ec_cert, tmp_path):
    """A Python client exits; curl is then started with the same pid, and both are read only after both
    exited. The kernel's owner record is keyed by the process image (pid, start time, exec): each
    handshake names its own process and exe, never the other's."""
    cert, key = ec_cert
    port = free_port()
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run(tmp_path, "--name", tp.PEER_PREFIX)
        tracer.proc.send_signal(signal.SIGSTOP)
        try:
            first = subprocess.Popen([tp.peer("python"), "-c", PYTHON_CLIENT, str(port)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
            assert first.wait(30) == 0
            second = spawn_with_pid(first.pid, [tp.peer("curl"), "-sSk", "-o", os.devnull, "--resolve",
                                                f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/small"])
            assert second is not None, "pid %d was taken by other processes 50 times" % first.pid
            assert second.wait(30) == 0
        finally:
            tracer.proc.send_signal(signal.SIGCONT)
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    mine = sorted((e["process"], e["exe"], e["sni"]) for e in tp.read_events(out)
                  if e["role"] == "client" and e["pid"] == first.pid)
    assert mine == [("ctpeer-curl", curl_exe(), "localhost"),
                    ("ctpeer-python", os.path.realpath(sys.executable), "py.test")]


def own_ns_pid(events, pids, nobody, both):
    """The one client pid that is none of the others: the curl run in a mount namespace of its own."""
    rest = {e["pid"] for e in events} - set(pids) - {nobody.pid, both.pid}
    assert len(rest) == 1, rest
    return rest.pop()


JAVA_CLIENT = r"""
import javax.net.ssl.*; import java.security.cert.X509Certificate;
public class HsClient {
  public static void main(String[] a) throws Exception {
    TrustManager[] all = { new X509TrustManager() {
      public void checkClientTrusted(X509Certificate[] c, String t) {}
      public void checkServerTrusted(X509Certificate[] c, String t) {}
      public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; } } };
    SSLContext ctx = SSLContext.getInstance("TLSv1.3"); ctx.init(null, all, null);
    try (SSLSocket s = (SSLSocket) ctx.getSocketFactory().createSocket("127.0.0.1", Integer.parseInt(a[0]))) {
      s.startHandshake();
      System.out.println(s.getSession().getCipherSuite());
    }
  }
}
"""


PYTHON_CLIENT = ("import socket, ssl, sys; c = ssl.create_default_context(); c.check_hostname = False; "
                 "c.verify_mode = ssl.CERT_NONE; s = c.wrap_socket(socket.create_connection(('127.0.0.1', "
                 "int(sys.argv[1]))), server_hostname='py.test'); print(s.cipher()[0], flush=True); sys.stdin.read(); "
                 "s.close()")


def events_of(out, pid):
    try:
        return [e for e in tp.read_events(out) if e["pid"] == pid]
    except (OSError, ValueError):
        return []


def test_any_implementation_and_summary(ec_cert, tmp_path):
    """gnutls-cli, Python ssl and Java each get their own event with their own pid; -f summary: one
    row per (process, remote, sni, version, cipher, group)."""
    need_tool("gnutls-cli", "javac", "java")
    cert, key = ec_cert
    port = free_port()
    java_dir = tmp_path / "java"
    java_dir.mkdir()
    (java_dir / "HsClient.java").write_text(JAVA_CLIENT)
    subprocess.run(["javac", "HsClient.java"], cwd=java_dir, check=True, timeout=120)
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run(tmp_path, "port", str(port))
        g = subprocess.Popen([tp.peer("gnutls-cli"), "--insecure", "-p", str(port), "--sni-hostname", "gnutls.test",
                              "127.0.0.1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        assert g.wait(30) == 0
        # the Python client stays until its event is out: its uid and exe are read from /proc then
        py = subprocess.Popen([tp.peer("python"), "-c", PYTHON_CLIENT, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        py_cipher = py.stdout.readline().strip()
        wait_until(lambda: events_of(out, py.pid), 10, "the Python client's event")
        py.stdin.close()
        assert py.wait(30) == 0
        j = subprocess.Popen(["java", "-cp", str(java_dir), "HsClient", str(port)], stdout=subprocess.PIPE, text=True)
        java_out, _ = j.communicate(timeout=60)
        assert j.returncode == 0
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    events = [e for e in tp.read_events(out) if e["role"] == "client"]
    by_process = {e["process"]: e for e in events}
    assert len(events) == 3, events
    gn = by_process["ctpeer-gnutls-c"]
    assert (gn["pid"], gn["sni"], gn["tls_version"]) == (g.pid, "gnutls.test", "TLSv1.3")
    pyev = by_process["ctpeer-python"]
    assert (pyev["pid"], pyev["sni"], pyev["cipher"], pyev["uid"], pyev["exe"], pyev["role"]) == \
        (py.pid, "py.test", py_cipher, 0, os.path.realpath(sys.executable), "client")
    jev = [e for e in events if e["pid"] == j.pid]
    assert len(jev) == 1, events
    assert (jev[0]["tls_version"], jev[0]["cipher"]) == ("TLSv1.3", java_out.strip())
    # exe, uid, ppid: recorded at connect(), there though java has exited
    assert (jev[0]["exe"], jev[0]["uid"], jev[0]["ppid"]) == (os.path.realpath(shutil.which("java")), 0, os.getpid())
    for e in events:
        assert e["ja4"].startswith("t13") and e["remote_port"] == port


def test_summary(ec_cert, tmp_path):
    cert, key = ec_cert
    port = free_port()
    extra = ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256", "--curves", "X25519"]
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run(tmp_path, "-f", "summary", "--name", "ctpeer-curl")
        pids = [tp.curl(f"https://localhost:{port}/small", extra=extra + ["--resolve", f"localhost:{port}:127.0.0.1"])
                for _ in range(2)]
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    with open(out) as f:
        lines = f.read().splitlines()
    assert lines[0] == "TLS handshakes: 2"
    assert lines[1].split() == ["process", "remote", "sni", "version", "cipher", "group", "count"]
    rows = sorted(line.split() for line in lines[2:])
    assert rows == sorted([f"ctpeer-curl[{pid}]", f"127.0.0.1:{port}", "localhost", "TLSv1.3",
                           "TLS_AES_128_GCM_SHA256", "x25519", "1"] for pid in pids)


GO_CLIENT = f"{tp.PEER_PREFIX}-gocli"


def go_client() -> tuple[str, str]:
    """tests/go/tlsclient built by the newest Go reachable (tests/gobuild.py), as (a link named
    ctpeer-gocli, its GoPrograms)."""
    from tests import gobuild

    try:
        progs = gobuild.build(gobuild.toolchain(gobuild.matrix()["newest"]), "normal")
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))
    os.makedirs(tp.PEER_DIR, exist_ok=True)
    link = os.path.join(tp.PEER_DIR, GO_CLIENT)
    tmp = f"{link}.{os.getpid()}"
    os.symlink(progs.client, tmp)
    os.replace(tmp, link)
    return link, progs


def pinned_nginx(tmp_path, port, cert, key, tls_lines):
    """nginx (http2 on) allowing only what tls_lines say: protocol, suite, group."""
    from tests.harness import nginx_conf

    conf = nginx_conf(tmp_path, port, cert, key, http2=True, master=True)
    with open(conf) as f:
        text = f.read()
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    with open(conf, "w") as f:
        f.write(text.replace("ssl_protocols TLSv1.2 TLSv1.3;", tls_lines))
    return tp.process([tp.peer("nginx"), "-c", conf, "-p", str(tmp_path)], port=port)


@pytest.mark.parametrize("tls13", [True, False], ids=["tls13", "tls12"])
def test_go_client_nginx(ec_cert, tmp_path, tls13):
    """Go's crypto/tls (never hooked in this mode) against nginx configured for TLS 1.3 only, or TLS
    1.2 only, each with one suite and one group: every negotiated and offered field, JA4 against
    ja4plus, and the client's process."""
    cert, key = ec_cert
    link, progs = go_client()
    port = free_port()
    if tls13:
        lines = "ssl_protocols TLSv1.3; ssl_conf_command Ciphersuites TLS_CHACHA20_POLY1305_SHA256; ssl_ecdh_curve X25519;"
        want = {"tls_version": "TLSv1.3", "cipher": "TLS_CHACHA20_POLY1305_SHA256", "cipher_code": 0x1303,
                "group": "x25519", "alpn": None, "peer_cert_subject": None, "peer_key_type": None,
                "weak_cipher": False}  # TLS 1.3: ALPN and certificate are in the encrypted flight
    else:
        lines = "ssl_protocols TLSv1.2; ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384; ssl_ecdh_curve secp384r1;"
        want = {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "cipher_code": 0xC02C,
                "group": "secp384r1", "alpn": "http/1.1", "peer_cert_subject": subject_of(cert),
                "peer_key_type": "EC", "weak_cipher": False}
    want.update({"sni": "localhost", "alpn_offered": ["http/1.1"], "resumed": False,
                 "offered_versions": ["TLSv1.3", "TLSv1.2"], "legacy_version": False, "no_forward_secrecy": False,
                 "not_quantum_safe_key_exchange": True, "role": "client", "process": GO_CLIENT, "uid": 0,
                 "ppid": os.getpid(), "exe": os.path.realpath(progs.client), "local_addr": "127.0.0.1",
                 "remote_addr": "127.0.0.1", "remote_port": port})
    with pinned_nginx(tmp_path, port, cert, key, lines):
        tracer, out = run(tmp_path, "--name", tp.PEER_PREFIX)
        sniff = HelloSniffer(port)
        try:
            # "localhost": Go sends it as SNI (never an IP address); nginx listens on 127.0.0.1 only
            go = subprocess.Popen([link, "-url", f"https://localhost:{port}/small"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=dict(os.environ, GOMAXPROCS="2"))
            stdout, stderr = go.communicate(timeout=60)
            assert go.returncode == 0 and stdout.endswith("done\n"), stderr
            hello = sniff.client_hello()
        finally:
            sniff.close()
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    events = [e for e in tp.read_events(out) if e["remote_port"] == port]
    assert len(events) == 1, events
    ev = events[0]
    assert ev["pid"] == go.pid
    assert {k: ev[k] for k in want} == want
    assert want["cipher_code"] in ev["offered_ciphers"]
    # Go's default curves (tests/go's go.mod says go 1.19: GODEBUG tlsmlkem=0, no X25519MLKEM768 offer)
    assert ev["offered_groups"] == ["x25519", "secp256r1", "secp384r1", "secp521r1"]
    assert ev["ja4"] == ja4_reference(hello)
    assert ev["ja4"].startswith("t13d")  # JA4 takes the highest version offered: Go offers 1.3 either way


JAVA_VERSION_CLIENT = r"""
import javax.net.ssl.*; import java.security.cert.X509Certificate; import java.util.List;
public class HsVersionClient {
  public static void main(String[] a) throws Exception {
    TrustManager[] all = { new X509TrustManager() {
      public void checkClientTrusted(X509Certificate[] c, String t) {}
      public void checkServerTrusted(X509Certificate[] c, String t) {}
      public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; } } };
    SSLContext ctx = SSLContext.getInstance("TLS"); ctx.init(null, all, null);
    try (SSLSocket s = (SSLSocket) ctx.getSocketFactory().createSocket("127.0.0.1", Integer.parseInt(a[0]))) {
      SSLParameters p = s.getSSLParameters();
      p.setServerNames(List.of(new SNIHostName("java.test")));
      p.setProtocols(new String[] {a[1]});
      s.setSSLParameters(p);
      s.startHandshake();
      System.out.println(s.getSession().getProtocol() + " " + s.getSession().getCipherSuite());
    }
  }
}
"""

PY_VERSION_CLIENT = ("import socket, ssl, sys; c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; "
                     "c.verify_mode = ssl.CERT_NONE; c.set_alpn_protocols(['h2', 'http/1.1']); "
                     "s = c.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1]))), "
                     "server_hostname='py.test'); print(s.version(), s.cipher()[0], s.selected_alpn_protocol()); "
                     "s.close()")

PINNED = {  # nginx allowing one protocol, one suite, one group; what every client must then negotiate
    "tls13": ("ssl_protocols TLSv1.3; ssl_conf_command Ciphersuites TLS_CHACHA20_POLY1305_SHA256; ssl_ecdh_curve X25519;",
              {"tls_version": "TLSv1.3", "cipher": "TLS_CHACHA20_POLY1305_SHA256", "cipher_code": 0x1303,
               "group": "x25519"}),
    "tls12": ("ssl_protocols TLSv1.2; ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384; ssl_ecdh_curve secp384r1;",
              {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "cipher_code": 0xC02C,
               "group": "secp384r1"}),
}


@pytest.mark.parametrize("version", ["tls13", "tls12"])
def test_python_wget_java_against_pinned_nginx(ec_cert, tmp_path, version):
    """Python's ssl (OpenSSL), wget (GnuTLS) and Java (JSSE: no library hook sees it) against nginx
    configured for TLS 1.3 only or TLS 1.2 only: each client's event has the pinned version, suite and
    group, its own SNI and the ALPN nginx chose (visible in TLS 1.2; encrypted in TLS 1.3: null)."""
    need_tool("wget", "javac", "java")
    cert, key = ec_cert
    lines, pinned = PINNED[version]
    tls13 = version == "tls13"
    port = free_port()
    java_dir = tmp_path / "java"
    java_dir.mkdir()
    (java_dir / "HsVersionClient.java").write_text(JAVA_VERSION_CLIENT)
    subprocess.run(["javac", "HsVersionClient.java"], cwd=java_dir, check=True, timeout=120)
    with pinned_nginx(tmp_path, port, cert, key, lines):
        tracer, out = run(tmp_path, "port", str(port))
        py = subprocess.run([tp.peer("python"), "-c", PY_VERSION_CLIENT, str(port)], capture_output=True, text=True,
                            timeout=30)
        assert py.returncode == 0, py.stderr
        # "localhost": wget sends SNI for names only (and falls back to 127.0.0.1 where ::1 comes first)
        wget = subprocess.Popen([tp.peer("wget"), "-q", "-O", os.devnull, "--no-check-certificate",
                                 f"https://localhost:{port}/small"])
        assert wget.wait(30) == 0
        java = subprocess.Popen(["java", "-cp", str(java_dir), "HsVersionClient", str(port),
                                 "TLSv1.3" if tls13 else "TLSv1.2"], stdout=subprocess.PIPE, text=True)
        java_out, _ = java.communicate(timeout=60)
        assert java.returncode == 0
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert py.stdout.split()[0] == pinned["tls_version"]  # what each client itself says it negotiated
    assert java_out.split() == [pinned["tls_version"], pinned["cipher"]]
    events = {e["pid"]: e for e in tp.read_events(out) if e["role"] == "client"}
    py_alpn = None if tls13 else "h2"  # nginx has http2 on; Python offers h2 first
    assert py.stdout.split()[2] == "h2"  # what Python itself negotiated, in either version
    for pid, process, sni, alpn in ((py_pid(events, "ctpeer-python"), "ctpeer-python", "py.test", py_alpn),
                                    (wget.pid, "ctpeer-wget", "localhost", events[wget.pid]["alpn"]),
                                    (java.pid, "java", "java.test", None)):
        ev = events[pid]
        got = {k: ev[k] for k in ("process", "sni", "alpn", *pinned)}
        assert got == {"process": process, "sni": sni, "alpn": alpn, **pinned}, (process, ev)
        assert ev["remote_port"] == port and ev["exe"] is not None
    # wget's ALPN is its own choice (none, or http/1.1 by version): never one nginx did not choose
    assert events[wget.pid]["alpn"] in ((None,) if tls13 else (None, "http/1.1"))


def py_pid(events, process):
    pids = [pid for pid, e in events.items() if e["process"] == process]
    assert len(pids) == 1, pids
    return pids[0]


PY_EARLY_CLIENT = ("import socket, ssl, sys; c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; "
                   "c.verify_mode = ssl.CERT_NONE; port = int(sys.argv[1]); "
                   "s = c.wrap_socket(socket.create_connection(('127.0.0.1', port)), server_hostname='early.test'); "
                   "print(s.getsockname()[1], flush=True); sys.stdin.readline(); "
                   "s.sendall(b'GET /small HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); s.recv(4096); "
                   "t = c.wrap_socket(socket.create_connection(('127.0.0.1', port)), server_hostname='late.test'); "
                   "print(t.getsockname()[1], flush=True); t.close(); s.close()")


def test_a_connection_opened_before_the_start_is_explicitly_not_reported(ec_cert, tmp_path):
    """A handshake done before the tool started never passes again: that connection has no event, even
    though it carries data while the tool runs; the same process's next connection has one, with its
    process (the owner of a socket that predates the start comes from /proc)."""
    cert, key = ec_cert
    port = free_port()
    with tp.nginx(tmp_path, port, cert, key):
        client = subprocess.Popen([tp.peer("python"), "-c", PY_EARLY_CLIENT, str(port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        early_port = int(client.stdout.readline())
        tracer, out = run(tmp_path, "port", str(port))
        client.stdin.write("go\n")
        client.stdin.flush()
        late_port = int(client.stdout.readline())
        assert client.wait(30) == 0
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    clients = [e for e in tp.read_events(out) if e["role"] == "client"]
    assert [e["local_port"] for e in clients] == [late_port] and early_port != late_port
    assert (clients[0]["pid"], clients[0]["process"], clients[0]["sni"]) == (client.pid, "ctpeer-python", "late.test")
