"""Finding TLS libraries in processes: shared libraries, static copies, containers.

A process is searched through ``/proc/PID/maps`` (library_files, also behind snapshot, profile
and the api probes); a file it maps is reached through ``/proc/PID/root`` + its path in the
process's own view (so a library inside a container is the container's file) and identified
by (st_dev, st_ino), so each file is hooked once however many processes map it.
Executables are kept when their ``.dynsym`` exports ``SSL_write`` (node's static OpenSSL), and
when they are Go programs with crypto/tls (kind ``go``: functions from ``.symtab`` or the pclntab,
see host/gobin.py); a Go binary with crypto/tls that cannot be hooked is named once with the reason.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from crypto_tracer.host import classify, elf, gobin, proc
from crypto_tracer.log import log

OPENSSL, GNUTLS, NSS, GO, BORINGSSL = "openssl", "gnutls", "nss", "go", "boringssl"
FLAT_SSL, SPLIT_SSL = "1.1.1-3.1", "3.2+"

# Functions hooked per library kind (only those the file exports are attached).
OPENSSL_DATA = ("SSL_read", "SSL_read_ex", "SSL_peek", "SSL_peek_ex", "SSL_write", "SSL_write_ex",
                "SSL_write_ex2")  # 3.3+; SSL_write_ex may call it (one event: see tls.bpf.c)
OPENSSL_HANDSHAKE = ("SSL_do_handshake", "SSL_connect", "SSL_accept")
GNUTLS_FUNCS = ("gnutls_record_recv", "gnutls_record_send", "gnutls_handshake")
NSS_FUNCS = ("PR_Read", "PR_Recv", "PR_Write", "PR_Send", "PR_Writev")
NSS_CLOSE = "PR_Close"  # ends a descriptor, whose address the next connection may get (probes/tls.py)
# BoringSSL keeps OpenSSL's API (the same data and handshake functions) with an SSL object of its own;
# SSL_CTX_set_grease_enabled is BoringSSL's alone
BORINGSSL_MARK = "SSL_CTX_set_grease_enabled"
WANTED_SYMBOLS = frozenset(OPENSSL_DATA + OPENSSL_HANDSHAKE + GNUTLS_FUNCS + NSS_FUNCS +
                           (NSS_CLOSE, "SSL_free", "SSL_new", "SSL_is_connection", "SSL_ImportFD", BORINGSSL_MARK,
                            "SSL_new_listener"))  # SSL_new_listener: OpenSSL 3.5+, QUIC objects (probes/tls.py)
# A static BoringSSL with a .symtab (PyPI curl_cffi): its SSL_* are local symbols; bssl::ssl_log_secret
# (C++, mangled; the parameter types differ between releases) is what tells it apart
BSSL_LOG_SECRET = "ssl_log_secret"
_BSSL_LOG_SECRET_MANGLED = b"_ZN4bssl14ssl_log_secretE"


_KEY_NAMES = (b"SSL_write", b"gnutls_record_send", b"PR_Write")


@dataclass
class TlsExports:
    soname: str | None = None
    build_id: str | None = None
    symbols: frozenset = frozenset()  # exported functions among WANTED_SYMBOLS
    offsets: dict = field(default_factory=dict)  # function -> file offset (what uprobes take)


@dataclass
class TlsLibrary:
    path: str  # a path that reaches the file from here (may go through /proc/PID/root)
    kind: str  # openssl, gnutls or nss
    build_id: str | None
    dev_ino: tuple[int, int]
    functions: tuple[str, ...] = ()
    offsets: dict = field(default_factory=dict)
    # OpenSSL's SSL object (tls.bpf.c ossl_fields): FLAT_SSL (1.1.1-3.1: ssl->version at 0, ssl->server
    # at 56), SPLIT_SSL (3.2+: ssl_connection_st, checked per object in the kernel) or None (unknown)
    openssl_layout: str | None = None
    display_path: str = ""  # the path as the process sees it
    pids: set = field(default_factory=set)
    # Go (kind "go"): the toolchain version and bpf/go_tls.h program -> file offsets
    go_version: str | None = None
    go_probes: dict = field(default_factory=dict)


def read_elf(path: str) -> TlsExports | None:
    """SONAME, build-id and the wanted exported functions of an ELF64 little-endian file."""
    try:
        with elf.ElfFile.open(path) as f:
            return _tls_exports(f)
    except (OSError, ValueError, struct.error):
        return None


def _tls_exports(f: elf.ElfFile) -> TlsExports:
    info = TlsExports(soname=f.soname, build_id=f.build_id)
    if f.mentions(_KEY_NAMES):  # cheap test first: most executables export nothing of interest
        syms = f.symbols(WANTED_SYMBOLS, types=(elf.STT_FUNC,))
        info.symbols = frozenset(syms)
        info.offsets = {name: s.offset for name, s in syms.items() if s.offset is not None}
    return info


def kind_of(name: str, exports: TlsExports) -> str | None:
    """Which TLS stack a mapped file is, from its name and exports."""
    base = os.path.basename(name)
    if base.startswith("libnspr4"):
        return NSS
    if base.startswith("libgnutls.so") and "gnutls_record_send" in exports.symbols:
        return GNUTLS
    if "SSL_write" in exports.symbols and "SSL_read" in exports.symbols and not base.startswith("libssl3"):
        # libssl.so.*, or an executable with a static OpenSSL (node); Debian's android-libboringssl
        return BORINGSSL if BORINGSSL_MARK in exports.symbols else OPENSSL
    return None


def openssl_layout(kind: str, exports: TlsExports) -> str | None:
    """Which SSL object layout an OpenSSL has, from its exports: SSL_read_ex is 1.1.1+,
    SSL_is_connection 3.2+ (the split object). 1.1.0 and older: None."""
    if kind != OPENSSL or "SSL_read_ex" not in exports.symbols:
        return None
    return SPLIT_SSL if "SSL_is_connection" in exports.symbols else FLAT_SSL


def functions_for(kind: str, exports: TlsExports) -> tuple[str, ...]:
    wanted = {OPENSSL: OPENSSL_DATA + OPENSSL_HANDSHAKE + ("SSL_free", "SSL_new"), GNUTLS: GNUTLS_FUNCS,
              NSS: NSS_FUNCS + (NSS_CLOSE,),
              # no SSL_new: its return feeds the OpenSSL layout reads, which BoringSSL has none of
              BORINGSSL: OPENSSL_DATA + OPENSSL_HANDSHAKE + ("SSL_free", BSSL_LOG_SECRET)}[kind]
    return tuple(f for f in wanted if f in exports.symbols)


def static_boringssl(path: str) -> TlsExports | None:
    """A file with BoringSSL linked in and a .symtab that names it (curl_cffi's _wrapper.abi3.so):
    its local SSL_* functions and bssl::ssl_log_secret, with their file offsets; None otherwise.
    Cheap for the usual stripped library: no .symtab, nothing read."""
    f = elf.open_or_none(path)
    if f is None:
        return None
    with f:
        try:
            mangled = f.name_starting(_BSSL_LOG_SECRET_MANGLED)
            if mangled is None:
                return None
            names = OPENSSL_DATA + OPENSSL_HANDSHAKE + ("SSL_free", BORINGSSL_MARK)
            syms = f.symbols(names + (mangled,), table=elf.SYMTAB, types=(elf.STT_FUNC,))
            if not {"SSL_read", "SSL_write", mangled} <= syms.keys():
                return None
            info = TlsExports(soname=f.soname, build_id=f.build_id)
            offsets = {(BSSL_LOG_SECRET if n == mangled else n): s.offset for n, s in syms.items()
                       if s.offset is not None}
            info.symbols = frozenset(offsets) | {BORINGSSL_MARK}
            info.offsets = offsets
            return info
        except (ValueError, struct.error, IndexError, OSError):
            return None


def _candidate(path: str) -> bool:
    return classify.library_name(path) in ("libssl", "libgnutls", "libnspr4", "libssl3")


def library_files(pid: int, maps: bytes | None = None, root: str | None = None) -> list[tuple[str, str, bool]]:
    """(path as pid sees it, path that reaches it from here, deleted) of each shared library pid
    maps, once per path in maps order. maps and root (pid's root) are read when not given.

    Paths in /proc/PID/maps are printed from the reader's mount tree: for a chrooted process, or
    a process in another mount namespace seen from inside a chroot, that is not a path the
    process (or /proc/PID/root) knows. own_view makes them the process's own."""
    if root is None:
        root = proc.read_root(pid)
    if maps is None:
        maps = proc.read_maps(pid)
        if maps is None:
            return []
    out = {}
    through = proc.root_path(pid, "")  # /proc/PID/root
    for path, deleted in proc.mapped_libraries(maps):
        own = proc.own_view(path, root)
        if own not in out:
            out[own] = (own, through + own, deleted)
    return list(out.values())


def executable_file(pid: int, root: str | None = None) -> tuple[str, str] | None:
    """(executable as pid sees it, path that reaches it from here); None if gone or deleted."""
    exe = proc.readlink(f"/proc/{pid}/exe")
    if not exe or exe.endswith(" (deleted)"):
        return None
    own = proc.own_view(exe, root if root is not None else proc.read_root(pid))
    return own, proc.root_path(pid, own)


def process_files(pid: int, others: list | None = None) -> list[tuple[str, str]]:
    """(path as the process sees it, path that reaches it from here) of the TLS candidates
    the process maps, plus its executable. others: gets the other mapped libraries and Python
    stable-ABI modules (*.abi3.so), which may carry a static BoringSSL."""
    root = proc.read_root(pid)
    out = {}
    maps = proc.read_maps(pid)
    for own, read, deleted in library_files(pid, maps=maps, root=root) if maps is not None else ():
        if deleted:
            continue
        if _candidate(own):
            out[own] = read
        elif others is not None:
            others.append((own, read))
    if others is not None and maps is not None:
        through = proc.root_path(pid, "")
        for path, deleted in dict.fromkeys(proc.mapped_abi3_modules(maps)):
            if not deleted:
                own = proc.own_view(path, root)
                others.append((own, through + own))
    exe = executable_file(pid, root)
    if exe:
        out.setdefault(*exe)
    return list(out.items())


class Discovery:
    """Remembers every file already examined (by dev/ino) and returns the new TLS libraries."""

    def __init__(self):
        self.seen: dict[tuple[int, int], TlsLibrary | None] = {}
        self.nss_pids: set[int] = set()  # processes that map NSS's libssl3 (so PR_* matter)
        self.go_unhookable: list[tuple[str, str]] = []  # (path, reason) of Go TLS programs not hooked

    def examine(self, display: str, path: str, pid: int | None = None) -> TlsLibrary | None:
        """The library at path if it is a TLS library never returned before, else None."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        try:  # same file under the same name here (no container): use the plain path
            here = os.stat(display)
            if (here.st_dev, here.st_ino) == key:
                path = display
        except OSError:
            pass
        if key in self.seen:
            lib = self.seen[key]
            if lib is not None and pid is not None:
                lib.pids.add(pid)
            return None
        if os.path.basename(display).startswith("libssl3.so"):
            self.seen[key] = None
            return None
        exports = read_elf(path)
        kind = kind_of(display, exports) if exports else None
        if kind is None and exports and not _candidate(display):
            static = static_boringssl(path)
            if static is not None:
                exports, kind = static, BORINGSSL
        if kind is None:
            lib = self._go(display, path, key) if exports and not _candidate(display) else None
            self.seen[key] = lib
            if lib is not None and pid is not None:
                lib.pids.add(pid)
            return lib
        lib = TlsLibrary(path=path, kind=kind, build_id=exports.build_id, dev_ino=key,
                         functions=functions_for(kind, exports), offsets=exports.offsets, display_path=display,
                         openssl_layout=openssl_layout(kind, exports))
        if pid is not None:
            lib.pids.add(pid)
        self.seen[key] = lib
        return lib

    def _go(self, display: str, path: str, key) -> TlsLibrary | None:
        """A Go program with crypto/tls as a TlsLibrary of kind go; None for anything else. One that
        has crypto/tls but cannot be hooked is named here, once (examine() sees each file once)."""
        info, has_tls = go_binary(path)
        if not has_tls:
            return None
        probes = gobin.tls_probes(path, info, isolated=True)
        if probes.reason is not None:
            self.go_unhookable.append((display, probes.reason))
            log.warning("Go TLS of %s is not traced: %s", display, probes.reason)
            return None
        return TlsLibrary(path=path, kind=GO, build_id=None, dev_ino=key, functions=tuple(info.functions),
                          display_path=display, go_version=info.version or info.version_range,
                          go_probes=probes.offsets)

    def examine_other(self, display: str, path: str, pid: int | None = None) -> TlsLibrary | None:
        """A mapped library that is no TLS library by name: kept only as a static BoringSSL."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            lib = self.seen[key]
            if lib is not None and pid is not None:
                lib.pids.add(pid)
            return None
        static = static_boringssl(path)
        lib = None
        if static is not None:
            lib = TlsLibrary(path=path, kind=BORINGSSL, build_id=static.build_id, dev_ino=key,
                             functions=functions_for(BORINGSSL, static), offsets=static.offsets,
                             display_path=display)
            if pid is not None:
                lib.pids.add(pid)
        self.seen[key] = lib
        return lib

    def scan_pid(self, pid: int) -> list[TlsLibrary]:
        found = []
        others: list[tuple[str, str]] = []
        files = process_files(pid, others)
        for display, path in others:
            lib = self.examine_other(display, path, pid)
            if lib:
                found.append(lib)
        if any(os.path.basename(d).startswith("libssl3.so") for d, _ in files):
            self.nss_pids.add(pid)
        for display, path in files:
            if os.path.basename(display).startswith("libnspr4") and pid not in self.nss_pids:
                continue  # NSPR without NSS's SSL: PR_Read/PR_Write would be plain file I/O
            lib = self.examine(display, path, pid)
            if lib:
                found.append(lib)
        return found

    def scan(self, pids: list[int] | None = None) -> list[TlsLibrary]:
        found = []
        for pid in pids if pids is not None else proc.list_pids():
            found += self.scan_pid(pid)
        return found


# --- what snapshot and profile ask of a file: static TLS, function offsets ---------------------

# Exported functions that show an executable carries a TLS library inside it (statically linked).
STATIC_TLS_SYMBOLS: dict[str, str] = {
    "SSL_write": "openssl", "SSL_read": "openssl", "SSL_write_ex": "openssl", "SSL_read_ex": "openssl",
    "gnutls_record_send": "gnutls", "gnutls_record_recv": "gnutls",
    "wolfSSL_write": "wolfssl", "mbedtls_ssl_write": "mbedtls",
}

_static_cache: dict[tuple[int, int, int], dict | None] = {}


def static_tls(path: str) -> dict | None:
    """{library, symbols, version} if the ELF file at path defines (exports) a TLS API, is a Go
    program with crypto/tls, or carries a BoringSSL its .symtab names (local symbols), else None.
    Cached by (device, inode, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _static_cache:
        symbols = exported(path, STATIC_TLS_SYMBOLS)
        result = None
        if symbols:
            family = STATIC_TLS_SYMBOLS[symbols[0]]
            if family == "openssl" and exported(path, (BORINGSSL_MARK,)):
                family = BORINGSSL
            version = classify.library_version(path, "libcrypto") if family == "openssl" else None
            result = {"library": family, "symbols": symbols, "version": version}
        else:
            result = go_static_tls(path)
        if result is None:
            bssl = static_boringssl(path)
            if bssl is not None:  # BoringSSL names no version of itself
                result = {"library": BORINGSSL, "version": None,
                          "symbols": sorted(n for n in bssl.symbols if n in STATIC_TLS_SYMBOLS)}
        _static_cache[key] = result
    return _static_cache[key]


def go_binary(path: str) -> tuple[gobin.GoBinary | None, bool]:
    """(what gobin reads of a Go program, whether it carries crypto/tls); (None, False) for
    anything else or an unreadable file."""
    f = elf.open_or_none(path)
    if f is None:
        return None, False
    with f:
        try:
            if not gobin.is_go(f):
                return None, False
            info = gobin.inspect_elf(f, path)
            return info, bool(info.functions) or f.data.find(b"crypto/tls.(*Conn)") >= 0
        except (ValueError, struct.error, OSError, IndexError):
            return None, False


def go_static_tls(path: str) -> dict | None:
    """{library: "go", symbols: the crypto/tls functions found, version: "go1.22.10" (or the range
    the pclntab implies, or None)} for a Go program that carries crypto/tls, else None."""
    info, _ = go_binary(path)
    if info is None or not info.functions:
        return None
    return {"library": GO, "symbols": sorted(info.functions), "version": info.version or info.version_range}


def exported(path: str, names) -> list[str]:
    """Which of names the ELF file at path defines in .dynsym (imports excluded), sorted."""
    f = elf.open_or_none(path)
    if f is None:
        return []
    with f:
        try:
            return f.exports(names)
        except (ValueError, struct.error, IndexError):
            return []


def function_offsets(path: str, names) -> dict[str, int]:
    """File offsets (what uprobes take) of the functions (FUNC, IFUNC) in names that the ELF
    file at path defines in .dynsym."""
    f = elf.open_or_none(path)
    if f is None:
        return {}
    with f:
        try:
            return {n: s.offset for n, s in f.symbols(names).items() if s.offset is not None}
        except (ValueError, struct.error, IndexError):
            return {}
