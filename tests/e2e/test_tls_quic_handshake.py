"""tls -m handshake over QUIC: the ClientHello and ServerHello read from QUIC Initial packets (decrypted
with the keys of the client's first DCID), one tls_handshake event per connection with transport
"quic"; with --decrypt-handshake, ALPN and the server's certificate from its Handshake packets. aioquic against aioquic (x25519), OpenSSL 3.5 against OpenSSL 3.5 (X25519MLKEM768: a ClientHello
over two Initial packets). A connected client's socket names its process; an unconnected one's does
not (null, never a guess). JA4 ground truth: ja4plus (the test extra), which decrypts the Initials of
the datagrams this test captures itself from lo with an AF_PACKET socket."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.e2e.test_tls13_flights import cert_fields
from tests.e2e.test_tls_quic import BUNDLE, OSSL_GROUPS
from tests.harness import (
    Tracer,
    free_port,
    make_cert,
    need_root,
    tracer_env,
    wait_until,
)
from tests.tls_helpers import bundled_libssl

pytestmark = pytest.mark.ebpf
HERE = os.path.dirname(os.path.abspath(__file__))
ETH_P_ALL = 3


class UdpSniffer:
    """The IPv4 UDP datagrams to and from `port` on lo, as Ethernet frames and (src port, payload)."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []

    def read(self) -> list[bytes]:
        while True:
            try:
                frame = self.sock.recv(1 << 17)
            except BlockingIOError:
                return self.frames
            if frame[12:14] == b"\x08\x00" and frame[23] == 17:  # IPv4, UDP
                udp = 14 + (frame[14] & 0xF) * 4
                if self.port in (int.from_bytes(frame[udp:udp + 2], "big"), int.from_bytes(frame[udp + 2:udp + 4], "big")):
                    self.frames.append(frame)

    def client_datagrams_before_server(self) -> list[bytes]:
        """The client's datagrams sent before the server's first."""
        out = []
        for frame in self.read():
            udp = 14 + (frame[14] & 0xF) * 4
            if int.from_bytes(frame[udp:udp + 2], "big") == self.port:
                break
            out.append(frame[udp + 8:])
        return out

    def ja4(self) -> str:
        from ja4plus.fingerprinters.ja4 import JA4Fingerprinter
        from scapy.layers.l2 import Ether

        fp = JA4Fingerprinter()
        for frame in self.read():
            value = fp.process_packet(Ether(frame))
            if value:
                return value
        raise AssertionError("ja4plus found no ClientHello")

    def close(self):
        self.sock.close()


@pytest.fixture
def libssl():
    need_root()
    lib = bundled_libssl(*BUNDLE)
    assert lib is not None, f"cannot download {BUNDLE[0]} {BUNDLE[1]} from PyPI (it bundles OpenSSL 3.5.9)"
    return lib


def _server(*args) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "quic_peer.py"), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=tracer_env())
    line = p.stdout.readline()
    assert json.loads(line) == {"ready": True}, line
    return p


def _client(*args) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "quic_hs_peer.py"), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=tracer_env())
    line = p.stdout.readline()
    assert line, f"{args[0]} client failed"
    return p, json.loads(line)


def _events(out) -> list[dict]:
    try:
        with open(out) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


COMMON = {"event_type": "tls_handshake", "transport": "quic", "tls_version": "TLSv1.3", "sni": "localhost",
          "alpn": None, "alpn_offered": ["ct-test"], "offered_versions": ["TLSv1.3"], "resumed": False,
          "result": None, "library": None, "fd": None, "peer_cert_subject": None, "legacy_version": False,
          "no_forward_secrecy": False, "weak_cipher": False}


