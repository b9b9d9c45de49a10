"""OpenSSL 3.5's own QUIC (psycopg-binary's bundled libssl, through ctypes) against aioquic, both ways:
`tls -m json` gives each stream's plaintext under its stream id, with the UDP fd and the connection's
4-tuple (the OpenSSL server's socket is unconnected: the remote end is the connection's peer). The
handshake event's ALPN and peer certificate come from the connection's Handshake packets, decrypted
with the secrets of the OpenSSL side's inner TLS object (asserted against the certificate file)."""

import base64
import json
import os
import subprocess
import sys

import pytest

from tests.e2e.quic_peer import ALPN, PAYLOADS, reply
from tests.e2e.test_tls13_flights import CERT_FIELDS, NO_PEER_CERT, cert_fields
from tests.harness import Tracer, free_port, make_cert, need_root, tracer_env
from tests.tls_helpers import bundled_libssl

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quic_peer.py")
BUNDLE = ("psycopg-binary", "3.3.9")  # OpenSSL 3.5.9
QUIC_FACTS = ("transport", "tls_version", "role", "cipher", "group", "sni", "alpn", "resumed", *CERT_FIELDS)
# SSL_get_negotiated_group()'s answer (a NID, or the IANA code | TLSEXT_nid_unknown) -> the event's name
OSSL_GROUPS = {415: "secp256r1", 1034: "x25519", 0x1000000 | 0x11EC: "X25519MLKEM768"}


@pytest.fixture
def libssl():
    need_root()
    pytest.importorskip("aioquic", reason="needs aioquic (the test extra, installed by ./setup test)")
    lib = bundled_libssl(*BUNDLE)
    if lib is None:
        pytest.skip(f"cannot download {BUNDLE[0]} {BUNDLE[1]} from PyPI (it bundles OpenSSL 3.5.9)")
    return lib


def _start(*args) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, PEER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=tracer_env())
    line = p.stdout.readline()
    assert json.loads(line) == {"ready": True}, line
    return p


