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
    session: int  # offset of the SSL_SESSION pointer
    master_key: int  # in the session
    cipher: int  # offset of the SSL_CIPHER pointer in the session
    cipher_id: int  # offset of the u32 id in SSL_CIPHER
    hs_a: int  # handshake_secret (or the client handshake traffic secret when hs_direct)
    hs_b: int  # handshake_traffic_hash (or the server handshake traffic secret)
    client_app: int
    server_app: int
    exporter: int
    hs_direct: bool = False
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

    deref, off = lay.client_random
    cr_base = ptr(ssl, deref) if deref >= 0 else ssl
    session = ptr(ssl, lay.session)
    cipher = ptr(session, lay.cipher)
    return KeyMaterial(
        version=struct.unpack("<i", at(ssl, lay.tls_version, 4))[0],
        cipher_id=struct.unpack("<I", at(cipher, lay.cipher_id, 4))[0],
        client_random=at(cr_base, off, 32),
        master_key=at(session, lay.master_key, MASTER_KEY_LEN),
        hs_a=at(ssl, lay.hs_a, SECRET_LEN), hs_b=at(ssl, lay.hs_b, SECRET_LEN),
        client_app=at(ssl, lay.client_app, SECRET_LEN), server_app=at(ssl, lay.server_app, SECRET_LEN),
        exporter=at(ssl, lay.exporter, SECRET_LEN), hs_direct=lay.hs_direct)
