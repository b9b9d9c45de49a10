"""Go binaries: is this ELF a Go program, which Go, and where are its crypto/tls functions.

Built on ``host.elf`` (the one ELF reader). What it gives, for uprobes on Go's crypto/tls:

- ``inspect(path)``: a ``GoBinary`` (None for a file that is not Go): its Go version (build info
  ``go1.x.y``; else the ``go1.x.y`` string compiled into the runtime; else only the range the
  pclntab magic implies), the wanted functions as ``GoFunc`` (entry file offset, size), and
  ``reason``: why it cannot be hooked (None when it can), to be printed once.
- Functions come from ``.symtab`` when present, else from the pclntab (``.gopclntab``; PIE:
  ``.data.rel.ro.gopclntab``; else through ``runtime.pclntab``/``runtime.firstmoduledata``; else a
  scan for its header). Formats read: Go 1.18-1.19 (magic 0xfffffff0), 1.20+ (0xfffffff1), and
  1.16-1.17 (0xfffffffa: read, but reported as too old to hook); 1.2-1.15 (0xfffffffb) is not read.
- ``ret_offsets(path, func)``: file offsets of every RET in a function (x86-64, by disassembly
  with capstone): uprobes there replace a uretprobe, which crashes Go programs (the runtime moves
  goroutine stacks and walks return addresses).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from crypto_tracer.host import elf as elfmod

WRITE_RECORD = "crypto/tls.(*Conn).writeRecordLocked"
READ = "crypto/tls.(*Conn).Read"
WRITE_KEYLOG = "crypto/tls.(*Config).writeKeyLog"
TLS_FUNCTIONS = (WRITE_RECORD, READ, WRITE_KEYLOG)

MIN_HOOKABLE = (1, 18)  # the oldest Go the hooks are built and tested for (register ABI since 1.17)

# pclntab magic -> (first, last) Go minor version it is written by (last None: still current)
MAGIC_GO116, MAGIC_GO118, MAGIC_GO120, MAGIC_GO12 = 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1, 0xFFFFFFFB
MAGIC_RANGES = {MAGIC_GO12: (2, 15), MAGIC_GO116: (16, 17), MAGIC_GO118: (18, 19), MAGIC_GO120: (20, None)}

PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
GO_SECTIONS = (".go.buildinfo", ".note.go.buildid") + PCLNTAB_SECTIONS
BUILDINFO_MAGIC = b"\xff Go buildinf:"
# the runtime's own version string, packed among other strings (not NUL-terminated)
_VERSION_STRING_RE = re.compile(rb"go1\.(\d{1,3})\.(\d{1,3})")
_PCLNTAB_HEADER_RE = re.compile(rb"[\xf0\xf1\xfa]\xff\xff\xff\x00\x00[\x01\x02\x04][\x04\x08]")
_GO_VERSION_RE = re.compile(r"go1\.(\d+)(?:\.(\d+))?")
ARCH_NAMES = {elfmod.EM_X86_64: "x86_64", elfmod.EM_AARCH64: "aarch64"}


@dataclass(frozen=True, slots=True)
class GoFunc:
    name: str
    address: int  # entry virtual address (link time)
    size: int  # bytes to the next function's entry (pclntab; includes padding) or st_size (.symtab)
    offset: int  # file offset of the entry: what a uprobe takes
    source: str  # "symtab" or "pclntab"


@dataclass(slots=True)
class GoBinary:
    path: str
    arch: str  # "x86_64", "aarch64" or "e_machine N"
    pie: bool
    version: str | None  # "go1.22.10" (from build info or the runtime's string); None when unknown
    version_source: str | None  # "buildinfo", "string" or None
    version_range: str | None  # what the pclntab magic implies: "go1.20+", "go1.18-go1.19", ...
    pclntab_magic: int | None
    pclntab_where: str | None  # section name, "runtime.pclntab", "runtime.firstmoduledata" or "scan"
    functions: dict[str, GoFunc] = field(default_factory=dict)
    reason: str | None = None  # why it cannot be hooked; None: it can

    @property
    def hookable(self) -> bool:
        return self.reason is None

    @property
    def version_tuple(self) -> tuple[int, int] | None:
        """(1, minor) of the exact version, else the lowest of the magic's range; None if neither."""
        found = parse_version(self.version)
        if found:
            return found[:2]
        low = MAGIC_RANGES.get(self.pclntab_magic or 0)
        return (1, low[0]) if low else None


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """'go1.22.10' -> (1, 22, 10); 'go1.19' -> (1, 19, 0); 'devel go1.23-abc' -> (1, 23, 0)."""
    match = _GO_VERSION_RE.search(text or "")
    return (1, int(match.group(1)), int(match.group(2) or 0)) if match else None


