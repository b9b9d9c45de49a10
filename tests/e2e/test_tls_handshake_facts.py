"""tls -m json: the handshake facts of every tls_handshake event (version, cipher, group, SNI, ALPN,
resumption, the peer's certificate), read from the handshake messages by tls_hello.bpf.c (TLS 1.3's
encrypted ones decrypted with the secrets the hooked library holds: pipeline/tls13_flight.py), asserted
field by field on both sides of real handshakes: curl -> nginx (TLS 1.2 and 1.3, AES-GCM and
ChaCha20, X25519 and P-256), node -> node (OpenSSL 3.5: X25519MLKEM768), openssl s_client session
resumption, gnutls-cli -> gnutls-serv and NSS's tstclnt -> selfserv. Ground truth: what each
peer was told to use, or what it reports itself."""

import json
import os
import re
import shutil
import subprocess

import pytest
from cryptography import x509

from tests.e2e import tlspeers as tp
from tests.harness import free_port, make_veth_netns, need_root, need_tool, remove_veth_netns, veth_netns_names

pytestmark = pytest.mark.ebpf

FACTS = ("role", "tls_version", "cipher", "group", "sni", "alpn", "resumed", "peer_cert_subject", "peer_cert_issuer",
         "peer_key_type", "peer_key_bits")
NO_PEER_CERT = {"peer_cert_subject": None, "peer_cert_issuer": None, "peer_key_type": None, "peer_key_bits": None}


@pytest.fixture(scope="module")
def ec_cert(certs):
    need_root()
    need_tool("openssl", "curl")
    return certs


def subject_of(cert_path):
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()


def run_tracer(tmp_path):
    out = str(tmp_path / "events.json")
    return tp.tls_tracer(["-m", "json", "-o", out]), out


def handshakes(events, **match):
    return [e for e in events if e["event_type"] == "tls_handshake" and all(e.get(k) == v for k, v in match.items())]


def one(events, **match) -> dict:
    found = handshakes(events, **match)
    assert len(found) == 1, (match, handshakes(events))
    return {k: found[0][k] for k in FACTS}


def client_and_server(events, client_match, server_process, port):
    """The facts of the client's handshake and of the server's handshake of the same connection."""
    c = handshakes(events, remote_port=port, **client_match)
    assert len(c) == 1, handshakes(events)
    server = one(events, process=server_process, local_port=port, remote_port=c[0]["local_port"])
    return {k: c[0][k] for k in FACTS}, server


@pytest.mark.parametrize("tls13", [True, False], ids=["tls13-chacha20-x25519", "tls12-aesgcm-p256"])
def test_curl_nginx(ec_cert, tmp_path, tls13):
    need_tool("nginx")
    cert, key = ec_cert
    port = free_port()
    if tls13:
        extra = ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256", "--curves", "X25519"]
        want = {"tls_version": "TLSv1.3", "cipher": "TLS_CHACHA20_POLY1305_SHA256", "group": "x25519",
                "sni": "localhost", "alpn": "h2", "resumed": False}  # from the decrypted EncryptedExtensions
    else:
        extra = ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256", "--curves", "P-256"]
        want = {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "group": "secp256r1",
                "sni": "localhost", "alpn": "h2", "resumed": False}
    subject, issuer = subject_of(cert)
    peer = {"peer_cert_subject": subject, "peer_cert_issuer": issuer, "peer_key_type": "EC", "peer_key_bits": 256}
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run_tracer(tmp_path)
        pid = tp.curl(f"https://localhost:{port}/small", extra=extra)
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    client, server = client_and_server(tp.read_events(out), {"pid": pid}, "ctpeer-nginx", port)
    assert client == {"role": "client", **want, **peer}
    assert server == {"role": "server", **want, **NO_PEER_CERT}  # curl sent no client certificate
    assert "handshake facts from packets are off" not in err


