"""pipeline/hello_facts.py on real handshakes: Python's ssl (the system OpenSSL) runs client and
server over memory BIOs, and the bytes each side sends are fed to HelloFacts as TCP segments the
way tls_hello.bpf.c hands them over (a flight per segment, or cut into MSS-sized pieces)."""

from __future__ import annotations

import ssl

import pytest

from crypto_tracer.pipeline.hello_facts import HelloFacts
from crypto_tracer.probes.tls_hello import Segment
from tests.harness import make_cert
from tests.tls_helpers import add_segments, pump_handshake

CLIENT, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 443)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("hello-certs"), cn="facts.test", rsa_bits=2048)


def contexts(cert, client_setup=None, server_setup=None):
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*cert)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    for ctx, setup in ((cctx, client_setup), (sctx, server_setup)):
        if setup:
            setup(ctx)
    return cctx, sctx


def handshake(cert, client_setup=None, server_setup=None, session=None, mss=0, sni="facts.test", ctxs=None):
    """Run one handshake in memory; returns (facts, the client's SSLObject, the flows done). Each
    side's output is delivered as segments in the order it was written."""
    cctx, sctx = ctxs or contexts(cert, client_setup, server_setup)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = cctx.wrap_bio(bios[0], bios[1], server_hostname=sni, session=session)
    s = sctx.wrap_bio(bios[2], bios[3], server_side=True)
    done_flows = []
    facts = HelloFacts(done=done_flows.append)
    seq = {CLIENT: 1000, SERVER: 5000}
    facts.sent = {CLIENT: b"", SERVER: b""}  # each side's bytes, for the comparison with dpkt

    def send(side, data):
        src, dst = (CLIENT, SERVER) if side == 0 else (SERVER, CLIENT)
        facts.sent[src] += data
        add_segments(facts, seq, src, dst, data, mss)

    pump_handshake(c, s, bios, send)
    # read once more, so a TLS 1.3 server's tickets reach the client (session resumption)
    s.write(b"x")
    data = bios[3].read()
    bios[0].write(data)
    c.read(1)
    return facts, c, done_flows


def test_tls13_aes_gcm_x25519(cert):
    def client(ctx):
        ctx.set_alpn_protocols(["h2", "http/1.1"])

    facts, _, done = handshake(cert, client)
    f = facts.lookup(CLIENT, SERVER)
    assert f.role_of(CLIENT) == "client" and f.role_of(SERVER) == "server"
    # OpenSSL 3.5+ (Debian 13's) offers and takes the hybrid group by default
    group = "X25519MLKEM768" if ssl.OPENSSL_VERSION_INFO >= (3, 5) else "x25519"
    assert f.fields() == {"tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "group": group,
                          "sni": "facts.test", "alpn": None, "resumed": False, "peer_cert_subject": None,
                          "peer_cert_issuer": None, "peer_key_type": None, "peer_key_bits": None}
    assert f.alpn_offered == ["h2", "http/1.1"]
    assert 0x1302 in f.offered_suites and 0x0304 in f.offered_versions and 0x001D in f.offered_groups
    assert {0, 10, 13, 16, 43, 51} <= set(f.offered_extensions) and 0x0804 in f.signature_algorithms
    assert len(done) == 2  # both directions read: the kernel stops copying them


def test_tls12_chacha20_secp384r1_certificate_alpn(cert):
    def client(ctx):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305")
        ctx.set_alpn_protocols(["http/1.1"])

    def server(ctx):
        ctx.set_ecdh_curve("secp384r1")
        ctx.set_alpn_protocols(["http/1.1"])

    facts, _, _ = handshake(cert, client, server, mss=1448)  # the certificate spans segments
    assert facts.lookup(SERVER, CLIENT).fields() == {
        "tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "group": "secp384r1",
        "sni": "facts.test", "alpn": "http/1.1", "resumed": False, "peer_cert_subject": "CN=facts.test",
        "peer_cert_issuer": "CN=facts.test", "peer_key_type": "RSA", "peer_key_bits": 2048}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed(cert, version):
    def client(ctx):
        ctx.maximum_version = version

    ctxs = contexts(cert, client)
    facts, first, _ = handshake(cert, ctxs=ctxs)
    assert facts.lookup(CLIENT, SERVER).resumed is False
    facts, second, _ = handshake(cert, session=first.session, ctxs=ctxs)
    assert second.session_reused
    f = facts.lookup(CLIENT, SERVER).fields()
    assert f["resumed"] is True and f["tls_version"] == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    assert f["peer_cert_subject"] is None  # an abbreviated handshake sends no certificate


