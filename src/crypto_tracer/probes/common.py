"""The Python side of bpf/common.h, shared by every probe: the record header and the
process filter (the `filter` map's slot 0 and the `pid_set` map)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<QIIII16s")  # struct ct_header: ts_ns, type, pid, tid, uid, comm
FILTER = struct.Struct("<IIII16s")  # struct ct_filter: pid, uid, name_len, use_pid_set, name


@dataclass
class ProcessFilter:
    """pid None = any; uid None = any; name: a case-insensitive substring of comm;
    use_pid_set: only the tgids written to the pid_set map."""

    pid: int | None = None
    uid: int | None = None
    name: str | None = None
    use_pid_set: bool = False

    def pack(self) -> bytes:
        name = (self.name or "").lower().encode()[:15]
        return FILTER.pack(self.pid or 0, 0xFFFFFFFF if self.uid is None else self.uid, len(name),
                           int(self.use_pid_set), name)

    def write(self, obj) -> None:
        """Into a loaded BpfObject's `filter` map."""
        obj.map("filter").update(b"\0\0\0\0", self.pack())


def add_to_pid_set(obj, pids) -> None:
    m = obj.map("pid_set")
    for pid in pids:
        m.update(struct.pack("<I", pid), b"\1")
