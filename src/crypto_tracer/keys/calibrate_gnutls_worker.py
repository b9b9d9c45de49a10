"""Learn where one libgnutls build keeps its TLS secrets (run in a subprocess).

    python -m crypto_tracer.keys.calibrate_gnutls_worker /path/to/libgnutls.so.30

The GnuTLS twin of ``calibrate_worker``: client and server sessions of that exact file
talk over in-memory push/pull functions (TLS 1.3 and 1.2, several suites), GnuTLS's own key
log comes from gnutls_session_set_keylog_function, and the session objects are searched
for those secrets. GnuTLS keeps the TLS 1.3 traffic secrets themselves (hs_direct), the
master secret inline, and the version and suite behind pointers, as two big-endian bytes.
Prints {"layout": {...}} or {"error": "..."}.
"""

from __future__ import annotations

import ctypes
import errno
import json
import struct
import sys
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_ssize_t, c_uint, c_void_p

from crypto_tracer.keys.calibrate_worker import _cert_der, read
from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.search import find_all, one, verify

SCAN = 16384  # bytes of the session searched (the secrets sit around 6 KB in 3.7)
GNUTLS_SERVER, GNUTLS_CLIENT = 1, 2
GNUTLS_CRD_CERTIFICATE = 1
GNUTLS_X509_FMT_DER = 0


class Datum(ctypes.Structure):
    _fields_ = [("data", c_void_p), ("size", c_uint)]


PUSH = ctypes.CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
PULL = ctypes.CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
KEYLOG = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, POINTER(Datum))

# (priority string, TLS 1.3?, suite id) -- our certificate is ECDSA
ROUNDS = [
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM", 0x1301),
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM", 0x1302),
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305", 0x1303),
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM:-KX-ALL:+ECDHE-ECDSA", 0xC02B),
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+ECDHE-ECDSA", 0xC02C),
    (b"NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+CHACHA20-POLY1305:-KX-ALL:+ECDHE-ECDSA", 0xCCA9),
]