def test_aioquic_connected_and_unconnected_clients(tmp_path):
    """A connected client's event names it; then an unconnected client on the same local port (the first
    one gone, its connect() still recorded) names no process: null, not the first client."""
    need_root()
    cert, key = make_cert(tmp_path)
    port = free_port()
    out = str(tmp_path / "hs.out")
    procs = [_server("aioquic-server", str(port), cert, key)]
    sniff = UdpSniffer(port)
    tracer = Tracer(["tls", "-m", "handshake", "--no-redact", "-o", out, "port", str(port)])
    try:
        connected, cinfo = _client("aioquic", str(port), "connected")
        procs.append(connected)
        # the client stays until its event is out: uid and exe are read from /proc then
        wait_until(lambda: len(_events(out)) == 1, 10, "the connected client's event")
        ja4_connected = sniff.ja4()
        connected.stdin.close()
        assert connected.wait(10) == 0
        unconnected, uinfo = _client("aioquic", str(port), "unconnected", str(cinfo["local"][1]))
        procs.append(unconnected)
        wait_until(lambda: len(_events(out)) == 2, 10, "the unconnected client's event")
    finally:
        sniff.close()
        _stop(procs[1:])
        res = tracer.stop()
        _stop(procs[:1])
    assert res.rc == 0, res.err
    events = _events(out)
    assert len(events) == 2, events  # one per connection, not one per Initial packet
    ev = events[0]
    want = dict(COMMON, pid=connected.pid, process="ctquic-aioquic", uid=0, exe=os.path.realpath(sys.executable),
                role="client", local_addr="127.0.0.1", local_port=cinfo["local"][1], remote_addr="127.0.0.1",
                remote_port=port, cipher="TLS_" + cinfo["cipher"], cipher_code=cinfo["cipher_code"],
                # aioquic's server takes the first of the client's key shares it supports; its client sends
                # one per supported group, in this order
                group="secp256r1", offered_ciphers=[0x1302, 0x1301, 0x1303],
                offered_groups=["secp256r1", "secp384r1", "x25519", "x448"],
                not_quantum_safe_key_exchange=True)
    assert {k: ev[k] for k in want} == want, ev
    assert ev["ja4"] == ja4_connected and ev["ja4"].startswith("q13d03"), ev["ja4"]
    # the unconnected socket names no process: pid, process, role null; local_* is the client end
    ev = events[1]
    assert uinfo["local"] == cinfo["local"]
    want.update(pid=None, process=None, uid=None, exe=None, role=None, cipher="TLS_" + uinfo["cipher"],
                cipher_code=uinfo["cipher_code"])
    assert {k: ev[k] for k in want} == want, ev
    assert ev["ja4"] == ja4_connected  # the same library's ClientHello


def test_aioquic_ipv6(tmp_path):
    """The same over ::1 (the classifier's IPv6 path)."""
    need_root()
    cert, key = make_cert(tmp_path)
    port = free_port()
    out = str(tmp_path / "hs.out")
    procs = [_server("aioquic-server", str(port), cert, key, "::1")]
    tracer = Tracer(["tls", "-m", "handshake", "--no-redact", "-o", out, "ip6"])
    try:
        client, info = _client("aioquic", str(port), "connected", "0", "::1")
        procs.append(client)
        wait_until(lambda: _events(out), 10, "the client's event")
    finally:
        _stop(procs[1:])
        res = tracer.stop()
        _stop(procs[:1])
    assert res.rc == 0, res.err
    (ev,) = [e for e in _events(out) if e["remote_port"] == port]
    want = dict(COMMON, pid=client.pid, process="ctquic-aioquic", role="client", local_addr="::1",
                local_port=info["local"][1], remote_addr="::1", remote_port=port, cipher="TLS_" + info["cipher"],
                group="secp256r1")
    assert {k: ev[k] for k in want} == want, ev
    assert ev["ja4"].startswith("q13d03")


