"""Handshake facts read from the handshake messages themselves (probes/tls_hello.py's segments):
per TCP connection, what the ClientHello offered and what the server chose.

Each direction's segments are put back in order (by TCP sequence number) until its messages are
read: the ClientHello for the client; for the server the ServerHello and, in TLS 1.2, the
Certificate, the ServerKeyExchange and ServerHelloDone (or the ChangeCipherSpec of a resumed
session). Messages are parsed here (a few fixed layouts; dpkt, which the unit tests compare
against, would cost ~6 MB of RSS); cipher-suite names are IANA's (pipeline/tls_names.py).

``Facts.lookup(local, remote)`` joins a hooked library's tls_handshake event to its connection.
TLS 1.3's ALPN and certificates are encrypted: with ``flights`` on, each direction's encrypted
flight is kept (MAX_FLIGHT bytes) until the session's handshake traffic secret arrives
(add_secret, from the hooked library) and read by pipeline/tls13_flight.py; without the secret
they stay None.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
# IANA TLS Supported Groups (the ones hosts meet)
GROUPS = {0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1", 0x001D: "x25519", 0x001E: "x448",
          0x001A: "brainpoolP256r1", 0x001B: "brainpoolP384r1", 0x001C: "brainpoolP512r1",
          0x001F: "brainpoolP256r1tls13", 0x0020: "brainpoolP384r1tls13", 0x0021: "brainpoolP512r1tls13",
          0x0100: "ffdhe2048", 0x0101: "ffdhe3072", 0x0102: "ffdhe4096", 0x0103: "ffdhe6144", 0x0104: "ffdhe8192",
          0x0200: "MLKEM512", 0x0201: "MLKEM768", 0x0202: "MLKEM1024",
          0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768", 0x11ED: "SecP384r1MLKEM1024",
          0x6399: "X25519Kyber768Draft00", 0x639A: "SecP256r1Kyber768Draft00"}
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
EXT_SNI, EXT_GROUPS, EXT_SIG_ALGS, EXT_ALPN, EXT_PSK, EXT_VERSIONS, EXT_KEY_SHARE = 0, 10, 13, 16, 41, 43, 51
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_TICKET, HS_CERTIFICATE, HS_SKE, HS_CERT_REQUEST, HS_SHD = 1, 2, 4, 11, 12, 13, 14
REC_CCS, REC_HANDSHAKE = 20, 22
MAX_STREAM = 64 * 1024  # bytes of one direction kept while waiting for its messages
MAX_CONNECTIONS = 4096  # connections remembered (a handshake event follows its hellos within a poll or two)
MAX_FLIGHTS = 256  # TLS 1.3 flights kept waiting for their secret (at most MAX_STREAM bytes each)
SECRET_LABELS = {"server": "SERVER_HANDSHAKE_TRAFFIC_SECRET", "client": "CLIENT_HANDSHAKE_TRAFFIC_SECRET"}


def _grease(code: int) -> bool:
    return (code & 0x0F0F) == 0x0A0A and (code >> 8) == (code & 0xFF)


def group_name(code: int | None) -> str | None:
    return None if code is None else GROUPS.get(code, f"0x{code:04x}")


def cipher_name(code: int | None) -> str | None:
    if code is None:
        return None
    from crypto_tracer.pipeline.tls_names import CIPHER_SUITES

    return CIPHER_SUITES.get(code, f"0x{code:04x}")


@dataclass
class ConnFacts:
    """One connection's facts; None: not seen (or not visible in packets)."""
    client: tuple[str, int]
    server: tuple[str, int]
    ts_ns: int = 0
    # the ClientHello's offer
    sni: str | None = None
    alpn_offered: list[str] | None = None
    offered_versions: list[int] | None = None
    offered_suites: list[int] | None = None
    offered_groups: list[int] | None = None
    offered_extensions: list[int] | None = None  # in order, GREASE left out (JA4 needs them)
    signature_algorithms: list[int] | None = None
    client_session_id: bytes = b""
    client_random: bytes | None = None  # the key log's session id
    # the server's choice
    version: int | None = None
    cipher: int | None = None
    group: int | None = None
    alpn: str | None = None
    resumed: bool | None = None
    hello_retry: bool = False
    transport: str = "tcp"  # "quic": the hellos came in QUIC Initial packets (pipeline/quic_initial.py)
    cert_der: bytes | None = None  # the server's certificate (TLS 1.3: decrypted), parsed when an event asks
    _cert: dict | None = None
    client_cert_der: bytes | None = None  # TLS 1.3 (decrypted): the client's certificate, if it sent one
    _client_cert: dict | None = None
    # TLS 1.3: "server"/"client" -> that direction's stream, kept until its encrypted flight is read
    flights: dict | None = None
    flight_since: float = 0.0  # (monotonic) since when the server's flight waits for its secret
    reported: bool = False  # completed() was called

    def role_of(self, local: tuple) -> str | None:
        return "client" if local == self.client else "server" if local == self.server else None

    def certificate(self, side: str = "server") -> dict | None:
        """subject, issuer, key_type, key_bits of the server's (or client's) certificate; parsed on
        first use, as importing cryptography adds ~10 MB of RSS that runs without such events never pay."""
        if side == "client":
            if self._client_cert is None and self.client_cert_der:
                self._client_cert = certificate_facts(self.client_cert_der)
                self.client_cert_der = None
            return self._client_cert
        if self._cert is None and self.cert_der:
            self._cert = certificate_facts(self.cert_der)
            self.cert_der = None
        return self._cert

    def fields(self, with_cert: bool = True, cert: str = "server") -> dict:
        """The tls_handshake fields these facts fill (the certificate of the `cert` side, only with_cert)."""
        cert = (self.certificate(cert) if with_cert else None) or {}
        return {"tls_version": VERSIONS.get(self.version) if self.version else None,
                "cipher": cipher_name(self.cipher), "group": group_name(self.group), "sni": self.sni,
                "alpn": self.alpn, "resumed": self.resumed, "peer_cert_subject": cert.get("subject"),
                "peer_cert_issuer": cert.get("issuer"), "peer_key_type": cert.get("key_type"),
                "peer_key_bits": cert.get("key_bits")}