class GnuTLS:
    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        sig = {
            "gnutls_global_init": (c_int, []), "gnutls_check_version": (c_char_p, [c_char_p]),
            "gnutls_init": (c_int, [POINTER(c_void_p), c_uint]),
            "gnutls_priority_set_direct": (c_int, [c_void_p, c_char_p, c_void_p]),
            "gnutls_credentials_set": (c_int, [c_void_p, c_int, c_void_p]),
            "gnutls_certificate_allocate_credentials": (c_int, [POINTER(c_void_p)]),
            "gnutls_certificate_set_x509_key_mem": (c_int, [c_void_p, POINTER(Datum), POINTER(Datum), c_int]),
            "gnutls_transport_set_push_function": (None, [c_void_p, PUSH]),
            "gnutls_transport_set_pull_function": (None, [c_void_p, PULL]),
            "gnutls_transport_set_errno": (None, [c_void_p, c_int]),
            "gnutls_handshake": (c_int, [c_void_p]),
            "gnutls_record_send": (c_ssize_t, [c_void_p, c_char_p, c_size_t]),
            "gnutls_record_recv": (c_ssize_t, [c_void_p, c_void_p, c_size_t]),
            "gnutls_session_set_keylog_function": (None, [c_void_p, KEYLOG]),
            "gnutls_session_get_random": (None, [c_void_p, POINTER(Datum), POINTER(Datum)]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib.gnutls_global_init()
        self.keylog: list[tuple[int, str, str]] = []  # (session, label, secret hex)
        self._keep = []
        self._keylog_cb = KEYLOG(self._on_key)
        cert, key = _cert_der()
        self._der = [ctypes.create_string_buffer(cert, len(cert)), ctypes.create_string_buffer(key, len(key))]
        self.cred = c_void_p()
        lib.gnutls_certificate_allocate_credentials(byref(self.cred))
        cd = Datum(ctypes.cast(self._der[0], c_void_p), len(cert))
        kd = Datum(ctypes.cast(self._der[1], c_void_p), len(key))
        if lib.gnutls_certificate_set_x509_key_mem(self.cred, byref(cd), byref(kd), GNUTLS_X509_FMT_DER) != 0:
            raise RuntimeError("the library refused the calibration certificate")

    def version(self) -> str:
        return self.lib.gnutls_check_version(None).decode()

    def _on_key(self, session, label, secret) -> int:
        self.keylog.append((session, label.decode(), ctypes.string_at(secret.contents.data,
                                                                       secret.contents.size).hex()))
        return 0

    def client_random(self, session: int) -> bytes:
        cr, sr = Datum(), Datum()
        self.lib.gnutls_session_get_random(session, byref(cr), byref(sr))
        return ctypes.string_at(cr.data, 32)

    def lines_for(self, session: int) -> dict[str, tuple[str, str]]:
        cr = self.client_random(session).hex()
        return {label: (cr, secret) for owner, label, secret in self.keylog if owner == session}

    def handshake(self, priority: bytes) -> tuple[int, int]:
        lib, inbox, sessions = self.lib, {1: bytearray(), 2: bytearray()}, {}

        def push_to(peer):
            def push(_ptr, data, n):
                inbox[peer].extend(ctypes.string_at(data, n))
                return n
            return PUSH(push)

        def pull_for(me):
            def pull(_ptr, data, n):
                box = inbox[me]
                if not box:
                    lib.gnutls_transport_set_errno(sessions[me], errno.EAGAIN)
                    return -1
                k = min(n, len(box))
                ctypes.memmove(data, bytes(box[:k]), k)
                del box[:k]
                return k
            return PULL(pull)

        for me, flag, peer in ((1, GNUTLS_SERVER, 2), (2, GNUTLS_CLIENT, 1)):
            s = c_void_p()
            lib.gnutls_init(byref(s), flag)
            sessions[me] = s.value
            if lib.gnutls_priority_set_direct(s, priority, None) != 0:
                raise RuntimeError(f"priority {priority.decode()} refused")
            lib.gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, self.cred)
            callbacks = (push_to(peer), pull_for(me))
            self._keep.extend(callbacks)
            lib.gnutls_transport_set_push_function(s, callbacks[0])
            lib.gnutls_transport_set_pull_function(s, callbacks[1])
            lib.gnutls_session_set_keylog_function(s, self._keylog_cb)
        server, client = sessions[1], sessions[2]
        done = {client: False, server: False}
        for _ in range(50):  # never call it again once done: on a TLS 1.2 server that renegotiates
            for s in (client, server):
                if not done[s]:
                    done[s] = lib.gnutls_handshake(s) == 0
            if all(done.values()):
                break
        else:
            raise RuntimeError("calibration handshake did not complete")
        buf = ctypes.create_string_buffer(256)
        lib.gnutls_record_send(client, b"ping", 4)
        lib.gnutls_record_recv(server, buf, 256)
        lib.gnutls_record_send(server, b"pong", 4)
        lib.gnutls_record_recv(client, buf, 256)
        return client, server


def _pointer_field(samples: list[tuple[int, bytes]]) -> tuple[int, int]:
    """(pointer offset, offset behind it) that leads to the expected bytes in every sample."""
    first, want = samples[0]
    mem = read(first, 2048)
    for ptr_off in range(0, len(mem) - 8, 8):
        target = struct.unpack_from("<Q", mem, ptr_off)[0]
        for inner in find_all(read(target, 128), want):
            ok = True
            for session, expected in samples[1:]:
                p = struct.unpack("<Q", read(session + ptr_off, 8) or bytes(8))[0]
                ok = ok and read(p + inner, len(expected)) == expected
            if ok:
                return ptr_off, inner
    raise RuntimeError("pointer field not found")


def learn(g: GnuTLS, pairs: list[tuple[int, int, int, bool]]) -> Layout:
    """pairs: (client, server, suite id, is TLS 1.3)."""
    c13 = next(c for c, _, _, tls13 in pairs if tls13)
    c12 = next(c for c, _, _, tls13 in pairs if not tls13)
    lines = g.lines_for(c13)
    mem = read(c13, SCAN)

    def where(label: str) -> int:
        return one(find_all(mem, bytes.fromhex(lines[label][1])), label)

    cr = one(find_all(read(c13, 512), g.client_random(c13)), "client_random")
    master = one(find_all(read(c12, SCAN), bytes.fromhex(g.lines_for(c12)["CLIENT_RANDOM"][1])), "master secret")
    version = _pointer_field([(s, bytes([3, 4 if tls13 else 3])) for c, sv, _, tls13 in pairs for s in (c, sv)])
    cipher = _pointer_field([(s, struct.pack(">H", suite)) for c, sv, suite, _ in pairs for s in (c, sv)])
    return Layout(version="", client_random=(-1, cr), tls_version=version[1], session=-1, master_key=master,
                  cipher=cipher[0], cipher_id=cipher[1], hs_a=where("CLIENT_HANDSHAKE_TRAFFIC_SECRET"),
                  hs_b=where("SERVER_HANDSHAKE_TRAFFIC_SECRET"), client_app=where("CLIENT_TRAFFIC_SECRET_0"),
                  server_app=where("SERVER_TRAFFIC_SECRET_0"), exporter=where("EXPORTER_SECRET"), hs_direct=True,
                  version_deref=version[0], version_be=True, cipher_in_session=False, cipher_id_be=True)


def calibrate(path: str) -> Layout:
    g = GnuTLS(path)
    pairs = []
    for priority, suite in ROUNDS:
        for _ in range(2):
            client, server = g.handshake(priority)
            pairs.append((client, server, suite, suite >> 8 == 0x13))
    lay = learn(g, pairs)
    lay.verified = verify(read, lay, [(s, g.lines_for(s)) for c, sv, _, _ in pairs for s in (c, sv)])
    lay.version = "gnutls " + g.version()
    return lay


def main() -> int:
    try:
        print(json.dumps({"layout": calibrate(sys.argv[1]).to_json()}))
    except (OSError, AttributeError, RuntimeError, KeyError, IndexError, ValueError, StopIteration) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
