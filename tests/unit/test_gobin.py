"""host.gobin on real Go programs: built here by every toolchain of tests/gobuild.py (normal, stripped, PIE)
and esbuild from npm. Oracles: .symtab of the same file, Go's own readers (`go tool objdump` on unstripped
builds, tests/go/gosymtab = debug/gosym on any), and the unstripped twin of a stripped build (same text:
-s -w only drops the symbol table and DWARF)."""

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from crypto_tracer.host import elf, gobin
from tests import gobuild

TLS = gobin.TLS_FUNCTIONS
MATRIX = gobuild.matrix()
CASES = [(label, variant) for label in MATRIX for variant in gobuild.VARIANTS]
INT3 = 0xCC


def programs(label: str, variant: str) -> gobuild.GoPrograms:
    try:
        return gobuild.build(gobuild.toolchain(MATRIX[label]), variant)
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))


def gosym(path: str, names) -> dict[str, tuple[int, int]]:
    """name -> (entry, end) from Go's debug/gosym."""
    try:
        tool = gobuild.gosymtab()
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))
    out = subprocess.run([tool, path, *names], capture_output=True, text=True, timeout=60, check=True).stdout
    return {name: (int(entry, 16), int(end, 16)) for name, entry, end in (line.rsplit(" ", 2) for line in out.splitlines())}


def objdump(go: str, path: str) -> dict[str, tuple[int, list[int]]]:
    """name -> (entry address, addresses of its RETs) from `go tool objdump` (needs .symtab)."""
    pattern = r"^crypto/tls\.\(\*(Conn|Config)\)\.(writeRecordLocked|Read|writeKeyLog)$"
    out = subprocess.run([go, "tool", "objdump", "-s", pattern, path], capture_output=True, text=True,
                         timeout=120, check=True, env=dict(os.environ, GOTOOLCHAIN="local")).stdout
    funcs: dict[str, tuple[int, list[int]]] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("TEXT "):
            name = line.split()[1].removesuffix("(SB)")
            continue
        fields = [f for f in line.strip().split("\t") if f]
        addr = next((int(f, 16) for f in fields if f.startswith("0x")), None)
        if name is None or addr is None:
            continue
        _entry, rets = funcs.setdefault(name, (addr, []))
        if fields[-1].strip() == "RET":
            rets.append(addr)
    return funcs


def ret_addresses(path: str, fn: gobin.GoFunc) -> list[int]:
    rets, why = gobin.ret_offsets(path, fn)
    assert rets, why
    with open(path, "rb") as f:
        data = f.read()
    assert all(data[off] == 0xC3 for off in rets), f"{fn.name}: not RET bytes at {rets}"
    return [fn.address + off - fn.offset for off in rets]


@pytest.mark.parametrize("label,variant", CASES)
def test_go_programs(label, variant):
    progs = programs(label, variant)
    twin = programs(label, "normal") if variant == "stripped" else progs
    for path, twin_path in ((progs.server, twin.server), (progs.client, twin.client)):
        info = gobin.inspect(path)
        assert info is not None
        assert (info.version, info.version_source) == (progs.toolchain.version, "buildinfo")
        assert (info.arch, info.pie, info.reason) == ("x86_64", variant == "pie", None)
        magic = gobin.MAGIC_GO118 if gobin.parse_version(info.version) < (1, 20) else gobin.MAGIC_GO120
        assert info.pclntab_magic == magic
        # PIE: .data.rel.ro.gopclntab up to some Go release, .gopclntab in 1.27 (no relocations left in it)
        assert info.pclntab_where in (gobin.PCLNTAB_SECTIONS if variant == "pie" else (".gopclntab",))
        assert sorted(info.functions) == sorted(TLS)
        assert {fn.source for fn in info.functions.values()} == {"pclntab" if variant == "stripped" else "symtab"}

        with elf.ElfFile.open(path) as f:
            pcln = gobin.pclntab_functions(f, TLS)
            data = f.read(0, os.path.getsize(path))
        oracle = gosym(path, TLS)
        for name in TLS:
            fn, p = info.functions[name], pcln[name]
            assert (p.address, p.address + p.size) == oracle[name]  # Go's own pclntab reader
            assert p.offset == fn.offset and p.address == fn.address
            assert data[p.offset:p.offset + 4] == data[fn.offset:fn.offset + 4]
            if fn.source == "symtab":  # the pclntab size runs to the next function: int3 padding
                assert p.size >= fn.size and set(data[fn.offset + fn.size:p.offset + p.size]) <= {INT3}

        # entries and RETs against `go tool objdump` of the unstripped build (the twin of a stripped one)
        dumped = objdump(progs.toolchain.go, twin_path)
        twin_info = gobin.inspect(twin_path) if twin_path != path else info
        for name in TLS:
            entry, rets = dumped[name]
            assert info.functions[name].address == twin_info.functions[name].address == entry
            assert rets, f"{name}: objdump shows no RET"
            assert ret_addresses(path, info.functions[name]) == rets