@dataclass
class _Stream:
    """One direction's bytes from its first handshake segment on."""
    base: int
    segs: dict[int, bytes] = field(default_factory=dict)  # offset -> payload
    used: int = 0  # bytes of handshake messages already parsed
    key: tuple = ()  # (src, dst): its key in HelloFacts.streams
    flow: bytes = b""  # the follow map's key
    flight: str | None = None  # TLS 1.3: "server"/"client", its encrypted flight is awaited
    facts: ConnFacts | None = None  # (of a flight)

    def add(self, seq: int, data: bytes) -> None:
        off = (seq - self.base) & 0xFFFFFFFF
        if off < MAX_STREAM and len(data) > len(self.segs.get(off, b"")):
            self.segs[off] = data

    def contiguous(self) -> bytes:
        out = bytearray()
        for off in sorted(self.segs):
            if off > len(out):
                break
            out += self.segs[off][len(out) - off:]
        return bytes(out)


def _messages(stream: bytes, past_ccs: bool = False) -> tuple[list[tuple[int, bytes]], bool, bool]:
    """The complete handshake messages at the start of a direction's bytes, whether a
    ChangeCipherSpec record came, and whether anything else ended them. Handshake records after
    a ChangeCipherSpec are encrypted, unless past_ccs (a HelloRetryRequest's compatibility CCS)."""
    body, pos, ccs, other = bytearray(), 0, False, False
    while pos + 5 <= len(stream):
        rtype, length = stream[pos], int.from_bytes(stream[pos + 3:pos + 5], "big")
        if pos + 5 + length > len(stream):
            break
        if rtype == REC_CCS:
            ccs = True
        elif rtype == REC_HANDSHAKE and (past_ccs or not ccs):
            body += stream[pos + 5:pos + 5 + length]
        else:
            other = True
            break
        pos += 5 + length
    msgs, p = [], 0
    while p + 4 <= len(body):
        n = int.from_bytes(body[p + 1:p + 4], "big")
        if p + 4 + n > len(body):
            break
        msgs.append((body[p], bytes(body[p + 4:p + 4 + n])))
        p += 4 + n
    return msgs, ccs, other


