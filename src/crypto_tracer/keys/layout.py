"""Where the secrets live in one library build's SSL object, and a reader that follows it.

Offsets are learned by calibration (``calibrate.py``), never guessed. A field is
``(deref, offset)``: with deref -1 it is at ssl+offset; otherwise at *(ssl+deref)+offset
(OpenSSL 1.1.1 keeps s3 behind a pointer). ``read_material`` is the Python twin of the
reads in bpf/tls_keys.h: calibration verifies a layout with it before anyone trusts it.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Callable

from crypto_tracer.keys.material import MASTER_KEY_LEN, KeyMaterial

SECRET_LEN = 64  # EVP_MAX_MD_SIZE: room for any TLS 1.3 hash
LAYOUT_FORMAT = 1


@dataclass
class Layout:
    version: str  # OpenSSL version the layout was learned on, e.g. "3.0.19"
    client_random: tuple[int, int]
    tls_version: int  # offset of the int version in the SSL object
    session: int  # offset of the SSL_SESSION pointer (-1: the master key is in the object itself)
    master_key: int  # in the session
    cipher: int  # offset of the SSL_CIPHER pointer in the session
    cipher_id: int  # offset of the u32 id in SSL_CIPHER
    hs_a: int  # handshake_secret (or the client handshake traffic secret when hs_direct)
    hs_b: int  # handshake_traffic_hash (or the server handshake traffic secret)
    client_app: int
    server_app: int
    exporter: int
    hs_direct: bool = False
    # GnuTLS keeps some fields elsewhere; the defaults are OpenSSL's way
    version_deref: int = -1  # >= 0: the version is behind a pointer at this offset
    version_be: bool = False  # two bytes major, minor (GnuTLS) instead of an int 0x0304
    cipher_in_session: bool = True  # the cipher pointer is in the session (OpenSSL), else in the object
    cipher_id_be: bool = False  # two bytes of the suite id (GnuTLS) instead of OpenSSL's 0x0300XXXX
    verified: int = 0  # handshakes whose every key log line this layout reproduced
    source: dict = field(default_factory=dict)  # build-id and path it was learned on

    def to_json(self) -> dict:
        return dict(asdict(self), format=LAYOUT_FORMAT)

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        if data.get("format") != LAYOUT_FORMAT:
            raise ValueError("unknown layout format")
        data = {k: v for k, v in data.items() if k != "format"}
        data["client_random"] = tuple(data["client_random"])
        return cls(**data)


Reader = Callable[[int, int], bytes]  # (address, size) -> bytes, b"" when unreadable


def read_material(read: Reader, ssl: int, lay: Layout) -> KeyMaterial:
    def at(base: int, off: int, n: int) -> bytes:
        data = read(base + off, n) if base else b""
        return data if len(data) == n else bytes(n)

    def ptr(base: int, off: int) -> int:
        return struct.unpack("<Q", at(base, off, 8))[0]

    def swap16(v: int) -> int:
        return ((v & 0xFF) << 8) | ((v >> 8) & 0xFF)

    deref, off = lay.client_random
    cr_base = ptr(ssl, deref) if deref >= 0 else ssl
    session = ptr(ssl, lay.session) if lay.session >= 0 else ssl
    cipher = ptr(session if lay.cipher_in_session else ssl, lay.cipher)
    version_base = ptr(ssl, lay.version_deref) if lay.version_deref >= 0 else ssl
    version = struct.unpack("<i", at(version_base, lay.tls_version, 4))[0]
    cipher_id = struct.unpack("<I", at(cipher, lay.cipher_id, 4))[0]
    return KeyMaterial(
        version=swap16(version) if lay.version_be else version,
        cipher_id=swap16(cipher_id) if lay.cipher_id_be else cipher_id,
        client_random=at(cr_base, off, 32),
        master_key=at(session, lay.master_key, MASTER_KEY_LEN),
        hs_a=at(ssl, lay.hs_a, SECRET_LEN), hs_b=at(ssl, lay.hs_b, SECRET_LEN),
        client_app=at(ssl, lay.client_app, SECRET_LEN), server_app=at(ssl, lay.server_app, SECRET_LEN),
        exporter=at(ssl, lay.exporter, SECRET_LEN), hs_direct=lay.hs_direct)