def _range_text(magic: int | None) -> str | None:
    found = MAGIC_RANGES.get(magic or 0)
    if not found:
        return None
    low, high = found
    return f"go1.{low}+" if high is None else f"go1.{low}-go1.{high}"


# --- build info --------------------------------------------------------------------------------

def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def buildinfo_version(f: elfmod.ElfFile) -> str | None:
    """The toolchain version recorded in the build info ('go1.22.10'; 'go1.23.4 X:boringcrypto'
    keeps its suffix), or None when the binary has none (esbuild strips it)."""
    sec = f.section(".go.buildinfo")
    if sec is not None:
        head, vaddr = f.read(sec.offset, min(sec.size, 4096)), sec.addr
    elif not f.sections:  # no section headers: look for the blob itself
        pos = f.data.find(BUILDINFO_MAGIC)
        if pos < 0:
            return None
        head, vaddr = bytes(f.data[pos:pos + 4096]), None
    else:
        return None
    if not head.startswith(BUILDINFO_MAGIC) or len(head) < 32:
        return None
    ptrsize, flags = head[14], head[15]
    try:
        if flags & 2:  # Go 1.18+: the version string inline after the 32-byte header
            length, pos = _uvarint(head, 32)
            return head[pos:pos + length].decode(errors="replace") or None
        if flags & 1 or ptrsize != 8 or vaddr is None:  # big-endian or 32-bit: not read
            return None
        # before 1.18: a pointer to a Go string header (data pointer, length)
        strhdr = f.pointer_at(vaddr + 16)
        data_ptr = f.pointer_at(strhdr) if strhdr else None
        length_off = f.file_offset(strhdr + 8) if strhdr else None
        if not data_ptr or length_off is None:
            return None
        length = struct.unpack("<Q", f.read(length_off, 8))[0]
        off = f.file_offset(data_ptr)
        return f.read(off, min(length, 64)).decode(errors="replace") if off is not None and length else None
    except (ValueError, struct.error):
        return None


def string_version(f: elfmod.ElfFile, magic: int | None = None) -> str | None:
    """The 'go1.x.y' the runtime carries as its build version, found as a string: the most frequent
    full x.y.z match that the pclntab magic allows (2-part strings such as 'go1.13' are GODEBUG
    history, not the toolchain). None when there is none."""
    counts: dict[tuple[int, int], int] = {}
    allowed = MAGIC_RANGES.get(magic or 0)
    for match in _VERSION_STRING_RE.finditer(f.data):
        minor, patch = int(match.group(1)), int(match.group(2))
        if allowed and not (allowed[0] <= minor and (allowed[1] is None or minor <= allowed[1])):
            continue
        counts[(minor, patch)] = counts.get((minor, patch), 0) + 1
    if not counts:
        return None
    minor, patch = max(counts, key=lambda k: (counts[k], k))
    return f"go1.{minor}.{patch}"


# --- pclntab -----------------------------------------------------------------------------------