def test_openssl35_hybrid_post_quantum_group(libssl, tmp_path):
    """OpenSSL 3.5 client and server: X25519MLKEM768, its 1216-byte key share puts the ClientHello
    over two Initial packets."""
    cert, key = make_cert(tmp_path)
    port = free_port()
    out = str(tmp_path / "hs.out")
    procs = [_server("ossl-server", libssl, str(port), cert, key, "1")]
    sniff = UdpSniffer(port)
    tracer = Tracer(["tls", "-m", "handshake", "--no-redact", "-o", out, "port", str(port)])
    try:
        client, info = _client("ossl", libssl, str(port), "connected")
        procs.append(client)
        wait_until(lambda: _events(out), 10, "the OpenSSL client's event")
        reference = sniff.ja4()
        first_flight = sniff.client_datagrams_before_server()
    finally:
        sniff.close()
        _stop(procs[1:])
        res = tracer.stop()
        _stop(procs[:1])
    assert res.rc == 0, res.err
    assert info["got"] == "reply(5):olleh"
    assert OSSL_GROUPS[info["group"]] == "X25519MLKEM768"  # what the client library says it negotiated
    assert len(first_flight) >= 2 and all(d[0] & 0xF0 == 0xC0 for d in first_flight)  # Initials
    (ev,) = _events(out)
    want = dict(COMMON, pid=client.pid, process="ctquic-ossl", uid=0, exe=os.path.realpath(sys.executable),
                role="client", local_addr="127.0.0.1", local_port=info["local"][1], remote_addr="127.0.0.1",
                remote_port=port, cipher="TLS_AES_256_GCM_SHA384", cipher_code=0x1302, group="X25519MLKEM768",
                not_quantum_safe_key_exchange=False)
    assert {k: ev[k] for k in want} == want, ev
    assert ev["offered_groups"][:2] == ["X25519MLKEM768", "x25519"] and ev["offered_ciphers"][:3] == \
        [0x1302, 0x1303, 0x1301], ev
    assert ev["ja4"] == reference and ev["ja4"].startswith("q13d"), (ev["ja4"], reference)


@pytest.mark.parametrize("server_kind", ["ossl", "aioquic"])
def test_decrypt_handshake_alpn_and_certificate(libssl, tmp_path, server_kind):
    """tls -m handshake --decrypt-handshake: the OpenSSL 3.5 client's handshake traffic secrets (read from its
    connection's inner TLS object) open the server's flight in the Handshake packets: the ALPN the server
    chose and its certificate, against an OpenSSL 3.5 server (EC P-256) and an aioquic server (RSA 3072: its
    Certificate goes on in datagrams that start with a Handshake packet)."""
    rsa = server_kind == "aioquic"
    cert, key = make_cert(tmp_path, rsa_bits=3072 if rsa else 0)
    port = free_port()
    out = str(tmp_path / "hs.out")
    procs = [_server("ossl-server", libssl, str(port), cert, key, "1") if server_kind == "ossl"
             else _server("aioquic-server", str(port), cert, key)]
    tracer = Tracer(["tls", "-m", "handshake", "--decrypt-handshake", "--libssl", libssl, "--no-redact", "-o", out,
                     "port", str(port)])
    try:
        client, info = _client("ossl", libssl, str(port), "connected")
        procs.append(client)
        wait_until(lambda: _events(out), 10, "the OpenSSL client's event")
    finally:
        _stop(procs[1:])
        res = tracer.stop()
        _stop(procs[:1])
    assert res.rc == 0, res.err
    assert info["got"] == "reply(5):olleh"
    (ev,) = _events(out)
    group = "X25519MLKEM768" if server_kind == "ossl" else "x25519"
    assert OSSL_GROUPS[info["group"]] == group
    want = dict(COMMON, pid=client.pid, process="ctquic-ossl", role="client", local_port=info["local"][1],
                remote_port=port, cipher="TLS_AES_256_GCM_SHA384", group=group, alpn="ct-test",
                **cert_fields(cert, "RSA" if rsa else "EC", 3072 if rsa else 256))
    assert {k: ev[k] for k in want} == want, ev


def test_keylog_of_openssl_quic_client(libssl, tmp_path):
    """tls -m keylog: an OpenSSL 3.5 QUIC connection's secrets, read from its inner TLS object, are the lines
    the library's own key-log callback wrote (all five, the same client_random)."""
    cert, key = make_cert(tmp_path)
    port = free_port()
    keys, truth = str(tmp_path / "tool.keys"), str(tmp_path / "ossl.keys")
    procs = [_server("aioquic-server", str(port), cert, key)]
    tracer = Tracer(["tls", "-m", "keylog", "--libssl", libssl, "--name", "ctquic-ossl", "-o", keys])
    try:
        client, info = _client("ossl", libssl, str(port), "connected", truth)
        procs.append(client)
    finally:
        _stop(procs[1:])
        res = tracer.stop()
        _stop(procs[:1])
    assert res.rc == 0, res.err
    assert info["got"] == "reply(5):olleh"
    with open(truth) as f:
        want = f.read().splitlines()
    with open(keys) as f:
        got = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    assert len(want) == 5 and len({line.split()[1] for line in want}) == 1, want
    assert sorted(got) == sorted(want)