def test_ipv6(ec_cert, tmp_path):
    """curl -> nginx over ::1: the same facts (no SNI for an address literal)."""
    need_tool("nginx")
    cert, key = ec_cert
    port = free_port()
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run_tracer(tmp_path)
        pid = tp.curl(f"https://[::1]:{port}/small", extra=["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256",
                                                             "--curves", "X25519"])
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    client, server = client_and_server(tp.read_events(out), {"pid": pid, "remote_addr": "::1"}, "ctpeer-nginx", port)
    want = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "x25519", "sni": None,
            "alpn": "h2", "resumed": False}
    subject, issuer = subject_of(cert)
    assert client == {"role": "client", **want, "peer_cert_subject": subject, "peer_cert_issuer": issuer,
                      "peer_key_type": "EC", "peer_key_bits": 256}
    assert server == {"role": "server", **want, **NO_PEER_CERT}


def test_node_hybrid_post_quantum_group(ec_cert, tmp_path):
    """node 24's OpenSSL 3.5 offers and picks X25519MLKEM768; no SNI for an IP address."""
    cert, key = ec_cert
    port = free_port()
    (tmp_path / "req").write_bytes(b"ping")
    (tmp_path / "resp").write_bytes(b"pong")
    with tp.node_server(port, cert, key, str(tmp_path / "resp")):
        tracer, out = run_tracer(tmp_path)
        tp.node_client(port, str(tmp_path / "req"), str(tmp_path / "got"))
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert (tmp_path / "got").read_bytes() == b"pong"
    events = tp.read_events(out)
    client = [e for e in handshakes(events, process="ctpeer-node", remote_port=port)]
    assert len(client) == 1, handshakes(events)
    server = one(events, process="ctpeer-node", local_port=port, remote_port=client[0]["local_port"])
    want = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "group": "X25519MLKEM768", "sni": None,
            "alpn": None, "resumed": False}
    subject, issuer = subject_of(cert)  # node's static OpenSSL 3.5 gives the secrets: the flight is decrypted
    assert {k: client[0][k] for k in FACTS} == {"role": "client", **want, "peer_cert_subject": subject,
                                                "peer_cert_issuer": issuer, "peer_key_type": "EC", "peer_key_bits": 256}
    assert server == {"role": "server", **want, **NO_PEER_CERT}


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_resumption(ec_cert, tmp_path, version):
    """s_client saves its session and resumes it: resumed false, then true (s_client says 'New'/'Reused')."""
    cert, key = ec_cert
    port = free_port()
    sess = str(tmp_path / "session.pem")
    request = b"GET / HTTP/1.0\r\n\r\n"

    def s_client(flag):
        p = subprocess.run([tp.peer("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
                            "facts.test", version, "-ign_eof", flag, sess], input=request, capture_output=True,
                           timeout=20)
        m = re.search(rb"^(New|Reused), (TLSv1\.[23])", p.stdout, re.MULTILINE)
        assert m, p.stdout[-2000:]
        return p, m.group(1).decode()

    with tp.process([tp.peer("openssl"), "s_server", "-accept", str(port), "-cert", cert, "-key", key, "-www"],
                    port=port):
        tracer, out = run_tracer(tmp_path)
        _, first = s_client("-sess_out")
        _, second = s_client("-sess_in")
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert (first, second) == ("New", "Reused")
    hs = handshakes(tp.read_events(out), process="ctpeer-openssl", remote_port=port, role="client")
    assert len(hs) == 2, hs
    name = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    assert [(e["tls_version"], e["sni"], e["resumed"]) for e in hs] == [(name, "facts.test", False),
                                                                        (name, "facts.test", True)]
    assert hs[0]["cipher"] == hs[1]["cipher"] is not None


def test_gnutls(ec_cert, tmp_path):
    """GnuTLS does not say its version: packets do. TLS 1.2 with ChaCha20 and X25519, as the priority string
    pins them; gnutls-cli's own description line agrees."""
    need_tool("gnutls-serv", "gnutls-cli")
    cert, key = ec_cert
    port = free_port()
    prio = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+CHACHA20-POLY1305:-GROUP-ALL:+GROUP-X25519"
    with tp.process([tp.peer("gnutls-serv"), "--echo", "-p", str(port), "--x509certfile", cert,
                     "--x509keyfile", key], port=port):
        tracer, out = run_tracer(tmp_path)
        p = subprocess.run([tp.peer("gnutls-cli"), "--insecure", "--priority", prio, "--sni-hostname", "facts.test",
                            "-p", str(port), "127.0.0.1"], input=b"hello\n", capture_output=True, timeout=20)
        assert b"(TLS1.2-X.509)-(ECDHE-X25519)-(ECDSA-SHA256)-(CHACHA20-POLY1305)" in p.stdout, p.stdout
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    subject, issuer = subject_of(cert)
    want = {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "group": "x25519",
            "sni": "facts.test", "alpn": None, "resumed": False}
    client, server = client_and_server(tp.read_events(out), {"process": "ctpeer-gnutls-c"}, "ctpeer-gnutls-s", port)
    assert client == {"role": "client", **want, "peer_cert_subject": subject, "peer_cert_issuer": issuer,
                      "peer_key_type": "EC", "peer_key_bits": 256}
    assert server == {"role": "server", **want, **NO_PEER_CERT}


@pytest.fixture(scope="module")
def nssdb(rsa_certs, tmp_path_factory):
    need_tool("certutil", "pk12util", "selfserv", "tstclnt")
    cert, key = rsa_certs
    d = tmp_path_factory.mktemp("nssdb")
    db = f"sql:{d}"
    p12 = str(d / "srv.p12")
    subprocess.run(["certutil", "-N", "-d", db, "--empty-password"], check=True, capture_output=True)
    subprocess.run(["openssl", "pkcs12", "-export", "-in", cert, "-inkey", key, "-out", p12, "-name", "srv",
                    "-passout", "pass:"], check=True, capture_output=True)
    subprocess.run(["pk12util", "-i", p12, "-d", db, "-W", ""], check=True, capture_output=True)
    return db


@pytest.fixture(scope="module")
def nssdb_trusting_clients(nssdb, tmp_path_factory):
    """A copy of nssdb whose srv certificate is trusted to issue client certificates: selfserv's, which
    verifies the client's (srv's too). tstclnt keeps nssdb: a certificate with explicit trust flags
    cannot be overridden (-o) as the server's."""
    d = tmp_path_factory.mktemp("nssdb-mtls")
    shutil.copytree(nssdb[len("sql:"):], d, dirs_exist_ok=True)
    subprocess.run(["certutil", "-M", "-d", f"sql:{d}", "-n", "srv", "-t", "Tu,,"], check=True, capture_output=True)
    return f"sql:{d}"


def nss_handshake(nssdb, tmp_path, server_args=(), client_args=(), server_db=None, alpn_client=False):
    """One TLS 1.3 connection to selfserv (which offers ALPN http/1.1: -Q), traced with -m json, from
    tstclnt or (alpn_client: tstclnt offers no ALPN) nss_client.py, NSS through ctypes, offering h2 and
    http/1.1: the facts of the client's and of the server's tls_handshake events."""
    need_root()
    port = free_port()
    (tmp_path / "request").write_bytes(b"GET /nss HTTP/1.0\r\n\r\n")
    with tp.process([tp.peer("selfserv"), "-d", server_db or nssdb, "-n", "srv", "-p", str(port), "-V",
                     "tls1.2:tls1.3", "-Q", *server_args], port=port):
        tracer, out = run_tracer(tmp_path)
        if alpn_client:
            client = subprocess.run([tp.peer("python"), os.path.join(os.path.dirname(__file__), "nss_client.py"),
                                     str(port), "facts.test", "h2,http/1.1"], capture_output=True, timeout=20)
            assert json.loads(client.stdout)["alpn"] == "http/1.1", client  # NSS's own word
            who = "ctpeer-python"
        else:
            with open(tmp_path / "request", "rb") as stdin:  # tstclnt hangs on a pipe's EOF, not a file's
                client = subprocess.run([tp.peer("tstclnt"), "-h", "127.0.0.1", "-p", str(port), "-d", nssdb, "-o",
                                         "-V", "tls1.3:tls1.3", "-a", "facts.test", *client_args], stdin=stdin,
                                        capture_output=True, timeout=20)
            assert b"GET /nss" in client.stdout, client.stderr  # selfserv echoes the request
            who = "ctpeer-tstclnt"
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert "accounting mismatch" not in err, err
    return client_and_server(tp.read_events(out), {"process": who}, "ctpeer-selfserv", port)


def rsa_cert_facts(cert_path) -> dict:
    subject, issuer = subject_of(cert_path)
    return {"peer_cert_subject": subject, "peer_cert_issuer": issuer, "peer_key_type": "RSA", "peer_key_bits": 2048}


NSS13 = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "x25519", "sni": "facts.test",
         "resumed": False}


