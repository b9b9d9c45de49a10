"""pipeline/tls13_flight.py and HelloFacts' flights on real TLS 1.3 handshakes: Python's ssl (the
system OpenSSL) runs client and server over memory BIOs with a key log (its own, the ground truth
for the secrets); the bytes each side sends are fed to HelloFacts as MSS-sized TCP segments and the
key log's lines to add_secret, as tls -m text|json does with the hooked library's secrets."""

from __future__ import annotations

import ssl
import time

import pytest
from cryptography import x509

from crypto_tracer.pipeline import tls13_flight as tf
from crypto_tracer.pipeline.hello_facts import HelloFacts
from tests.harness import make_cert
from tests.tls_helpers import add_segments, pump_handshake

CLIENT, SERVER = ("127.0.0.1", 40001), ("127.0.0.1", 8443)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("flight-certs")
    return (make_cert(d, cn="flight.test", rsa_bits=2048),
            make_cert(d, cn="client.test", cert_name="client.pem", key_name="client.key"))


def facts_of(cert_path: str) -> dict:
    with open(cert_path, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    return {"subject": c.subject.rfc4514_string(), "issuer": c.issuer.rfc4514_string()}


def run(tmp_path, certs, version=ssl.TLSVersion.TLSv1_3, mtls=False, alpn=("h2",), mss=1000, completed=None):
    """One handshake in memory; (facts, key log {label: secret}, bytes each side sent, flows done)."""
    (scert, skey), (ccert, ckey) = certs
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(scert, skey)
    sctx.maximum_version = version
    if alpn:
        sctx.set_alpn_protocols(list(alpn))
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.set_alpn_protocols(["h2", "http/1.1"])
    keylog = str(tmp_path / "keylog.txt")
    cctx.keylog_filename = keylog
    if mtls:
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(ccert)
        cctx.load_cert_chain(ccert, ckey)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = cctx.wrap_bio(bios[0], bios[1], server_hostname="flight.test")
    s = sctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = []
    facts = HelloFacts(done=done.append, flights=True, completed=completed)
    seq = {CLIENT: 1000, SERVER: 5000}
    sent = {CLIENT: b"", SERVER: b""}

    def send(side, data):
        src, dst = (CLIENT, SERVER) if side == 0 else (SERVER, CLIENT)
        sent[src] += data
        add_segments(facts, seq, src, dst, data, mss)

    assert pump_handshake(c, s, bios, send)

    lines = {}
    with open(keylog) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                label, cr, secret = line.split()
                lines[label] = (bytes.fromhex(cr), bytes.fromhex(secret))
    return facts, lines, sent, done


def feed(facts, lines):
    for label, (cr, secret) in lines.items():
        facts.add_secret(label, cr, secret)


def test_server_flight(tmp_path, certs):
    facts, lines, _, done = run(tmp_path, certs)
    f = facts.lookup(CLIENT, SERVER)
    assert f.version == 0x0304 and f.alpn is None and set(f.flights) == {"server", "client"}
    assert done == []  # the kernel still copies both directions
    feed(facts, lines)
    got = f.fields(cert="server")
    want = facts_of(certs[0][0])
    assert (got["alpn"], got["peer_cert_subject"], got["peer_cert_issuer"], got["peer_key_type"],
            got["peer_key_bits"]) == ("h2", want["subject"], want["issuer"], "RSA", 2048)
    assert f.fields(cert="client")["peer_cert_subject"] is None  # no client certificate asked for
    assert facts.flights_read == 2 and f.flights is None and not facts.waiting
    assert sorted(done) == sorted({repr((CLIENT, SERVER)).encode(), repr((SERVER, CLIENT)).encode()})


def test_client_certificate(tmp_path, certs):
    facts, lines, _, _ = run(tmp_path, certs, mtls=True, alpn=("http/1.1",))
    feed(facts, lines)
    f = facts.lookup(SERVER, CLIENT)
    client, server = f.fields(cert="client"), f.fields(cert="server")
    want = facts_of(certs[1][0])
    assert (client["peer_cert_subject"], client["peer_cert_issuer"], client["peer_key_type"],
            client["peer_key_bits"]) == (want["subject"], want["issuer"], "EC", 256)
    assert server["alpn"] == "http/1.1" and server["peer_cert_subject"] == facts_of(certs[0][0])["subject"]


def test_no_or_wrong_secret_stays_null(tmp_path, certs):
    facts, lines, sent, _ = run(tmp_path, certs)
    f = facts.lookup(CLIENT, SERVER)
    assert f.fields()["alpn"] is None and f.fields()["peer_cert_subject"] is None  # no secret (yet)
    cr, shts = lines["SERVER_HANDSHAKE_TRAFFIC_SECRET"]
    facts.add_secret("SERVER_HANDSHAKE_TRAFFIC_SECRET", cr, bytes(len(shts)))  # wrong: authentication fails
    assert f.fields()["alpn"] is None and f.fields()["peer_cert_subject"] is None
    # the decryption itself: the right secret reads it, one flipped byte or a cut flight reads nothing
    flight = sent[SERVER][5 + int.from_bytes(sent[SERVER][3:5], "big"):]
    assert tf.read_flight(flight, shts, 0x1302).alpn == "h2"
    bad = bytearray(flight)
    bad[20] ^= 1  # in the first encrypted record (the flight is followed by the tickets)
    assert tf.read_flight(bytes(bad), shts, 0x1302) is None
    assert tf.read_flight(flight[:len(flight) // 2], shts, 0x1302) is None
    assert tf.read_flight(flight, shts, 0x1301) is None  # another suite: another key


def test_tls12_keeps_no_flight(tmp_path, certs):
    facts, _, _, done = run(tmp_path, certs, version=ssl.TLSVersion.TLSv1_2)
    f = facts.lookup(CLIENT, SERVER)
    assert f.version == 0x0303 and f.alpn == "h2" and f.flights is None and not facts.waiting
    assert repr((CLIENT, SERVER)).encode() in done and repr((SERVER, CLIENT)).encode() in done
    assert f.fields(cert="server")["peer_key_bits"] == 2048


def test_completed_once_the_flight_is_read(tmp_path, certs):
    """-m handshake --decrypt-handshake: a TLS 1.3 handshake is reported once its server flight is read..."""
    got = []
    facts, lines, _, _ = run(tmp_path, certs, completed=got.append)
    assert got == []  # ServerHello read: waiting for the secret
    feed(facts, lines)
    assert [(f.alpn, f.fields()["peer_key_bits"]) for f in got] == [("h2", 2048)]


def test_completed_without_a_secret(tmp_path, certs):
    """...or, without a secret, once the wait is over: with those facts null, the kernel told to stop."""
    got = []
    facts, _, _, done = run(tmp_path, certs, completed=got.append)
    facts.expire(1.0)
    assert got == []
    facts.expire(1.0, now=time.monotonic() + 2)
    assert [(f.version, f.alpn, f.fields()["peer_cert_subject"]) for f in got] == [(0x0304, None, None)]
    assert not facts.waiting and not facts.streams and len(done) == 2
    facts.expire(0)
    assert len(got) == 1  # once


def test_traffic_keys_rfc8448():
    """RFC 8448 section 3 (simple 1-RTT handshake): the server handshake traffic secret's key and iv."""
    secret = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    key, iv = tf.traffic_keys(secret, 0x1301)
    assert (key.hex(), iv.hex()) == ("3fce516009c21727d0f2e4e86ee403bc", "5d313eb2671276ee13000b30")


def test_compressed_certificate(certs):
    """RFC 8879 (OpenSSL 3.2+ compresses a certificate where both ends can; Debian 13's with zlib): the
    leaf is read from the zlib-compressed message, and an algorithm this Python lacks gives None."""
    import zlib

    from cryptography.hazmat.primitives.serialization import Encoding

    with open(certs[1][0], "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)
    entry = len(der).to_bytes(3, "big") + der + b"\0\0"
    message = b"\0" + len(entry).to_bytes(3, "big") + entry  # empty context, one entry without extensions
    packed = zlib.compress(message)
    body = (1).to_bytes(2, "big") + len(message).to_bytes(3, "big") + len(packed).to_bytes(3, "big") + packed
    assert tf.compressed_leaf_certificate(body) == der
    assert tf.compressed_leaf_certificate(b"\0\x09" + body[2:]) is None  # no such algorithm
    wrong_length = body[:2] + (len(message) + 1).to_bytes(3, "big") + body[5:]
    assert tf.compressed_leaf_certificate(wrong_length) is None
