"""Secrets as read from one SSL object, and the key log lines they make.

The same ``KeyMaterial`` comes from a BPF record (``keys/tls_keys.py``) and from the calibration
(read straight from memory), so what is verified at calibration is what runs in production.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto_tracer.keys.hkdf import handshake_traffic_secrets

TLS1_2 = 0x0303
TLS1_3 = 0x0304
MASTER_KEY_LEN = 48  # TLS <= 1.2 master secret, fixed by RFC 5246


def tls13_hash(cipher_id: int) -> str:
    """Hash of a TLS 1.3 suite: only TLS_AES_256_GCM_SHA384 (0x1302) uses SHA-384."""
    return "sha384" if cipher_id & 0xFFFF == 0x1302 else "sha256"


def _zero(b: bytes) -> bool:
    return not any(b)


@dataclass
class KeyMaterial:
    version: int
    cipher_id: int
    client_random: bytes
    master_key: bytes  # TLS 1.2
    hs_a: bytes  # derive mode: handshake_secret; direct mode: client handshake traffic secret
    hs_b: bytes  # derive mode: handshake_traffic_hash; direct mode: server handshake traffic secret
    client_app: bytes
    server_app: bytes
    exporter: bytes
    hs_direct: bool = False

    def complete(self) -> bool:
        """True once every secret the version needs is final (non-zero)."""
        if _zero(self.client_random):
            return False
        if self.version == TLS1_3:
            n = 48 if tls13_hash(self.cipher_id) == "sha384" else 32
            return not any(_zero(s[:n]) for s in (self.hs_a, self.hs_b, self.client_app, self.server_app,
                                                  self.exporter))
        if self.version in (TLS1_2, 0x0302, 0x0301, 0x0300):
            return not _zero(self.master_key[:MASTER_KEY_LEN])
        return False

    def lines(self) -> list[tuple[str, str, str]]:
        """(label, client_random hex, secret hex) for every secret, in handshake order."""
        if not self.complete():
            return []
        cr = self.client_random.hex()
        if self.version != TLS1_3:
            return [("CLIENT_RANDOM", cr, self.master_key[:MASTER_KEY_LEN].hex())]
        hash_name = tls13_hash(self.cipher_id)
        n = 48 if hash_name == "sha384" else 32
        if self.hs_direct:
            chts, shts = self.hs_a[:n], self.hs_b[:n]
        else:
            chts, shts = handshake_traffic_secrets(self.hs_a[:n], self.hs_b[:n], hash_name)
        return [("CLIENT_HANDSHAKE_TRAFFIC_SECRET", cr, chts.hex()),
                ("SERVER_HANDSHAKE_TRAFFIC_SECRET", cr, shts.hex()),
                ("CLIENT_TRAFFIC_SECRET_0", cr, self.client_app[:n].hex()),
                ("SERVER_TRAFFIC_SECRET_0", cr, self.server_app[:n].hex()),
                ("EXPORTER_SECRET", cr, self.exporter[:n].hex())]