def test_nss(nssdb, rsa_certs, tmp_path):
    """NSS's events had no role: packets say which side sent the ClientHello. TLS 1.3, NSS's first
    suite (AES-128-GCM) and first key share (x25519). TLS 1.3 encrypts the certificate, and NSS's
    secrets cannot be read: it comes from the client's sslSocket (keys/calibrate_nss_worker.py).
    tstclnt offers no ALPN."""
    c, s = nss_handshake(nssdb, tmp_path)
    assert c == {"role": "client", **NSS13, "alpn": None, **rsa_cert_facts(rsa_certs[0])}
    assert s == {"role": "server", **NSS13, "alpn": None, **NO_PEER_CERT}  # no client certificate asked for


def test_nss_alpn(nssdb, rsa_certs, tmp_path):
    """An NSS client offering h2 and http/1.1 to selfserv, which takes http/1.1: both sides' events
    say so (encrypted in TLS 1.3: read from each side's sslSocket)."""
    c, s = nss_handshake(nssdb, tmp_path, alpn_client=True)
    assert c == {"role": "client", **NSS13, "alpn": "http/1.1", **rsa_cert_facts(rsa_certs[0])}
    assert s == {"role": "server", **NSS13, "alpn": "http/1.1", **NO_PEER_CERT}


def test_nss_client_certificate(nssdb, nssdb_trusting_clients, rsa_certs, tmp_path):
    """mTLS: selfserv requires a client certificate (-r -r), tstclnt sends srv's (-n): the server's
    event has it, read from the server's sslSocket."""
    c, s = nss_handshake(nssdb, tmp_path, server_args=("-r", "-r"), client_args=("-n", "srv"),
                         server_db=nssdb_trusting_clients)
    cert = rsa_cert_facts(rsa_certs[0])
    assert c == {"role": "client", **NSS13, "alpn": None, **cert}
    assert s == {"role": "server", **NSS13, "alpn": None, **cert}


