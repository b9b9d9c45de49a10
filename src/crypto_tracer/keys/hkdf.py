"""TLS 1.3 HKDF-Expand-Label (RFC 8446 section 7.1), used to derive the handshake traffic
secrets that OpenSSL 3.0 does not keep in the SSL object."""

from __future__ import annotations

import hashlib
import hmac


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand(secret, HkdfLabel(length, "tls13 " + label, context), length)."""
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def handshake_traffic_secrets(handshake_secret: bytes, transcript_hash: bytes, hash_name: str) -> tuple[bytes, bytes]:
    """(client, server) handshake traffic secrets from the handshake secret and the
    transcript hash through ServerHello."""
    n = hashlib.new(hash_name).digest_size
    return (hkdf_expand_label(handshake_secret, "c hs traffic", transcript_hash, n, hash_name),
            hkdf_expand_label(handshake_secret, "s hs traffic", transcript_hash, n, hash_name))