def _flight_start(stream: bytes) -> int | None:
    """Where a TLS 1.3 direction's encrypted records begin: after its plaintext hellos and
    ChangeCipherSpec records (None: not in the bytes yet)."""
    pos = 0
    while pos + 5 <= len(stream):
        if stream[pos] == 23:
            return pos
        if stream[pos] not in (REC_CCS, REC_HANDSHAKE):
            return None
        pos += 5 + int.from_bytes(stream[pos + 3:pos + 5], "big")
    return None


def _u16s(data: bytes, lenbytes: int = 2) -> list[int]:
    n = int.from_bytes(data[:lenbytes], "big")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(lenbytes, lenbytes + n - 1, 2)]


def _alpn_list(data: bytes) -> list[str]:
    out, p, end = [], 2, 2 + int.from_bytes(data[:2], "big")
    while p < min(end, len(data)):
        n = data[p]
        out.append(data[p + 1:p + 1 + n].decode("ascii", "replace"))
        p += 1 + n
    return out


def _sni(data: bytes) -> str | None:
    p, end = 2, 2 + int.from_bytes(data[:2], "big")
    while p + 3 <= min(end, len(data)):
        kind, n = data[p], int.from_bytes(data[p + 1:p + 3], "big")
        if kind == 0:
            return data[p + 3:p + 3 + n].decode("ascii", "replace")
        p += 3 + n
    return None


class _Reader:
    """Big-endian fields of a handshake message; a short message raises ValueError."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("short handshake message")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, lenbytes: int) -> bytes:
        return self.take(self.int(lenbytes))

    def extensions(self) -> list[tuple[int, bytes]]:
        if self.pos >= len(self.data):
            return []
        ext, out = _Reader(self.vector(2)), []
        while ext.pos < len(ext.data):
            out.append((ext.int(2), ext.vector(2)))
        return out


def parse_client_hello(body: bytes, facts: ConnFacts) -> None:
    r = _Reader(body)
    version = r.int(2)
    facts.client_random = r.take(32)
    facts.client_session_id = r.vector(1)
    suites = r.vector(2)
    facts.offered_suites = [c for c in (int.from_bytes(suites[i:i + 2], "big") for i in range(0, len(suites) - 1, 2))
                            if not _grease(c)]
    r.vector(1)  # compression methods
    facts.offered_versions = [version]
    exts = r.extensions()
    facts.offered_extensions = [ext for ext, _ in exts if not _grease(ext)]
    for ext, data in exts:
        if ext == EXT_SNI:
            facts.sni = _sni(data)
        elif ext == EXT_ALPN:
            facts.alpn_offered = _alpn_list(data)
        elif ext == EXT_GROUPS:
            facts.offered_groups = [g for g in _u16s(data) if not _grease(g)]
        elif ext == EXT_VERSIONS:
            facts.offered_versions = [v for v in _u16s(data, 1) if not _grease(v)]
        elif ext == EXT_SIG_ALGS:
            facts.signature_algorithms = _u16s(data)


def parse_server_hello(body: bytes, facts: ConnFacts) -> bool:
    """The server's choices; False for a HelloRetryRequest (its ServerHello comes next)."""
    r = _Reader(body)
    version, random, session_id, suite = r.int(2), r.take(32), r.vector(1), r.int(2)
    r.take(1)  # compression method
    exts = dict(r.extensions())
    if random == HRR_RANDOM:
        facts.hello_retry = True
        return False
    facts.version = int.from_bytes(exts[EXT_VERSIONS][:2], "big") if EXT_VERSIONS in exts else version
    facts.cipher = suite
    if facts.version >= 0x0304:
        facts.group = int.from_bytes(exts[EXT_KEY_SHARE][:2], "big") if EXT_KEY_SHARE in exts else None
        facts.resumed = EXT_PSK in exts
    else:
        if EXT_ALPN in exts:
            names = _alpn_list(exts[EXT_ALPN])
            facts.alpn = names[0] if names else None
        # a session id the server echoes: an abbreviated handshake (tickets: decided by the next message)
        if facts.client_session_id and session_id == facts.client_session_id:
            facts.resumed = True
    return True


