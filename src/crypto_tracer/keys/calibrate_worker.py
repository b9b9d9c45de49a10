"""Learn where one libssl build keeps its TLS secrets (run in a subprocess).

    python -m crypto_tracer.keys.calibrate_worker /path/to/libssl.so.3

Loads that exact file with ctypes, runs client and server SSL objects against each other
over a memory BIO pair (TLS 1.3 and 1.2, several suites), collects OpenSSL's own key log
through SSL_CTX_set_keylog_callback, and searches the SSL objects' memory for those
secrets (keys/search.py, shared with the node calibration). The learned layout is then checked against every handshake; it prints one JSON
object: {"layout": {...}} or {"error": "..."}. Nothing leaves the process: the sessions
are in memory, the secrets are thrown away.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from ctypes import c_char_p, c_int, c_long, c_void_p

from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.material import TLS1_3
from crypto_tracer.keys.search import Sample, learn, verify

SSL_CTRL_SET_MIN_PROTO_VERSION = 123
SSL_CTRL_SET_MAX_PROTO_VERSION = 124
EVP_PKEY_EC = 408
KEYLOG_CB = ctypes.CFUNCTYPE(None, c_void_p, c_char_p)

# (max version, TLS 1.3 suites, TLS 1.2 cipher list)
ROUNDS = [
    (TLS1_3, b"TLS_AES_128_GCM_SHA256", None),
    (TLS1_3, b"TLS_AES_256_GCM_SHA384", None),
    (TLS1_3, b"TLS_CHACHA20_POLY1305_SHA256", None),
    (0x0303, None, b"ECDHE-ECDSA-AES128-GCM-SHA256"),
    (0x0303, None, b"ECDHE-ECDSA-AES256-GCM-SHA384"),
    (0x0303, None, b"ECDHE-ECDSA-CHACHA20-POLY1305"),
]

_mem = os.open("/proc/self/mem", os.O_RDONLY)


def read(addr: int, size: int) -> bytes:
    """Our own memory, without risking a segfault on an unmapped address."""
    if not 0x10000 <= addr < 1 << 47:  # user-space addresses only
        return b""
    try:
        return os.pread(_mem, size, addr)
    except OSError:
        return b""


def _cert_der() -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crypto-tracer calibration")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _libcrypto_beside(path: str) -> str | None:
    """The libcrypto next to a libssl: same name with libcrypto, or the only libcrypto*.so.N
    there (bundled copies have hashed names, e.g. libcrypto-2ade47cd.so.1.1)."""
    import glob

    real = os.path.realpath(path)
    name, where = os.path.basename(real), os.path.dirname(real)
    if not name.startswith("libssl") or ".so" not in name:
        return None
    same = os.path.join(where, name.replace("libssl", "libcrypto", 1))
    if os.path.exists(same):
        return same
    found = glob.glob(os.path.join(where, "libcrypto*" + name[name.index(".so"):]))
    return found[0] if len(found) == 1 else None


class OpenSSL:
    def __init__(self, path: str):
        # Its own libcrypto, from the same directory, is loaded first so that libssl binds to it
        # (not LD_LIBRARY_PATH: that would also swap libraries under the Python interpreter).
        crypto = _libcrypto_beside(path)
        if crypto:
            self.crypto = ctypes.CDLL(crypto, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        self.lib = lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        sig = {
            "TLS_method": (c_void_p, []), "SSL_CTX_new": (c_void_p, [c_void_p]),
            "SSL_CTX_ctrl": (c_long, [c_void_p, c_int, c_long, c_void_p]),
            "SSL_CTX_set_ciphersuites": (c_int, [c_void_p, c_char_p]),
            "SSL_CTX_set_cipher_list": (c_int, [c_void_p, c_char_p]),
            "SSL_CTX_set_keylog_callback": (None, [c_void_p, KEYLOG_CB]),
            "SSL_CTX_use_certificate_ASN1": (c_int, [c_void_p, c_int, c_char_p]),
            "SSL_CTX_use_PrivateKey_ASN1": (c_int, [c_int, c_void_p, c_char_p, c_long]),
            "SSL_new": (c_void_p, [c_void_p]), "SSL_free": (None, [c_void_p]),
            "SSL_set_bio": (None, [c_void_p, c_void_p, c_void_p]),
            "SSL_set_connect_state": (None, [c_void_p]), "SSL_set_accept_state": (None, [c_void_p]),
            "SSL_do_handshake": (c_int, [c_void_p]),
            "SSL_write": (c_int, [c_void_p, c_char_p, c_int]), "SSL_read": (c_int, [c_void_p, c_char_p, c_int]),
            "SSL_version": (c_int, [c_void_p]), "SSL_get_session": (c_void_p, [c_void_p]),
            "SSL_get_current_cipher": (c_void_p, [c_void_p]), "SSL_CIPHER_get_id": (ctypes.c_uint32, [c_void_p]),
            "BIO_new_bio_pair": (c_int, [ctypes.POINTER(c_void_p), ctypes.c_size_t,
                                         ctypes.POINTER(c_void_p), ctypes.c_size_t]),
            "OpenSSL_version": (c_char_p, [c_int]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.keylog: list[tuple[int, str]] = []
        self._cb = KEYLOG_CB(lambda ssl, line: self.keylog.append((ssl, line.decode())))
        self.cert, self.key = _cert_der()

    def version(self) -> str:
        return self.lib.OpenSSL_version(0).decode()  # "OpenSSL 3.0.19 27 Jan 2026"

    def _ctx(self, max_version: int, suites: bytes | None, ciphers: bytes | None, server: bool) -> int:
        lib = self.lib
        ctx = lib.SSL_CTX_new(lib.TLS_method())
        lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, max_version, None)
        lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MAX_PROTO_VERSION, max_version, None)
        if suites:
            lib.SSL_CTX_set_ciphersuites(ctx, suites)
        if ciphers:
            lib.SSL_CTX_set_cipher_list(ctx, ciphers)
        lib.SSL_CTX_set_keylog_callback(ctx, self._cb)
        if server:
            if lib.SSL_CTX_use_certificate_ASN1(ctx, len(self.cert), self.cert) != 1 or \
                    lib.SSL_CTX_use_PrivateKey_ASN1(EVP_PKEY_EC, ctx, self.key, len(self.key)) != 1:
                raise RuntimeError("the library refused the calibration certificate")
        return ctx

    def handshake(self, max_version: int, suites: bytes | None, ciphers: bytes | None) -> tuple[int, int]:
        """A finished client/server pair (SSL pointers), with data exchanged both ways."""
        lib = self.lib
        client = lib.SSL_new(self._ctx(max_version, suites, ciphers, False))
        server = lib.SSL_new(self._ctx(max_version, suites, ciphers, True))
        b1, b2 = c_void_p(), c_void_p()
        lib.BIO_new_bio_pair(ctypes.byref(b1), 0, ctypes.byref(b2), 0)
        lib.SSL_set_bio(client, b1, b1)
        lib.SSL_set_bio(server, b2, b2)
        lib.SSL_set_connect_state(client)
        lib.SSL_set_accept_state(server)
        for _ in range(50):
            rc, rs = lib.SSL_do_handshake(client), lib.SSL_do_handshake(server)
            if rc == 1 and rs == 1:
                break
        else:
            raise RuntimeError("calibration handshake did not complete")
        buf = ctypes.create_string_buffer(256)
        for _ in range(2):  # lets the client take the server's session tickets
            lib.SSL_write(client, b"ping", 4)
            lib.SSL_read(server, buf, 256)
            lib.SSL_write(server, b"pong", 4)
            lib.SSL_read(client, buf, 256)
        return client, server

    def lines_for(self, ssl: int) -> dict[str, tuple[str, str]]:
        out = {}
        for owner, line in self.keylog:
            if owner == ssl:
                label, cr, secret = line.split()
                out[label] = (cr, secret)
        return out


def samples(ossl: OpenSSL, ssls: list[int]) -> list[Sample]:
    """The SSL objects with what the library says of them (its key log, version, cipher, session)."""
    lib = ossl.lib
    return [Sample(ssl, ossl.lines_for(ssl), lib.SSL_version(ssl),
                   lib.SSL_CIPHER_get_id(lib.SSL_get_current_cipher(ssl)), lib.SSL_get_session(ssl))
            for ssl in ssls]


def calibrate(path: str) -> Layout:
    ossl = OpenSSL(path)
    pairs = [ossl.handshake(*r) for r in ROUNDS for _ in range(2)]
    found = samples(ossl, [s for pair in pairs for s in pair])
    lay = learn(read, found)
    lay.verified = verify(read, lay, [(s.ssl, s.lines) for s in found])
    lay.version = ossl.version().split()[1]
    return lay


def main() -> int:
    try:
        lay = calibrate(sys.argv[1])
        print(json.dumps({"layout": lay.to_json()}))
    except (OSError, AttributeError, RuntimeError, KeyError, IndexError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