def _run(*args) -> dict:
    out = subprocess.run([sys.executable, PEER, *args], check=False, capture_output=True, text=True, timeout=60,
                         env=tracer_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _streams(events, pid) -> dict:
    """(direction, stream id) -> the bytes of that pid's tls_data events, in order."""
    got: dict = {}
    for e in events:
        if e["event_type"] == "tls_data" and e["pid"] == pid:
            got.setdefault((e["direction"], e["stream_id"]), bytearray()).extend(base64.b64decode(e["data_b64"]))
    return {k: bytes(v) for k, v in got.items()}


def _expected(sent: dict) -> dict:
    """What the OpenSSL side's events must hold, from the bytes each stream carried one way."""
    want = {}
    for sid, data in sent.items():
        want[("client", int(sid))] = bytes.fromhex(data)
        if not int(sid) & 2:  # bidirectional: the server answered
            want[("server", int(sid))] = reply(bytes.fromhex(data))
    return want


def test_openssl_quic_server_with_aioquic_client(libssl, tmp_path):
    cert, key = make_cert(tmp_path)
    port = free_port()
    tracer = Tracer(["tls", "-m", "json", "--libssl", libssl, "--name", "ctquic"])
    server = peer = None
    try:
        server = _start("ossl-server", libssl, str(port), cert, key, str(len(PAYLOADS)))
        peer = subprocess.Popen([sys.executable, PEER, "aioquic-client", str(port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=tracer_env())
        client = json.loads(peer.stdout.readline())  # it has every answer; its connection stays open
        done = json.loads(server.stdout.readline())  # after its last call returned
        peer.stdin.close()  # now it may close the connection
        assert peer.wait(30) == 0
    finally:
        if peer and peer.poll() is None:
            peer.kill()
            peer.wait(10)
        if server:
            server.kill()
            server.wait(10)
        res = tracer.stop()
    want = _expected(client["sent"])
    assert {int(s): bytes.fromhex(d) for s, d in client["got"].items()} == \
        {sid: data for (side, sid), data in want.items() if side == "server"}
    events = [json.loads(line) for line in res.out.splitlines() if line.strip()]
    data = [e for e in events if e["event_type"] == "tls_data" and e["pid"] == server.pid]
    # the server reads what the client sent on each stream and writes its answers
    assert _streams(events, server.pid) == {("read" if side == "client" else "write", sid): d
                                            for (side, sid), d in want.items()}
    assert {e["stream_id"] for e in data} == {0, 4, 2}
    for e in data:  # one unconnected UDP socket; the remote end is this connection's client
        assert (e["fd"], e["local_addr"], e["local_port"], e["remote_addr"], e["remote_port"]) == \
            (done["fd"], "127.0.0.1", port, "127.0.0.1", client["local_port"]), e
        assert e["library"] == "openssl" and e["function"] in ("SSL_read_ex", "SSL_write_ex")
    # one session, announced by its first stream's first call, with the connection's 4-tuple
    hss = [e for e in events if e["event_type"] == "tls_handshake" and e["pid"] == server.pid]
    (hs,) = hss
    assert (hs["fd"], hs["local_port"], hs["remote_addr"], hs["remote_port"], hs["result"]) == \
        (done["fd"], port, "127.0.0.1", client["local_port"], "success")
    # the facts of the hellos in the connection's Initial packets: aioquic offers AES-256-GCM first and no
    # ML-KEM group; the group is the one the OpenSSL server says it took. The ALPN the server chose, from
    # its EncryptedExtensions (Handshake packets); the aioquic client sent no certificate: peer fields null
    assert {k: hs[k] for k in QUIC_FACTS} == {"transport": "quic", "tls_version": "TLSv1.3", "role": "server",
                                               "cipher": "TLS_AES_256_GCM_SHA384", "group": OSSL_GROUPS[done["group"]],
                                               "sni": "localhost", "alpn": ALPN.decode(), "resumed": False,
                                               **NO_PEER_CERT}, hs


def test_openssl_quic_client_with_aioquic_server(libssl, tmp_path):
    # RSA 3072: the server's Certificate goes on in datagrams that start with a Handshake packet
    cert, key = make_cert(tmp_path, rsa_bits=3072)
    port = free_port()
    tracer = Tracer(["tls", "-m", "json", "--libssl", libssl, "--name", "ctquic"])
    server = None
    try:
        server = _start("aioquic-server", str(port), cert, key)
        client = _run("ossl-client", libssl, str(port))
    finally:
        if server:
            server.kill()
            server.wait(10)
        res = tracer.stop()
    want = _expected(client["sent"])
    assert {int(s): bytes.fromhex(d) for s, d in client["got"].items()} == \
        {sid: data for (side, sid), data in want.items() if side == "server"}
    events = [json.loads(line) for line in res.out.splitlines() if line.strip()]
    pids = {e["pid"] for e in events if e["event_type"] == "tls_data"}
    assert len(pids) == 1
    pid = pids.pop()
    # the client writes each stream (stream 0 through its connection object, the default stream) and reads
    # the answers; each stream's two writes are two events
    assert _streams(events, pid) == {("write" if side == "client" else "read", sid): d
                                     for (side, sid), d in want.items()}
    data = [e for e in events if e["event_type"] == "tls_data"]
    assert sorted(e["stream_id"] for e in data if e["direction"] == "write") == [0, 0, 2, 2, 4, 4]
    local = tuple(client["local"])
    for e in data + [e for e in events if e["event_type"] == "tls_handshake"]:
        assert (e["fd"], e["local_addr"], e["local_port"], e["remote_addr"], e["remote_port"]) == \
            (client["fd"], *local, "127.0.0.1", port), e
    (hs,) = [e for e in events if e["event_type"] == "tls_handshake"]  # one session, not one per stream
    assert (hs["role"], hs["result"], hs["pid"]) == ("client", "success", pid)
    # aioquic has no ML-KEM group: it takes OpenSSL's x25519 key share (OpenSSL 3.5 sends
    # X25519MLKEM768's and x25519's), as the OpenSSL client says too
    assert OSSL_GROUPS[client["group"]] == "x25519"
    # ALPN and the server's certificate: its flight, decrypted with the OpenSSL client's handshake secrets
    assert {k: hs[k] for k in QUIC_FACTS} == {"transport": "quic", "tls_version": "TLSv1.3", "role": "client",
                                               "cipher": "TLS_AES_256_GCM_SHA384", "group": "x25519",
                                               "sni": "localhost", "alpn": ALPN.decode(), "resumed": False,
                                               **cert_fields(cert, "RSA", 3072)}, hs


def test_streams_mode_writes_a_file_per_quic_stream(libssl, tmp_path):
    """-m streams: one file per QUIC stream and direction (not one per UDP 4-tuple)."""
    cert, key = make_cert(tmp_path)
    port = free_port()
    out = tmp_path / "streams"
    tracer = Tracer(["tls", "-m", "streams", "-o", str(out), "--libssl", libssl, "--name", "ctquic"])
    server = None
    try:
        server = _start("aioquic-server", str(port), cert, key)
        client = _run("ossl-client", libssl, str(port))
    finally:
        if server:
            server.kill()
            server.wait(10)
        tracer.stop()
    files = {}
    for name in os.listdir(out):
        if name.endswith((".sent", ".received")):
            stem, direction = name.rsplit(".", 1)
            assert "-stream" in stem, name
            files[(direction, int(stem.rsplit("-stream", 1)[1]))] = (out / name).read_bytes()
    assert files == {("sent" if side == "client" else "received", sid): d
                     for (side, sid), d in _expected(client["sent"]).items()}