def test_without_cap_net_admin(ec_cert, tmp_path, monkeypatch):
    """No CAP_NET_ADMIN: one warning, the run goes on, the facts packets give are null, the library's stay."""
    need_tool("capsh", "nginx")
    from tests import harness

    cmd = harness.tracer_cmd()
    monkeypatch.setattr(harness, "tracer_cmd", lambda: ["capsh", "--drop=cap_net_admin", "--", "-c",
                                                        'exec "$0" "$@"'] + cmd)
    cert, key = ec_cert
    port = free_port()
    with tp.nginx(tmp_path, port, cert, key):
        tracer, out = run_tracer(tmp_path)
        pid = tp.curl(f"https://localhost:{port}/small", extra=["--tlsv1.3"])
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert err.count("handshake facts from packets are off") == 1, err
    assert "needs CAP_NET_ADMIN" in err
    client = one(tp.read_events(out), pid=pid, remote_port=port)
    assert client == {"role": "client", "tls_version": "TLSv1.3", "cipher": None, "group": None, "sni": None,
                      "alpn": None, "resumed": None, **NO_PEER_CERT}


def test_nss_without_cap_net_admin(nssdb, rsa_certs, tmp_path, monkeypatch):
    """No CAP_NET_ADMIN, so no packets: NSS's ALPN and peer certificate still come, from its sslSocket
    read in the kernel; what only packets say (version, suite, group, SNI, role) is null."""
    need_tool("capsh")
    from tests import harness

    cmd = harness.tracer_cmd()
    monkeypatch.setattr(harness, "tracer_cmd", lambda: ["capsh", "--drop=cap_net_admin", "--", "-c",
                                                        'exec "$0" "$@"'] + cmd)
    c, s = nss_handshake(nssdb, tmp_path, alpn_client=True)
    unknown = {"role": None, "tls_version": None, "cipher": None, "group": None, "sni": None, "resumed": None}
    assert c == {**unknown, "alpn": "http/1.1", **rsa_cert_facts(rsa_certs[0])}
    assert s == {**unknown, "alpn": "http/1.1", **NO_PEER_CERT}


