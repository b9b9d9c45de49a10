"""Finding TLS libraries in processes: shared libraries, static copies, containers.

A process is searched through ``/proc/PID/maps``; a file it maps is reached through
``/proc/PID/root`` (so a library inside a container is the container's file) and identified
by (st_dev, st_ino), so each file is hooked once however many processes map it.
Executables are kept when their ``.dynsym`` exports ``SSL_write`` (node's static OpenSSL).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

OPENSSL, GNUTLS, NSS = "openssl", "gnutls", "nss"
FLAT_SSL, SPLIT_SSL = "1.1.1-3.1", "3.2+"

# Functions hooked per library kind (only those the file exports are attached).
OPENSSL_DATA = ("SSL_read", "SSL_read_ex", "SSL_peek", "SSL_peek_ex", "SSL_write", "SSL_write_ex",
                "SSL_write_ex2")  # 3.3+; SSL_write_ex may call it (one event: see tls.bpf.c)
OPENSSL_HANDSHAKE = ("SSL_do_handshake", "SSL_connect", "SSL_accept")
GNUTLS_FUNCS = ("gnutls_record_recv", "gnutls_record_send", "gnutls_handshake")
NSS_FUNCS = ("PR_Read", "PR_Recv", "PR_Write", "PR_Send", "PR_Writev")
WANTED_SYMBOLS = frozenset(OPENSSL_DATA + OPENSSL_HANDSHAKE + GNUTLS_FUNCS + NSS_FUNCS +
                           ("SSL_free", "SSL_is_connection", "SSL_ImportFD"))


_KEY_NAMES = (b"\0SSL_write\0", b"\0gnutls_record_send\0", b"\0PR_Write\0")


@dataclass
class ElfInfo:
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


def read_elf(path: str) -> ElfInfo | None:
    """SONAME, build-id and the wanted exported functions of an ELF64 little-endian file."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse_elf(m)
    except (OSError, ValueError, struct.error):
        return None


