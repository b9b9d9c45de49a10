"""Which process owns each TCP connection, for `tls -m handshake` (packets carry no process):
tc_capture.bpf.c's connect()/accept() tracepoints, which record a socket's 4-tuple -> pid and
comm in its `flows` map when the syscall returns in the owner's context, seeded at start with
the connections open then (from /proc). Only those tracepoints are attached (no TC program
of that object): a data call costs nothing. A connection missing from the map (a socket handed
to another process is still its creator's) has no owner: null, never a guess."""

from __future__ import annotations

import socket

from crypto_tracer.probes import tc_capture

RING_SIZE = 4096  # the object's packet ring: nothing is written to it (no TC program attached)


class SocketOwners:
    def __init__(self):
        self.obj = None

    def start(self) -> None:
        from crypto_tracer.engine import BpfObject, num_possible_cpus

        self.obj = BpfObject.from_package("tc_capture")
        self.obj.map("cap_scratch").set_max_entries(num_possible_cpus())
        self.obj.map("events").set_max_entries(RING_SIZE)
        self.obj.load()
        flows = self.obj.map("flows")
        for key, owner in tc_capture.existing_flows().items():  # connections opened before the run
            flows.update(key, owner)
        self.obj.attach_tracepoint("cap_connect_enter", "syscalls", "sys_enter_connect")
        self.obj.attach_tracepoint("cap_connect_exit", "syscalls", "sys_exit_connect")
        self.obj.attach_tracepoint("cap_accept4_exit", "syscalls", "sys_exit_accept4")
        self.obj.attach_tracepoint("cap_accept_exit", "syscalls", "sys_exit_accept")

    def owner(self, local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, str] | None:
        """(pid, comm) of the socket whose local end is `local`, connected to `remote`."""
        try:
            family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
            la, ra = socket.inet_pton(family, local[0]), socket.inet_pton(family, remote[0])
        except (OSError, TypeError):
            return None
        key = tc_capture.FLOW_KEY.pack(family, local[1], remote[1], la.ljust(16, b"\0"), ra.ljust(16, b"\0"))
        value = self.obj.map("flows").lookup(key) if self.obj is not None else None
        if value is None:
            return None
        pid, _n, comm, _opt = tc_capture.FLOW_PROC.unpack_from(value)
        return pid, comm.split(b"\0", 1)[0].decode("utf-8", "replace")

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None
