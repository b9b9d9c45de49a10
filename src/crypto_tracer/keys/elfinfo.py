"""What we need to know about a library file: its ELF build-id and its OpenSSL version string."""

from __future__ import annotations

import hashlib
import mmap
import re
import struct

_VERSION_RE = re.compile(rb"OpenSSL (\d+\.\d+\.\d+[a-z]?)(?:-[\w.~+]+)? +\d{1,2} \w{3} \d{4}")


def build_id(path: str) -> str:
    """The GNU build-id as hex; for a file without one, 'sha256-' + the file's digest."""
    with open(path, "rb") as f:
        data = f.read(64)
        if data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1:  # ELF64 little-endian
            shoff, = struct.unpack_from("<Q", data, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            for i in range(shnum):
                sh_type, = struct.unpack_from("<I", table, i * shentsize + 4)
                if sh_type != 7:  # SHT_NOTE
                    continue
                offset, size = struct.unpack_from("<QQ", table, i * shentsize + 0x18)
                f.seek(offset)
                found = _gnu_build_id(f.read(size))
                if found:
                    return found
        f.seek(0)
        return "sha256-" + hashlib.file_digest(f, "sha256").hexdigest()


def _gnu_build_id(notes: bytes) -> str | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + ((namesz + 3) & ~3)
        if ntype == 3 and notes[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"GNU":
            return notes[name_end:name_end + descsz].hex()
        pos = name_end + ((descsz + 3) & ~3)
    return None


def openssl_version(path: str) -> str | None:
    """'3.0.19' from the 'OpenSSL 3.0.19 27 Jan 2026' string compiled into a file, or None.
    For a shared libssl the string lives in libcrypto; static builds (node) carry it."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            match = _VERSION_RE.search(m)
            return match.group(1).decode() if match else None
    except (OSError, ValueError):
        return None
