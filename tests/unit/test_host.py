"""host/: the ELF reader against binutils and the section-based conversion it replaced, and the
/proc parsers on real and fixed input."""

import os
import re
import shutil
import subprocess

import pytest

from crypto_tracer.host import elf, proc

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed")
    return path


def test_pt_load_and_section_offsets_agree_for_every_function():
    with elf.ElfFile.open(_need(LIBCRYPTO)) as f:
        syms = f.symbols(None)
        assert len(syms) > 3000 and "EVP_DigestInit_ex" in syms
        for sym in syms.values():
            sec = f.sections[sym.shndx]
            assert sym.offset == sym.value - sec.addr + sec.offset, sym.name


def test_symbols_match_nm_and_exports_exclude_imports():
    if not shutil.which("nm"):
        pytest.skip("needs binutils")
    with elf.ElfFile.open(_need(LIBSSL)) as f:
        assert f.soname == "libssl.so.3"
        got = f.symbols(["SSL_write", "SSL_read", "no_such_fn"])
        assert set(got) == {"SSL_write", "SSL_read"} and all(s.defined and s.type == elf.STT_FUNC
                                                           for s in got.values())
        assert f.imports(["EVP_MD_get_size", "SSL_write"]) == ["EVP_MD_get_size"]  # from libcrypto
        assert f.exports(["EVP_MD_get_size", "SSL_write"]) == ["SSL_write"]
        assert f.section(".dynsym").type == elf.SHT_DYNSYM and f.section(".nope") is None
        note = f.section_bytes(".note.gnu.build-id")
        assert note is not None and note.endswith(bytes.fromhex(f.build_id))
    nm = subprocess.run(["nm", "-D", "--defined-only", LIBSSL], capture_output=True, text=True).stdout
    for name, sym in got.items():
        assert int(re.search(rf"^([0-9a-f]+) T {name}@@", nm, re.M).group(1), 16) == sym.value


def test_symtab_of_a_built_program(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    src = tmp_path / "p.c"
    src.write_text("int hidden_helper(int x) { return x + 1; }\nint main(void) { return hidden_helper(0); }\n")
    exe = tmp_path / "p"
    subprocess.run([cc, "-O0", "-o", str(exe), str(src)], check=True)
    with elf.ElfFile.open(str(exe)) as f:
        assert "hidden_helper" not in f.symbols(["hidden_helper"])  # not in .dynsym
        sym = f.symbols(["hidden_helper", "main"], table=elf.SYMTAB)
        assert set(sym) == {"hidden_helper", "main"}
        assert sym["main"].offset == f.file_offset(sym["main"].value) is not None
        assert "__libc_start_main" in f.symbols(None, elf.SYMTAB, defined=False)  # "...@GLIBC_2.34"
        assert "__libc_start_main" in f.symbols(["__libc_start_main"], elf.SYMTAB, defined=False)


def test_not_elf_and_versions(tmp_path):
    text = tmp_path / "x.txt"
    text.write_bytes(b"OpenSSL 3.1.4 24 Oct 2023 \0" + b"x" * 100)
    assert elf.open_or_none(str(text)) is None and not elf.is_elf(str(text))
    assert elf.openssl_version(str(text)) == "3.1.4"
    assert elf.build_id_or_digest(str(text)).startswith("sha256-")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert elf.open_or_none(str(empty)) is None and elf.openssl_version(str(empty)) is None
    with elf.ElfFile.open(_need(LIBCRYPTO)) as f:
        assert elf.build_id_or_digest(LIBCRYPTO) == f.build_id
        assert f.search(elf.OPENSSL_BANNER_RE) == elf.openssl_version(LIBCRYPTO)


def test_proc_readers_on_this_process():
    comm, ppid, start = proc.read_stat(os.getpid())
    assert ppid == os.getppid() and start > 0 and comm
    assert proc.read_exe(os.getpid()) == os.path.realpath("/proc/self/exe")
    assert proc.read_cmdline_args(os.getpid())[0]
    assert proc.read_stat(2 ** 22 + 1) is None and proc.read_exe(2 ** 22 + 1) is None
    libs = [p for p, _deleted in proc.mapped_libraries(proc.read_maps(os.getpid()))]
    assert any("/libc.so" in p or "/libc-" in p for p in libs)


def test_tcp_rows_and_addresses():
    data = (b"  sl  local_address rem_address   st\n"
            b"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 55 1\n"
            b"   1: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:D431 01 "
            b"00000000:00000000 00:00000000 00000000     0        0 777 1\n")
    rows = list(proc.tcp_rows(data))
    assert rows[0] == (b"\x7f\0\0\x01", 8080, b"\0\0\0\0", 0, proc.TCP_LISTEN, 55)
    assert rows[1][0] == b"\0" * 15 + b"\x01" and rows[1][2] == b"\0" * 10 + b"\xff\xff\x7f\0\0\x01"
    assert proc.address_text(proc.AF_INET6, rows[1][2]) == "127.0.0.1"
    assert proc.address_text(proc.AF_INET, b"\x0a\0\0\x01") == "10.0.0.1"
    assert proc.address_text(proc.AF_INET6, rows[1][0]) == "::1"
    assert proc.address_text(1, b"\0" * 16) is None
    assert proc.parse_tcp_table(data)[55]["state"] == "LISTEN"
