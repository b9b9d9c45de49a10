"""A digest of what a BPF object file means to the loader, not of its exact bytes.

Two clang runs on the same sources can number the same BTF types differently (the order
depends on the compiler's heap layout, so on the checkout path) and write source file
names and lines into .BTF.ext. The digest therefore covers: every allocated section
(program instructions, .maps, license, .rodata/.data/.bss) with its relocations, the
symbols, every BTF type with type ids replaced by what they refer to, and the BTF.ext
function info and CO-RE relocations. It leaves out DWARF, line info, string offsets and the
order of types and strings. Pure Python (ELF64 little-endian, as clang -target bpf writes).
"""

from __future__ import annotations

import hashlib
import json
import struct

SHF_ALLOC, SHT_SYMTAB, SHT_NOBITS, SHT_REL, STT_SECTION, STT_FILE = 0x2, 2, 8, 9, 3, 4
KINDS = [None, "int", "ptr", "array", "struct", "union", "enum", "fwd", "typedef", "volatile", "const",
         "restrict", "func", "func_proto", "var", "datasec", "float", "decl_tag", "type_tag", "enum64"]
REF = "@"  # marks a BTF type id inside a parsed type, resolved when rendering


def _cstr(table: bytes, off: int) -> str:
    return table[off:table.index(b"\0", off)].decode()


def _sections(data: bytes) -> list[dict]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, flags, _a, off, size, link, info, _al, _es = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize)
        body = b"" if typ == SHT_NOBITS else data[off:off + size]
        secs.append(dict(name_off=name, type=typ, flags=flags, size=size, link=link, info=info, data=body))
    for s in secs:
        s["name"] = _cstr(secs[shstrndx]["data"], s["name_off"])
    return secs


def _btf(btf: bytes) -> tuple[list, callable]:
    """Parse .BTF into [None, (kind, name, body), ...] and a string lookup."""
    _magic, _ver, _fl, hdr, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", btf, 0)
    strs = btf[hdr + str_off:hdr + str_off + str_len]
    name = lambda off: _cstr(strs, off)  # noqa: E731
    types, pos, end = [None], hdr + type_off, hdr + type_off + type_len

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, btf, pos)
        pos += struct.calcsize(fmt)
        return vals

    while pos < end:
        name_off, info, st = take("<III")
        kind, vlen, kflag = KINDS[(info >> 24) & 0x1F], info & 0xFFFF, info >> 31
        if kind == "int":
            body = [st, take("<I")[0]]
        elif kind in ("ptr", "typedef", "volatile", "const", "restrict", "type_tag"):
            body = [[REF, st]]
        elif kind == "array":
            elem, index, n = take("<III")
            body = [[REF, elem], [REF, index], n]
        elif kind in ("struct", "union"):
            body = [st, kflag] + [[name(m), [REF, t], o] for m, t, o in (take("<III") for _ in range(vlen))]
        elif kind == "enum":
            body = [st, kflag] + [[name(n), v] for n, v in (take("<Ii") for _ in range(vlen))]
        elif kind == "enum64":
            body = [st, kflag] + [[name(n), lo | hi << 32] for n, lo, hi in (take("<III") for _ in range(vlen))]
        elif kind == "fwd":
            body = [kflag]
        elif kind == "func":
            body = [vlen, [REF, st]]
        elif kind == "func_proto":
            body = [[REF, st]] + [[name(n), [REF, t]] for n, t in (take("<II") for _ in range(vlen))]
        elif kind == "var":
            body = [take("<I")[0], [REF, st]]
        elif kind == "datasec":
            body = [st] + [[[REF, t], o, s] for t, o, s in (take("<III") for _ in range(vlen))]
        elif kind == "float":
            body = [st]
        elif kind == "decl_tag":
            body = [take("<i")[0], [REF, st]]
        else:
            raise ValueError(f"unknown BTF kind {(info >> 24) & 0x1F}")
        types.append((kind, name(name_off), body))
    return types, name


