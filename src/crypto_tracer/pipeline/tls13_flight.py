"""TLS 1.3's encrypted handshake flights, opened with the session's handshake traffic secret.

In TLS 1.3 everything after ServerHello is encrypted: EncryptedExtensions (the selected ALPN),
CertificateRequest, Certificate, CertificateVerify and Finished. Where the hooked library gave
the session's secrets (keys/: SERVER_HANDSHAKE_TRAFFIC_SECRET for the server's flight,
CLIENT_HANDSHAKE_TRAFFIC_SECRET for the client's), the records copied by tls_hello.bpf.c are
decrypted here (RFC 8446 sections 5.2-5.3, 7.3): key and iv by HKDF-Expand-Label with the suite's
hash, nonce = iv XOR the record's sequence number, additional data = the record header. Records
are authenticated: a wrong secret, a gap in the copied bytes or anything else gives None, never
a wrong fact.
"""

from __future__ import annotations

from crypto_tracer.keys.hkdf import hkdf_expand_label

REC_CCS, REC_ALERT, REC_HANDSHAKE, REC_APPDATA = 20, 21, 22, 23
HS_ENCRYPTED_EXTENSIONS, HS_CERTIFICATE, HS_CERT_REQUEST, HS_FINISHED, HS_COMPRESSED_CERTIFICATE = 8, 11, 13, 20, 25
EXT_ALPN = 16
MAX_FLIGHT = 32 * 1024  # bytes of records after a hello kept for decryption (a certificate chain fits)
MAX_RECORD = (1 << 14) + 256  # TLSCiphertext.length limit
MAX_CERTIFICATE = 1 << 20  # uncompressed_length accepted from a CompressedCertificate


def preload() -> None:
    """Import what decrypting and reading a flight needs (cryptography's AEADs and X.509)."""
    from cryptography import x509  # noqa: F401
    from cryptography.hazmat.primitives.ciphers import aead  # noqa: F401

    from crypto_tracer.host import certinfo  # noqa: F401


def suite_params(suite: int) -> tuple[str, int, int] | None:
    """(hash, key length, tag length) of a TLS 1.3 cipher suite; None for another suite."""
    return {0x1301: ("sha256", 16, 16), 0x1302: ("sha384", 32, 16), 0x1303: ("sha256", 32, 16),
            0x1304: ("sha256", 16, 16), 0x1305: ("sha256", 16, 8)}.get(suite)


def aead_of(suite: int, key: bytes):
    """The AEAD of a TLS 1.3 suite with this key (QUIC uses the same: pipeline/quic_initial.py)."""
    from cryptography.hazmat.primitives.ciphers import aead

    if suite == 0x1303:
        return aead.ChaCha20Poly1305(key)
    if suite in (0x1304, 0x1305):
        return aead.AESCCM(key, tag_length=16 if suite == 0x1304 else 8)
    return aead.AESGCM(key)


def traffic_keys(secret: bytes, suite: int) -> tuple[bytes, bytes]:
    """(key, iv) of a traffic secret (RFC 8446 section 7.3)."""
    hash_name, key_len, _tag = suite_params(suite)
    return (hkdf_expand_label(secret, "key", b"", key_len, hash_name),
            hkdf_expand_label(secret, "iv", b"", 12, hash_name))


def handshake_messages(records: bytes, secret: bytes, suite: int) -> list[tuple[int, bytes]] | None:
    """The handshake messages of one direction's encrypted flight, through its Finished.

    records: that direction's bytes from the first record after its hello (ChangeCipherSpec
    records are skipped). None when the suite is not TLS 1.3's, a record fails authentication or
    the bytes end before Finished."""
    if suite_params(suite) is None:
        return None
    key, iv = traffic_keys(secret, suite)
    aead = aead_of(suite, key)
    body, msgs, pos, seq = bytearray(), [], 0, 0
    while pos + 5 <= len(records):
        rtype, length = records[pos], int.from_bytes(records[pos + 3:pos + 5], "big")
        if records[pos + 1] != 3 or length > MAX_RECORD or pos + 5 + length > len(records):
            return None
        header, payload = records[pos:pos + 5], records[pos + 5:pos + 5 + length]
        pos += 5 + length
        if rtype == REC_CCS:
            continue
        if rtype != REC_APPDATA:
            return None  # a plaintext alert: the handshake failed
        nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big")))
        try:
            plain = aead.decrypt(nonce, payload, header)
        except Exception:  # cryptography's InvalidTag (or a bad length): not these keys
            return None
        seq += 1
        plain = plain.rstrip(b"\0")  # TLSInnerPlaintext: content, type, zero padding
        if not plain or plain[-1] != REC_HANDSHAKE:
            return None  # an alert, or data before Finished
        body += plain[:-1]
        while len(body) >= 4 and len(body) >= 4 + (n := int.from_bytes(body[1:4], "big")):
            mtype = body[0]
            msgs.append((mtype, bytes(body[4:4 + n])))
            del body[:4 + n]
            if mtype == HS_FINISHED:
                return msgs
    return None


