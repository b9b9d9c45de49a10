"""Learn where one libssl3 (NSS) build keeps a connection's peer certificate and ALPN (run in a subprocess).

    python -m crypto_tracer.keys.calibrate_nss_worker /path/to/libssl3.so

NSS's secrets stay in PKCS#11 handles, but the facts TLS 1.3 encrypts do not: the SSL layer's
PRFileDesc (public, prio.h: methods, secret, lower, higher, dtor, identity) holds in `secret` the
sslSocket (nss lib/ssl/sslsock.c ssl_FindSocket), whose `sec.peerCert` is a CERTCertificate *
(public, certt.h: its derCert SECItem at a fixed offset) and whose `xtnData.nextProto` is a SECItem
with the negotiated ALPN. The offsets inside sslSocket depend on the build: this worker loads that
file (with the libnss3 and libnspr4 beside it) through ctypes, runs NSS client handshakes against a
loopback Python ssl server with a certificate and an ALPN of its own, takes the ground truth from
NSS's public API (SSL_PeerCertificate, SSL_GetNextProto) and finds where sslSocket holds them (and
the sslSocket's own pointer back to its PRFileDesc, which tells a reader that a descriptor's secret
is an sslSocket). Every offset must hold on every handshake (different certificates, key types and
ALPNs) or the worker reports none.
Prints {"nss": {...}} or {"error": "..."}.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import ssl
import struct
import sys
import tempfile
import threading
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_void_p

SCAN = 16384  # bytes of the sslSocket searched (about 3-4 KB in NSS 3.87-3.110)
FD_SECRET, FD_LOWER, FD_IDENTITY = 8, 16, 40  # PRFileDesc (prio.h)
CERT_DER = 0x78  # CERTCertificate.derCert: arena, subjectName, issuerName, CERTSignedData (96) (certt.h)
SECITEM_DATA, SECITEM_LEN = 8, 16  # SECItem {SECItemType type; unsigned char *data; unsigned int len}
TLS13 = 0x0304
SSL_SECURITY, SSL_HANDSHAKE_AS_CLIENT, SSL_ENABLE_ALPN = 1, 5, 26  # ssl.h option numbers
# (ALPN the server picks, key type of its certificate, its common name): each round must reproduce every offset
ROUNDS = [(b"h2", "ec", "crypto-tracer nss calibration one"),
          (b"crypto-tracer/calibration-2", "rsa", "crypto-tracer nss calibration two, longer name"),
          (b"http/1.1", "ec", "three")]

AUTH_HOOK = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_int, c_int)


class VersionRange(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint16), ("max", ctypes.c_uint16)]


_MEM = None


def read(addr: int, size: int) -> bytes:
    """Our own memory through /proc/self/mem: an unmapped address is an OSError, never a crash."""
    global _MEM
    if _MEM is None:
        _MEM = open("/proc/self/mem", "rb", buffering=0)
    if not 0 < addr < 1 << 47:
        raise OSError("not a user address")
    _MEM.seek(addr)
    data = _MEM.read(size)
    if len(data) != size:
        raise OSError("short read")
    return data


def _certificate(kind: str, name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM), self-signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class Server:
    """One loopback TLS 1.3 connection served by Python's ssl with this certificate and ALPN."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, alpn: bytes):
        with tempfile.TemporaryDirectory() as d:
            cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            with open(cert, "wb") as f:
                f.write(cert_pem)
            with open(key, "wb") as f:
                f.write(key_pem)
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(cert, key)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.set_alpn_protocols([alpn.decode()])
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(20)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"x")  # a byte, so the client's first read completes the handshake
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
        finally:
            self.listener.close()


