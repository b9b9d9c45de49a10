"""CT_EV_TLS_PEER (tls.bpf.c nss_peer_facts: what an NSS connection's sslSocket holds) -> the alpn and
peer_cert_* fields of that connection's tls_handshake event (pipeline/tls_data.py), from real records'
bytes as the kernel lays them out (probes/tls.py's structs, checked against BTF by test_bpf_layouts)."""

import datetime
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crypto_tracer.pipeline.clock import WallClock
from crypto_tracer.pipeline.tls_data import TlsDataPipeline
from crypto_tracer.probes.common import CT_EV_TLS_HANDSHAKE, CT_EV_TLS_PEER, HEADER
from crypto_tracer.probes.tls import CT_LIB_NSS, FUNC_IDS, HANDSHAKE, PEER_ALPN_MAX, TLS_PEER_REC, decode_peer

PID, SSL = 4242, 0x5555_0000_1000


def _header(rtype: int) -> bytes:
    return HEADER.pack(1, rtype, PID, PID, 0, b"nss-client")


def peer_raw(alpn: bytes, der: bytes, cert_len: int | None = None) -> bytes:
    body = TLS_PEER_REC.after("h").pack(SSL, len(alpn), len(der) if cert_len is None else cert_len,
                                        alpn.ljust(PEER_ALPN_MAX, b"\0"))
    return _header(CT_EV_TLS_PEER) + body + der


def handshake_raw() -> bytes:
    lo = socket.inet_aton("127.0.0.1").ljust(16, b"\0")
    return _header(CT_EV_TLS_HANDSHAKE) + HANDSHAKE.pack(SSL, 7, 1, CT_LIB_NSS, FUNC_IDS["PR_Write"], 0, 1, 0,
                                                         socket.AF_INET, 40000, 443, lo, lo)


def ec_cert() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER), "CN=peer.test"


class _Stats:
    received = user_filtered = output = 0


def pipeline() -> TlsDataPipeline:
    return TlsDataPipeline(sink=None, stats=_Stats(), clock=WallClock())


def test_peer_record_fills_its_connections_handshake():
    der, subject = ec_cert()
    pipe = pipeline()
    pipe.learn_peer(peer_raw(b"h2", der))
    ev = pipe.handshake(handshake_raw())
    assert (ev["library"], ev["alpn"], ev["peer_cert_subject"], ev["peer_cert_issuer"], ev["peer_key_type"],
            ev["peer_key_bits"]) == ("nss", "h2", subject, subject, "EC", 384)
    again = pipe.handshake(handshake_raw())  # used once: another handshake of the same pointer is another connection
    assert again["alpn"] is None and again["peer_cert_subject"] is None


def test_no_alpn_and_a_certificate_too_long_to_copy_stay_null():
    der, _ = ec_cert()
    assert decode_peer(peer_raw(b"", b"", cert_len=9000)) == (PID, SSL, None, None)
    assert decode_peer(peer_raw(b"http/1.1", der[:100], cert_len=len(der))) == (PID, SSL, b"http/1.1", None)
    pipe = pipeline()
    pipe.learn_peer(peer_raw(b"", b"", cert_len=9000))
    ev = pipe.handshake(handshake_raw())
    assert ev["alpn"] is None and ev["peer_cert_subject"] is None and ev["peer_key_type"] is None