def parse_certificate(body: bytes, facts: ConnFacts) -> None:
    """The first certificate of a TLS 1.2 Certificate message (the sender's own), kept as DER."""
    r = _Reader(_Reader(body).vector(3))
    facts.cert_der = r.vector(3) if r.data else None


_CERT_FACTS: dict[bytes, dict] = {}  # DER -> facts: a server shows the same certificate to every client


def certificate_facts(der: bytes) -> dict:
    """subject, issuer, key_type, key_bits of a DER certificate ({} when cryptography cannot read it)."""
    facts = _CERT_FACTS.get(der)
    if facts is None:
        if len(_CERT_FACTS) >= 1024:
            _CERT_FACTS.clear()
        facts = _CERT_FACTS[der] = _read_certificate(der)
    return facts


def _read_certificate(der: bytes) -> dict:
    try:
        from cryptography import x509

        from crypto_tracer.host.certinfo import _public_key_summary

        cert = x509.load_der_x509_certificate(der)
        key = _public_key_summary(cert)
        return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "key_type": key["algorithm"], "key_bits": key["key_size"]}
    except Exception:  # a certificate cryptography cannot read: unknown
        return {}


def parse_server_key_exchange(body: bytes, facts: ConnFacts) -> None:
    # ECDHE: ECParameters {curve_type named_curve(3), NamedCurve}; DHE's explicit prime has no name
    if len(body) >= 3 and body[0] == 3 and facts.cipher is not None:
        facts.group = int.from_bytes(body[1:3], "big")


