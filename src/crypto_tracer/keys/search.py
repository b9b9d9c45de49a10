"""Find where one OpenSSL build keeps its TLS secrets, from live SSL objects and their key log lines.

Shared by both calibrations: keys/calibrate_worker.py (a shared libssl loaded in-process) and
keys/calibrate_node.py (a node executable run as a child, read through /proc/PID/mem). Each gives a
reader ``(address, size) -> bytes`` and the addresses of finished SSL objects with the library's own
key log lines for each; ``learn`` returns the offsets that hold those secrets in every object, and
``verify`` checks that the layout reproduces every line of every object (nothing is used otherwise).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crypto_tracer.keys.hkdf import hkdf_expand_label
from crypto_tracer.keys.layout import Layout, Reader, read_material
from crypto_tracer.keys.material import TLS1_3, tls13_hash

SCAN = 8192  # bytes of the SSL object searched (sizeof(SSL) is 7608 in 3.0)


class SearchError(RuntimeError):
    """The secrets could not be placed, or the layout does not reproduce the key log."""


@dataclass
class Sample:
    """One finished SSL object and what the library itself says about it."""
    ssl: int  # its address
    lines: dict[str, tuple[str, str]]  # its key log: label -> (client_random hex, secret hex)
    version: int  # 0x0304 or 0x0303
    cipher_id: int  # OpenSSL's id, 0x0300XXXX (XXXX: the IANA suite)
    session: int | None = None  # its SSL_SESSION, when the library told us (else searched by the master key)

    @property
    def client_random(self) -> bytes:
        return bytes.fromhex(next(iter(self.lines.values()))[0])

    def secret(self, label: str) -> bytes:
        return bytes.fromhex(self.lines[label][1])


def find_all(hay: bytes, needle: bytes, align: int = 1) -> list[int]:
    found, pos = [], hay.find(needle)
    while pos >= 0:
        if pos % align == 0:
            found.append(pos)
        pos = hay.find(needle, pos + 1)
    return found


def one(candidates, what: str) -> int:
    candidates = sorted(candidates)
    if len(candidates) != 1:
        raise SearchError(f"{what}: {len(candidates)} candidate offsets")
    return candidates[0]


def _ptr(read: Reader, addr: int) -> int:
    data = read(addr, 8)
    return struct.unpack("<Q", data)[0] if len(data) == 8 else 0


def _pointers(mem: bytes):
    """(offset, value) of each aligned word of mem that could be a user-space pointer."""
    for off in range(0, len(mem) - 7, 8):
        value = struct.unpack_from("<Q", mem, off)[0]
        if 0x10000 <= value < 1 << 47:
            yield off, value


def _common(samples: list[Sample], candidates) -> set:
    """The candidates (a function of one sample) that hold in every sample."""
    found = None
    for s in samples:
        found = set(candidates(s)) if found is None else found & set(candidates(s))
        if not found:
            break
    return found or set()


def _client_random_candidates(read: Reader, ssl: int, cr: bytes) -> list[tuple[int, int]]:
    mem = read(ssl, SCAN)
    found = [(-1, off) for off in find_all(mem, cr)]
    for deref, target in _pointers(mem[:4096]):  # one pointer level (1.1.1: ssl->s3)
        found += [(deref, off) for off in find_all(read(target, 2048), cr)]
    return found


def _read_client_random(read: Reader, ssl: int, field: tuple[int, int]) -> bytes:
    deref, off = field
    base = _ptr(read, ssl + deref) if deref >= 0 else ssl
    return read(base + off, 32) if base else b""


def _find_client_random(read: Reader, samples: list[Sample]) -> tuple[int, int]:
    """The one place that holds client_random in every sample SSL object (a hit in a
    neighbouring heap object, e.g. a separately allocated s3, would fail on the others)."""
    first = samples[0]
    fits = [f for f in _client_random_candidates(read, first.ssl, first.client_random)
            if all(_read_client_random(read, s.ssl, f) == s.client_random for s in samples[1:])]
    if not fits:
        raise SearchError("client_random not found")
    return min(fits, key=lambda f: (f[0] >= 0, f))  # prefer inside the object itself


def _find_handshake(mem: bytes, chts: bytes, shts: bytes, app_off: int, hash_name: str) -> tuple[int, int, bool]:
    """Offsets of (handshake_secret, handshake_traffic_hash), or of CHTS/SHTS if stored as such."""
    n = len(chts)
    c, s = find_all(mem, chts), find_all(mem, shts)
    if c and s:
        return c[0], s[0], True
    window = range(max(0, app_off - 1024), app_off, 4)
    nonzero = [o for o in window if any(mem[o:o + n])]
    for hs in nonzero:
        secret = mem[hs:hs + n]
        for th in nonzero:
            if hkdf_expand_label(secret, "c hs traffic", mem[th:th + n], n, hash_name) == chts:
                return hs, th, False
    raise SearchError("handshake secret not found")


def _session_candidates(read: Reader, s: Sample) -> set[tuple[int, int]]:
    """(offset of the session pointer in the object, offset of the master key in the session)."""
    mem = read(s.ssl, SCAN)
    master = s.secret("CLIENT_RANDOM")
    if s.session is not None:
        pointers = [(off, s.session) for off in find_all(mem, struct.pack("<Q", s.session), 8)]
    else:
        pointers = list(_pointers(mem))
    return {(off, m) for off, target in pointers for m in find_all(read(target, 2048), master)}


def _cipher_candidates(read: Reader, s: Sample, session_off: int) -> set[tuple[int, int]]:
    """(offset of the SSL_CIPHER pointer in the session, offset of the u32 id in SSL_CIPHER)."""
    session = _ptr(read, s.ssl + session_off)
    want = struct.pack("<I", s.cipher_id)
    return {(off, i) for off, target in _pointers(read(session, 2048)) for i in find_all(read(target, 64), want, 4)}


def learn(read: Reader, samples: list[Sample]) -> Layout:
    """A layout from finished SSL objects: TLS 1.3 ones (one with a SHA-256 suite) and TLS 1.2 ones;
    every offset must hold in every object of its kind (a hit in a neighbouring heap object fails on
    the others). The first TLS 1.3 object with a SHA-256 suite is searched for the handshake secret."""
    t13 = [s for s in samples if s.version == TLS1_3]
    t12 = [s for s in samples if s.version != TLS1_3]
    if not t13 or not t12:
        raise SearchError("needs TLS 1.3 and TLS 1.2 objects")
    cr_field = _find_client_random(read, samples)

    def offsets_of(label):
        return lambda s: find_all(read(s.ssl, SCAN), s.secret(label))

    client_app = one(_common(t13, offsets_of("CLIENT_TRAFFIC_SECRET_0")), "client app secret")
    server_app = one(_common(t13, offsets_of("SERVER_TRAFFIC_SECRET_0")), "server app secret")
    exporter = one(_common(t13, offsets_of("EXPORTER_SECRET")), "exporter secret")
    first = next((s for s in t13 if tls13_hash(s.cipher_id) == "sha256"), None)
    if first is None:
        raise SearchError("needs a TLS 1.3 object with a SHA-256 suite")
    hs_a, hs_b, direct = _find_handshake(read(first.ssl, SCAN), first.secret("CLIENT_HANDSHAKE_TRAFFIC_SECRET"),
                                         first.secret("SERVER_HANDSHAKE_TRAFFIC_SECRET"), client_app, "sha256")
    # the version int: the same offset holds 0x0304 in the 1.3 objects and 0x0303 in the 1.2 ones
    versions = _common(samples, lambda s: find_all(read(s.ssl, 4096), struct.pack("<i", s.version), 4))
    if not versions:
        raise SearchError("version: 0 candidate offsets")
    tls_version = min(versions)
    # TLS 1.2: ssl->session -> master_key; session->cipher -> id
    sessions = _common(t12, lambda s: _session_candidates(read, s))
    if not sessions:
        raise SearchError("session and master key not found")
    fits = []
    for session_off, master_key in sorted(sessions):
        ciphers = _common(samples, lambda s, off=session_off: _cipher_candidates(read, s, off))
        if ciphers:
            fits.append((session_off, master_key, min(ciphers)))
    if not fits:
        raise SearchError("cipher not found")
    session_off, master_key, (cipher_off, cipher_id) = fits[0]  # several: verify() judges the first
    return Layout(version="", client_random=cr_field, tls_version=tls_version, session=session_off,
                  master_key=master_key, cipher=cipher_off, cipher_id=cipher_id, hs_a=hs_a, hs_b=hs_b,
                  client_app=client_app, server_app=server_app, exporter=exporter, hs_direct=direct)


def verify(read: Reader, lay: Layout, objects) -> int:
    """Every key log line of every object must come out of the layout exactly; objects: (address,
    its key log lines: label -> (client_random hex, secret hex)). Returns how many it reproduced."""
    objects = list(objects)
    for ssl, lines in objects:
        want = {(label, cr, secret) for label, (cr, secret) in lines.items()}
        got = set(read_material(read, ssl, lay).lines())
        if not want or got != want:
            raise SearchError("the learned layout does not reproduce the library's own key log")
    return len(objects)