def system_openssl() -> tuple[int, int]:
    """(major, minor) of the openssl tool's library (the one s_server, curl and nginx use here)."""
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    major, minor = out.split()[1].split(".")[:2]
    return int(major), int(minor)


def tc_filters() -> str:
    return "".join(subprocess.run(["tc", "filter", "show", "dev", "lo", d], capture_output=True, text=True).stdout
                   for d in ("ingress", "egress"))


def test_classifier_removed_after_kill_9(ec_cert, tmp_path):
    """A run killed with SIGKILL leaves its TC filters; the next run removes them, and its own at exit."""
    need_tool("tc")
    tracer, _ = run_tracer(tmp_path)
    assert "hello_egress" in tc_filters()
    tracer.proc.kill()
    tracer.wait()
    assert "hello_egress" in tc_filters()  # nothing ran at SIGKILL
    tracer, _ = run_tracer(tmp_path)
    _, err, rc = tracer.stop()
    assert rc == 0, err
    assert "removed the TC handshake classifier left behind" in err
    assert "hello_egress" not in tc_filters()


@pytest.mark.parametrize("version", ["tls1.3", "tls1.2"])
def test_boringssl(ec_cert, tmp_path, version):
    """bssl-tool (Debian's android-libboringssl) client -> server: the facts equal what bssl-tool prints
    about its own connection (Version, Cipher, ECDHE curve, Resumed session)."""
    need_tool("bssl-tool")
    cert, key = ec_cert
    port = free_port()
    with tp.process([tp.peer("bssl-tool"), "server", "-accept", str(port), "-www", "-loop", "-key", key, "-cert",
                     cert], port=port):
        tracer, out = run_tracer(tmp_path)
        p = subprocess.run([tp.peer("bssl-tool"), "client", "-connect", f"127.0.0.1:{port}", "-server-name",
                            "facts.test", "-min-version", version, "-max-version", version],
                           input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=20)
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    said = dict(re.findall(r"^  ([A-Za-z ]+): (.*)$", p.stdout.decode(), re.MULTILINE))
    assert said["Version"] == ("TLSv1.3" if version == "tls1.3" else "TLSv1.2"), p.stdout
    want = {"tls_version": said["Version"], "cipher": said["Cipher"],
            "group": {"X25519": "x25519", "P-256": "secp256r1"}[said["ECDHE curve"]], "sni": "facts.test",
            "alpn": None, "resumed": {"no": False, "yes": True}[said["Resumed session"]]}
    events = tp.read_events(out)
    client, server = client_and_server(events, {"process": "ctpeer-bssl-too", "role": "client"},
                                       "ctpeer-bssl-too", port)
    subject, issuer = subject_of(cert)  # TLS 1.3: decrypted with the secrets of bssl_keylog
    peer = {"peer_cert_subject": subject, "peer_cert_issuer": issuer, "peer_key_type": "EC", "peer_key_bits": 256}
    assert client == {"role": "client", **want, **peer}
    assert server == {"role": "server", **want, **NO_PEER_CERT}


NODE_HELLO = r"""
process.title = 'ctpeer-node';
const tls = require('tls');
const [host, port] = process.argv.slice(1);
const s = tls.connect({host, port: +port, servername: 'facts.test', rejectUnauthorized: false}, () => {
  s.write('GET / HTTP/1.0\r\n\r\n');
});
s.on('data', () => {}); s.on('end', () => s.destroy());
"""


@pytest.fixture
def veth_netns():
    """A network namespace behind a veth pair (MTU 1500, unlike lo's 64 KiB): a peer there is reached over
    a real interface, both TC directions, and hellos and certificates span segments (made before the tool
    starts; test_tls_new_interfaces.py makes one after)."""
    need_root()
    need_tool("ip")
    v = veth_netns_names("hello", 7)
    try:
        make_veth_netns(v)
        yield v.ns
    finally:
        remove_veth_netns(v)


