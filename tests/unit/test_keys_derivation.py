"""HKDF-Expand-Label and the key log lines made from raw secrets."""

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from crypto_tracer.keys import tls_keys
from crypto_tracer.keys.hkdf import handshake_traffic_secrets, hkdf_expand_label
from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.material import KeyMaterial

# RFC 8448 section 3 (simple 1-RTT handshake)
HS_SECRET = bytes.fromhex("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
HS_HASH = bytes.fromhex("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
CHTS = "b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21"
SHTS = "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38"


def test_rfc8448_handshake_traffic_secrets():
    c, s = handshake_traffic_secrets(HS_SECRET, HS_HASH, "sha256")
    assert (c.hex(), s.hex()) == (CHTS, SHTS)


def test_hkdf_expand_label_matches_cryptography_for_sha384():
    secret, context = bytes(range(48)), bytes(range(48, 96))
    label = b"tls13 c hs traffic"
    info = (48).to_bytes(2, "big") + bytes([len(label)]) + label + bytes([len(context)]) + context
    want = HKDFExpand(hashes.SHA384(), 48, info).derive(secret)
    assert hkdf_expand_label(secret, "c hs traffic", context, 48, "sha384") == want


def _material(**kw):
    base = dict(version=0x0304, cipher_id=0x03001301, client_random=b"\x01" * 32, master_key=bytes(48),
                hs_a=HS_SECRET + bytes(32), hs_b=HS_HASH + bytes(32), client_app=b"\x02" * 64,
                server_app=b"\x03" * 64, exporter=b"\x04" * 64)
    base.update(kw)
    return KeyMaterial(**base)


def test_tls13_lines_have_the_right_labels_and_lengths():
    lines = _material().lines()
    assert [label for label, _, _ in lines] == ["CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                                                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0",
                                                "EXPORTER_SECRET"]
    assert lines[0][2] == CHTS and lines[1][2] == SHTS
    assert lines[2][2] == "02" * 32 and all(cr == "01" * 32 for _, cr, _ in lines)
    # TLS_AES_256_GCM_SHA384: 48-byte secrets
    assert len(_material(cipher_id=0x03001302).lines()[2][2]) == 96


def test_incomplete_sessions_give_no_lines():
    assert _material(server_app=bytes(64)).lines() == []
    assert _material(client_random=bytes(32)).lines() == []
    assert _material(version=0x0303, master_key=bytes(48)).lines() == []


def test_tls12_line():
    lines = _material(version=0x0303, cipher_id=0x0300C02B, master_key=b"\x05" * 48).lines()
    assert lines == [("CLIENT_RANDOM", "01" * 32, "05" * 48)]


def test_record_decoding_round_trip():
    header = struct.pack("<QIIII16s", 123, tls_keys.CT_EV_TLS_KEYS, 42, 43, 0, b"curl")
    body = struct.pack("<QIiII32s48s64s64s64s64s64s", 0xdead, 1, 0x0304, 0x03001301, 0, b"\x01" * 32, bytes(48),
                       HS_SECRET + bytes(32), HS_HASH + bytes(32), b"\x02" * 64, b"\x03" * 64, b"\x04" * 64)
    assert len(header + body) == tls_keys.RECORD_SIZE
    rec = tls_keys.decode(header + body)
    assert (rec.pid, rec.comm, rec.ssl, rec.lib_kind) == (42, "curl", 0xdead, 1)
    assert rec.material.lines() == _material().lines()


def test_layout_value_packs_every_offset():
    lay = Layout(version="3.0.19", client_random=(-1, 352), tls_version=0, session=2328, master_key=80, cipher=760,
                 cipher_id=24, hs_a=1412, hs_b=1796, client_app=1860, server_app=1924, exporter=1988)
    assert struct.unpack("<I16i", tls_keys.layout_value(lay)) == (1, -1, 352, 0, 2328, 80, 760, 24, 1412, 1796,
                                                                 1860, 1924, 1988, -1, 0, 1, 0)
    assert tls_keys.layout_value(None) == bytes(68)
    assert Layout.from_json(lay.to_json()) == lay
