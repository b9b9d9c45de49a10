"""Learn, on one BoringSSL build, what bpf/tls.bpf.c's bssl_keylog needs (run in a subprocess).

    python -m crypto_tracer.keys.calibrate_bssl_worker /path/to/libssl.so.0-or-a-static-copy

bssl_keylog sits on bssl::ssl_log_secret(ssl, label, Span secret), which gets the label and the
secret; the client_random it reads itself from ssl->s3->client_random. This worker loads that
exact file with ctypes, runs client/server pairs over a memory BIO pair (TLS 1.3 and 1.2) with
SSL_CTX_set_keylog_callback, and learns:

* where ssl_log_secret is: its .symtab name, or (a stripped shared library: Debian's
  android-libboringssl) the one function that every `lea rsi, [label]` of the key log labels
  calls;
* where client_random is: the (s3 pointer offset, offset in s3) that holds the client_random of
  every key log line of every object.

Then it calls that ssl_log_secret itself, on every object, with a label and secret of its own: the
library's key log callback must print exactly the line the layout predicts. That checks the
function, its argument registers and the layout against BoringSSL's own output. It prints one
JSON object: {"bssl": {...}} or {"error": "..."}. Nothing leaves the process.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from ctypes import c_char_p, c_int, c_size_t, c_void_p

from crypto_tracer.host import elf
from crypto_tracer.keys.calibrate_worker import KEYLOG_CB, _cert_der, read
from crypto_tracer.keys.search import Sample, _find_client_random

EVP_PKEY_EC = 408
TLS1_2, TLS1_3 = 0x0303, 0x0304
LABELS = (b"CLIENT_RANDOM", b"CLIENT_HANDSHAKE_TRAFFIC_SECRET", b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
          b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0", b"EXPORTER_SECRET")
MANGLED = b"_ZN4bssl14ssl_log_secretE"
MIN_VERIFIED = 8  # SSL objects whose key log the layout and the function reproduce
SIGS = {
    "TLS_method": (c_void_p, []), "SSL_CTX_new": (c_void_p, [c_void_p]),
    "SSL_CTX_set_min_proto_version": (c_int, [c_void_p, ctypes.c_uint16]),
    "SSL_CTX_set_max_proto_version": (c_int, [c_void_p, ctypes.c_uint16]),
    "SSL_CTX_set_keylog_callback": (None, [c_void_p, KEYLOG_CB]),
    "SSL_CTX_use_certificate_ASN1": (c_int, [c_void_p, c_size_t, c_char_p]),
    "SSL_CTX_use_PrivateKey_ASN1": (c_int, [c_int, c_void_p, c_char_p, c_size_t]),
    "SSL_new": (c_void_p, [c_void_p]),
    "SSL_set_bio": (None, [c_void_p, c_void_p, c_void_p]),
    "SSL_set_connect_state": (None, [c_void_p]), "SSL_set_accept_state": (None, [c_void_p]),
    "SSL_do_handshake": (c_int, [c_void_p]),
    "SSL_write": (c_int, [c_void_p, c_char_p, c_int]), "SSL_read": (c_int, [c_void_p, c_char_p, c_int]),
    "BIO_new_bio_pair": (c_int, [ctypes.POINTER(c_void_p), c_size_t, ctypes.POINTER(c_void_p), c_size_t]),
}
LOG_SECRET = ctypes.CFUNCTYPE(ctypes.c_bool, c_void_p, c_char_p, c_void_p, c_size_t)


def find_log_secret(f: elf.ElfFile) -> int | None:
    """The virtual address of bssl::ssl_log_secret: from .symtab, else the one call target
    that at least three different key log labels, loaded into RSI just before, lead to."""
    name = f.name_starting(MANGLED)
    if name is not None:
        sym = f.symbols([name], table=elf.SYMTAB, types=(elf.STT_FUNC,)).get(name)
        if sym is not None:
            return sym.value
    import capstone  # only here: a stripped library

    data = f.data
    labels = {}
    for label in LABELS:
        pos = data.find(b"\0" + label + b"\0")
        if pos >= 0:
            vaddr = _vaddr(f, pos + 1)
            if vaddr is not None:
                labels[vaddr] = label
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    votes: dict[int, set] = {}
    pos = data.find(b"\x48\x8d\x35")  # lea rsi, [rip + disp32]
    while pos >= 0:
        at = _vaddr(f, pos)
        if at is not None:
            target = at + 7 + struct.unpack_from("<i", data, pos + 3)[0]
            if target in labels:
                for insn in md.disasm(bytes(data[pos + 7:pos + 7 + 48]), at + 7):
                    if insn.mnemonic in ("call", "jmp") and insn.op_str.startswith("0x"):
                        votes.setdefault(int(insn.op_str, 16), set()).add(labels[target])
                        break
                    if insn.mnemonic.startswith(("ret", "call", "j")):
                        break
        pos = data.find(b"\x48\x8d\x35", pos + 1)
    best = [t for t, seen in votes.items() if len(seen) >= 3]
    return best[0] if len(best) == 1 else None


def _vaddr(f: elf.ElfFile, offset: int) -> int | None:
    for vaddr, memsz, off in f.loads:
        if off <= offset < off + memsz:
            return vaddr + offset - off
    return None


class Bssl:
    def __init__(self, path: str):
        with elf.ElfFile.open(path) as f:
            self.log_secret_vaddr = find_log_secret(f)
            if self.log_secret_vaddr is None:
                raise RuntimeError("bssl::ssl_log_secret not found")
            self.log_secret_offset = f.file_offset(self.log_secret_vaddr)
            exported = f.symbols(list(SIGS))
            local = f.symbols(list(SIGS), table=elf.SYMTAB, types=(elf.STT_FUNC,))
            first_load = min(v for v, _m, _o in f.loads)
        self.lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        self.base = _load_base(path) - first_load
        self.fn = {}
        for name, (res, args) in SIGS.items():
            if name in local and name not in exported:  # a static copy: call its own, by address
                fn = ctypes.CFUNCTYPE(res, *args)(self.base + local[name].value)
            else:  # exported by it or by its libcrypto (dlsym on the handle searches both)
                try:
                    fn = getattr(self.lib, name)
                except AttributeError:
                    raise RuntimeError(f"{name} not found") from None
                fn.restype, fn.argtypes = res, args
            self.fn[name] = fn
        self.log_secret = LOG_SECRET(self.base + self.log_secret_vaddr)
        self.keylog: list[tuple[int, str]] = []
        self._cb = KEYLOG_CB(lambda ssl, line: self.keylog.append((ssl, line.decode())))
        self.cert, self.key = _cert_der()

    def _ctx(self, version: int, server: bool) -> int:
        fn = self.fn
        ctx = fn["SSL_CTX_new"](fn["TLS_method"]())
        fn["SSL_CTX_set_min_proto_version"](ctx, version)
        fn["SSL_CTX_set_max_proto_version"](ctx, version)
        fn["SSL_CTX_set_keylog_callback"](ctx, self._cb)
        if server and (fn["SSL_CTX_use_certificate_ASN1"](ctx, len(self.cert), self.cert) != 1 or
                       fn["SSL_CTX_use_PrivateKey_ASN1"](EVP_PKEY_EC, ctx, self.key, len(self.key)) != 1):
            raise RuntimeError("the library refused the calibration certificate")
        return ctx

    def handshake(self, version: int) -> tuple[int, int]:
        fn = self.fn
        client, server = fn["SSL_new"](self._ctx(version, False)), fn["SSL_new"](self._ctx(version, True))
        b1, b2 = c_void_p(), c_void_p()
        fn["BIO_new_bio_pair"](ctypes.byref(b1), 0, ctypes.byref(b2), 0)
        fn["SSL_set_bio"](client, b1, b1)
        fn["SSL_set_bio"](server, b2, b2)
        fn["SSL_set_connect_state"](client)
        fn["SSL_set_accept_state"](server)
        for _ in range(50):
            rc, rs = fn["SSL_do_handshake"](client), fn["SSL_do_handshake"](server)  # both, every round
            if rc == 1 and rs == 1:
                break
        else:
            raise RuntimeError("calibration handshake did not complete")
        buf = ctypes.create_string_buffer(256)
        fn["SSL_write"](client, b"ping", 4)
        fn["SSL_read"](server, buf, 256)
        return client, server

    def randoms(self, ssl: int) -> set[str]:
        return {line.split()[1] for owner, line in self.keylog if owner == ssl}


def _load_base(path: str) -> int:
    real = os.path.realpath(path)
    st = os.stat(real)
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and int(parts[2], 16) == 0 and parts[5] == real:
                return int(parts[0].split("-")[0], 16)
            if len(parts) >= 6 and int(parts[2], 16) == 0 and parts[4] == str(st.st_ino):
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError("the library's mapping was not found")


def calibrate(path: str) -> dict:
    b = Bssl(path)
    ssls = [s for v in (TLS1_3, TLS1_2) for _ in range(3) for s in b.handshake(v)]
    samples = []
    for ssl in ssls:
        randoms = b.randoms(ssl)
        if len(randoms) != 1:
            raise RuntimeError("no key log (or more than one client_random) for an SSL object")
        samples.append((ssl, bytes.fromhex(randoms.pop())))
    s3, client_random = _find_client_random(read, [Sample(ssl, {"": (cr.hex(), "")}, 0, 0) for ssl, cr in samples])
    if s3 < 0:
        raise RuntimeError("client_random is not behind a pointer of the SSL object (ssl->s3)")
    # ssl_log_secret itself, called by us: the library's callback must print what the layout predicts
    verified = 0
    for n, (ssl, cr) in enumerate(samples):
        secret = bytes(range(n, n + 48))
        b.keylog.clear()
        if not b.log_secret(ssl, b"CT_CALIBRATION", secret, len(secret)):
            raise RuntimeError("ssl_log_secret failed")
        s3_ptr = struct.unpack("<Q", read(ssl + s3, 8))[0]
        want = f"CT_CALIBRATION {read(s3_ptr + client_random, 32).hex()} {secret.hex()}"
        if b.keylog != [(ssl, want)] or read(s3_ptr + client_random, 32) != cr:
            raise RuntimeError("ssl_log_secret or the client_random offsets do not reproduce the key log")
        verified += 1
    return {"s3": s3, "client_random": client_random, "log_secret": b.log_secret_offset, "verified": verified}


def main() -> int:
    try:
        print(json.dumps({"bssl": calibrate(sys.argv[1])}))
    except (OSError, AttributeError, RuntimeError, KeyError, IndexError, ValueError, ImportError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