def test_real_interface_segments(veth_netns, tmp_path):
    """Over a veth (MTU 1500): a TLS 1.2 server flight with an RSA 4096 certificate and node's ~1.8 KB
    ClientHello (a hybrid key share) each span several segments; the facts are whole."""
    need_tool("curl", "openssl")
    from tests.harness import make_cert, wait_until

    cert, key = make_cert(tmp_path, cn="big.facts.test", rsa_bits=4096)
    port = free_port()
    server = subprocess.Popen(["ip", "netns", "exec", veth_netns, tp.peer("openssl"), "s_server", "-accept",
                               f"10.201.7.2:{port}", "-cert", cert, "-key", key, "-www", "-alpn", "http/1.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", veth_netns, "ss", "-Hltn", f"sport = :{port}"],
                                          capture_output=True, text=True).stdout.strip(), 10, "s_server listening")
        # a node running before the tracer: its executable is hooked at start, so the short client is traced
        with tp.process([tp.peer("node"), "-e", "setTimeout(() => {}, 60000)"]):
            tracer, out = run_tracer(tmp_path)
            curl_pid = tp.curl(f"https://10.201.7.2:{port}/", extra=["--tls-max", "1.2", "--ciphers",
                                                                      "ECDHE-RSA-AES256-GCM-SHA384"])
            subprocess.run([tp.peer("node"), "-e", NODE_HELLO, "10.201.7.2", str(port)], check=True, timeout=30)
            _, err, rc = tracer.stop()
    finally:
        server.terminate()
        server.wait(10)
    assert rc == 0, err
    events = tp.read_events(out)
    subject, issuer = subject_of(cert)
    assert one(events, pid=curl_pid, remote_port=port) == {
        "role": "client", "tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "group": "x25519", "sni": None, "alpn": "http/1.1", "resumed": False, "peer_cert_subject": subject,
        "peer_cert_issuer": issuer, "peer_key_type": "RSA", "peer_key_bits": 4096}
    # node's TLS 1.3 flight, its RSA 4096 certificate over several segments: decrypted whole
    # node offers X25519MLKEM768 first: s_server takes it from OpenSSL 3.5 on (Debian 13); 3.0's (Debian 12)
    # knows no ML-KEM and takes node's second key share
    hybrid = system_openssl() >= (3, 5)
    assert one(events, process="ctpeer-node", remote_port=port) == {
        "role": "client", "tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
        "group": "X25519MLKEM768" if hybrid else "x25519",
        "sni": "facts.test", "alpn": None, "resumed": False, "peer_cert_subject": subject,
        "peer_cert_issuer": issuer, "peer_key_type": "RSA", "peer_key_bits": 4096}


def test_shared_qdisc_kept_for_a_later_capture(tmp_path):
    """tls -m json creates lo's clsact; a pcapng capture started later uses it: when the json run ends, the
    capture's filters (and so the qdisc) stay."""
    need_root()
    need_tool("tc")
    tracer, _ = run_tracer(tmp_path)
    capture = tp.tls_tracer(["-m", "pcapng", "-w", str(tmp_path / "c.pcapng"), "-i", "lo"])
    try:
        both = tc_filters()
        assert "hello_egress" in both and "tc_egress" in both
        _, err, rc = tracer.stop()
        assert rc == 0, err
        left = tc_filters()
        assert "hello_egress" not in left and "tc_egress" in left
    finally:
        assert capture.stop().rc == 0
        # the capture found the qdisc there, so it left it (empty): the json run made it, the test removes it
        if not tc_filters():
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "clsact"], capture_output=True)


def test_shared_qdisc_kept_for_a_later_classifier(tmp_path):
    """The other way round: a pcapng capture creates lo's clsact, tls -m json adds its classifier; when the
    capture ends first, the classifier (and so the qdisc) stays."""
    need_root()
    need_tool("tc")
    capture = tp.tls_tracer(["-m", "pcapng", "-w", str(tmp_path / "c.pcapng"), "-i", "lo"])
    tracer = None
    try:
        tracer, _ = run_tracer(tmp_path)
        assert capture.stop().rc == 0
        left = tc_filters()
        assert "hello_egress" in left and "tc_egress" not in left
    finally:
        if capture.proc.poll() is None:
            capture.stop()
        if tracer is not None:
            assert tracer.stop().rc == 0
        if not tc_filters():
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "clsact"], capture_output=True)