class HelloFacts:
    """Segments -> per-connection facts. done(flow) tells the kernel to stop copying a direction;
    completed(facts), when given, is called once the server's messages are read (a handshake
    seen from packets alone: what `tls -m handshake` reports). flights: keep TLS 1.3's encrypted
    flights for add_secret (the classifier must copy them: HelloCapture(flights=True))."""

    def __init__(self, done=None, completed=None, flights: bool = False):
        self.done, self.completed = done, completed
        self.flights = flights
        self.conns: OrderedDict[tuple, ConnFacts] = OrderedDict()
        self.streams: OrderedDict[tuple, _Stream] = OrderedDict()
        self.secrets: OrderedDict[bytes, dict[str, bytes]] = OrderedDict()  # client_random -> label -> secret
        self.waiting: OrderedDict[bytes, ConnFacts] = OrderedDict()  # client_random -> facts with flights kept
        self.errors = 0
        self.quic = None  # pipeline/quic_initial.QuicInitials, at the first QUIC datagram
        self.flights_read = 0

    @staticmethod
    def key(a: tuple, b: tuple) -> tuple:
        return (a, b) if a <= b else (b, a)

    def add_raw(self, raw: bytes) -> None:
        from crypto_tracer.probes.tls_hello import decode

        self.add(decode(raw))

    def add(self, seg) -> None:
        if seg.udp:
            if self.quic is None:
                from crypto_tracer.pipeline.quic_initial import QuicInitials

                self.quic = QuicInitials(self._quic_message, self._quic_flight if self.flights else None,
                                         self._quic_secret)
            self.quic.add(seg.ts_ns, seg.src, seg.dst, seg.data)
            return
        d = (seg.src, seg.dst)
        data = seg.data
        start = len(data) >= 6 and data[0] == REC_HANDSHAKE and data[5] in (HS_CLIENT_HELLO, HS_SERVER_HELLO)
        stream = self.streams.get(d)
        if start and (stream is None or ((seg.seq - stream.base) & 0xFFFFFFFF) >= MAX_STREAM):
            stream = self.streams[d] = _Stream(seg.seq)
            if len(self.streams) > MAX_CONNECTIONS:
                self.streams.popitem(last=False)
        if stream is None:
            return
        stream.add(seg.seq, data)
        stream.key, stream.flow = d, seg.flow
        try:
            finished = self._read_flight(stream) if stream.flight else self._parse(seg, stream)
        except Exception:  # malformed or not TLS after all: what was read stays
            self.errors += 1
            finished = True
        if finished:
            self._stop(stream)
            if (facts := self.conns.get(self.key(seg.src, seg.dst))) is not None and facts.server == seg.src:
                self._complete(facts)

    def _complete(self, facts: ConnFacts) -> None:
        if self.completed is not None and not facts.reported:
            facts.reported = True
            self.completed(facts)

    def _quic_message(self, client: tuple, server: tuple, ts: int, from_client: bool, mtype: int,
                      body: bytes) -> bool:
        """A handshake message of a QUIC connection's Initial CRYPTO stream; True when that
        direction has given what it is read for (ClientHello; ServerHello after any HelloRetryRequest)."""
        try:
            if from_client:
                if mtype == HS_CLIENT_HELLO:
                    facts = self._conn(client, server, ts, new=True)
                    facts.transport = "quic"
                    parse_client_hello(body, facts)
                return True
            if mtype != HS_SERVER_HELLO:
                return True
            facts = self._conn(client, server, ts, new=False)
            facts.transport = "quic"
            if not parse_server_hello(body, facts):
                return False  # HelloRetryRequest: the ServerHello follows in the same stream
        except Exception:  # malformed: what was read stays
            self.errors += 1
            return True
        if self.flights and facts.version == 0x0304 and facts.client_random:
            # its flights come in Handshake packets, read with the secrets (_quic_flight): the
            # handshake is complete then, or when they do not come in time (expire)
            self._await_flights(facts, {"server": None, "client": None})
            if self.secrets.get(facts.client_random) and self.quic is not None:
                self.quic.retry(ts, client, server)  # secrets already there (a library that was quick)
            return True
        self._complete(facts)
        return True

    def _quic_secret(self, client: tuple, server: tuple, from_client: bool) -> tuple[bytes, int] | None:
        """(handshake traffic secret, suite) of one side of a QUIC connection, once the hooked library gave it."""
        facts = self.lookup(client, server)
        if facts is None or facts.client != client or facts.client_random is None or facts.cipher is None:
            return None
        secret = self.secrets.get(facts.client_random, {}).get(SECRET_LABELS["client" if from_client else "server"])
        return (secret, facts.cipher) if secret is not None else None

    def _quic_flight(self, client: tuple, server: tuple, ts: int, from_client: bool,
                     msgs: list[tuple[int, bytes]]) -> None:
        """One side's messages of a QUIC connection's Handshake packets, through its Finished."""
        from crypto_tracer.pipeline import tls13_flight

        facts = self.lookup(client, server)
        if facts is None or facts.client != client:
            return
        side = "client" if from_client else "server"
        flight = tls13_flight.flight_facts(msgs)
        if flight is None:
            self.errors += 1
        elif side == "server":
            facts.alpn, facts.cert_der = flight.alpn, flight.cert_der
        else:
            facts.client_cert_der = flight.cert_der
        if flight is not None:
            self.flights_read += 1
        if facts.flights is not None and side in facts.flights:
            del facts.flights[side]
            if not facts.flights:
                self._drop_flights(facts)
            if side == "server":
                self._complete(facts)

    def _stop(self, stream: _Stream) -> None:
        """Nothing more is wanted from this direction: the kernel stops copying it."""
        if self.streams.get(stream.key) is stream:
            del self.streams[stream.key]
            if self.done is not None:
                self.done(stream.flow)

    # --- TLS 1.3's encrypted flights ------------------------------------------------------

    def _keep_flight(self, facts: ConnFacts, side: str, stream: _Stream) -> None:
        stream.flight, stream.facts = side, facts
        self._await_flights(facts, {side: stream})

    def _await_flights(self, facts: ConnFacts, flights: dict) -> None:
        """facts waits for these sides' flights (TCP: their streams; QUIC: None, QuicInitials keeps them)."""
        if "server" in flights:
            facts.flight_since = time.monotonic()
        if facts.flights is None:
            facts.flights = {}
        facts.flights.update(flights)
        self.waiting[facts.client_random] = facts
        self.waiting.move_to_end(facts.client_random)
        while len(self.waiting) > MAX_FLIGHTS:
            self._drop_flights(self.waiting.popitem(last=False)[1])

    def _drop_flights(self, facts: ConnFacts) -> None:
        for stream in (facts.flights or {}).values():
            if stream is not None:
                self._stop(stream)
        server_waiting = facts.version is not None and "server" in (facts.flights or {})
        facts.flights = None
        if facts.client_random is not None and self.waiting.get(facts.client_random) is facts:
            del self.waiting[facts.client_random]
        if server_waiting:
            self._complete(facts)  # without what the flight would have said

    def expire(self, wait_s: float, now: float | None = None) -> None:
        """Give up on server flights whose secret did not come within wait_s (a library not hooked,
        no keys for it): their handshakes are completed with those facts null."""
        now = time.monotonic() if now is None else now
        for facts in [f for f in self.waiting.values() if f.flights and "server" in f.flights
                      and f.flight_since and now - f.flight_since > wait_s]:
            self._drop_flights(facts)

    def _read_flight(self, stream: _Stream) -> bool:
        """Decrypt the direction's flight when its secret is known; True once it is read, or
        when as much as is kept arrived (it stays for a secret that comes later)."""
        from crypto_tracer.pipeline import tls13_flight

        facts, side = stream.facts, stream.flight
        data = stream.contiguous()
        start = _flight_start(data)
        if start is None:
            return False
        secret = self.secrets.get(facts.client_random, {}).get(SECRET_LABELS[side])
        if secret is not None and facts.cipher is not None and facts.flights and side in facts.flights:
            flight = tls13_flight.read_flight(data[start:], secret, facts.cipher)
            if flight is not None:
                if side == "server":
                    facts.alpn, facts.cert_der = flight.alpn, flight.cert_der
                else:
                    facts.client_cert_der = flight.cert_der
                self.flights_read += 1
                del facts.flights[side]
                if not facts.flights:
                    self._drop_flights(facts)
                return True
        return len(data) - start >= tls13_flight.MAX_FLIGHT

    def add_secret(self, label: str, client_random: bytes, secret: bytes) -> None:
        """A session's key log line (keys/): its handshake traffic secrets open its flights."""
        if label not in SECRET_LABELS.values():
            return
        self.secrets.setdefault(client_random, {})[label] = secret
        self.secrets.move_to_end(client_random)
        if len(self.secrets) > MAX_CONNECTIONS:
            self.secrets.popitem(last=False)
        facts = self.waiting.get(client_random)
        side = "server" if label == SECRET_LABELS["server"] else "client"
        if facts is not None and facts.transport == "quic":
            if self.quic is not None:
                try:
                    self.quic.retry(0, facts.client, facts.server)
                except Exception:
                    self.errors += 1
            return
        stream = (facts.flights or {}).get(side) if facts is not None else None
        if stream is None:
            return
        try:
            done = self._read_flight(stream)
        except Exception:
            self.errors += 1
            done = True
        if done or self.streams.get(stream.key) is not stream:  # read, or no more bytes will come
            self._stop(stream)
            if facts.flights is not None:
                facts.flights.pop(side, None)
                if not facts.flights:
                    self._drop_flights(facts)
            if side == "server":
                self._complete(facts)

    def _conn(self, client: tuple, server: tuple, ts: int, new: bool) -> ConnFacts:
        key = self.key(client, server)
        facts = self.conns.get(key)
        if facts is None or facts.client != client or new:
            facts = self.conns[key] = ConnFacts(client, server, ts)
            if len(self.conns) > MAX_CONNECTIONS:
                self.conns.popitem(last=False)
        self.conns.move_to_end(key)
        return facts

    def _parse(self, seg, stream: _Stream) -> bool:
        """Read the direction's new messages; True when nothing more is needed from it."""
        data = stream.contiguous()
        msgs, ccs, other = _messages(data)
        if not msgs:
            return False
        if msgs[0][0] == HS_CLIENT_HELLO:
            facts = self._conn(seg.src, seg.dst, seg.ts_ns, new=True)
            parse_client_hello(msgs[0][1], facts)
            if self.flights and 0x0304 in (facts.offered_versions or ()) and facts.client_random:
                self._keep_flight(facts, "client", stream)  # its certificate, if the server asks (mTLS)
                return False
            return True  # (after a HelloRetryRequest the second ClientHello adds nothing the first lacked)
        if msgs[0][0] != HS_SERVER_HELLO:
            return True
        facts = self._conn(seg.dst, seg.src, seg.ts_ns, new=False)
        if facts.hello_retry:
            msgs, ccs, other = _messages(data, past_ccs=True)
        for mtype, body in msgs[stream.used:]:
            stream.used += 1
            if mtype == HS_SERVER_HELLO:
                if not parse_server_hello(body, facts):
                    return self._parse(seg, stream)  # HRR: its ServerHello follows the compatibility CCS
                if facts.version >= 0x0304:
                    if self.flights and facts.client_random:
                        self._keep_flight(facts, "server", stream)
                        return self._read_flight(stream)
                    return True
                if facts.flights:  # TLS 1.2: no encrypted flight to wait for
                    self._drop_flights(facts)
            elif mtype in (HS_CERTIFICATE, HS_SKE, HS_SHD):
                if mtype == HS_CERTIFICATE:
                    parse_certificate(body, facts)
                elif mtype == HS_SKE:
                    parse_server_key_exchange(body, facts)
                if facts.resumed is None:
                    facts.resumed = False  # a full handshake
                if mtype == HS_SHD:
                    return True
            elif mtype == HS_TICKET and facts.resumed is None:  # a ticket right after ServerHello: abbreviated
                facts.resumed = True
        if ccs and facts.version is not None and facts.version < 0x0304:
            if facts.resumed is None:
                facts.resumed = True  # ServerHello then ChangeCipherSpec: abbreviated
            return True
        return other

    def lookup(self, local: tuple, remote: tuple) -> ConnFacts | None:
        return self.conns.get(self.key(local, remote))


