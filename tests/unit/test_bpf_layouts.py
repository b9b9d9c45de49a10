"""Every record layout and constant user space declares (bpf/cstruct.py: CStruct, CEnum) agrees
with the BTF of the shipped objects: member offsets, sizes, signedness, struct sizes, and enum
members both ways. A C change not made on the Python side too fails here."""

from __future__ import annotations

import glob
import os
import struct

import pytest

import crypto_tracer.pipeline.tls_data  # noqa: F401 (imports every decoder the tls command uses)
import crypto_tracer.keys.tls_keys  # noqa: F401
import crypto_tracer.probes.api  # noqa: F401
import crypto_tracer.probes.common  # noqa: F401
import crypto_tracer.probes.monitor  # noqa: F401
import crypto_tracer.probes.tc_capture  # noqa: F401
import crypto_tracer.probes.tls  # noqa: F401
import crypto_tracer.probes.tls_hello  # noqa: F401
from crypto_tracer.bpf import cstruct
from crypto_tracer.bpf.objdigest import btf_types

BPF_DIR = os.path.dirname(cstruct.__file__)
OBJECTS = {os.path.basename(p).split(".")[0]: btf_types(p) for p in sorted(glob.glob(f"{BPF_DIR}/*.bpf.o"))}
SIGNED_CODES, UNSIGNED_CODES = set("bhilq"), set("BHILQ")


def _strip(types, tid):
    """Through typedefs and qualifiers."""
    while types[tid][0] in ("typedef", "const", "volatile", "restrict", "type_tag"):
        tid = types[tid][2][0][1]
    return tid


def _size(types, tid) -> int:
    tid = _strip(types, tid)
    kind, _, body = types[tid]
    if kind in ("int", "struct", "union", "enum", "enum64", "float"):
        return body[0]
    if kind == "ptr":
        return 8
    if kind == "array":
        return body[2] * _size(types, body[0][1])
    raise AssertionError(f"no size for BTF {kind}")


def _members(types, tid, prefix="", base=0, out=None) -> dict:
    """member path -> (offset, size, BTF type id), nested structs and arrays of structs included."""
    out = {} if out is None else out
    for name, (_ref, mtid), bits in types[tid][2][2:]:
        assert bits % 8 == 0, f"{prefix}{name}: bitfield"
        off, path = base + bits // 8, prefix + name
        out[path] = (off, _size(types, mtid), mtid)
        inner = _strip(types, mtid)
        if types[inner][0] in ("struct", "union"):
            _members(types, inner, path + ".", off, out)
        elif types[inner][0] == "array":
            elem = _strip(types, types[inner][2][0][1])
            if types[elem][0] in ("struct", "union"):
                esize = _size(types, elem)
                for i in range(types[inner][2][2]):
                    _members(types, elem, f"{path}[{i}].", off + i * esize, out)
    return out


def _find(kind: str, name: str) -> list[tuple[str, list, int]]:
    """(object, its types, type id) of every object whose BTF has this named type."""
    return [(obj, types, i) for obj, types in OBJECTS.items() for i, t in enumerate(types)
            if t and t[0] == kind and t[1] == name]


def check_struct(decl: cstruct.CStruct) -> list[str]:
    found = _find("struct", decl.name)
    if not found:
        return [f"struct {decl.name}: in no shipped object's BTF"]
    errors = []
    for obj, types, tid in found:
        where = f"{obj}.bpf.o struct {decl.name}"
        members = _members(types, tid)
        pos = 0
        for member, code in decl.fields:
            size = struct.calcsize("<" + code)
            if member != "_":
                if member not in members:
                    errors.append(f"{where}: no member {member}")
                else:
                    off, csize, mtid = members[member]
                    if (off, csize) != (pos, size):
                        errors.append(f"{where}.{member}: C offset {off} size {csize}, Python {pos} {size}")
                    kind, _, body = types[_strip(types, mtid)]
                    if kind == "int" and code in SIGNED_CODES | UNSIGNED_CODES:
                        signed = bool((body[1] >> 24) & 1)
                        if signed != (code in SIGNED_CODES):
                            errors.append(f"{where}.{member}: C {'signed' if signed else 'unsigned'}, "
                                          f"Python code {code}")
            pos += size
        if decl.until:
            end = members.get(decl.until, (None,))[0]
            if end != decl.size:
                errors.append(f"{where}: {decl.until} at {end}, Python layout ends at {decl.size}")
        elif types[tid][2][0] != decl.size:
            errors.append(f"{where}: C size {types[tid][2][0]}, Python {decl.size}")
    return errors


def check_enum(decl: cstruct.CEnum) -> list[str]:
    found = _find("enum", decl.name)
    if not found:
        return [f"enum {decl.name}: in no shipped object's BTF"]
    errors = []
    for obj, types, tid in found:
        c = dict(types[tid][2][2:])
        if c != decl.members:
            errors.append(f"{obj}.bpf.o enum {decl.name}: C {sorted(c.items())}, "
                          f"Python {sorted(decl.members.items())}")
    return errors


@pytest.mark.parametrize("decl", cstruct.STRUCTS, ids=lambda d: d.name)
def test_struct_matches_btf(decl):
    assert check_struct(decl) == []


@pytest.mark.parametrize("decl", cstruct.ENUMS, ids=lambda d: d.name)
def test_enum_matches_btf(decl):
    assert check_enum(decl) == []


def test_every_record_and_constant_is_declared():
    """The records the ring buffer carries and the shared enums all have a declaration."""
    structs = {d.name for d in cstruct.STRUCTS}
    assert {"ct_header", "ct_filter", "tls_data_rec", "tls_hs_rec", "tls_ctrl_rec", "tls_config",
            "ct_keys_layout", "ct_tls_keys_event", "exec_rec", "exit_rec", "file_rec", "lib_rec", "mon_config",
            "trust_prefix", "cap_rec", "cap_config", "cap_iface", "flow_key", "flow_proc", "api_key", "api_val",
            "peer_key", "ct_proc_rec", "hello_rec", "hello_flow", "hello_iface"} <= structs
    assert {"ct_event_type", "ct_counter", "tls_func", "tls_lib", "tls_cookie", "tls_counter",
            "tls_keys_const", "ct_arg_kind", "tls_bssl_cookie"} <= {d.name for d in cstruct.ENUMS}


def test_checks_catch_drift():
    """The check itself: a moved member, a wrong sign, a short struct and a changed enum value fail."""
    from crypto_tracer.probes.tls import TLS_DATA_REC

    fields = " ".join(f"{m} {c}" for m, c in TLS_DATA_REC.fields)
    try:
        moved = cstruct.CStruct("tls_data_rec", fields.replace("truncated B pad x", "pad x truncated B"),
                                until="data")
        signed = cstruct.CStruct("tls_data_rec", fields.replace("fd i", "fd I"), until="data")
        short = cstruct.CStruct("tls_config", "capture_data I")
        enum = cstruct.CEnum("ct_event_type", {**crypto_tracer.probes.common.EVENT_TYPES.members,
                                               "CT_EV_TLS_DATA": 70})
    finally:
        del cstruct.STRUCTS[-3:], cstruct.ENUMS[-1:]
    assert any("truncated: C offset 74 size 1, Python 75 1" in e for e in check_struct(moved))
    assert any("fd: C signed, Python code I" in e for e in check_struct(signed))
    assert any("C size 8, Python 4" in e for e in check_struct(short))
    assert check_enum(enum)