def _vector(data: bytes, pos: int, lenbytes: int) -> tuple[bytes, int]:
    n = int.from_bytes(data[pos:pos + lenbytes], "big")
    end = pos + lenbytes + n
    if len(data) < end:
        raise ValueError("short vector")
    return data[pos + lenbytes:end], end


def selected_alpn(encrypted_extensions: bytes) -> str | None:
    """The protocol the server selected (EncryptedExtensions' ALPN: a list of exactly one name)."""
    exts, _ = _vector(encrypted_extensions, 0, 2)
    pos = 0
    while pos + 4 <= len(exts):
        ext = int.from_bytes(exts[pos:pos + 2], "big")
        data, pos = _vector(exts, pos + 2, 2)
        if ext == EXT_ALPN:
            names, _ = _vector(data, 0, 2)
            name, _ = _vector(names, 0, 1)
            return name.decode("ascii", "replace") or None
    return None


def leaf_certificate(certificate: bytes) -> bytes | None:
    """The first (the sender's own) certificate of a TLS 1.3 Certificate message, DER; None when
    the list is empty (a client without a certificate) or the entries are not X.509."""
    _context, pos = _vector(certificate, 0, 1)
    entries, _ = _vector(certificate, pos, 3)
    if not entries:
        return None
    der, _ = _vector(entries, 0, 3)
    return der or None


def _decompress(algorithm: int, data: bytes, length: int) -> bytes | None:
    """RFC 8879's algorithms: zlib (1), brotli (2), zstd (3), where this Python has them."""
    try:
        if algorithm == 1:
            import zlib

            d = zlib.decompressobj()
            out = d.decompress(data, length + 1)
        elif algorithm == 2:
            import brotli  # not a dependency: where installed

            out = brotli.decompress(data)
        elif algorithm == 3:
            try:
                from compression import zstd  # Python 3.14
            except ImportError:
                import zstandard as zstd  # not a dependency: where installed
            out = zstd.decompress(data) if hasattr(zstd, "decompress") else None
        else:
            return None
    except Exception:  # not installed, or not what it claims
        return None
    return out if out is not None and len(out) == length else None


def compressed_leaf_certificate(body: bytes) -> bytes | None:
    """The leaf of a CompressedCertificate (RFC 8879; OpenSSL 3.2+ compresses where both ends can);
    None when its algorithm is not available here."""
    if len(body) < 5:
        raise ValueError("short CompressedCertificate")
    algorithm, length = int.from_bytes(body[:2], "big"), int.from_bytes(body[2:5], "big")
    compressed, _ = _vector(body, 5, 3)
    if length > MAX_CERTIFICATE:
        return None
    plain = _decompress(algorithm, compressed, length)
    return leaf_certificate(plain) if plain is not None else None


class Flight:
    """What one direction's decrypted flight said."""

    __slots__ = ("alpn", "cert_der", "cert_requested")

    def __init__(self, alpn: str | None, cert_der: bytes | None, cert_requested: bool):
        self.alpn, self.cert_der, self.cert_requested = alpn, cert_der, cert_requested


def read_flight(records: bytes, secret: bytes, suite: int) -> Flight | None:
    """The facts of a decrypted flight (server: ALPN, certificate, whether it asked for the
    client's; client: its certificate); None when it cannot be decrypted."""
    msgs = handshake_messages(records, secret, suite)
    return None if msgs is None else flight_facts(msgs)


def flight_facts(msgs: list[tuple[int, bytes]]) -> Flight | None:
    """The facts of one direction's decrypted handshake messages (TLS records here, QUIC Handshake
    packets' CRYPTO stream in pipeline/quic_initial.py); None when they are not what they claim."""
    alpn, der, requested = None, None, False
    try:
        for mtype, body in msgs:
            if mtype == HS_ENCRYPTED_EXTENSIONS:
                alpn = selected_alpn(body)
            elif mtype == HS_CERTIFICATE:
                der = leaf_certificate(body)
            elif mtype == HS_COMPRESSED_CERTIFICATE:
                der = compressed_leaf_certificate(body)
            elif mtype == HS_CERT_REQUEST:
                requested = True
    except ValueError:  # authenticated, yet not the messages they claim to be: nothing from it
        return None
    return Flight(alpn, der, requested)
