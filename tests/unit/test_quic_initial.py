"""QUIC Initial packets (pipeline/quic_initial.py): RFC 9001 appendix A's sample packets decrypted
with keys derived from the client's DCID alone, and hello_facts' facts from them; a ClientHello
over two Initial packets (out of order), QUIC v2 (RFC 9369), a HelloRetryRequest, and packets
that must not be read."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_tracer.pipeline import hello_facts as hf
from crypto_tracer.pipeline import quic_initial as qi
from crypto_tracer.probes.tls_hello import Segment

# RFC 9001 appendix A
DCID = bytes.fromhex("8394c8f03e515708")
CLIENT_SECRET = "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"
CLIENT_KEYS = ("1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2")
SERVER_SECRET = "3c199828fd139efd216c155ad844cc81fb82fa8d7446fa7d78be803acdda951b"
SERVER_KEYS = ("cf3a5331653c364c88f0f379b6067e37", "0ac1493ca1905853b0bba03e", "c206b8d9b9f0f37644430b490eeaa314")
# A.2: the client's CRYPTO frame (a ClientHello: SNI example.com, ALPN "alpn", x25519), then PADDING
CLIENT_PAYLOAD = bytes.fromhex(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868"
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578"
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005"
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba"
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400"
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100"
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000"
    "75300901100f088394c8f03e51570806048000ffff") + bytes(917)
CLIENT_PACKET = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934")
# A.3: the server's ACK and CRYPTO frames (a ServerHello: TLS_AES_128_GCM_SHA256, x25519)
SERVER_PAYLOAD = bytes.fromhex(
    "02000000000600405a020000560303eefce7f7b37ba1d1632e96677825ddf739"
    "88cfc79825df566dc5430b9a045a1200130100002e00330024001d00209d3c94"
    "0d89690b84d08a60993c144eca684d1081287c834d5311bcf32bb9da1a002b00"
    "020304")
SERVER_PACKET = bytes.fromhex(
    "cf000000010008f067a5502a4262b5004075c0d95a482cd0991cd25b0aac406a"
    "5816b6394100f37a1c69797554780bb38cc5a99f5ede4cf73c3ec2493a1839b3"
    "dbcba3f6ea46c5b7684df3548e7ddeb9c3bf9c73cc3f3bded74b562bfb19fb84"
    "022f8ef4cdd93795d77d06edbb7aaf2f58891850abbdca3d20398c276456cbc4"
    "2158407dd074ee")
CLIENT, SERVER = ("10.0.0.1", 50000), ("10.0.0.2", 443)


def test_rfc9001_keys():
    assert qi.initial_secrets(DCID) == (bytes.fromhex(CLIENT_SECRET), bytes.fromhex(SERVER_SECRET))
    client, server = qi.initial_keys(DCID)
    assert (client.key.hex(), client.iv.hex(), client.hp.hex()) == CLIENT_KEYS
    assert (server.key.hex(), server.iv.hex(), server.hp.hex()) == SERVER_KEYS


def test_rfc9001_packets_decrypt():
    assert len(CLIENT_PACKET) == 1200
    (pkt,) = qi.packets(CLIENT_PACKET)
    assert (pkt.version, pkt.initial, pkt.dcid, pkt.scid, pkt.pn_offset) == (1, True, DCID, b"", 18)
    client, server = qi.initial_keys(DCID)
    assert qi.decrypt(pkt, client) == (2, CLIENT_PAYLOAD)
    with pytest.raises(qi.QuicError):  # the other direction's keys do not open it
        qi.decrypt(pkt, server)
    (spkt,) = qi.packets(SERVER_PACKET)
    assert (spkt.dcid, spkt.scid) == (b"", bytes.fromhex("f067a5502a4262b5"))
    assert qi.decrypt(spkt, server) == (1, SERVER_PAYLOAD)
    frames = qi.crypto_frames(SERVER_PAYLOAD)  # an ACK, then the ServerHello
    assert frames == [(0, SERVER_PAYLOAD[9:])] and frames[0][1][0] == hf.HS_SERVER_HELLO
    assert qi.crypto_frames(CLIENT_PAYLOAD) == [(0, CLIENT_PAYLOAD[4:4 + 0xF1])]


def seg(src, dst, datagram, ts=1):
    return Segment(ts, True, src, dst, 0, len(datagram), datagram, b"", udp=True)


def test_rfc9001_handshake_facts():
    done = []
    facts = hf.HelloFacts(completed=done.append)
    facts.add(seg(SERVER, CLIENT, SERVER_PACKET))  # a server Initial before its client's: unreadable
    assert facts.conns == {} and facts.quic.errors == 1
    facts.add(seg(CLIENT, SERVER, CLIENT_PACKET))
    f = facts.lookup(CLIENT, SERVER)
    assert (f.transport, f.sni, f.alpn_offered, f.offered_suites, f.offered_groups, f.offered_versions) == \
        ("quic", "example.com", ["alpn"], [0x1301, 0x1302], [0x1D, 0x17, 0x18], [0x0304])
    assert not done
    facts.add(seg(SERVER, CLIENT, SERVER_PACKET))
    assert done == [f] and f.role_of(CLIENT) == "client"
    assert f.fields() == {"tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "x25519",
                          "sni": "example.com", "alpn": None, "resumed": False, "peer_cert_subject": None,
                          "peer_cert_issuer": None, "peer_key_type": None, "peer_key_bits": None}
    # JA4 "q": 2 ciphers, 11 extensions (0, 0xff01, 10, 16, 5, 51, 43, 13, 45, 28, 57), ALPN "alpn" -> "an"
    assert hf.ja4(f).startswith("q13d0211an_")
    facts.add(seg(SERVER, CLIENT, SERVER_PACKET))  # a retransmission completes nothing twice
    assert done == [f]


# --- packets built here (the protection of RFC 9001 section 5, the other way round) -----------

def _varint(v: int) -> bytes:
    for n, tag in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if v < 1 << (8 * n - 2):
            b = v.to_bytes(n, "big")
            return bytes([b[0] | tag]) + b[1:]
    raise ValueError(v)


def protect(keys, version, dcid, scid, pn, frames: bytes, pad_to: int = 0, token: bytes = b"") -> bytes:
    itype = {qi.V1: 0, qi.V2: 1}[version]  # the Initial type bits
    payload = frames + bytes(max(0, pad_to - len(frames)))
    first = 0xC0 | (itype << 4) | 0x01  # 2-byte packet number
    length = 2 + len(payload) + 16
    header = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid \
        + _varint(len(token)) + token + _varint(length) + pn.to_bytes(2, "big")
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big")))
    sealed = AESGCM(keys.key).encrypt(nonce, payload, header)
    pn_off = len(header) - 2
    sample = sealed[2:18]
    enc = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    out[pn_off] ^= mask[1]
    out[pn_off + 1] ^= mask[2]
    return bytes(out)


def crypto(off: int, data: bytes) -> bytes:
    return b"\x06" + _varint(off) + _varint(len(data)) + data


def client_hello(groups=(0x11EC, 0x1D), key_share_len=1216 + 32, sni=b"pq.example") -> bytes:
    """A TLS 1.3 ClientHello with a large (ML-KEM hybrid sized) key share: over 1200 bytes."""
    def ext(code, body):
        return code.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    sni_ext = ext(0, (len(sni) + 3).to_bytes(2, "big") + b"\x00" + len(sni).to_bytes(2, "big") + sni)
    grp = b"".join(g.to_bytes(2, "big") for g in groups)
    share = groups[0].to_bytes(2, "big") + key_share_len.to_bytes(2, "big") + os.urandom(key_share_len)
    exts = sni_ext + ext(10, len(grp).to_bytes(2, "big") + grp) + ext(16, b"\x00\x03\x02h3") \
        + ext(43, b"\x02\x03\x04") + ext(13, b"\x00\x04\x08\x04\x04\x03") \
        + ext(51, len(share).to_bytes(2, "big") + share)
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x06\x13\x01\x13\x02\x13\x03" + b"\x01\x00" \
        + len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def server_hello(group=0x11EC, cipher=0x1302, hrr=False) -> bytes:
    def ext(code, body):
        return code.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    share = group.to_bytes(2, "big") if hrr else group.to_bytes(2, "big") + (1120).to_bytes(2, "big") + bytes(1120)
    random = hf.HRR_RANDOM if hrr else os.urandom(32)
    exts = ext(43, b"\x03\x04") + ext(51, share)
    body = b"\x03\x03" + random + b"\x00" + cipher.to_bytes(2, "big") + b"\x00" + len(exts).to_bytes(2, "big") + exts
    return b"\x02" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("version", [qi.V1, qi.V2], ids=["v1", "v2"])
def test_client_hello_over_two_packets_out_of_order(version):
    dcid, cscid, sscid = os.urandom(8), os.urandom(8), os.urandom(8)
    ckeys, skeys = qi.initial_keys(dcid, version)
    ch = client_hello()
    assert len(ch) > 1200
    cut = 1000
    first = protect(ckeys, version, dcid, cscid, 0, crypto(0, ch[:cut]), pad_to=1150)
    # the second Initial goes to the server's connection id; its keys are still the original DCID's
    second = protect(ckeys, version, sscid, cscid, 1, b"\x01" + crypto(cut, ch[cut:]), pad_to=1150)
    done = []
    facts = hf.HelloFacts(completed=done.append)
    facts.add(seg(CLIENT, SERVER, second))  # before the first: its keys are not known yet
    assert facts.lookup(CLIENT, SERVER) is None
    facts.add(seg(CLIENT, SERVER, first))
    facts.add(seg(CLIENT, SERVER, second))  # (retransmitted)
    f = facts.lookup(CLIENT, SERVER)
    assert (f.transport, f.sni, f.offered_groups, f.alpn_offered) == ("quic", "pq.example", [0x11EC, 0x1D], ["h3"])
    # the server's ServerHello split over two CRYPTO frames in one packet, coalesced with a Handshake packet
    sh = server_hello()
    spkt = protect(skeys, version, cscid, sscid, 0, b"\x02\x00\x00\x00\x00" + crypto(600, sh[600:]) + crypto(0, sh[:600]))
    hs_type = 2 if version == qi.V1 else 3
    handshake_pkt = bytes([0xC0 | (hs_type << 4)]) + version.to_bytes(4, "big") + b"\x08" + cscid + b"\x08" + sscid \
        + _varint(40) + os.urandom(40)
    facts.add(seg(SERVER, CLIENT, spkt + handshake_pkt))
    assert done == [f]
    assert (f.fields()["tls_version"], f.fields()["cipher"], f.fields()["group"]) == \
        ("TLSv1.3", "TLS_AES_256_GCM_SHA384", "X25519MLKEM768")
    assert hf.flags(f)["not_quantum_safe_key_exchange"] is False
    assert hf.ja4(f).startswith("q13d0306h3_")


def test_hello_retry_request_then_server_hello():
    dcid, cscid, sscid = os.urandom(8), os.urandom(4), os.urandom(4)
    ckeys, skeys = qi.initial_keys(dcid)
    done = []
    facts = hf.HelloFacts(completed=done.append)
    facts.add(seg(CLIENT, SERVER, protect(ckeys, qi.V1, dcid, cscid, 0, crypto(0, client_hello()[:600]))))
    assert facts.lookup(CLIENT, SERVER) is None  # not complete yet
    ch = client_hello(groups=(0x1D, 0x17), key_share_len=32)
    facts.add(seg(CLIENT, SERVER, protect(ckeys, qi.V1, dcid, cscid, 1, crypto(0, ch), pad_to=1200)))
    hrr = server_hello(group=0x17, cipher=0x1301, hrr=True)
    facts.add(seg(SERVER, CLIENT, protect(skeys, qi.V1, cscid, sscid, 0, crypto(0, hrr))))
    assert not done
    sh = server_hello(group=0x17, cipher=0x1301)
    facts.add(seg(SERVER, CLIENT, protect(skeys, qi.V1, cscid, sscid, 1, crypto(len(hrr), sh))))
    f = facts.lookup(SERVER, CLIENT)
    assert done == [f] and f.hello_retry and (f.cipher, f.group, f.version) == (0x1301, 0x17, 0x0304)


def test_not_read():
    facts = hf.HelloFacts()
    dcid = os.urandom(8)
    ckeys, _ = qi.initial_keys(dcid)
    good = protect(ckeys, qi.V1, dcid, b"", 0, crypto(0, client_hello()[:500]), pad_to=1200)
    bad = bytearray(good)
    bad[-1] ^= 1  # the AEAD tag fails: nothing is read
    facts.add(seg(CLIENT, SERVER, bytes(bad)))
    facts.add(seg(CLIENT, SERVER, good[:700]))  # cut short (beyond the copied bytes): not a packet
    facts.add(seg(CLIENT, SERVER, b"\x40" + os.urandom(1199)))  # a short-header packet
    facts.add(seg(CLIENT, SERVER, b"\xc0\xff\x00\x00\x1d" + os.urandom(1195)))  # a draft version
    assert facts.conns == {} and facts.quic.errors == 1
    assert list(qi.packets(good[:700])) == []


def test_ja4_equals_ja4plus():
    """The JA4 of RFC 9001's client Initial, as the ja4plus package (the test extra; it decrypts the
    Initial itself) computes it from the datagram in a scapy packet."""
    from ja4plus.fingerprinters.ja4 import JA4Fingerprinter
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    facts = hf.HelloFacts()
    facts.add(seg(CLIENT, SERVER, CLIENT_PACKET))
    frame = Ether() / IP(src=CLIENT[0], dst=SERVER[0]) / UDP(sport=CLIENT[1], dport=SERVER[1]) / CLIENT_PACKET
    reference = JA4Fingerprinter().process_packet(Ether(bytes(frame)))
    assert reference == "q13d0211an_62ed6f6ca7ad_4d634acda6c0"
    assert hf.ja4(facts.lookup(CLIENT, SERVER)) == reference


def test_server_answers_v1_client_in_v2():
    """Compatible version negotiation (RFC 9368): a v1 ClientHello, the server's Initial in v2, keys of
    both versions from the same original DCID."""
    dcid, cscid, sscid = os.urandom(8), os.urandom(8), os.urandom(8)
    ckeys, _ = qi.initial_keys(dcid, qi.V1)
    _, skeys2 = qi.initial_keys(dcid, qi.V2)
    done = []
    facts = hf.HelloFacts(completed=done.append)
    facts.add(seg(CLIENT, SERVER, protect(ckeys, qi.V1, dcid, cscid, 0, crypto(0, client_hello(key_share_len=32)),
                                          pad_to=1200)))
    facts.add(seg(SERVER, CLIENT, protect(skeys2, qi.V2, cscid, sscid, 0, crypto(0, server_hello(group=0x1D)))))
    (f,) = done
    assert (f.version, f.cipher, f.group, f.transport) == (0x0304, 0x1302, 0x1D, "quic")


def test_after_retry_the_new_dcid_keys():
    """After a Retry (not copied: only Initials are) the client's Initial goes to the Retry's connection id
    with a token, under that id's keys, and so does the server's: the connection starts over."""
    dcid, retry_scid, cscid, sscid = os.urandom(8), os.urandom(8), os.urandom(8), os.urandom(8)
    done = []
    facts = hf.HelloFacts(completed=done.append)
    ch = client_hello(key_share_len=32)
    facts.add(seg(CLIENT, SERVER, protect(qi.initial_keys(dcid)[0], qi.V1, dcid, cscid, 0, crypto(0, ch), pad_to=1200)))
    ckeys, skeys = qi.initial_keys(retry_scid)
    facts.add(seg(CLIENT, SERVER, protect(ckeys, qi.V1, retry_scid, cscid, 1, crypto(0, ch), pad_to=1200,
                                          token=os.urandom(40))))
    facts.add(seg(SERVER, CLIENT, protect(skeys, qi.V1, cscid, sscid, 0, crypto(0, server_hello(group=0x1D)))))
    (f,) = done
    assert (f.sni, f.group, f.cipher) == ("pq.example", 0x1D, 0x1302) and facts.quic.errors == 0


def test_quic_event_in_text_and_otlp():
    """The transport of a handshake event built from QUIC facts, in the text line and as OTLP's
    network.transport."""
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.pipeline.tls_handshakes import handshake_event
    from crypto_tracer.sinks.otlp import attributes
    from crypto_tracer.sinks.text import header_line

    facts = hf.HelloFacts()
    facts.add(seg(CLIENT, SERVER, CLIENT_PACKET))
    facts.add(seg(SERVER, CLIENT, SERVER_PACKET))
    ev = handshake_event(facts.lookup(CLIENT, SERVER), None, WallClock())
    assert (ev["transport"], ev["pid"], ev["role"], ev["local_addr"], ev["local_port"]) == \
        ("quic", None, None, *CLIENT)
    ev["timestamp"] = "T"
    assert header_line(ev).endswith(" 10.0.0.1:50000 -> 10.0.0.2:443 handshake unknown-role None "
                                    "TLSv1.3 TLS_AES_128_GCM_SHA256 x25519 sni=example.com quic full-handshake [None]")
    assert attributes(ev)["network.transport"] == "quic"
