"""JA4 of a ClientHello (pipeline/hello_facts.ja4) against an independent implementation: the
reference values below were computed by the PyPI package ja4plus 1.4.0 (generate_ja4 of
parse_tls_handshake, FoxIO's spec), from the same bytes; when ja4plus is installed (the test
extra) it is also asked directly. And the flags of `tls -m handshake`."""

import pytest

from crypto_tracer.pipeline import hello_facts as hf

# Python 3.11 ssl (OpenSSL 3) ClientHello: SNI ja4.example, ALPN h2,http/1.1; then zero padding (extension 21)
CLIENT_HELLO = bytes.fromhex("1603010200010001fc03033546750d582703df989ed8f4a766dd70bf91ba4422ac239e7398fca6c6c2cafe205736a151754513c7e8e8dd14c679fef21bc9e7d57e6ddab7fbbf890bf8dfdd600024130213031301c02cc030c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f00000010000e00000b6a61342e6578616d706c65000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000010000e000c02683208687474702f312e310016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b00050403040303002d00020101003300260024001d00201e498a5b7a761ca77a45138568e31e70a8c1db6ba1bddfc11f1df57466997b18001500d".ljust(1034, "0"))
JA4_REFERENCE = "t13d1812h2_85036bcba153_d41ae481755e"  # ja4plus 1.4.0


def with_grease(rec: bytes) -> bytes:
    """The same hello with a GREASE cipher (0x0a0a) and a GREASE extension (0x1a1a) in front: JA4 ignores both."""
    body = rec[9:]
    p = 2 + 32 + 1 + body[34]
    n = int.from_bytes(body[p:p + 2], "big")
    body = body[:p] + (n + 2).to_bytes(2, "big") + b"\x0a\x0a" + body[p + 2:]
    p += 2 + n + 2
    p += 1 + body[p]
    n = int.from_bytes(body[p:p + 2], "big")
    body = body[:p] + (n + 4).to_bytes(2, "big") + b"\x1a\x1a\x00\x00" + body[p + 2:]
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def facts_of(rec: bytes) -> hf.ConnFacts:
    msgs, _, _ = hf._messages(rec)
    facts = hf.ConnFacts(("127.0.0.1", 1), ("127.0.0.1", 2))
    hf.parse_client_hello(msgs[0][1], facts)
    return facts


@pytest.mark.parametrize("rec", [CLIENT_HELLO, with_grease(CLIENT_HELLO)], ids=["plain", "grease"])
def test_ja4_reference(rec):
    assert hf.ja4(facts_of(rec)) == JA4_REFERENCE
    try:
        from ja4plus.fingerprinters.ja4 import generate_ja4
        from ja4plus.utils.tls_utils import parse_tls_handshake
    except ImportError:
        return
    assert generate_ja4(parse_tls_handshake(rec)) == JA4_REFERENCE


def test_ja4_fields():
    f = facts_of(CLIENT_HELLO)
    assert (f.sni, f.alpn_offered) == ("ja4.example", ["h2", "http/1.1"])
    f.offered_extensions = [e for e in f.offered_extensions if e not in (0, 16)]
    f.alpn_offered = None
    assert hf.ja4(f).startswith("t13i1810" + "00_85036bcba153_")


def conn(version, cipher, group, resumed=False):
    f = hf.ConnFacts(("127.0.0.1", 1), ("127.0.0.1", 2))
    f.version, f.cipher, f.group, f.resumed = version, cipher, group, resumed
    return f


def test_flags():
    assert hf.flags(conn(0x0304, 0x1301, 0x11EC)) == {"legacy_version": False, "no_forward_secrecy": False,
                                                       "weak_cipher": False, "not_quantum_safe_key_exchange": False}
    assert hf.flags(conn(0x0304, 0x1302, 0x001D)) == {"legacy_version": False, "no_forward_secrecy": False,
                                                       "weak_cipher": False, "not_quantum_safe_key_exchange": True}
    # TLS_RSA_WITH_AES_128_CBC_SHA in TLS 1.0: static RSA, CBC with SHA-1
    assert hf.flags(conn(0x0301, 0x002F, None)) == {"legacy_version": True, "no_forward_secrecy": True,
                                                     "weak_cipher": True, "not_quantum_safe_key_exchange": True}
    # TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA
    assert hf.flags(conn(0x0303, 0xC012, 0x0017))["weak_cipher"] is True
    assert hf.flags(conn(0x0303, 0xC02F, 0x0017))["weak_cipher"] is False  # ECDHE-RSA-AES128-GCM-SHA256
    assert hf.flags(conn(0x0303, 0x0005, None))["weak_cipher"] is True  # RC4-SHA
    assert hf.flags(conn(None, None, None)) == {"legacy_version": None, "no_forward_secrecy": None,
                                                 "weak_cipher": None, "not_quantum_safe_key_exchange": None}
