"""QUIC Handshake packets (pipeline/quic_initial.py): a real aioquic client and server shake hands in
memory, aioquic logs its secrets (the ground truth), and hello_facts reads the server's flight from
the datagrams with the handshake traffic secrets: the ALPN the server chose and its certificate, for
each suite QUIC allows (AES-128/256-GCM, ChaCha20-Poly1305) and QUIC v1 and v2; secrets before and
after the packets; a wrong secret opens nothing. RFC 9001 appendix A.5 checks ChaCha20's keys and
header protection."""

import datetime
import io
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from crypto_tracer.pipeline import hello_facts as hf
from crypto_tracer.pipeline import quic_initial as qi
from crypto_tracer.probes.tls_hello import Segment

aioquic = pytest.importorskip("aioquic", reason="needs aioquic (the test extra, installed by ./setup test)")

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion
from aioquic.tls import CipherSuite

CLIENT, SERVER = ("10.0.0.1", 50000), ("10.0.0.2", 443)
ALPN = "ct-hs/1"


def _cert(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quic.example"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crypto-tracer tests")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("quic.example")]), critical=False)
            .sign(key, hashes.SHA256()))


def handshake(suite, version=QuicProtocolVersion.VERSION_1, key=None):
    """The datagrams of one aioquic handshake, in order as (from_client, bytes), aioquic's key log
    (label -> (client_random, secret)) and the server's certificate."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = _cert(key)
    log = io.StringIO()
    ccfg = QuicConfiguration(is_client=True, alpn_protocols=["other", ALPN], cipher_suites=[suite],
                             supported_versions=[version], verify_mode=ssl.CERT_NONE, server_name="quic.example",
                             secrets_log_file=log)
    scfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], cipher_suites=[suite],
                             supported_versions=[version])
    scfg.certificate, scfg.private_key = cert, key
    client = QuicConnection(configuration=ccfg)
    server = QuicConnection(configuration=scfg,
                            original_destination_connection_id=client.original_destination_connection_id)
    now = 1000.0
    client.connect(SERVER, now=now)
    datagrams = []
    for _ in range(10):
        moved = False
        for conn, peer, src, from_client in ((client, server, CLIENT, True), (server, client, SERVER, False)):
            for data, _addr in conn.datagrams_to_send(now=now):
                datagrams.append((from_client, data))
                peer.receive_datagram(data, src, now=now)
                moved = True
        if not moved:
            break
    assert client._handshake_complete and server._handshake_complete
    assert any(p.ptype == qi.HANDSHAKE for _c, d in datagrams for p in qi.packets(d))
    secrets = {}
    for line in log.getvalue().splitlines():
        label, cr, secret = line.split()
        secrets[label] = (bytes.fromhex(cr), bytes.fromhex(secret))
    return datagrams, secrets, cert


def seg(from_client, data, ts=1):
    src, dst = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
    return Segment(ts, True, src, dst, 0, len(data), data, b"", udp=True)


def feed(facts, datagrams):
    for from_client, data in datagrams:
        facts.add(seg(from_client, data))


def give(facts, secrets, *labels):
    for label in labels:
        cr, secret = secrets[label]
        facts.add_secret(label, cr, secret)


HS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET")
SUITES = {CipherSuite.AES_128_GCM_SHA256: "TLS_AES_128_GCM_SHA256",
          CipherSuite.AES_256_GCM_SHA384: "TLS_AES_256_GCM_SHA384",
          CipherSuite.CHACHA20_POLY1305_SHA256: "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.mark.parametrize("version", [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2], ids=["v1", "v2"])
@pytest.mark.parametrize("suite", list(SUITES), ids=[s.name for s in SUITES])
@pytest.mark.parametrize("secrets_first", [False, True], ids=["secrets-after", "secrets-before"])
def test_server_flight_alpn_and_certificate(suite, version, secrets_first):
    datagrams, secrets, _cert = handshake(suite, version)
    done = []
    facts = hf.HelloFacts(completed=done.append, flights=True)
    if secrets_first:  # a library whose key record was read before the packets (hello_facts keeps them)
        give(facts, secrets, *HS)
        feed(facts, datagrams)
    else:  # the usual order: the packets are kept until the secrets arrive
        feed(facts, datagrams)
        assert not done  # the handshake waits for its server flight
        give(facts, secrets, *HS)
    (f,) = done
    assert facts.quic.errors == 0 and facts.flights_read == 2  # both sides' flights, through Finished
    assert f.client_random == secrets[HS[0]][0]
    assert f.fields(cert="server") == {
        "tls_version": "TLSv1.3", "cipher": SUITES[suite], "group": f.fields()["group"], "sni": "quic.example",
        "alpn": ALPN, "resumed": False, "peer_cert_subject": "O=crypto-tracer tests,CN=quic.example",
        "peer_cert_issuer": "O=crypto-tracer tests,CN=quic.example", "peer_key_type": "EC", "peer_key_bits": 256}
    assert f.certificate("client") is None  # the client sent none
    assert not facts.waiting


def test_rsa_certificate_and_one_secret():
    """The server's secret alone opens the server's flight (the client's stays waiting)."""
    datagrams, secrets, _cert = handshake(CipherSuite.AES_128_GCM_SHA256,
                                          key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    # the certificate takes the flight over a second datagram, one that starts with a Handshake packet
    assert [fc for fc, d in datagrams if [p.ptype for p in qi.packets(d)] == [qi.HANDSHAKE]] == [False]
    done = []
    facts = hf.HelloFacts(completed=done.append, flights=True)
    feed(facts, datagrams)
    give(facts, secrets, "SERVER_HANDSHAKE_TRAFFIC_SECRET")
    (f,) = done
    assert (f.alpn, f.certificate()["key_type"], f.certificate()["key_bits"]) == (ALPN, "RSA", 2048)
    assert facts.flights_read == 1 and f.flights == {"client": None}


def test_wrong_secret_opens_nothing():
    datagrams, secrets, _cert = handshake(CipherSuite.AES_128_GCM_SHA256)
    done = []
    facts = hf.HelloFacts(completed=done.append, flights=True)
    feed(facts, datagrams)
    cr = secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"][0]
    facts.add_secret("SERVER_HANDSHAKE_TRAFFIC_SECRET", cr, secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"][1])
    assert not done and facts.quic.errors > 0 and facts.flights_read == 0
    facts.expire(0)  # the secret did not open it in time: complete, the flight's facts null
    (f,) = done
    assert (f.alpn, f.certificate(), f.fields()["cipher"]) == (None, None, "TLS_AES_128_GCM_SHA256")


def test_without_flights_nothing_is_kept():
    """tls -m handshake without --decrypt-handshake: complete at the ServerHello, Handshake packets ignored."""
    datagrams, secrets, _cert = handshake(CipherSuite.AES_128_GCM_SHA256)
    done = []
    facts = hf.HelloFacts(completed=done.append)
    feed(facts, datagrams)
    give(facts, secrets, *HS)
    (f,) = done
    assert f.alpn is None and f.certificate() is None
    assert all(not fl.pending for c in facts.quic.conns.values() for fl in c.hs)


def test_rfc9001_chacha20_keys_and_header_protection():
    """RFC 9001 appendix A.5: the ChaCha20-Poly1305 short-header packet, opened with our keys and mask."""
    secret = bytes.fromhex("9ac312a7f877468ebe69422748ad00a15443f18203a07d6060f688f30f21632b")
    keys = qi.Keys.from_secret(secret, qi.V1, 0x1303)
    assert (keys.key.hex(), keys.iv.hex(), keys.hp.hex()) == (
        "c6d98ff3441c3fe1b2182094f69caa2ed4b716b65488960a7a984979fb23e1c8", "e0459b3474bdd0e44a41c144",
        "25a282b9e82f06f21f488917a4fc8f1b73573685608597d0efcb076b0ab7a7a4")
    packet = bytes.fromhex("4cfe4189655e5cd55c41f69080575d7999c25a5bfb")
    mask = keys.mask(packet[5:21])  # sample: 4 bytes after the packet number's start (offset 1)
    assert mask.hex() == "aefefe7d03"
    first = packet[0] ^ (mask[0] & 0x1F)  # short header: 5 bits protected
    assert first == 0x42
    pn = int.from_bytes(bytes(a ^ b for a, b in zip(packet[1:4], mask[1:4])), "big")
    assert pn == 0x00BFF4  # truncated (the full number is 654360564, 0x2700bff4)
    nonce = bytes(a ^ b for a, b in zip(keys.iv, (654360564).to_bytes(12, "big")))
    assert keys.open(nonce, packet[4:], bytes([first]) + bytes.fromhex("00bff4")) == b"\x01"


def test_ccm8_is_not_a_quic_suite():
    with pytest.raises(qi.QuicError):
        qi.Keys.from_secret(bytes(32), qi.V1, 0x1305)
