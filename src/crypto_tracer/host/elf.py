"""ELF files: the one reader for everything the tracer takes from a library or executable.

ELF64 little-endian only (x86_64, aarch64). Only the parts asked for are read (pread), so
scanning every executable on a host stays cheap. What it gives:

- ``sections`` / ``section(name)`` / ``section_bytes(name)``: section headers, by name;
- ``symbols(names, table=DYNSYM|SYMTAB)``: defined (exported) or undefined (imported) symbols
  with their file offset, which is what uprobes take; ``exports(names)`` / ``imports(names)``;
- ``file_offset(vaddr)``: virtual address -> file offset through the PT_LOAD segments (the
  one conversion used everywhere);
- ``build_id``, ``soname``; ``search(regex)`` over the whole file (version strings);
- ``machine`` / ``elf_type`` (e_machine, e_type); ``pointer_at(vaddr)``: an 8-byte pointer in the
  file as the loader leaves it (RELATIVE relocations applied: PIE data such as Go's moduledata).

Module functions cover one-shot uses: ``open_or_none``, ``is_elf``, ``build_id_or_digest``,
``search_file``, ``openssl_version``, ``banner_version``. A new TLS stack (Go's .gopclntab, BoringSSL) reads its sections and
symbols through ``ElfFile``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

SHT_SYMTAB, SHT_STRTAB, SHT_DYNAMIC, SHT_NOTE, SHT_DYNSYM = 2, 3, 6, 7, 11
DYNSYM, SYMTAB = SHT_DYNSYM, SHT_SYMTAB
STT_OBJECT, STT_FUNC, STT_GNU_IFUNC = 1, 2, 10
FUNCTIONS = frozenset((STT_FUNC, STT_GNU_IFUNC))
PT_LOAD = 1
SHT_RELA = 4
EM_X86_64, EM_AARCH64 = 62, 183
ET_EXEC, ET_DYN = 2, 3
R_X86_64_RELATIVE, R_AARCH64_RELATIVE = 8, 1027
DT_NEEDED = 1
DT_SONAME = 14
NT_GNU_BUILD_ID = 3

_EHDR = struct.Struct("<QQQIHHHHHH")  # e_entry .. e_shstrndx, from offset 0x18
_PHDR = struct.Struct("<IIQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")

# "OpenSSL 3.0.19 27 Jan 2026": the dated banner (keys calibration: the exact OpenSSL version)
OPENSSL_BANNER_RE = re.compile(rb"OpenSSL ((\d+\.\d+\.\d+[a-z]?)(?:[-+][\w.~+]+)?) +\d{1,2} \w{3} \d{4}")
# the first banner of an OpenSSL-family library (inventory: which version a process maps)
TLS_BANNER_RE = re.compile(rb"(OpenSSL|LibreSSL|BoringSSL|wolfSSL) (\d+\.\d+\.\d+[a-z]?)")
BORINGSSL_RE = re.compile(rb"BoringSSL")
# GnuTLS, NSS, libsodium, libgcrypt carry a bare "x.y.z" string
BARE_VERSION_RE = re.compile(rb"\x00([1-9]\d?\.\d{1,3}\.\d{1,3})\x00")


class NotElf(ValueError):
    """Not an ELF64 little-endian file (or a truncated one)."""


class Section(NamedTuple):
    name_offset: int  # into the section-name string table; section_name() decodes it
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    value: int  # st_value: the virtual address
    size: int
    type: int  # STT_*
    bind: int  # STB_*: 0 local, 1 global, 2 weak
    shndx: int  # 0 = undefined: an import
    offset: int | None  # file offset of value (None for imports, or outside every PT_LOAD)

    @property
    def defined(self) -> bool:
        return self.shndx != 0


class ElfFile:
    """An ELF64 little-endian file. Headers, tables and strings are read with pread (cheaper than
    mapping for the many small executables a scan meets); the whole file is mmap'ed only when
    `data` is used (search). Use as a context manager, or close()."""

    def __init__(self, fd: int | None = None, image: bytes | None = None):
        """From an open fd (owned: closed by close()) or an in-memory image."""
        self._fd = fd
        self._image = image
        self._map: mmap.mmap | None = None
        head = self.read(0, 64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise NotElf("not an ELF64 little-endian file")
        self.elf_type, self.machine = struct.unpack_from("<HH", head, 0x10)  # ET_*, EM_*
        (_entry, self.phoff, self.shoff, _flags, _ehsize, self.phentsize, self.phnum, self.shentsize,
         self.shnum, self.shstrndx) = _EHDR.unpack_from(head, 0x18)
        self._sections: list[Section] | None = None
        self._raw_sections: list[tuple] | None = None
        self._names: dict[str, Section] | None = None
        self._loads: list[tuple[int, int, int]] | None = None

    @classmethod
    def open(cls, path: str) -> ElfFile:
        """Raises OSError, NotElf (a ValueError)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def read(self, offset: int, size: int) -> bytes:
        """size bytes at offset (fewer at the end of the file)."""
        if self._image is not None:
            return self._image[offset:offset + size]
        return os.pread(self._fd, size, offset)

    @property
    def data(self):
        """The whole file (mmap'ed on first use)."""
        if self._image is not None:
            return self._image
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ElfFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- headers ---------------------------------------------------------------------------

    @property
    def sections(self) -> list[Section]:
        if self._sections is None:
            self._sections = list(map(Section._make, self._shdrs()))
        return self._sections

    def _shdrs(self) -> list[tuple]:
        """The section headers as plain tuples (Section's fields), unpacked once in C: this
        runs for every executable a snapshot meets."""
        if self._raw_sections is None:
            size = self.shnum * self.shentsize
            table = self.read(self.shoff, size) if self.shoff and self.shentsize == _SHDR.size else b""
            self._raw_sections = list(_SHDR.iter_unpack(table)) if len(table) == size else []
        return self._raw_sections

    def section_name(self, sec: Section) -> str:
        strtab = self.sections[self.shstrndx] if self.shstrndx < len(self.sections) else None
        return self._string(strtab.offset + sec.name_offset) if strtab else ""

    def section(self, name: str) -> Section | None:
        if self._names is None:
            self._names = {}
            for sec in self.sections:
                self._names.setdefault(self.section_name(sec), sec)
        return self._names.get(name)

    def section_bytes(self, name: str) -> bytes | None:
        sec = self.section(name)
        return self.read(sec.offset, sec.size) if sec else None

    def sections_of_type(self, stype: int) -> list[Section]:
        return [s for s in self.sections if s.type == stype]

    @property
    def loads(self) -> list[tuple[int, int, int]]:
        """(vaddr, memsz, file offset) of the PT_LOAD segments."""
        if self._loads is None:
            loads = []
            table = self.read(self.phoff, self.phnum * self.phentsize)
            for i in range(self.phnum):
                ptype, _flags, off, vaddr, _paddr, _filesz, memsz = _PHDR.unpack_from(table, i * self.phentsize)
                if ptype == PT_LOAD:
                    loads.append((vaddr, memsz, off))
            self._loads = loads
        return self._loads

    def file_offset(self, vaddr: int) -> int | None:
        """The file offset of a virtual address (what a uprobe takes), through PT_LOAD."""
        for start, memsz, off in self.loads:
            if start <= vaddr < start + memsz:
                return vaddr - start + off
        return None

    def pointer_at(self, vaddr: int) -> int | None:
        """The 8-byte little-endian pointer stored at vaddr, as loaded at the link-time base: a
        RELATIVE relocation's addend when one targets vaddr (PIE data), else the file's bytes.
        None when vaddr is not in the file."""
        off = self.file_offset(vaddr)
        if off is None:
            return None
        raw = self.read(off, 8)
        if len(raw) < 8:
            return None
        relative = {EM_X86_64: R_X86_64_RELATIVE, EM_AARCH64: R_AARCH64_RELATIVE}.get(self.machine)
        if self.elf_type == ET_DYN and relative is not None:
            key = struct.pack("<Q", vaddr)
            for sec in self.sections_of_type(SHT_RELA):
                if sec.entsize != _RELA.size:
                    continue
                table = self.read(sec.offset, sec.size)
                pos = table.find(key)
                while pos >= 0:
                    if pos % _RELA.size == 0:
                        _r_offset, info, addend = _RELA.unpack_from(table, pos)
                        if info & 0xFFFFFFFF == relative:
                            return addend
                    pos = table.find(key, pos + 1)
        return struct.unpack("<Q", raw)[0]

    def _string(self, pos: int) -> str:
        chunks = []
        while True:
            chunk = self.read(pos, 256)
            end = chunk.find(b"\0")
            if end >= 0 or not chunk:
                chunks.append(chunk[:end] if end >= 0 else chunk)
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)
            pos += len(chunk)

    # --- notes, dynamic ----------------------------------------------------------------------

    @property
    def build_id(self) -> str | None:
        """The GNU build-id as hex, or None."""
        for sec in self.sections_of_type(SHT_NOTE):
            notes = self.read(sec.offset, sec.size)
            pos, end = 0, len(notes)
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name_end = pos + 12 + ((namesz + 3) & ~3)
                if ntype == NT_GNU_BUILD_ID and notes[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"GNU":
                    return notes[name_end:name_end + descsz].hex()
                pos = name_end + ((descsz + 3) & ~3)
        return None

    def _dynamic_strings(self, tag: int) -> list[str]:
        """The strings of every dynamic entry with this tag (DT_SONAME, DT_NEEDED), in order."""
        out = []
        for sec in self.sections_of_type(SHT_DYNAMIC):
            if not sec.entsize or sec.link >= len(self.sections):
                continue
            dynstr = self.sections[sec.link].offset
            dynamic = self.read(sec.offset, sec.size)
            for pos in range(0, len(dynamic) - 15, sec.entsize):
                entry, val = struct.unpack_from("<qQ", dynamic, pos)
                if entry == 0:  # DT_NULL
                    break
                if entry == tag:
                    out.append(self._string(dynstr + val))
        return out

    @property
    def soname(self) -> str | None:
        names = self._dynamic_strings(DT_SONAME)
        return names[0] if names else None

    @property
    def needed(self) -> list[str]:
        """The libraries it links against (DT_NEEDED), e.g. libcrypto-fa202293.so.3 for a wheel's libssl."""
        return self._dynamic_strings(DT_NEEDED)

    # --- symbols -----------------------------------------------------------------------------

    def _table(self, table: int) -> tuple[tuple, tuple] | None:
        """(symbol table, its string table) as raw section headers."""
        shdrs = self._shdrs()
        for sec in shdrs:
            if sec[1] == table and sec[9] and sec[6] < len(shdrs):  # type, entsize, link
                return sec, shdrs[sec[6]]
        return None

    def mentions(self, names, table: int = DYNSYM) -> bool:
        """Whether any of names (bytes) is in the string table of `table`: a cheap test before
        symbols() on files that are mostly irrelevant (executables)."""
        found = self._table(table)
        if found is None:
            return False
        strings = self.read(found[1][4], found[1][5])
        return any(strings.find(b"\0" + n + b"\0") >= 0 for n in names)

    def name_starting(self, prefix: bytes, table: int = SYMTAB) -> str | None:
        """The first name in the string table of `table` that starts with prefix (a C++ name
        whose mangled parameter types vary between builds), or None."""
        found = self._table(table)
        if found is None:
            return None
        strings = self.read(found[1][4], found[1][5])
        pos = strings.find(b"\0" + prefix)
        if pos < 0:
            return None
        return strings[pos + 1:strings.index(b"\0", pos + 1)].decode(errors="replace")

    def symbols(self, names=None, table: int = DYNSYM, types=FUNCTIONS, defined: bool | None = True
                ) -> dict[str, Symbol]:
        """name -> Symbol from .dynsym (table=DYNSYM) or .symtab (SYMTAB).

        names: the names wanted (str), or None for all (slower: every name is decoded);
        types: STT_* kept (None: any); defined: True exports, False imports, None both.
        Versioned .symtab names ("f@@V_1") count as their base name."""
        found = self._table(table)
        if found is None:
            return {}
        symtab, strtab = found
        strings = self.read(strtab[4], strtab[5])  # offset, size
        by_pos: dict[int, str] | None = None
        if names is not None:
            by_pos = {}
            terms = (b"\0", b"@") if table == SYMTAB else (b"\0",)
            for name in names:
                raw = name.encode()
                for term in terms:  # every string ending in name (linkers share string tails)
                    pos = strings.find(raw + term)
                    while pos >= 0:
                        if term == b"\0" or pos == 0 or strings[pos - 1] == 0:
                            by_pos[pos] = name
                        pos = strings.find(raw + term, pos + 1)
            if not by_pos:
                return {}
        out = {}
        raw_syms = self.read(symtab[4], symtab[5])
        if symtab[9] != _SYM.size:
            return {}
        for st_name, st_info, _other, shndx, value, size in _SYM.iter_unpack(raw_syms):
            if by_pos is not None:
                name = by_pos.get(st_name)
                if name is None:
                    continue
            elif st_name:
                name = strings[st_name:strings.find(b"\0", st_name)].decode(errors="replace").split("@")[0]
            else:
                continue
            stype = st_info & 0xF
            if types is not None and stype not in types:
                continue
            if defined is not None and (shndx != 0) != defined:
                continue
            out[name] = Symbol(name, value, size, stype, st_info >> 4, shndx,
                               self.file_offset(value) if shndx else None)
        return out

    def exports(self, names, types=None) -> list[str]:
        """Which of names the file defines in .dynsym (any symbol type unless types), sorted."""
        return sorted(self.symbols(names, DYNSYM, types, True))

    def imports(self, names, types=None) -> list[str]:
        """Which of names the file needs from another (undefined in .dynsym), sorted."""
        return sorted(self.symbols(names, DYNSYM, types, False))

    def search(self, regex: re.Pattern, group: int = 1) -> str | None:
        """A group of the first match of a bytes regex anywhere in the file, decoded, or None."""
        match = regex.search(self.data)
        return match.group(group).decode() if match else None


# --- one-shot helpers --------------------------------------------------------------------------

def open_or_none(path: str) -> ElfFile | None:
    try:
        return ElfFile.open(path)
    except (OSError, ValueError):
        return None


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1


def build_id_or_digest(path: str) -> str:
    """The GNU build-id as hex; for a file without one, 'sha256-' + the file's digest.
    Raises OSError."""
    try:
        with ElfFile.open(path) as elf:
            found = elf.build_id
            if found:
                return found
    except (ValueError, struct.error):  # NotElf
        pass
    with open(path, "rb") as f:
        return "sha256-" + hashlib.file_digest(f, "sha256").hexdigest()


def search_file(path: str, regex: re.Pattern, group: int = 1) -> str | None:
    """A group of the first match of a bytes regex in any file (ELF or not), decoded; None when
    absent or unreadable. The file is mmap'ed, not read."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            match = regex.search(m)
            return match.group(group).decode() if match else None
    except (OSError, ValueError):
        return None


def openssl_version(path: str) -> str | None:
    """'3.0.19' from the dated 'OpenSSL 3.0.19 27 Jan 2026' banner compiled into a file, or None.
    For a shared libssl the banner lives in libcrypto; static builds (node) carry it."""
    return search_file(path, OPENSSL_BANNER_RE, 2)


def openssl_build(path: str) -> str | None:
    """The whole version of that banner: '3.0.13+quic' for node 20's patched OpenSSL."""
    return search_file(path, OPENSSL_BANNER_RE)


def banner_version(path: str, openssl_family: bool) -> str | None:
    """The version string of a crypto library file: the first OpenSSL/LibreSSL/BoringSSL/wolfSSL
    banner ('BoringSSL' when it has no number) for the OpenSSL family, else the first bare
    'x.y.z' with a major version >= 1. None when absent or unreadable."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if openssl_family:
                match = TLS_BANNER_RE.search(m)
                if match:
                    return match.group(2).decode()
                return "BoringSSL" if BORINGSSL_RE.search(m) else None
            match = BARE_VERSION_RE.search(m)
            return match.group(1).decode() if match else None
    except (OSError, ValueError):
        return None