class Pclntab:
    """The header and function table of a Go pclntab (Go's src/debug/gosym/pclntab.go)."""

    def __init__(self, data: bytes, addr: int, text_start: int | None = None):
        """data: the table's bytes (at least); addr: its virtual address; text_start: the
        runtime.text address when the header's own is 0 (relocated PIE). Raises ValueError."""
        if len(data) < 8:
            raise ValueError("truncated pclntab")
        self.magic, pad, self.quantum, self.ptrsize = struct.unpack_from("<IHBB", data, 0)
        if self.magic not in (MAGIC_GO116, MAGIC_GO118, MAGIC_GO120):
            fmt = MAGIC_RANGES.get(self.magic)
            raise ValueError(f"pclntab of Go 1.{fmt[0]}-1.{fmt[1]} is not read (too old)" if fmt
                             else f"unknown pclntab magic {self.magic:#x}")
        if pad != 0 or self.quantum not in (1, 2, 4) or self.ptrsize not in (4, 8):
            raise ValueError("bad pclntab header")
        self.data, self.addr = data, addr
        word = "<Q" if self.ptrsize == 8 else "<I"

        def header(i: int) -> int:
            return struct.unpack_from(word, data, 8 + i * self.ptrsize)[0]

        self.nfunc = header(0)
        if self.magic == MAGIC_GO116:
            self.text_start = 0  # entries are absolute addresses
            names, cutab, functab, self.field = header(2), header(3), header(6), self.ptrsize
        else:
            self.text_start = header(2) or text_start or 0
            names, cutab, functab, self.field = header(3), header(4), header(7), 4
        self.names = (names, cutab)
        self.functab = functab
        if not (0 < names < cutab <= len(data) and 0 < functab and self.nfunc > 0
                and functab + (2 * self.nfunc + 1) * self.field <= len(data)):
            raise ValueError("pclntab offsets out of bounds")
        if self.magic != MAGIC_GO116 and not self.text_start:
            raise ValueError("pclntab has no text start")

    def _entry(self, i: int) -> int:
        fmt = "<I" if self.field == 4 else "<Q"
        return struct.unpack_from(fmt, self.data, self.functab + 2 * i * self.field)[0] + self.text_start

    def lookup(self, names) -> dict[str, tuple[int, int]]:
        """name -> (entry address, size to the next entry) for the names present."""
        start, end = self.names
        table = self.data[start:end]
        by_nameoff: dict[int, str] = {}
        for name in names:
            raw = name.encode() + b"\0"
            pos = table.find(raw)
            while pos >= 0:
                if pos == 0 or table[pos - 1] == 0:
                    by_nameoff[pos] = name
                pos = table.find(raw, pos + 1)
        out: dict[str, tuple[int, int]] = {}
        if not by_nameoff:
            return out
        pair = "<II" if self.field == 4 else "<QQ"
        span = 2 * self.field
        funcs = self.data[self.functab:self.functab + self.nfunc * span]
        for i, (_entry, funcoff) in enumerate(struct.iter_unpack(pair, funcs)):
            # _func: entry (u32 offset from 1.18, uintptr before), then nameOff int32
            nameoff = struct.unpack_from("<i", self.data, self.functab + funcoff + self.field)[0]
            name = by_nameoff.get(nameoff)
            if name is not None and name not in out:
                entry = self._entry(i)
                out[name] = (entry, self._entry(i + 1) - entry)
        return out


def _segment_end(f: elfmod.ElfFile, vaddr: int) -> int | None:
    """File offset where the PT_LOAD holding vaddr ends in the file (its filesz)."""
    table = f.read(f.phoff, f.phnum * f.phentsize)
    for i in range(f.phnum):
        ptype, _flags, off, start, _paddr, filesz, _memsz = struct.unpack_from("<IIQQQQQ", table, i * f.phentsize)
        if ptype == elfmod.PT_LOAD and start <= vaddr < start + filesz:
            return off + filesz
    return None


def _vaddr_of(f: elfmod.ElfFile, offset: int) -> int | None:
    for start, memsz, off in f.loads:
        if off <= offset < off + memsz:
            return offset - off + start
    return None


def _text_start(f: elfmod.ElfFile, addr: int, ptrsize: int) -> int | None:
    """runtime.text: relocated PIE headers leave the field 0 in the file; then the RELATIVE
    relocation's addend, the symbol, or the .text address (what debug/gosym uses)."""
    via_reloc = f.pointer_at(addr + 8 + 2 * ptrsize)
    if via_reloc:
        return via_reloc
    syms = f.symbols(["runtime.text"], elfmod.SYMTAB, types=None)
    if "runtime.text" in syms:
        return syms["runtime.text"].value
    text = f.section(".text")
    return text.addr if text else None


def find_pclntab(f: elfmod.ElfFile) -> tuple[Pclntab | None, str | None, str | None]:
    """(table, where it was found, error). The table is None with the reason when none could be read."""
    candidates: list[tuple[str, int, int, int | None]] = []  # (where, vaddr, file offset, end offset)
    for name in PCLNTAB_SECTIONS:
        sec = f.section(name)
        if sec is not None and sec.type != 8:  # not NOBITS
            candidates.append((name, sec.addr, sec.offset, sec.offset + sec.size))
    if not candidates:
        syms = f.symbols(["runtime.pclntab", "runtime.epclntab", "runtime.firstmoduledata"],
                         elfmod.SYMTAB, types=None)
        if "runtime.pclntab" in syms and syms["runtime.pclntab"].offset is not None:
            start = syms["runtime.pclntab"]
            end = syms.get("runtime.epclntab")
            candidates.append(("runtime.pclntab", start.value, start.offset,
                               end.offset if end and end.offset else None))
        elif "runtime.firstmoduledata" in syms:  # moduledata.pcHeader is its first field
            addr = f.pointer_at(syms["runtime.firstmoduledata"].value)
            off = f.file_offset(addr) if addr else None
            if off is not None:
                candidates.append(("runtime.firstmoduledata", addr, off, None))
    if not candidates and not f.sections:  # no section headers at all: scan for the header
        for match in _PCLNTAB_HEADER_RE.finditer(f.data):
            addr = _vaddr_of(f, match.start())
            if addr is not None:
                candidates.append(("scan", addr, match.start(), None))
    error = "no Go pclntab found"
    for where, addr, off, end in candidates:
        end = end or _segment_end(f, addr)
        if end is None or end <= off:
            continue
        data = f.read(off, end - off)
        try:
            ptrsize = data[7] if len(data) > 7 else 8
            return Pclntab(data, addr, _text_start(f, addr, ptrsize)), where, None
        except (ValueError, struct.error) as exc:
            error = f"pclntab ({where}): {exc}"
    return None, None, error


