"""C structs and enums of the BPF objects as user space reads and writes them.

Each struct is declared once in Python, next to the code that decodes it (probes/common.py
for bpf/common.h, probes/tls.py for bpf/tls.bpf.c, ...), with its C member names and struct
codes; offsets, sizes and struct.Struct formats are derived from that, once, at import, so the
hot paths keep plain slices and unpack_from. tests/unit/test_bpf_layouts.py checks every
declaration (and every registered enum) against the BTF of the shipped objects, so a C change
that is not made here too fails the unit tests instead of misreading records.
"""

from __future__ import annotations

import struct

STRUCTS: list["CStruct"] = []  # every declaration, for the BTF check
ENUMS: list["CEnum"] = []


class CStruct:
    """struct `name` of the BPF objects, member by member in order.

    ``parts`` are strings of "member code" pairs (struct module codes: Q, i, 16s, ...; a code of
    pad bytes, "4x", marks a member user space does not read, or, named "_", padding that C
    leaves implicit) and (prefix, CStruct) pairs for nested struct members. ``until`` names the
    flexible tail member (``data[]``) that starts where this layout ends.
    """

    def __init__(self, name: str, *parts, until: str | None = None):
        self.name, self.until = name, until
        self.fields: list[tuple[str, str]] = []  # (member path, code)
        for part in parts:
            if isinstance(part, tuple):
                prefix, inner = part
                self.fields += [(f"{prefix}.{m}", c) for m, c in inner.fields]
            else:
                words = part.split()
                if len(words) % 2:
                    raise ValueError(f"struct {name}: odd member list {part!r}")
                self.fields += list(zip(words[::2], words[1::2]))
        self.format = "<" + "".join(c for _, c in self.fields)
        self.struct = struct.Struct(self.format)
        self.size = self.struct.size
        self.offsets: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        pos = 0
        for member, code in self.fields:
            size = struct.calcsize("<" + code)
            if member != "_":
                self.offsets[member], self.sizes[member] = pos, size
            pos += size
        # the members struct.unpack returns, in order
        self.names = tuple(m for m, c in self.fields if not c.endswith("x"))
        STRUCTS.append(self)

    def offset(self, member: str) -> int:
        return self.offsets[member]

    def end(self, member: str) -> int:
        return self.offsets[member] + self.sizes[member]

    def span(self, first: str, last: str) -> tuple[int, int]:
        """Bytes from the start of `first` to the end of `last`."""
        return self.offsets[first], self.end(last)

    def after(self, prefix: str) -> struct.Struct:
        """The members after the nested struct `prefix` (the record's body after its header)."""
        rest = [c for m, c in self.fields if not m.startswith(prefix + ".")]
        if [c for m, c in self.fields[:len(self.fields) - len(rest)] if not m.startswith(prefix + ".")]:
            raise ValueError(f"struct {self.name}: {prefix} is not the first member")
        return struct.Struct("<" + "".join(rest))

    def tail(self, first: str) -> struct.Struct:
        """The members from `first` on (what follows a record's fixed head)."""
        names = [m for m, _ in self.fields]
        return struct.Struct("<" + "".join(c for _, c in self.fields[names.index(first):]))

    def unpacker(self, *members: str) -> struct.Struct:
        """A struct that unpacks only these members (in ascending order), from the record start."""
        fmt, pos = "<", 0
        for member in members:
            off = self.offsets[member]
            if off < pos:
                raise ValueError(f"struct {self.name}: {member} is not after the previous member")
            fmt += (f"{off - pos}x" if off > pos else "") + dict(self.fields)[member]
            pos = off + self.sizes[member]
        return struct.Struct(fmt)


class CEnum:
    """enum `name` of the BPF objects: every member with its value (checked both ways)."""

    def __init__(self, name: str, members: dict[str, int]):
        self.name, self.members = name, dict(members)
        ENUMS.append(self)

    @classmethod
    def from_module(cls, name: str, namespace: dict, prefix: str) -> "CEnum":
        """The module constants named prefix* (as the C enum names them)."""
        return cls(name, {k: v for k, v in namespace.items() if k.startswith(prefix) and isinstance(v, int)})