# --- what `tls -m handshake` adds: JA4 and the flags ------------------------------------------

_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2",
                 0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3"}


def _alpn_end(b: int) -> str | None:
    return chr(b) if 0x20 <= b <= 0x7E else "9" if b >= 0x80 else None


def _sha12(items: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(f"{v:04x}" for v in items).encode()).hexdigest()[:12]


def ja4(facts: ConnFacts) -> str | None:
    """FoxIO's JA4 of the ClientHello (TCP: 't', QUIC: 'q'), GREASE values left out: version (highest offered),
    SNI d/i, cipher and extension counts, ALPN first+last character, sha256-12 of the sorted
    ciphers, sha256-12 of the sorted extensions without SNI and ALPN '_' the signature algorithms
    in order. None without a parsed ClientHello."""
    if facts.offered_suites is None or facts.offered_extensions is None:
        return None
    return _ja4(facts.transport == "quic", tuple(facts.offered_versions or ()), tuple(facts.offered_suites),
                tuple(facts.offered_extensions), facts.alpn_offered[0] if facts.alpn_offered else None,
                tuple(facts.signature_algorithms or ()))


@functools.lru_cache(maxsize=1024)  # a client sends the same ClientHello shape on every connection
def _ja4(quic: bool, offered_versions: tuple, suites: tuple, exts: tuple, first_alpn: str | None, sig_algs: tuple) -> str:
    versions = [v for v in offered_versions if not _grease(v)]
    version = _JA4_VERSIONS.get(max(versions), "00") if versions else "00"
    alpn = "00"
    if first_alpn:
        first = first_alpn.encode("utf-8")
        ends = _alpn_end(first[0]), _alpn_end(first[-1])
        alpn = "99" if None in ends else ends[0] + ends[1]
    a = f"{'q' if quic else 't'}{version}{'d' if EXT_SNI in exts else 'i'}{min(len(suites), 99):02d}" \
        f"{min(len(exts), 99):02d}{alpn}"
    b = _sha12(sorted(suites)) if suites else "000000000000"
    sorted_exts = sorted(e for e in exts if e not in (EXT_SNI, EXT_ALPN))
    c_text = ",".join(f"{e:04x}" for e in sorted_exts)
    sigs = [s for s in sig_algs if not _grease(s)]
    if sigs:
        c_text += "_" + ",".join(f"{s:04x}" for s in sigs)
    import hashlib

    c = hashlib.sha256(c_text.encode()).hexdigest()[:12] if sorted_exts else "000000000000"
    return f"{a}_{b}_{c}"


