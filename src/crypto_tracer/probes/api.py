"""The Python side of bpf/api.bpf.c: crypto API uprobes attached per pid, counted in the kernel.

``FUNCTIONS`` is the table of hooked OpenSSL functions (1.1.1 and 3.x names): which library
exports it, what it shows, and which argument carries the algorithm. Functions that call
another hooked function are left out (SSL_CTX_new -> SSL_CTX_new_ex, RAND_bytes ->
RAND_bytes_ex, EVP_PKEY_keygen -> EVP_PKEY_generate, SSL_connect/SSL_accept ->
SSL_do_handshake), so one call is counted once; EVP_{En,De}cryptInit_ex(2), which call
EVP_CipherInit_ex(2), are hooked both and the inner call is subtracted (NESTED).

What is not seen: calls inside a library that do not go through an exported function
(e.g. node drives its handshakes from SSL_read/SSL_write, so SSL_do_handshake never runs),
and calls made between a library being mapped (or a fork) and the probes being attached.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from crypto_tracer.bpf.cstruct import CEnum, CStruct
from crypto_tracer.engine import AttachError, BpfObject
from crypto_tracer.host import classify, discovery, proc
from crypto_tracer.errors import TracerError
from crypto_tracer.log import log

# argument kinds (bpf/api.bpf.c enum ct_arg_kind, checked against its BTF by tests/unit/test_bpf_layouts.py)
NONE, STR, NID_PTR, NID, SIZE, NID_PTR_OR_CTX, PKEY_CTX_TYPE = 0, 1, 2, 3, 4, 5, 6
ARG_KINDS = CEnum("ct_arg_kind", {"CT_ARG_" + k: v for k, v in (
    ("NONE", NONE), ("STR", STR), ("NID_PTR", NID_PTR), ("NID", NID), ("SIZE", SIZE),
    ("NID_PTR_OR_CTX", NID_PTR_OR_CTX), ("PKEY_CTX_TYPE", PKEY_CTX_TYPE))})
# program per probe shape
ENTER, RET_OK, RET_BYTES, EX = "enter", "ret_ok", "ret_bytes", "ex"


@dataclass(frozen=True)
class Function:
    id: int
    name: str
    library: str  # "libssl" or "libcrypto": which library exports it (a static exe may export both)
    category: str
    kind: int = NONE
    arg: int = 0  # 1-based index of the argument read
    shape: str = ENTER


FUNCTIONS: tuple[Function, ...] = (
    # libssl: contexts, sessions, handshakes, certificates, data
    Function(1, "SSL_CTX_new_ex", "libssl", "context"),
    Function(2, "SSL_new", "libssl", "session"),
    Function(3, "SSL_do_handshake", "libssl", "handshake", shape=RET_OK),
    Function(4, "SSL_CTX_use_certificate_file", "libssl", "certificate"),
    Function(5, "SSL_CTX_use_certificate_chain_file", "libssl", "certificate"),
    Function(6, "SSL_CTX_use_PrivateKey_file", "libssl", "private_key"),
    Function(7, "SSL_use_certificate_file", "libssl", "certificate"),
    Function(8, "SSL_use_PrivateKey_file", "libssl", "private_key"),
    Function(9, "SSL_CTX_load_verify_file", "libssl", "trust"),
    Function(10, "SSL_CTX_load_verify_dir", "libssl", "trust"),
    Function(11, "SSL_CTX_set_default_verify_paths", "libssl", "trust"),
    Function(12, "SSL_read", "libssl", "tls_read", shape=RET_BYTES),
    Function(13, "SSL_write", "libssl", "tls_write", shape=RET_BYTES),
    Function(14, "SSL_read_ex", "libssl", "tls_read", shape=EX),
    Function(15, "SSL_write_ex", "libssl", "tls_write", shape=EX),
    Function(16, "SSL_write_ex2", "libssl", "tls_write", arg=5, shape=EX),  # 3.3+: written is argument 5
    # libcrypto: EVP digests, ciphers, signatures, key exchange, key generation, randomness
    Function(30, "EVP_DigestInit", "libcrypto", "digest", NID_PTR_OR_CTX, 2),
    Function(31, "EVP_DigestInit_ex", "libcrypto", "digest", NID_PTR_OR_CTX, 2),
    Function(32, "EVP_DigestInit_ex2", "libcrypto", "digest", NID_PTR_OR_CTX, 2),
    Function(40, "EVP_CipherInit", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(41, "EVP_CipherInit_ex", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(42, "EVP_CipherInit_ex2", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(43, "EVP_EncryptInit_ex", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(44, "EVP_EncryptInit_ex2", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(45, "EVP_DecryptInit_ex", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(46, "EVP_DecryptInit_ex2", "libcrypto", "cipher", NID_PTR_OR_CTX, 2),
    Function(50, "EVP_DigestSignInit", "libcrypto", "signature", NID_PTR, 3),
    Function(51, "EVP_DigestSignInit_ex", "libcrypto", "signature", STR, 3),
    Function(52, "EVP_DigestVerifyInit", "libcrypto", "signature", NID_PTR, 3),
    Function(53, "EVP_DigestVerifyInit_ex", "libcrypto", "signature", STR, 3),
    Function(60, "EVP_PKEY_derive", "libcrypto", "key_exchange", PKEY_CTX_TYPE, 1),
    Function(61, "EVP_PKEY_generate", "libcrypto", "key_generation", PKEY_CTX_TYPE, 1),
    Function(62, "EVP_PKEY_CTX_new_from_name", "libcrypto", "key_context", STR, 2),
    Function(63, "EVP_PKEY_CTX_new_id", "libcrypto", "key_context", NID, 1),
    Function(70, "RAND_bytes_ex", "libcrypto", "random", SIZE, 3),
    Function(71, "RAND_priv_bytes_ex", "libcrypto", "random", SIZE, 3),
    Function(80, "EVP_MD_fetch", "libcrypto", "fetch", STR, 2),
    Function(81, "EVP_CIPHER_fetch", "libcrypto", "fetch", STR, 2),
    Function(82, "EVP_MAC_fetch", "libcrypto", "fetch", STR, 2),
    Function(83, "EVP_KDF_fetch", "libcrypto", "fetch", STR, 2),
)
FUNCTIONS_BY_ID = {f.id: f for f in FUNCTIONS}
# OpenSSL 1.1.1 has no EVP_PKEY_generate / RAND_bytes_ex: hook these instead when absent
FALLBACKS = {"EVP_PKEY_generate": "EVP_PKEY_keygen", "RAND_bytes_ex": "RAND_bytes",
             "RAND_priv_bytes_ex": "RAND_priv_bytes", "SSL_CTX_new_ex": "SSL_CTX_new"}
FALLBACK_ARG = {"RAND_bytes": 2, "RAND_priv_bytes": 2}

# In OpenSSL 1.1.1 and 3.x, EVP_{En,De}cryptInit_ex(2) call EVP_CipherInit_ex(2) with the same
# cipher: the inner call is subtracted so that one application call counts once.
NESTED = {"EVP_CipherInit_ex": ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"),
          "EVP_CipherInit_ex2": ("EVP_EncryptInit_ex2", "EVP_DecryptInit_ex2")}

KEY = CStruct("api_key", "tgid I func H kind H arg 32s").struct
VAL = CStruct("api_val", "count Q bytes Q").struct


def cookie(f: Function, arg: int | None = None, kind: int | None = None) -> int:
    return f.id | ((f.kind if kind is None else kind) << 16) | ((arg if arg is not None else f.arg) << 24)


_nid_names = None


def nid_name(nid: int) -> str:
    """OpenSSL's name of a NID: the short name ('SHA256', 'RSA'), or the long one where the short
    one is an odd 'id-...' ('id-aes256-GCM' -> 'aes-256-gcm'). NIDs are the same in every build."""
    global _nid_names
    if _nid_names is None:
        import ctypes

        _nid_names = False
        for soname in ("libcrypto.so.3", "libcrypto.so.1.1"):
            try:
                lib = ctypes.CDLL(soname)
            except OSError:
                continue
            for fn in (lib.OBJ_nid2sn, lib.OBJ_nid2ln):
                fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_int]
            _nid_names = (lib.OBJ_nid2sn, lib.OBJ_nid2ln)
            break
    if not _nid_names:
        return f"nid:{nid}"
    short = _nid_names[0](nid)
    if short and short.lower().startswith(b"id-"):
        short = _nid_names[1](nid) or short
    return short.decode() if short else f"nid:{nid}"


def decode_key(raw: bytes) -> tuple[int, int, str | None]:
    """(tgid, function id, algorithm) of an api_counts key."""
    tgid, func, kind, arg = KEY.unpack(raw)
    algorithm = None
    if kind == STR:
        algorithm = arg.split(b"\0", 1)[0].decode(errors="replace") or None
    elif kind == NID:
        nid = struct.unpack_from("<i", arg)[0]
        algorithm = nid_name(nid) if nid > 0 else None  # NID 0: a provider-only algorithm
    return tgid, func, algorithm


def normalize_algorithm(name: str | None) -> str | None:
    """One spelling per algorithm: fetch names are case-insensitive ('sha256' == 'SHA256')."""
    if name is None or name.startswith("nid:"):
        return name
    upper = name.upper()
    return {"SHA-256": "SHA256", "SHA-384": "SHA384", "SHA-512": "SHA512", "SHA-1": "SHA1",
            "SHA2-256": "SHA256", "SHA2-384": "SHA384", "SHA2-512": "SHA512"}.get(upper, upper)


PROGRAMS = ("api_enter", "api_ret_ok", "api_ret_bytes", "api_ex_enter", "api_ex_ret")
TCP_PROGRAMS = ("api_tcp_state", "api_accept4_exit", "api_accept_exit")
PEER_KEY = CStruct("peer_key", "tgid I role B pad B family H port H pad2 H addr 16s").struct


def probe_points(f: Function) -> list[tuple[str, bool]]:
    """(program, is_return) pairs hooked for one function."""
    if f.shape == ENTER:
        return [("api_enter", False)]
    if f.shape == EX:
        return [("api_ex_enter", False), ("api_ex_ret", True)]
    return [("api_ret_ok" if f.shape == RET_OK else "api_ret_bytes", True)]


class ApiProbe:
    """Loads api.bpf.o once; attach(pid) hooks the crypto libraries that pid maps.

    Preferred: one uprobe_multi link per (program, pid, file) (Linux 6.6+). Detaching a link waits for an RCU-tasks
    grace period (~0.2 s on these VMs), so 5 links instead of ~40 per library make the end of
    a profile take a second instead of eight. Older kernels get one perf uprobe per function.
    """

    def __init__(self):
        self.multi = True
        self.obj = self._open(multi=True)
        self.attached: set[tuple[int, int, int]] = set()  # (pid, dev, ino) of hooked files
        self.links = 0  # probe points attached
        self.failed: list[str] = []

    def _open(self, multi: bool) -> BpfObject:
        obj = BpfObject.from_package("api")
        obj.map("events").set_max_entries(4096)  # unused here: counts live in api_counts
        if multi:
            for name in PROGRAMS:
                obj.program(name).expect_uprobe_multi()
        return obj

    def load(self) -> None:
        try:
            self.obj.load()
        except TracerError:
            log.debug("api probes: uprobe_multi programs refused, using one uprobe per function")
            self.obj.close()
            self.multi = False
            self.obj = self._open(multi=False)
            self.obj.load()
        for prog in TCP_PROGRAMS:  # count connections of profiled pids (filtered in the kernel)
            self.obj.attach(prog)

    def attach(self, pid: int) -> int:
        """Hook pid's libssl/libcrypto (through its root) and its executable if it carries
        OpenSSL statically; already-hooked files are skipped. Returns the new probe count."""
        self.obj.map("profiled").update(struct.pack("<I", pid), b"\1")
        targets = []
        root = proc.read_root(pid)
        for path, read_path, _deleted in discovery.library_files(pid, root=root):
            name = classify.library_name(path)
            if name in ("libssl", "libcrypto"):
                targets.append((read_path, (name,)))
        info = discovery.static_tls(f"/proc/{pid}/exe")
        exe = discovery.executable_file(pid, root) if info and info["library"] == "openssl" else None
        if exe:
            targets.append((exe[1], ("libssl", "libcrypto")))
        new = 0
        for path, libraries in targets:
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (pid, st.st_dev, st.st_ino)
            if key in self.attached:
                continue
            self.attached.add(key)
            new += self._attach_file(pid, path, libraries)
        self.links += new
        return new

    def _functions_in(self, path: str, libraries: tuple[str, ...]) -> list[tuple[Function, str, int, int]]:
        """(function, symbol hooked, cookie, file offset) for what the file exports."""
        names = [f.name for f in FUNCTIONS if f.library in libraries] + list(FALLBACKS.values())
        offsets = discovery.function_offsets(path, names)
        # the EVP_PKEY_CTX layout read by PKEY_CTX_TYPE is OpenSSL 3's
        version = classify.library_version(path, "libcrypto") if "libcrypto" in libraries else None
        openssl3 = bool(version and version.startswith("3."))
        out = []
        for f in FUNCTIONS:
            if f.library not in libraries:
                continue
            name, arg = f.name, None
            if name not in offsets and FALLBACKS.get(name) in offsets:
                name = FALLBACKS[name]
                arg = FALLBACK_ARG.get(name)
            if name in offsets:
                kind = NONE if f.kind == PKEY_CTX_TYPE and not openssl3 else None
                out.append((f, name, cookie(f, arg, kind), offsets[name]))
        return out

    def _attach_file(self, pid: int, path: str, libraries: tuple[str, ...]) -> int:
        hooks = self._functions_in(path, libraries)
        count = 0
        if self.multi:
            groups: dict[tuple[str, bool], list[tuple[int, int]]] = {}
            for f, _name, c, offset in hooks:
                for prog, ret in probe_points(f):
                    groups.setdefault((prog, ret), []).append((offset, c))
            for (prog, ret), points in groups.items():
                try:
                    self.obj.attach_uprobe_multi(prog, path, [o for o, _ in points], [c for _, c in points],
                                                 ret, pid)
                    count += len(points)
                except AttachError as exc:
                    self.failed.append(f"{prog} on {path}: {exc.strerror}")
                    log.debug("api probes: uprobe_multi %s on %s failed: %s", prog, path, exc.strerror)
        else:
            for f, name, c, _offset in hooks:
                for prog, ret in probe_points(f):
                    try:
                        self.obj.attach_uprobe(prog, path, name, pid=pid, retprobe=ret, cookie=c)
                        count += 1
                    except TracerError as exc:
                        self.failed.append(f"{name} in {path}: {exc.args[0]}")
        log.debug("api probes: %d on %s for pid %d", count, path, pid)
        return count

    def counts(self) -> dict[int, list[dict]]:
        """tgid -> [{function_name, library, category, algorithm, count, bytes}] from the kernel map."""
        return aggregate(self.obj.map("api_counts").items())

    def connections(self) -> dict[int, list[dict]]:
        """tgid -> TCP connections counted in the kernel: made (client: remote address and port)
        and accepted (server: remote address, our local port)."""
        out: dict[int, list[dict]] = {}
        for raw_key, raw_val in self.obj.map("peers").items():
            tgid, role, _pad, family, port, _pad2, addr = PEER_KEY.unpack(raw_key)
            entry = decode_peer(role, family, port, addr)
            if entry is not None:
                entry["count"] = struct.unpack("<Q", raw_val)[0]
                out.setdefault(tgid, []).append(entry)
        for entries in out.values():
            entries.sort(key=lambda e: (e["role"], -e["count"], e["remote_addr"]))
        return out

    def counters(self) -> dict[str, int]:
        return self.obj.counters()

    def close(self) -> None:
        """Detach every uprobe: each detach waits for a grace period, so they run in parallel."""
        self.obj.detach(parallel=True)
        self.obj.close()


def decode_peer(role: int, family: int, port: int, addr: bytes) -> dict | None:
    remote = proc.address_text(family, addr)
    if remote is None:
        return None
    if role == 1:
        return {"role": "client", "remote_addr": remote, "remote_port": port}
    return {"role": "server", "remote_addr": remote, "local_port": port}


def aggregate(items) -> dict[int, list[dict]]:
    """api_counts (key, value) pairs -> per tgid, the calls by function and algorithm, most
    frequent first; algorithm spellings merged, nested cipher inits counted once (NESTED)."""
    merged: dict[tuple[int, int, str | None], list[int]] = {}
    for raw_key, raw_val in items:
        tgid, func, algorithm = decode_key(raw_key)
        n, nbytes = VAL.unpack(raw_val)
        acc = merged.setdefault((tgid, func, normalize_algorithm(algorithm)), [0, 0])
        acc[0] += n
        acc[1] += nbytes
    by_name = {f.name: f.id for f in FUNCTIONS}
    for inner, outers in NESTED.items():
        for (tgid, func, algorithm), acc in merged.items():
            if func == by_name[inner]:
                for outer in outers:
                    acc[0] -= merged.get((tgid, by_name[outer], algorithm), [0, 0])[0]
                acc[0] = max(acc[0], 0)
    out: dict[int, list[dict]] = {}
    for (tgid, func, algorithm), (n, nbytes) in merged.items():
        f = FUNCTIONS_BY_ID.get(func)
        if f is None or n == 0:
            continue
        entry = {"function_name": f.name, "library": f.library, "category": f.category,
                 "algorithm": algorithm, "count": n}
        if f.shape in (RET_BYTES, EX) or f.kind == SIZE:
            entry["bytes"] = nbytes
        out.setdefault(tgid, []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: (-e["count"], e["function_name"], e["algorithm"] or ""))
    return out