# --- the binary --------------------------------------------------------------------------------

def is_go(f: elfmod.ElfFile) -> bool:
    """Whether an ELF is a Go program: its Go sections, else (no section headers) its build info
    or pclntab header."""
    if any(f.section(name) is not None for name in GO_SECTIONS):
        return True
    if f.sections:
        return bool(f.symbols(["runtime.main"], elfmod.SYMTAB))
    return f.data.find(BUILDINFO_MAGIC) >= 0 or _PCLNTAB_HEADER_RE.search(f.data) is not None


def inspect(path: str, names=TLS_FUNCTIONS) -> GoBinary | None:
    """The Go facts of the file at path, or None when it is not a Go ELF (or unreadable)."""
    f = elfmod.open_or_none(path)
    if f is None:
        return None
    with f:
        try:
            return inspect_elf(f, path, names)
        except (ValueError, struct.error, OSError):
            return None


def inspect_elf(f: elfmod.ElfFile, path: str, names=TLS_FUNCTIONS) -> GoBinary | None:
    if not is_go(f):
        return None
    names = tuple(names)
    arch = ARCH_NAMES.get(f.machine, f"e_machine {f.machine}")
    table, where, table_error = find_pclntab(f)
    magic = table.magic if table else None
    if magic is None and table_error and "Go 1.2-1.15" in table_error:
        magic = MAGIC_GO12
    version, source = buildinfo_version(f), "buildinfo"
    if version is None:
        version, source = string_version(f, magic), "string"
    info = GoBinary(path, arch, f.elf_type == elfmod.ET_DYN, version, source if version else None,
                    _range_text(magic), magic, where)

    found = symtab_functions(f, names)
    info.functions.update(found)
    missing = [n for n in names if n not in info.functions]
    if missing and table is not None:
        info.functions.update(pclntab_functions(f, missing, table))
    info.reason = _reason(info, names, table_error if table is None and not found else None)
    return info


def symtab_functions(f: elfmod.ElfFile, names) -> dict[str, GoFunc]:
    """The functions of names that .symtab defines (none in stripped builds)."""
    return {name: GoFunc(name, sym.value, sym.size, sym.offset, "symtab")
            for name, sym in f.symbols(names, elfmod.SYMTAB).items() if sym.offset is not None}


def pclntab_functions(f: elfmod.ElfFile, names, table: Pclntab | None = None) -> dict[str, GoFunc]:
    """The functions of names found in the pclntab (table: already found by find_pclntab)."""
    if table is None:
        table = find_pclntab(f)[0]
        if table is None:
            return {}
    out = {}
    for name, (entry, size) in table.lookup(names).items():
        off = f.file_offset(entry)
        if off is not None:
            out[name] = GoFunc(name, entry, size, off, "pclntab")
    return out


def _reason(info: GoBinary, names, table_error: str | None) -> str | None:
    ver = info.version_tuple
    label = info.version or info.version_range or "Go of unknown version"
    if ver is not None and ver < MIN_HOOKABLE:
        return (f"{label}: too old (Go's crypto/tls is hooked from go1.{MIN_HOOKABLE[1]}, "
                f"the register ABI and pclntab it is built for)")
    if table_error and not info.functions:
        return table_error
    if info.arch != "x86_64":
        return f"{label} on {info.arch}: only x86-64 Go is hooked (register ABI and RET disassembly)"
    missing = [n for n in names if n not in info.functions]
    if missing and len(missing) == len(names):
        return f"{label}: no crypto/tls in this binary"
    if missing:
        return f"{label}: crypto/tls function(s) not found: {', '.join(missing)}"
    return None


# --- disassembly -------------------------------------------------------------------------------

