"""TLS 1.3's encrypted handshake facts: tls -m json decrypts each connection's EncryptedExtensions and
Certificate with the handshake traffic secrets the hooked library holds (pipeline/tls13_flight.py), so
`alpn` and the peer certificate fields are filled for TLS 1.3 as packets fill them for TLS 1.2. Asserted
field by field against what each peer was configured with and the certificate files (read with
cryptography): curl -> nginx with each TLS 1.3 suite, Python's ssl -> openssl s_server, and a client
certificate (mTLS: curl -> a Python server) on the server's event."""

import subprocess

import pytest
from cryptography import x509

from tests.e2e import tlspeers as tp
from tests.harness import free_port, make_cert, need_root, need_tool

pytestmark = pytest.mark.ebpf

CERT_FIELDS = ("peer_cert_subject", "peer_cert_issuer", "peer_key_type", "peer_key_bits")
NO_PEER_CERT = dict.fromkeys(CERT_FIELDS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server certificate (RSA 3072) and a client certificate (EC P-256), each self-signed."""
    need_root()
    need_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("flights")
    return (make_cert(d, cn="flights.test", rsa_bits=3072),
            make_cert(d, cn="client.flights.test", cert_name="client.pem", key_name="client.key"))


def cert_fields(path, key_type, key_bits) -> dict:
    with open(path, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    return {"peer_cert_subject": c.subject.rfc4514_string(), "peer_cert_issuer": c.issuer.rfc4514_string(),
            "peer_key_type": key_type, "peer_key_bits": key_bits}


def facts(ev) -> dict:
    return {k: ev[k] for k in ("role", "tls_version", "cipher", "alpn", *CERT_FIELDS)}


def brief(out) -> list:
    return [(e["process"], e["role"], e["local_port"], e["remote_port"], e["tls_version"]) for e in handshake_events(out)]


def handshake_events(out, **match):
    return [e for e in tp.read_events(out) if e["event_type"] == "tls_handshake"
            and all(e.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("suite,http", [("TLS_AES_128_GCM_SHA256", "h2"), ("TLS_AES_256_GCM_SHA384", "http/1.1"),
                                        ("TLS_CHACHA20_POLY1305_SHA256", "h2")])
def test_curl_nginx(pki, tmp_path, suite, http):
    need_tool("nginx")
    (cert, key), _ = pki
    port = free_port()
    out = str(tmp_path / "events.json")
    with tp.nginx(tmp_path, port, cert, key):
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        pid = tp.curl(f"https://localhost:{port}/small", extra=["--tlsv1.3", "--tls13-ciphers", suite,
                                                                 "--http2" if http == "h2" else "--http1.1"])
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    client = handshake_events(out, pid=pid, remote_port=port)
    assert len(client) == 1, brief(out)
    server = handshake_events(out, process="ctpeer-nginx", local_port=port, remote_port=client[0]["local_port"])
    assert len(server) == 1, brief(out)
    want = {"tls_version": "TLSv1.3", "cipher": suite, "alpn": http}
    assert facts(client[0]) == {"role": "client", **want, **cert_fields(cert, "RSA", 3072)}
    assert facts(server[0]) == {"role": "server", **want, **NO_PEER_CERT}  # curl sent no certificate


PYTHON_CLIENT = r"""
import socket, ssl, sys
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
c.minimum_version = ssl.TLSVersion.TLSv1_3
c.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as raw:
    with c.wrap_socket(raw, server_hostname="flights.test") as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.recv(64)
        print(s.selected_alpn_protocol(), s.cipher()[0], flush=True)
"""


def s_server(port, cert, key, *extra):
    return tp.process([tp.peer("openssl"), "s_server", "-accept", str(port), "-cert", cert, "-key", key, "-www",
                       "-tls1_3", *extra], port=port)


def test_python_client_openssl_server(pki, tmp_path):
    """Python's ssl (the system libssl, hooked) -> s_server choosing ChaCha20 and http/1.1."""
    (cert, key), _ = pki
    port = free_port()
    out = str(tmp_path / "events.json")
    with s_server(port, cert, key, "-alpn", "http/1.1", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"):
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        p = subprocess.run([tp.peer("python"), "-c", PYTHON_CLIENT, str(port)], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert p.stdout.split() == ["http/1.1", "TLS_CHACHA20_POLY1305_SHA256"]  # what the client itself says
    client = handshake_events(out, process="ctpeer-python", remote_port=port)
    assert len(client) == 1, brief(out)
    assert facts(client[0]) == {"role": "client", "tls_version": "TLSv1.3", "cipher": "TLS_CHACHA20_POLY1305_SHA256",
                                "alpn": "http/1.1", **cert_fields(cert, "RSA", 3072)}


MTLS_SERVER = r"""
import socket, ssl, sys
port, cert, key, client_ca = sys.argv[1:]
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(cert, key)
c.minimum_version = ssl.TLSVersion.TLSv1_3
c.verify_mode = ssl.CERT_REQUIRED
c.load_verify_locations(client_ca)
c.set_alpn_protocols(["http/1.1"])
srv = socket.create_server(("127.0.0.1", int(port)))
while True:
    conn, _ = srv.accept()
    try:
        with c.wrap_socket(conn, server_side=True) as s:
            s.recv(4096)
            s.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except (ssl.SSLError, OSError):
        pass
"""


def test_client_certificate(pki, tmp_path):
    """mTLS: a Python server requires a certificate, curl sends one: the server's event has the client's
    certificate (decrypted from the client's flight), the client's event the server's."""
    (cert, key), (ccert, ckey) = pki
    port = free_port()
    out = str(tmp_path / "events.json")
    with tp.process([tp.peer("python"), "-c", MTLS_SERVER, str(port), cert, key, ccert], port=port):
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        pid = tp.curl(f"https://127.0.0.1:{port}/", extra=["--tlsv1.3", "--cert", ccert, "--key", ckey])
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    client = handshake_events(out, pid=pid, remote_port=port)
    assert len(client) == 1, brief(out)
    server = handshake_events(out, process="ctpeer-python", local_port=port, remote_port=client[0]["local_port"])
    assert len(server) == 1, brief(out)
    assert facts(client[0]) == {"role": "client", "tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                                "alpn": "http/1.1", **cert_fields(cert, "RSA", 3072)}
    assert facts(server[0]) == {"role": "server", "tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                                "alpn": "http/1.1", **cert_fields(ccert, "EC", 256)}


JAVA_SERVER = r"""
import javax.net.ssl.*; import java.security.KeyStore; import java.io.*;
public class HsServer {
  public static void main(String[] a) throws Exception {
    KeyStore ks = KeyStore.getInstance("PKCS12"); ks.load(new FileInputStream(a[1]), "pw".toCharArray());
    KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
    kmf.init(ks, "pw".toCharArray());
    SSLContext ctx = SSLContext.getInstance("TLSv1.3"); ctx.init(kmf.getKeyManagers(), null, null);
    try (SSLServerSocket ss = (SSLServerSocket) ctx.getServerSocketFactory().createServerSocket(
           Integer.parseInt(a[0]), 5, java.net.InetAddress.getByName("127.0.0.1"))) {
      while (true) {
        try (SSLSocket s = (SSLSocket) ss.accept()) { s.startHandshake(); } catch (IOException e) {}
      }
    }
  }
}
"""


def test_handshake_mode_decrypt(pki, tmp_path):
    """tls -m handshake --decrypt-handshake: curl -> nginx, both hooked (key functions only): the event has the
    ALPN and certificate. Java's JSSE is hooked by nothing: Java -> nginx is decrypted with nginx's secret
    (either side's library suffices); Java -> a Java server has no secret anywhere: its event comes (after
    the wait for secrets) with those facts null."""
    need_tool("nginx", "javac", "java")
    from tests.e2e.test_tls_handshake_mode import JAVA_CLIENT

    (cert, key), _ = pki
    java_dir = tmp_path / "java"
    java_dir.mkdir()
    (java_dir / "HsClient.java").write_text(JAVA_CLIENT)
    (java_dir / "HsServer.java").write_text(JAVA_SERVER)
    subprocess.run(["javac", "HsClient.java", "HsServer.java"], cwd=java_dir, check=True, timeout=120)
    keystore = str(tmp_path / "server.p12")
    subprocess.run(["openssl", "pkcs12", "-export", "-in", cert, "-inkey", key, "-out", keystore, "-passout",
                    "pass:pw", "-name", "srv"], check=True, capture_output=True)
    port, java_port = free_port(), free_port()
    out = str(tmp_path / "hs.json")

    def java_client(to_port):
        j = subprocess.run(["java", "-cp", str(java_dir), "HsClient", str(to_port)], capture_output=True, text=True,
                           timeout=60)
        assert j.returncode == 0, j.stderr
        return j.stdout.strip()

    with tp.nginx(tmp_path, port, cert, key), \
            tp.process(["java", "-cp", str(java_dir), "HsServer", str(java_port), keystore], port=java_port):
        tracer = tp.Tracer(["tls", "-m", "handshake", "--decrypt-handshake", "--no-redact", "-o", out,
                            "port", str(port), "or", "port", str(java_port)])
        pid = tp.curl(f"https://127.0.0.1:{port}/small", extra=["--tlsv1.3", "--tls13-ciphers",
                                                                 "TLS_AES_128_GCM_SHA256"])
        to_nginx = java_client(port)
        to_java = java_client(java_port)
        _, err, rc = tracer.stop(settle=[port, java_port])
    assert rc == 0, err
    events = [e for e in tp.read_events(out) if e["role"] == "client"]
    server_cert = cert_fields(cert, "RSA", 3072)
    curl_ev = [e for e in events if e["pid"] == pid]
    assert len(curl_ev) == 1, events
    assert facts(curl_ev[0]) == {"role": "client", "tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256",
                                 "alpn": "h2", **server_cert}
    java_nginx = [e for e in events if e["process"] != "ctpeer-curl" and e["remote_port"] == port]
    assert len(java_nginx) == 1, events
    assert facts(java_nginx[0]) == {"role": "client", "tls_version": "TLSv1.3", "cipher": to_nginx, "alpn": None,
                                    **server_cert}  # (the Java client offers no ALPN)
    java_java = [e for e in events if e["remote_port"] == java_port]
    assert len(java_java) == 1, events
    assert facts(java_java[0]) == {"role": "client", "tls_version": "TLSv1.3", "cipher": to_java, "alpn": None,
                                   **NO_PEER_CERT}


def test_gnutls(pki, tmp_path):
    """GnuTLS on both ends (gnutls-cli -> gnutls-serv), TLS 1.3 with AES-256-GCM and ALPN: its secrets
    open the server's flight on both events' sides."""
    need_tool("gnutls-serv", "gnutls-cli")
    (cert, key), _ = pki
    port = free_port()
    out = str(tmp_path / "events.json")
    prio = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM"
    with tp.process([tp.peer("gnutls-serv"), "--echo", "-p", str(port), "--x509certfile", cert, "--x509keyfile", key,
                     "--alpn", "h2"], port=port):
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        p = subprocess.run([tp.peer("gnutls-cli"), "--insecure", "--priority", prio, "--alpn", "h2", "-p", str(port),
                            "127.0.0.1"], input=b"hello\n", capture_output=True, timeout=20)
        assert b"(TLS1.3-X.509)" in p.stdout and b"(AES-256-GCM)" in p.stdout, p.stdout
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    client = handshake_events(out, process="ctpeer-gnutls-c", remote_port=port)
    assert len(client) == 1, brief(out)
    server = handshake_events(out, process="ctpeer-gnutls-s", local_port=port, remote_port=client[0]["local_port"])
    assert len(server) == 1, brief(out)
    want = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "alpn": "h2"}
    assert facts(client[0]) == {"role": "client", **want, **cert_fields(cert, "RSA", 3072)}
    assert facts(server[0]) == {"role": "server", **want, **NO_PEER_CERT}
