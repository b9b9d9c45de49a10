"""Test helpers shared by the key log and pcapng tests: a throwaway certificate, random
tokens, and synthetic TCP packets for TLS bytes made in memory."""

from __future__ import annotations

import datetime
import os
import secrets
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(directory: str, name: str = "localhost") -> tuple[str, str]:
    """A self-signed EC certificate for localhost/127.0.0.1; returns (cert path, key path)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def token() -> str:
    return "tok" + secrets.token_hex(8)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class TcpFlow:
    """Builds Ethernet/IPv4/TCP frames of one connection (127.0.0.1 cport <-> sport)."""

    def __init__(self, cport: int, sport: int):
        self.ports = {True: (cport, sport), False: (sport, cport)}
        self.seq = {True: 1000, False: 5000}

    def frame(self, from_client: bool, payload: bytes, flags: int = 0x18) -> bytes:
        src, dst = self.ports[from_client]
        seq, ack = self.seq[from_client], self.seq[not from_client]
        tcp = struct.pack("!HHIIBBHHH", src, dst, seq, ack, 5 << 4, flags, 65535, 0, 0)
        pseudo = struct.pack("!4s4sBBH", bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]), 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp + payload)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        self.seq[from_client] += len(payload) + (1 if flags & 0x02 else 0)
        return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload

    def handshake(self) -> list[tuple[bool, bytes]]:
        syn = self.frame(True, b"", 0x02)
        synack = self.frame(False, b"", 0x12)
        ack = self.frame(True, b"", 0x10)
        return [(True, syn), (False, synack), (True, ack)]