def test_esbuild_stripped_without_buildinfo():
    try:
        path = gobuild.esbuild()
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))
    with elf.ElfFile.open(path) as f:
        assert f.section(".go.buildinfo") is None and f.section(".symtab") is None
        assert gobin.buildinfo_version(f) is None
    info = gobin.inspect(path)
    assert (info.version, info.version_source, info.version_range) == ("go1.26.5", "string", "go1.20+")
    assert (info.arch, info.pie, info.reason, info.pclntab_where) == ("x86_64", False, None, ".gopclntab")
    oracle = gosym(path, TLS)
    assert sorted(info.functions) == sorted(TLS)
    for name, fn in info.functions.items():
        assert fn.source == "pclntab" and (fn.address, fn.address + fn.size) == oracle[name]
        assert len(ret_addresses(path, fn)) >= 1


def _copy(tmp_path, src: str, name: str) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copyfile(src, dst)
    return dst


def _patch(path: str, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def _patch_in_section(path: str, section: str, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    with elf.ElfFile.open(path) as f:
        sec = f.section(section) if section != "shstrtab" else f.sections[f.shstrndx]
        data = f.read(sec.offset, sec.size)
    pos = data.find(old)
    assert pos >= 0, f"{old!r} not in {section}"
    _patch(path, sec.offset + pos, new)


@pytest.mark.parametrize("variant", ["normal", "pie"])
def test_pclntab_without_its_section(tmp_path, variant):
    """The same table through runtime.pclntab, then runtime.firstmoduledata (PIE: through its RELATIVE
    relocation), then with no section headers at all (a scan), at the same offsets as .symtab's."""
    progs = programs("middle", variant)
    section = ".data.rel.ro.gopclntab" if variant == "pie" else ".gopclntab"
    with elf.ElfFile.open(progs.server) as f:
        expected = {n: (fn.address, fn.offset) for n, fn in gobin.symtab_functions(f, TLS).items()}
    assert sorted(expected) == sorted(TLS)

    path = _copy(tmp_path, progs.server, "renamed")
    _patch_in_section(path, "shstrtab", b"gopclntab\0", b"gopclntaX\0")
    for where in ("runtime.pclntab", "runtime.firstmoduledata"):
        with elf.ElfFile.open(path) as f:
            assert f.section(section) is None
            table, found_where, error = gobin.find_pclntab(f)
            assert (found_where, error) == (where, None)
            got = {n: (fn.address, fn.offset) for n, fn in gobin.pclntab_functions(f, TLS, table).items()}
        assert got == expected
        if where == "runtime.pclntab":  # next: without that symbol
            _patch_in_section(path, ".strtab", b"\0runtime.pclntab\0", b"\0runtime.pclntaX\0")

    path = _copy(tmp_path, progs.server, "no-sections")
    _patch(path, 0x28, struct.pack("<Q", 0))  # e_shoff
    _patch(path, 0x3C, struct.pack("<HH", 0, 0))  # e_shnum, e_shstrndx
    info = gobin.inspect(path)
    assert (info.version, info.pclntab_where, info.reason) == (progs.toolchain.version, "scan", None)
    assert {n: (fn.address, fn.offset) for n, fn in info.functions.items()} == expected


def test_not_go_and_not_elf(tmp_path):
    assert gobin.inspect(os.path.realpath(sys.executable)) is None
    text = tmp_path / "text"
    text.write_text("go1.22.10 not an ELF\n")
    assert gobin.inspect(str(text)) is None
    assert gobin.inspect(str(tmp_path / "missing")) is None


def test_reasons(tmp_path):
    """What the tracer prints once for a Go binary it cannot hook (real builds, some patched)."""
    normal, stripped = programs("middle", "normal"), programs("middle", "stripped")
    version = normal.toolchain.version

    info = gobin.inspect(normal.plain)
    assert (info.version, info.functions) == (version, {})
    assert info.reason == f"{version}: no crypto/tls in this binary"

    old = _copy(tmp_path, normal.server, "old")
    _patch_in_section(old, ".go.buildinfo", version.encode(), re.sub(r"go1\.\d\d", "go1.17", version).encode())
    info = gobin.inspect(old)
    assert info.version.startswith("go1.17.") and info.reason.startswith(info.version + ": too old")

    pre116 = _copy(tmp_path, stripped.server, "pre116")
    _patch_in_section(pre116, ".gopclntab", b"\xf1\xff\xff\xff", b"\xfb\xff\xff\xff")
    info = gobin.inspect(pre116)
    assert info.functions == {} and info.version_range == "go1.2-go1.15"
    assert info.reason == "pclntab (.gopclntab): pclntab of Go 1.2-1.15 is not read (too old)"

    nopcln = _copy(tmp_path, stripped.server, "nopcln")
    _patch_in_section(nopcln, "shstrtab", b"gopclntab\0", b"gopclntaX\0")
    info = gobin.inspect(nopcln)
    assert (info.functions, info.reason) == ({}, "no Go pclntab found")

    arm = _copy(tmp_path, normal.server, "arm64")
    _patch(arm, 0x12, struct.pack("<H", elf.EM_AARCH64))
    info = gobin.inspect(arm)
    assert info.arch == "aarch64" and sorted(info.functions) == sorted(TLS)
    assert info.reason == f"{version} on aarch64: only x86-64 Go is hooked (register ABI and RET disassembly)"
    rets, why = gobin.ret_offsets(arm, info.functions[gobin.READ])
    assert rets is None and why == f"{gobin.READ}: disassembly of aarch64 is not supported (x86-64 only)"