def instructions(path_or_elf, func: GoFunc):
    """(file offset, size, mnemonic, operands) of every instruction of an x86-64 function, by
    linear disassembly (Go puts no data in .text; padding after the function shows as int3).
    Raises RuntimeError for another architecture; OSError when unreadable."""
    import capstone  # only here: other commands do not pay for it

    f = elfmod.ElfFile.open(path_or_elf) if isinstance(path_or_elf, str) else path_or_elf
    try:
        if f.machine != elfmod.EM_X86_64:
            raise RuntimeError(f"disassembly of {ARCH_NAMES.get(f.machine, f.machine)} is not supported (x86-64 only)")
        code = f.read(func.offset, func.size)
    finally:
        if isinstance(path_or_elf, str):
            f.close()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True
    for addr, size, mnemonic, operands in md.disasm_lite(code, func.address):
        yield func.offset + addr - func.address, size, mnemonic, operands


def ret_offsets(path_or_elf, func: GoFunc) -> tuple[list[int] | None, str | None]:
    """(file offsets of every RET instruction of func, None), or (None, reason): not x86-64, or
    no RET found. Uprobes at these offsets see the function's results in the registers."""
    try:
        rets = [off for off, _size, mnemonic, _ops in instructions(path_or_elf, func) if mnemonic == "ret"]
    except RuntimeError as exc:
        return None, f"{func.name}: {exc}"
    except OSError as exc:
        return None, f"{func.name}: {exc.strerror or exc}"
    if not rets:
        return None, f"{func.name}: no RET instruction found in {func.size} bytes"
    return rets, None


def body_offset(path_or_elf, func: GoFunc) -> int:
    """The file offset just after func's stack-growth check (`cmp rsp|r12, [r14+0x10]; jbe`), else
    its entry. A call that must grow its stack runs morestack and jumps back to the entry, so an entry
    uprobe can fire twice for one call; one here fires once, with the arguments still in registers."""
    try:
        ins = []
        for item in instructions(path_or_elf, func):
            ins.append(item)
            if len(ins) >= 4:
                break
    except (RuntimeError, OSError):
        return func.offset
    for i in range(1, len(ins)):
        off, size, mnemonic, _ops = ins[i]
        if mnemonic in ("jbe", "jb") and "[r14 + 0x10]" in ins[i - 1][3]:
            return off + size
    return func.offset


@dataclass(slots=True)
class GoProbes:
    """Where the Go TLS uprobes go (file offsets): program name -> offsets, or why not."""
    binary: GoBinary
    offsets: dict[str, list[int]] = field(default_factory=dict)
    reason: str | None = None


def tls_probes(path: str, info: GoBinary | None = None, isolated: bool = False) -> GoProbes | None:
    """The offsets of bpf/go_tls.h's programs in the Go binary at path (None: not Go); reason set
    when it cannot be hooked. go_write/go_read_enter/go_keylog after the stack check, go_read_ret at
    every RET of (*Conn).Read. isolated: disassemble in a child process, so capstone (~8 MB resident
    once loaded) never enters the caller's memory (the tracer's RSS budget)."""
    info = info or inspect(path)
    if info is None:
        return None
    probes = GoProbes(info, reason=info.reason)
    if info.reason is not None:
        return probes
    funcs = {name: info.functions[name] for name in (READ, WRITE_RECORD, WRITE_KEYLOG)}
    if isolated:
        probes.offsets, probes.reason = _probe_offsets_child(path, funcs)
    else:
        probes.offsets, probes.reason = _probe_offsets(path, funcs)
    return probes


def _probe_offsets(path: str, funcs: dict[str, GoFunc]) -> tuple[dict[str, list[int]], str | None]:
    f = elfmod.open_or_none(path)
    if f is None:
        return {}, "unreadable"
    with f:
        read = funcs[READ]
        rets, why = ret_offsets(f, read)
        if rets is None:
            return {}, why
        return {"go_write": [body_offset(f, funcs[WRITE_RECORD])],
                "go_read_enter": [body_offset(f, read)],
                "go_read_ret": rets,
                "go_keylog": [body_offset(f, funcs[WRITE_KEYLOG])]}, None


_CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from crypto_tracer.host import gobin
funcs = {k: gobin.GoFunc(*v) for k, v in json.loads(sys.stdin.read()).items()}
print(json.dumps(gobin._probe_offsets(sys.argv[2], funcs)))
"""


def _probe_offsets_child(path: str, funcs: dict[str, GoFunc]) -> tuple[dict[str, list[int]], str | None]:
    import json
    import subprocess
    import sys

    arg = {k: [f.name, f.address, f.size, f.offset, f.source] for k, f in funcs.items()}
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sys.path), path], input=json.dumps(arg),
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {}, f"disassembly: {exc}"
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {}, f"disassembly failed: {lines[-1] if lines else out.returncode}"
    offsets, reason = json.loads(out.stdout)
    return offsets, reason