class Nss:
    def __init__(self, path: str):
        where = os.path.dirname(os.path.realpath(path))
        # the NSS and NSPR of the same build sit beside their libssl3 (Debian: one directory)
        self.nspr = ctypes.CDLL(os.path.join(where, "libnspr4.so"))
        self.nss = ctypes.CDLL(os.path.join(where, "libnss3.so"))
        self.ssl = ctypes.CDLL(path)
        sigs = {
            (self.nspr, "PR_ImportTCPSocket"): (c_void_p, [c_int]),
            (self.nspr, "PR_Close"): (c_int, [c_void_p]),
            (self.nspr, "PR_Read"): (c_int, [c_void_p, c_void_p, c_int]),
            (self.nspr, "PR_Write"): (c_int, [c_void_p, c_char_p, c_int]),
            (self.nss, "NSS_NoDB_Init"): (c_int, [c_char_p]),
            (self.nss, "NSS_GetVersion"): (c_char_p, []),
            (self.nss, "CERT_DestroyCertificate"): (None, [c_void_p]),
            (self.ssl, "SSL_ImportFD"): (c_void_p, [c_void_p, c_void_p]),
            (self.ssl, "SSL_OptionSet"): (c_int, [c_void_p, c_int, c_int]),
            (self.ssl, "SSL_VersionRangeSet"): (c_int, [c_void_p, POINTER(VersionRange)]),
            (self.ssl, "SSL_SetURL"): (c_int, [c_void_p, c_char_p]),
            (self.ssl, "SSL_SetNextProtoNego"): (c_int, [c_void_p, c_char_p, c_uint]),
            (self.ssl, "SSL_AuthCertificateHook"): (c_int, [c_void_p, AUTH_HOOK, c_void_p]),
            (self.ssl, "SSL_ResetHandshake"): (c_int, [c_void_p, c_int]),
            (self.ssl, "SSL_ForceHandshake"): (c_int, [c_void_p]),
            (self.ssl, "SSL_PeerCertificate"): (c_void_p, [c_void_p]),
            (self.ssl, "SSL_GetNextProto"): (c_int, [c_void_p, POINTER(c_int), c_char_p, POINTER(c_uint), c_uint]),
        }
        for (lib, name), (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if self.nss.NSS_NoDB_Init(None) != 0:
            raise RuntimeError("NSS_NoDB_Init failed")
        self._accept = AUTH_HOOK(lambda *_: 0)  # SECSuccess: the test certificate is self-signed

    def version(self) -> str:
        return self.nss.NSS_GetVersion().decode()

    def handshake(self, port: int, alpn: bytes, inspect=None) -> dict:
        """One TLS 1.3 client handshake: the truth (NSS's API) and where its sslSocket holds it
        (and inspect(descriptor, sslSocket)'s result, called before the connection is closed)."""
        ssl_ = self.ssl
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        fd = self.nspr.PR_ImportTCPSocket(sock.detach())
        if not fd:
            raise RuntimeError("PR_ImportTCPSocket failed")
        top = ssl_.SSL_ImportFD(None, fd)
        if not top:
            raise RuntimeError("SSL_ImportFD failed")
        rng = VersionRange(TLS13, TLS13)
        offer = bytes([len(alpn)]) + alpn + b"\x02h3"  # the server's choice and one it does not know
        if (ssl_.SSL_OptionSet(top, SSL_SECURITY, 1) or ssl_.SSL_OptionSet(top, SSL_HANDSHAKE_AS_CLIENT, 1) or
                ssl_.SSL_VersionRangeSet(top, byref(rng)) or ssl_.SSL_SetURL(top, b"localhost") or
                ssl_.SSL_SetNextProtoNego(top, offer, len(offer)) or
                ssl_.SSL_AuthCertificateHook(top, self._accept, None) or ssl_.SSL_ResetHandshake(top, 0) or
                ssl_.SSL_ForceHandshake(top)):
            raise RuntimeError("the NSS client handshake failed")
        buf = ctypes.create_string_buffer(1)
        if self.nspr.PR_Read(top, buf, 1) != 1:  # as a traced client's first data call: after the handshake
            raise RuntimeError("PR_Read after the handshake failed")
        cert = ssl_.SSL_PeerCertificate(top)
        state, proto, plen = c_int(), ctypes.create_string_buffer(256), c_uint()
        ok = ssl_.SSL_GetNextProto(top, byref(state), proto, byref(plen), 255) == 0
        ss = struct.unpack("<Q", read(top + FD_SECRET, 8))[0]
        mem = read(ss, SCAN)
        got = {"alpn": proto.raw[:plen.value] if ok and plen.value else None,
               "der": read(struct.unpack("<Q", read(cert + CERT_DER + SECITEM_DATA, 8))[0],
                           struct.unpack("<I", read(cert + CERT_DER + SECITEM_LEN, 4))[0]) if cert else None,
               # SSL_PeerCertificate returns sec.peerCert itself (CERT_DupCertificate adds a reference)
               "peer_cert": _pointers_to(mem, cert) if cert else set(), "fd": _pointers_to(mem, top),
               "next_proto": _secitems_of(mem, alpn), "inspected": inspect(top, ss) if inspect else None}
        self.nspr.PR_Write(top, b"y", 1)
        if cert:
            self.nss.CERT_DestroyCertificate(cert)
        self.nspr.PR_Close(top)
        return got


def _pointers_to(mem: bytes, value: int) -> set[int]:
    """Offsets of 8-aligned pointers equal to value."""
    return {o for o in range(0, len(mem) - 7, 8) if struct.unpack_from("<Q", mem, o)[0] == value}


def _secitems_of(mem: bytes, want: bytes) -> set[int]:
    """Offsets of SECItems {type, data, len} in mem whose bytes are want."""
    found = set()
    for o in range(0, len(mem) - 23, 8):
        data, length = struct.unpack_from("<QI", mem, o + SECITEM_DATA)
        if length == len(want) and data > 4096:
            try:
                if read(data, length) == want:
                    found.add(o)
            except OSError:
                continue
    return found


def calibrate(path: str) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    nss = Nss(path)
    cert_offs = fd_offs = alpn_offs = None
    verified = 0
    for alpn, kind, name in ROUNDS:
        cert_pem, key_pem = _certificate(kind, name)
        want_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        server = Server(cert_pem, key_pem, alpn)
        got = nss.handshake(server.port, alpn)
        server.thread.join(20)
        if server.error is not None:
            raise RuntimeError(f"the calibration server failed: {server.error}")
        # the public API's truth first: what NSS says it negotiated and received
        if got["alpn"] != alpn or got["der"] != want_der:
            raise RuntimeError(f"NSS reports ALPN {got['alpn']!r} and a certificate "
                               f"{'equal' if got['der'] == want_der else 'unequal'} to the server's")
        c, f, a = got["peer_cert"], got["fd"], got["next_proto"]
        cert_offs = c if cert_offs is None else cert_offs & c
        fd_offs = f if fd_offs is None else fd_offs & f
        alpn_offs = a if alpn_offs is None else alpn_offs & a
        verified += 1
    if len(cert_offs) != 1 or len(alpn_offs) != 1 or not fd_offs:
        raise RuntimeError(f"no single offset: peer certificate {sorted(cert_offs)}, ALPN {sorted(alpn_offs)}, "
                           f"descriptor {sorted(fd_offs)}")
    return {"version": nss.version(), "peer_cert": cert_offs.pop(), "next_proto": alpn_offs.pop(),
            "fd": min(fd_offs), "cert_der": CERT_DER, "verified": verified}


def main() -> int:
    try:
        result = {"nss": calibrate(sys.argv[1])}
    except (OSError, RuntimeError, ValueError, ssl.SSLError, AttributeError) as exc:  # AttributeError: a symbol missing
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