def _renderer(types: list):
    """Render a type id as what it denotes: a named type by kind and name, an anonymous one in full."""
    def full(tid: int, depth: int = 0):
        kind, nm, body = types[tid]
        return [kind, nm, resolve(body, depth)]

    def ref(tid: int, depth: int):
        if tid == 0:
            return "void"
        kind, nm, _ = types[tid]
        if nm:
            return f"{kind} {nm}"
        if depth > 64:
            raise ValueError("BTF nests anonymous types too deeply")
        return full(tid, depth + 1)

    def resolve(x, depth):
        if isinstance(x, list):
            if len(x) == 2 and x[0] == REF:
                return ref(x[1], depth)
            return [resolve(y, depth) for y in x]
        return x

    return full, lambda tid: ref(tid, 0)


def _btf_ext(ext: bytes, name, ref) -> dict:
    """Function info and CO-RE relocations per program section (line info is left out)."""
    hdr = struct.unpack_from("<I", ext, 4)[0]
    fi_off, fi_len = struct.unpack_from("<II", ext, 8)
    core_off, core_len = struct.unpack_from("<II", ext, 24) if hdr >= 32 else (0, 0)
    out = {"func_info": [], "core_relo": []}
    for key, off, length in (("func_info", fi_off, fi_len), ("core_relo", core_off, core_len)):
        if not length:
            continue
        pos, end = hdr + off + 4, hdr + off + length
        (rec,) = struct.unpack_from("<I", ext, hdr + off)
        while pos < end:
            sec, n = struct.unpack_from("<II", ext, pos)
            pos += 8
            for _ in range(n):
                r = struct.unpack_from("<IIII" if key == "core_relo" else "<II", ext, pos)
                pos += rec
                item = [name(sec), r[0], ref(r[1])]
                out[key].append(item + ([name(r[2]), r[3]] if key == "core_relo" else []))
    return out


def btf_types(path: str) -> list:
    """The object's BTF: [None, (kind, name, body), ...], type ids inside bodies as [REF, id]
    (bpf/cstruct.py's declarations are checked against it)."""
    with open(path, "rb") as f:
        secs = _sections(f.read())
    return _btf(next(s for s in secs if s["name"] == ".BTF")["data"])[0]


def describe(path: str) -> dict:
    """The canonical content of a BPF object, as plain data."""
    with open(path, "rb") as f:
        secs = _sections(f.read())
    by_name = {s["name"]: s for s in secs}
    symtab = next(s for s in secs if s["type"] == SHT_SYMTAB)
    syms = []
    for i in range(0, len(symtab["data"]), 24):
        nm, info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", symtab["data"], i)
        sec = secs[shndx]["name"] if shndx < len(secs) else str(shndx)
        loaded = shndx == 0 or (shndx < len(secs) and secs[shndx]["flags"] & SHF_ALLOC)
        syms.append([sec if info & 0xF == STT_SECTION else _cstr(secs[symtab["link"]]["data"], nm), sec, value, size,
                     info, loaded])
    doc = {
        "sections": {s["name"]: [s["flags"], s["size"], hashlib.sha256(s["data"]).hexdigest()]
                     for s in secs if s["flags"] & SHF_ALLOC},
        "relocations": sorted([secs[s["info"]]["name"], off, syms[r >> 32][0], r & 0xFFFFFFFF]
                              for s in secs if s["type"] == SHT_REL and secs[s["info"]]["flags"] & SHF_ALLOC
                              for off, r in struct.iter_unpack("<QQ", s["data"])),
        # only symbols of loaded sections (and undefined ones): DWARF's go with llvm-strip, and the
        # file symbol carries the source name as given on the command line
        "symbols": sorted(s[:5] for s in syms[1:] if s[5] and s[4] & 0xF != STT_FILE),
    }
    if ".BTF" in by_name:
        types, name = _btf(by_name[".BTF"]["data"])
        full, ref = _renderer(types)
        doc["btf"] = sorted(json.dumps(full(i)) for i in range(1, len(types)))
        if ".BTF.ext" in by_name:
            ext = _btf_ext(by_name[".BTF.ext"]["data"], name, ref)
            doc.update({k: sorted(v, key=json.dumps) for k, v in ext.items()})
    return doc


def digest(path: str) -> str:
    return hashlib.sha256(json.dumps(describe(path), sort_keys=True).encode()).hexdigest()