# weak_cipher: suites whose name holds one of these (IANA names): no encryption or authentication,
# export grade, 40/56-bit or broken ciphers (RC4, DES, 3DES, RC2, IDEA), MD5 MACs; and CBC suites
# with a SHA-1 MAC (Lucky13-class padding oracles, SHA-1).
WEAK_CIPHER_PARTS = ("_NULL_", "_NULL", "EXPORT", "_anon_", "RC4", "_DES_", "DES40", "3DES", "_RC2_", "_IDEA_",
                     "_MD5")
# Key-exchange groups that hold against a quantum computer: ML-KEM, alone or in a hybrid.
QUANTUM_SAFE_GROUPS = {0x0200, 0x0201, 0x0202, 0x11EB, 0x11EC, 0x11ED}


def weak_cipher(name: str | None) -> bool | None:
    if name is None or not name.startswith("TLS_"):
        return None
    if any(part in name for part in WEAK_CIPHER_PARTS):
        return True
    return "_CBC_" in name and name.endswith("_SHA")


def flags(facts: ConnFacts) -> dict:
    """legacy_version, no_forward_secrecy, weak_cipher, not_quantum_safe_key_exchange: None when
    what they depend on is not known."""
    version, name = facts.version, cipher_name(facts.cipher)
    legacy = None if version is None else version < 0x0303
    if version is None or name is None:
        no_fs = None
    elif version >= 0x0304:  # TLS 1.3: ephemeral unless a resumption without key share (psk_ke)
        no_fs = facts.group is None and bool(facts.resumed)
    else:
        no_fs = not ("_ECDHE_" in name or "_DHE_" in name)
    if facts.group is not None:
        not_pq = facts.group not in QUANTUM_SAFE_GROUPS
    else:  # TLS 1.2 RSA or DHE with explicit parameters: no ML-KEM either
        not_pq = True if name is not None and version is not None else None
    return {"legacy_version": legacy, "no_forward_secrecy": no_fs, "weak_cipher": weak_cipher(name),
            "not_quantum_safe_key_exchange": not_pq}
