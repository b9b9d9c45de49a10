"""The TLS handshakes of QUIC connections: the hellos from their Initial packets, and, where the
handshake traffic secrets are known, the rest of each side's flight from their Handshake packets
(tls_hello.bpf.c copies UDP datagrams that start with a QUIC v1 or v2 Initial packet, and with a
Handshake packet where user space reads flights).

Initial packets are protected with keys every observer can derive (RFC 9001 section 5.2; v2: RFC
9369): HKDF-Extract(version salt, the client's first Destination Connection ID) gives the initial
secret, "client in"/"server in" each direction's secret, and "quic key"/"quic iv"/"quic hp"
("quicv2 ..." in v2) the AES-128-GCM key, IV and header-protection key. The ClientHello and the
ServerHello travel in CRYPTO frames (a post-quantum ClientHello over several Initial packets);
this module removes header protection, decrypts, reassembles each direction's CRYPTO stream by
offset and hands its first handshake messages to hello_facts' parsers.

A connection is keyed by its UDP 4-tuple; the DCIDs its client's Initials were derived from are
kept, and every later Initial of the 4-tuple (the server's, the client's after it switched to the
server's connection id) is tried with their keys: the AEAD tag says which key is right, so a
wrong match is never read. A server Initial with no client Initial seen is not readable (a
connection that started before the capture). A Retry changes the client's DCID: its new Initial
decrypts under its own DCID and starts the connection over.

Handshake packets (RFC 9001 section 5.1) are protected with keys from the TLS handshake traffic
secrets (CLIENT_/SERVER_HANDSHAKE_TRAFFIC_SECRET, from the hooked library: keys/), expanded with
the negotiated suite's hash and AEAD (AES-128/256-GCM, ChaCha20-Poly1305; header protection with
AES-ECB or ChaCha20). They are kept per side (a bounded few) until their secret is there, then
decrypted; the Handshake-level CRYPTO stream, reassembled by offset, is handed over once it holds
that side's Finished (EncryptedExtensions, Certificate: tls13_flight's parsers read them). The AEAD
tag authenticates every packet: a wrong secret opens nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from crypto_tracer.keys.hkdf import hkdf_expand_label

V1, V2 = 0x00000001, 0x6B3343CF
# version -> (initial salt, label prefix)
VERSIONS = {V1: (bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"), "quic "),
            V2: (bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"), "quicv2 ")}
# long-header packet types, v1's numbering (v2 rotates them: RFC 9369 section 3.2)
INITIAL, ZERO_RTT, HANDSHAKE, RETRY = 0, 1, 2, 3
HS_FINISHED = 20
QUIC_SUITES = (0x1301, 0x1302, 0x1303, 0x1304)  # TLS_AES_128_CCM_8_SHA256 is not for QUIC (RFC 9001 5.3)
MAX_PENDING = 8  # Handshake packets kept per side while its secret is not known
MAX_PENDING_CONNS = 256  # connections with packets kept (8 MB at most)
FRAME_PADDING, FRAME_PING, FRAME_ACK, FRAME_ACK_ECN, FRAME_CRYPTO, FRAME_CLOSE = 0x00, 0x01, 0x02, 0x03, 0x06, 0x1C
MAX_CRYPTO = 16 * 1024  # CRYPTO stream offsets kept per direction (the hellos are in the first few KB)
MAX_CONNECTIONS = 4096
MAX_DCIDS = 4  # original DCIDs remembered per 4-tuple (a Retry adds one)


class QuicError(ValueError):
    """A packet that is not a well-formed Initial (or not one this connection's keys open)."""


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the QUIC variable-length integer at pos (RFC 9000 section 16)."""
    if pos >= len(data):
        raise QuicError("short varint")
    n = 1 << (data[pos] >> 6)
    if pos + n > len(data):
        raise QuicError("short varint")
    return int.from_bytes(bytes([data[pos] & 0x3F]) + data[pos + 1:pos + n], "big"), pos + n


@dataclass(frozen=True)
class Keys:
    key: bytes
    iv: bytes
    hp: bytes
    suite: int = 0x1301  # Initial packets: TLS_AES_128_GCM_SHA256's

    @classmethod
    def from_secret(cls, secret: bytes, version: int = V1, suite: int = 0x1301) -> Keys:
        """A packet protection secret's keys (RFC 9001 section 5.1) for this suite's hash and AEAD."""
        from crypto_tracer.pipeline.tls13_flight import suite_params

        if suite not in QUIC_SUITES:
            raise QuicError(f"no QUIC packet protection for suite 0x{suite:04x}")
        hash_name, key_len, _tag = suite_params(suite)
        prefix = VERSIONS[version][1]
        return cls(hkdf_expand_label(secret, prefix + "key", b"", key_len, hash_name),
                   hkdf_expand_label(secret, prefix + "iv", b"", 12, hash_name),
                   hkdf_expand_label(secret, prefix + "hp", b"", key_len, hash_name), suite)

    def mask(self, sample: bytes) -> bytes:
        """The header-protection mask of a 16-byte sample (RFC 9001 sections 5.4.3, 5.4.4)."""
        if self.suite == 0x1303:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

            # counter (first 4 bytes, little-endian) then nonce: cryptography's 16-byte ChaCha20 nonce
            enc = Cipher(algorithms.ChaCha20(self.hp, sample), mode=None).encryptor()
            return enc.update(bytes(5))
        return _aes_ecb(self.hp, sample)

    def open(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        from crypto_tracer.pipeline.tls13_flight import aead_of

        return aead_of(self.suite, self.key).decrypt(nonce, data, aad)


def initial_secrets(dcid: bytes, version: int = V1) -> tuple[bytes, bytes]:
    """(client, server) initial secrets of a connection whose client's first Initial had this DCID."""
    initial = hmac.new(VERSIONS[version][0], dcid, hashlib.sha256).digest()  # HKDF-Extract(salt, dcid)
    return (hkdf_expand_label(initial, "client in", b"", 32, "sha256"),
            hkdf_expand_label(initial, "server in", b"", 32, "sha256"))


def initial_keys(dcid: bytes, version: int = V1) -> tuple[Keys, Keys]:
    client, server = initial_secrets(dcid, version)
    return Keys.from_secret(client, version), Keys.from_secret(server, version)


@dataclass(slots=True)
class Packet:
    """One long-header packet of a datagram: where it is and what its header says."""
    version: int
    initial: bool
    ptype: int  # INITIAL, ZERO_RTT, HANDSHAKE (v1's numbering)
    dcid: bytes
    scid: bytes
    pn_offset: int  # from the packet's start
    data: bytes     # the whole packet (header .. end of its Length)


def packets(datagram: bytes) -> Iterator[Packet]:
    """The coalesced long-header packets of a datagram (a short-header packet ends it)."""
    pos = 0
    while pos + 7 <= len(datagram):
        start, first = pos, datagram[pos]
        if first & 0xC0 != 0xC0:
            return  # short header (1-RTT) or not QUIC: it runs to the datagram's end
        version = int.from_bytes(datagram[pos + 1:pos + 5], "big")
        if version not in VERSIONS:
            return
        pos += 5
        dlen = datagram[pos]
        dcid = datagram[pos + 1:pos + 1 + dlen]
        pos += 1 + dlen
        if pos >= len(datagram) or dlen > 20:
            return
        slen = datagram[pos]
        scid = datagram[pos + 1:pos + 1 + slen]
        pos += 1 + slen
        ptype = (first >> 4) & 3
        if version == V2:
            ptype = (ptype + 3) & 3  # v2: Initial 1, 0-RTT 2, Handshake 3, Retry 0
        initial = ptype == INITIAL
        if ptype == RETRY:  # no Length, runs to the end
            return
        try:
            if initial:
                token_len, pos = varint(datagram, pos)
                pos += token_len
            length, pos = varint(datagram, pos)
        except QuicError:
            return
        if pos + length > len(datagram):
            return  # truncated (beyond what was copied)
        yield Packet(version, initial, ptype, dcid, scid, pos - start, datagram[start:pos + length])
        pos += length


def _aes_ecb(key: bytes, block: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def decrypt(pkt: Packet, keys: Keys, largest_pn: int = -1) -> tuple[int, bytes]:
    """(packet number, plaintext payload); QuicError when the keys do not open it (tag mismatch)."""
    from cryptography.exceptions import InvalidTag

    data, pn_off = pkt.data, pkt.pn_offset
    sample = data[pn_off + 4:pn_off + 20]
    if len(sample) < 16:
        raise QuicError("packet too short for a header-protection sample")
    mask = keys.mask(sample)
    first = data[0] ^ (mask[0] & 0x0F)  # long header: the low 4 bits are protected
    pn_len = (first & 3) + 1
    pn_bytes = bytes(b ^ m for b, m in zip(data[pn_off:pn_off + pn_len], mask[1:1 + pn_len]))
    truncated = int.from_bytes(pn_bytes, "big")
    pn = _decode_pn(largest_pn, truncated, pn_len * 8)
    header = bytes([first]) + data[1:pn_off] + pn_bytes
    nonce = bytes(a ^ b for a, b in zip(keys.iv, pn.to_bytes(12, "big")))
    try:
        return pn, keys.open(nonce, data[pn_off + pn_len:], header)
    except InvalidTag:
        raise QuicError("not this connection's keys") from None


def _decode_pn(largest: int, truncated: int, bits: int) -> int:
    """RFC 9000 appendix A.3."""
    expected, win = largest + 1, 1 << bits
    hwin, mask = win // 2, win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def crypto_frames(plain: bytes) -> list[tuple[int, bytes]]:
    """The (offset, data) of the CRYPTO frames of an Initial packet's payload. The frames an Initial
    may carry (PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE) are read; anything else ends it."""
    out, pos = [], 0
    while pos < len(plain):
        ftype, pos = varint(plain, pos)
        if ftype in (FRAME_PADDING, FRAME_PING):
            continue
        if ftype == FRAME_CRYPTO:
            off, pos = varint(plain, pos)
            n, pos = varint(plain, pos)
            if pos + n > len(plain):
                raise QuicError("short CRYPTO frame")
            out.append((off, plain[pos:pos + n]))
            pos += n
        elif ftype in (FRAME_ACK, FRAME_ACK_ECN):
            _largest, pos = varint(plain, pos)
            _delay, pos = varint(plain, pos)
            count, pos = varint(plain, pos)
            _first, pos = varint(plain, pos)
            for _ in range(2 * count + (3 if ftype == FRAME_ACK_ECN else 0)):
                _, pos = varint(plain, pos)
        elif ftype == FRAME_CLOSE:
            _code, pos = varint(plain, pos)
            _frame, pos = varint(plain, pos)
            n, pos = varint(plain, pos)
            pos += n
        else:
            break
    return out


@dataclass
class _Crypto:
    """One direction's CRYPTO stream: fragments by offset, and how much of it is parsed."""
    frags: dict[int, bytes] = field(default_factory=dict)
    used: int = 0
    done: bool = False
    size: int = 0  # bytes held in frags (bounded: overlapping fragments cannot pile up)
    limit: int = MAX_CRYPTO  # offsets kept

    def add(self, off: int, data: bytes) -> None:
        old = len(self.frags.get(off, b""))
        if off < self.limit and len(data) > old and self.size + len(data) - old <= 2 * self.limit:
            self.frags[off] = data
            self.size += len(data) - old

    def messages(self) -> Iterator[tuple[int, bytes]]:
        """The complete handshake messages after those already taken."""
        buf = bytearray()
        for off in sorted(self.frags):
            if off > len(buf):
                break
            buf += self.frags[off][len(buf) - off:]
        while self.used + 4 <= len(buf):
            n = int.from_bytes(buf[self.used + 1:self.used + 4], "big")
            if self.used + 4 + n > len(buf):
                return
            msg = (buf[self.used], bytes(buf[self.used + 4:self.used + 4 + n]))
            self.used += 4 + n
            yield msg


@dataclass
class _Flight:
    """One side's Handshake packets: kept until its secret is known, then its CRYPTO stream."""
    pending: list[Packet] = field(default_factory=list)
    keys: dict[int, Keys] = field(default_factory=dict)  # by version
    largest: int = -1
    stream: _Crypto = field(default_factory=lambda: _Crypto(limit=_max_flight()))
    msgs: list[tuple[int, bytes]] = field(default_factory=list)
    done: bool = False


def _max_flight() -> int:
    from crypto_tracer.pipeline.tls13_flight import MAX_FLIGHT

    return MAX_FLIGHT


@dataclass
class _Conn:
    client: tuple
    server: tuple
    dcids: list[bytes]  # original DCIDs, newest first
    keys: dict[tuple, tuple[Keys, Keys]] = field(default_factory=dict)  # by (DCID, version)
    largest: list[int] = field(default_factory=lambda: [-1, -1])  # client, server
    streams: tuple[_Crypto, _Crypto] = field(default_factory=lambda: (_Crypto(), _Crypto()))
    hs: tuple[_Flight, _Flight] = field(default_factory=lambda: (_Flight(), _Flight()))  # Handshake level

    def keys_of(self, dcid: bytes, version: int) -> tuple[Keys, Keys]:
        """(client, server) keys; a server may answer a v1 Initial in v2 (compatible version
        negotiation, RFC 9368): v2's keys from the same DCID."""
        if (dcid, version) not in self.keys:
            self.keys[(dcid, version)] = initial_keys(dcid, version)
        return self.keys[(dcid, version)]


class QuicInitials:
    """Datagrams -> on_message(client, server, ts_ns, from_client, msg_type, body) for each
    handshake message at the start of a direction's CRYPTO stream, until take(...) says it has
    what it needs from that direction (it returns True).

    With on_flight and secret: secret(client, server, from_client) gives (handshake traffic secret,
    suite) of that side once known (None before), and on_flight(client, server, ts_ns, from_client,
    messages) gets each side's Handshake-level messages through its Finished; retry(client, server)
    after a secret arrived opens the packets kept for it."""

    def __init__(self, on_message: Callable[..., bool], on_flight: Callable[..., None] | None = None,
                 secret: Callable[[tuple, tuple, bool], tuple[bytes, int] | None] | None = None):
        self.on_message = on_message
        self.on_flight, self.secret = on_flight, secret
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self.pending: OrderedDict[tuple, _Conn] = OrderedDict()  # connections with Handshake packets kept
        self.errors = 0

    @staticmethod
    def key(a: tuple, b: tuple) -> tuple:
        return (a, b) if a <= b else (b, a)

    def add(self, ts_ns: int, src: tuple, dst: tuple, datagram: bytes) -> None:
        for pkt in packets(datagram):
            try:
                if pkt.initial:
                    self._packet(ts_ns, src, dst, pkt)
                elif pkt.ptype == HANDSHAKE and self.on_flight is not None:
                    self._handshake(ts_ns, src, dst, pkt)
            except QuicError:
                self.errors += 1

    def _handshake(self, ts_ns: int, src: tuple, dst: tuple, pkt: Packet) -> None:
        """A Handshake packet of a connection whose Initials were seen: read now, or kept until its
        side's secret is known (MAX_PENDING; beyond that the flight stays unread)."""
        conn = self.conns.get(self.key(src, dst))
        if conn is None:
            return  # no ClientHello seen: nothing to join it to
        side = 0 if src == conn.client else 1
        flight = conn.hs[side]
        if flight.done:
            return
        keys = self._hs_keys(conn, side, pkt.version)
        if keys is None:
            if len(flight.pending) < MAX_PENDING:
                flight.pending.append(pkt)
                k = self.key(src, dst)
                self.pending[k] = conn
                self.pending.move_to_end(k)
                while len(self.pending) > MAX_PENDING_CONNS:
                    for f in self.pending.popitem(last=False)[1].hs:
                        f.pending.clear()
            return
        self._open_handshake(ts_ns, conn, side, pkt, keys)

    def _hs_keys(self, conn: _Conn, side: int, version: int) -> Keys | None:
        flight = conn.hs[side]
        if version not in flight.keys:
            got = self.secret(conn.client, conn.server, side == 0) if self.secret is not None else None
            if got is None:
                return None
            flight.keys[version] = Keys.from_secret(got[0], version, got[1])
        return flight.keys[version]

    def _open_handshake(self, ts_ns: int, conn: _Conn, side: int, pkt: Packet, keys: Keys) -> None:
        flight = conn.hs[side]
        pn, plain = decrypt(pkt, keys, flight.largest)
        flight.largest = max(flight.largest, pn)
        for off, data in crypto_frames(plain):
            flight.stream.add(off, data)
        for mtype, body in flight.stream.messages():
            flight.msgs.append((mtype, body))
            if mtype == HS_FINISHED:
                flight.done = True
                msgs, flight.msgs, flight.pending, flight.stream = flight.msgs, [], [], _Crypto(limit=0)
                self.on_flight(conn.client, conn.server, ts_ns, side == 0, msgs)
                return

    def retry(self, ts_ns: int, client: tuple, server: tuple) -> None:
        """A secret of this connection arrived: open the Handshake packets kept for it."""
        conn = self.conns.get(self.key(client, server))
        if conn is None or conn.client != client:
            return
        for side in (0, 1):
            flight = conn.hs[side]
            while flight.pending and not flight.done:
                pkt = flight.pending[0]
                keys = self._hs_keys(conn, side, pkt.version)
                if keys is None:
                    break
                flight.pending.pop(0)
                try:
                    self._open_handshake(ts_ns, conn, side, pkt, keys)
                except QuicError:
                    self.errors += 1

    def _packet(self, ts_ns: int, src: tuple, dst: tuple, pkt: Packet) -> None:
        k = self.key(src, dst)
        conn = self.conns.get(k)
        opened = None
        if conn is not None:
            side = 0 if src == conn.client else 1
            for dcid in conn.dcids:
                try:
                    opened = decrypt(pkt, conn.keys_of(dcid, pkt.version)[side], conn.largest[side])
                    break
                except QuicError:
                    continue
        if opened is None:
            # a client's Initial under keys of its own DCID: a new connection (or one after a Retry)
            client_keys = initial_keys(pkt.dcid, pkt.version)
            opened = decrypt(pkt, client_keys[0])
            side = 0
            conn = _Conn(src, dst, [pkt.dcid], {(pkt.dcid, pkt.version): client_keys})
            if (old := self.conns.get(k)) is not None and old.client == src:
                conn.dcids += [d for d in old.dcids if d != pkt.dcid][:MAX_DCIDS - 1]
            self.conns[k] = conn
            if len(self.conns) > MAX_CONNECTIONS:
                self.conns.popitem(last=False)
        self.conns.move_to_end(k)
        pn, plain = opened
        conn.largest[side] = max(conn.largest[side], pn)
        stream = conn.streams[side]
        if stream.done:
            return
        for off, data in crypto_frames(plain):
            stream.add(off, data)
        for mtype, body in stream.messages():
            if self.on_message(conn.client, conn.server, ts_ns, side == 0, mtype, body):
                stream.done = True
                stream.frags.clear()
                stream.size = 0
                break