def _parse_elf(m) -> ElfInfo | None:
    if m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", m, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", m, 0x36)
    loads = []  # (vaddr, memsz, file offset) of PT_LOAD segments
    for i in range(phnum):
        ptype, _flags, off, vaddr, _paddr, _filesz, memsz = struct.unpack_from("<IIQQQQQ", m, phoff + i * phentsize)
        if ptype == 1:
            loads.append((vaddr, memsz, off))
    shoff, = struct.unpack_from("<Q", m, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", m, 0x3A)
    sections = []
    for i in range(shnum):
        name, stype, _flags, _addr, off, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", m, shoff + i * shentsize)
        sections.append((name, stype, off, size, link, entsize))
    info = ElfInfo()
    symbols, offsets = set(), {}
    for _name, stype, off, size, link, entsize in sections:
        if stype == 11 and entsize:  # SHT_DYNSYM
            stroff, strsize = sections[link][2], sections[link][3]
            if not any(m.find(k, stroff, stroff + strsize) >= 0 for k in _KEY_NAMES):
                continue  # cheap test first: most executables export nothing of interest
            for pos in range(off, off + size, entsize):
                st_name, st_info, _other, st_shndx, st_value = struct.unpack_from("<IBBHQ", m, pos)
                if st_shndx == 0 or (st_info & 0xF) != 2:  # undefined, or not a function
                    continue
                end = m.find(b"\0", stroff + st_name)
                sym = m[stroff + st_name:end].decode(errors="replace").split("@")[0]
                if sym in WANTED_SYMBOLS:
                    symbols.add(sym)
                    for vaddr, memsz, off in loads:
                        if vaddr <= st_value < vaddr + memsz:
                            offsets[sym] = st_value - vaddr + off
        elif stype == 7:  # SHT_NOTE
            pos = off
            while pos + 12 <= off + size:
                namesz, descsz, ntype = struct.unpack_from("<III", m, pos)
                name_end = pos + 12 + ((namesz + 3) & ~3)
                if ntype == 3 and m[pos + 12:pos + 12 + namesz] == b"GNU\0":  # NT_GNU_BUILD_ID
                    info.build_id = m[name_end:name_end + descsz].hex()
                pos = name_end + ((descsz + 3) & ~3)
        elif stype == 6 and entsize:  # SHT_DYNAMIC: DT_SONAME
            dynstr = sections[link][2]
            for pos in range(off, off + size, entsize):
                tag, val = struct.unpack_from("<qQ", m, pos)
                if tag == 14:
                    end = m.find(b"\0", dynstr + val)
                    info.soname = m[dynstr + val:end].decode(errors="replace")
    info.symbols = frozenset(symbols)
    info.offsets = offsets
    return info


def kind_of(name: str, elf: ElfInfo) -> str | None:
    """Which TLS stack a mapped file is, from its name and exports."""
    base = os.path.basename(name)
    if base.startswith("libnspr4"):
        return NSS
    if base.startswith("libgnutls.so") and "gnutls_record_send" in elf.symbols:
        return GNUTLS
    if "SSL_write" in elf.symbols and "SSL_read" in elf.symbols and not base.startswith("libssl3"):
        return OPENSSL  # libssl.so.*, or an executable with a static OpenSSL (node)
    return None


def openssl_layout(kind: str, elf: ElfInfo) -> str | None:
    """Which SSL object layout an OpenSSL has, from its exports: SSL_read_ex is 1.1.1+,
    SSL_is_connection 3.2+ (the split object). 1.1.0 and older: None."""
    if kind != OPENSSL or "SSL_read_ex" not in elf.symbols:
        return None
    return SPLIT_SSL if "SSL_is_connection" in elf.symbols else FLAT_SSL


def functions_for(kind: str, elf: ElfInfo) -> tuple[str, ...]:
    wanted = {OPENSSL: OPENSSL_DATA + OPENSSL_HANDSHAKE + ("SSL_free",), GNUTLS: GNUTLS_FUNCS,
              NSS: NSS_FUNCS}[kind]
    return tuple(f for f in wanted if f in elf.symbols)


def _candidate(path: str) -> bool:
    base = os.path.basename(path)
    return base.startswith(("libssl.so", "libgnutls.so", "libnspr4.so", "libssl3.so"))


def process_files(pid: int) -> list[tuple[str, str]]:
    """(path as the process sees it, path that reaches it from here) of the TLS candidates
    the process maps, plus its executable."""
    out = {}
    root = f"/proc/{pid}/root"
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6:  # any mapping: the executable one may be a moment away
                    continue
                path = parts[5].strip()
                if path.startswith("/") and _candidate(path):
                    out[path] = root + path
    except OSError:
        return []
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        if not exe.endswith(" (deleted)"):
            out.setdefault(exe, root + exe)
    except OSError:
        pass
    return list(out.items())


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


class Discovery:
    """Remembers every file already examined (by dev/ino) and returns the new TLS libraries."""

    def __init__(self):
        self.seen: dict[tuple[int, int], TlsLibrary | None] = {}
        self.nss_pids: set[int] = set()  # processes that map NSS's libssl3 (so PR_* matter)

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
        elf = read_elf(path)
        kind = kind_of(display, elf) if elf else None
        if kind is None:
            self.seen[key] = None
            return None
        lib = TlsLibrary(path=path, kind=kind, build_id=elf.build_id, dev_ino=key,
                         functions=functions_for(kind, elf), offsets=elf.offsets, display_path=display,
                         openssl_layout=openssl_layout(kind, elf))
        if pid is not None:
            lib.pids.add(pid)
        self.seen[key] = lib
        return lib

    def scan_pid(self, pid: int) -> list[TlsLibrary]:
        found = []
        files = process_files(pid)
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
        for pid in pids if pids is not None else all_pids():
            found += self.scan_pid(pid)
        return found