def test_hello_retry_request(cert):
    def server(ctx):
        ctx.set_ecdh_curve("secp384r1")  # the client's key share is x25519: the server asks again

    facts, _, _ = handshake(cert, None, server)
    f = facts.lookup(CLIENT, SERVER)
    assert f.hello_retry and f.fields()["group"] == "secp384r1" and f.fields()["tls_version"] == "TLSv1.3"


def test_garbage_is_not_facts():
    facts = HelloFacts()
    facts.add(Segment(0, True, CLIENT, SERVER, 1, 9, b"\x16\x03\x01\x00\x04\x01\x00\x00\xff", b""))
    assert facts.lookup(CLIENT, SERVER) is None


def test_text_line_shows_the_facts():
    from crypto_tracer.pipeline.events import TLS_HANDSHAKE
    from crypto_tracer.sinks.text import header_line

    ev = TLS_HANDSHAKE.build(timestamp="T", pid=7, process="curl", tid=7, library="openssl", role="client", fd=5,
                             local_addr="127.0.0.1", local_port=40000, remote_addr="127.0.0.1", remote_port=443,
                             result="success", tls_version="TLSv1.2",
                             cipher="TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", group="secp256r1", sni="localhost",
                             alpn="h2", resumed=False, peer_cert_subject="CN=localhost", peer_key_type="EC",
                             peer_key_bits=256)
    assert header_line(ev) == ("T curl pid=7 tid=7 fd=5 127.0.0.1:40000 -> 127.0.0.1:443 handshake client success "
                               "TLSv1.2 TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 secp256r1 sni=localhost alpn=h2 "
                               "full-handshake peer='CN=localhost' (EC 256) [openssl]")
    bare = TLS_HANDSHAKE.build(timestamp="T", pid=7, process="curl", tid=7, library="nss", result="success")
    assert header_line(bare) == "T curl pid=7 tid=7 fd=? ? -> ? handshake unknown-role success [nss]"


def test_agrees_with_dpkt(cert):
    """Our parser and dpkt's (a maintained one, test-only: it costs ~6 MB of RSS at run time) read the same
    hellos alike; our cipher-suite table is dpkt's IANA names."""
    dpkt = pytest.importorskip("dpkt")
    from dpkt import ssl as dssl
    from dpkt import ssl_ciphersuites

    from crypto_tracer.pipeline.hello_facts import _messages
    from crypto_tracer.pipeline.tls_names import CIPHER_SUITES

    assert CIPHER_SUITES == {c: n.name for c, n in ssl_ciphersuites.BY_CODE.items() if n.name.startswith("TLS_")}

    def client(ctx):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])

    for setup in (None, client):
        facts, _, _ = handshake(cert, setup)
        f = facts.lookup(CLIENT, SERVER)
        ch = dssl.TLSClientHello(_messages(facts.sent[CLIENT])[0][0][1])
        sh = dssl.TLSServerHello(_messages(facts.sent[SERVER])[0][0][1])
        assert f.offered_suites == [c.code for c in ch.ciphersuites if (c.code & 0x0F0F) != 0x0A0A]
        assert f.offered_extensions == [t for t, _ in ch.extensions]
        assert f.client_session_id == ch.session_id
        assert f.cipher == sh.ciphersuite.code and f.fields()["cipher"] == sh.ciphersuite.name
        assert dpkt.__version__
