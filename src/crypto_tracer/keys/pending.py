"""Secrets of SSL objects whose handshake no hooked function returns from.

The key modes hook no data call (SSL_read/SSL_write cost a trap each). Keys are read in BPF at
handshake returns and at SSL_free's entry (bpf/tls_keys.h); a program whose handshake runs inside
SSL_read/SSL_write (node) would only get them at free. So SSL_new's return announces each object
(CT_EV_TLS_OBJECT), and this module reads the secrets of the announced objects from the process's
memory (process_vm_readv) with the same calibrated layout and the same reader as calibration
(keys/layout.read_material), every POLL_S, until they are complete; SSL_free (or the keys from BPF)
ends the watch. A complete read is written only once two reads POLL_S apart agree: a handshake in
progress (a TLS 1.2 resumption offer, a secret being written) never yields a line.
"""

from __future__ import annotations

import ctypes
import time
from typing import Callable

from crypto_tracer.keys import tls_keys
from crypto_tracer.keys.layout import Layout, read_material
from crypto_tracer.keys.material import KeyMaterial

POLL_S = 0.02
SLOW_AFTER_S = 10.0  # objects idle that long (no handshake yet) are read every SLOW_POLL_S
SLOW_POLL_S = 0.5


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_vm_readv = _libc.process_vm_readv
_vm_readv.restype = ctypes.c_ssize_t
_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec),
                      ctypes.c_ulong, ctypes.c_ulong]


def reader(pid: int) -> Callable[[int, int], bytes]:
    """(address, size) -> bytes of process pid, b"" when unreadable (as layout.Reader wants)."""
    buf = ctypes.create_string_buffer(128)

    def read(addr: int, size: int) -> bytes:
        if size > len(buf) or addr <= 0:
            return b""
        local, remote = _IoVec(ctypes.addressof(buf), size), _IoVec(addr, size)
        n = _vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        return buf.raw[:size] if n == size else b""

    return read


class _Watch:
    __slots__ = ("slot", "since", "next_at", "last")

    def __init__(self, slot: int, now: float):
        self.slot, self.since, self.next_at = slot, now, 0.0  # read at the next poll
        self.last: KeyMaterial | None = None


class PendingObjects:
    """Objects announced by SSL_new whose keys are not out yet; see the module docstring.

    on_material(pid, ssl, material) gets each complete, stable read (the caller dedupes by session)."""

    def __init__(self, layouts: dict[int, Layout], on_material: Callable[[int, int, KeyMaterial], None]):
        self.layouts = layouts
        self.on_material = on_material
        self.watch: dict[tuple[int, int], _Watch] = {}
        self.freed_incomplete = 0  # freed with a handshake started and its secrets not all there
        self.read_from_memory = 0  # sessions whose keys this module found first
        self._next = 0.0

    def record(self, raw: bytes) -> None:
        pid, ssl, slot, event = tls_keys.decode_object(raw)
        key = (pid, ssl)
        if event == tls_keys.CT_OBJ_NEW:
            if slot in self.layouts:
                self.watch[key] = _Watch(slot, time.monotonic())
            return
        self.watch.pop(key, None)
        if event == tls_keys.CT_OBJ_FREE_INCOMPLETE:
            self.freed_incomplete += 1

    def done(self, pid: int, ssl: int) -> None:
        """The session's keys are out (a BPF record): stop reading the object."""
        self.watch.pop((pid, ssl), None)

    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        slack = POLL_S / 2  # the loop's timer may fire a little early: do not skip a whole cycle
        if not self.watch or now < self._next - slack:
            return
        self._next = now + POLL_S
        readers: dict[int, Callable[[int, int], bytes]] = {}
        for key, w in list(self.watch.items()):
            if now < w.next_at - slack:
                continue
            pid, ssl = key
            read = readers.get(pid)
            if read is None:
                read = readers[pid] = reader(pid)
            lay = self.layouts[w.slot]
            mat = read_material(read, ssl, lay)
            w.next_at = now + (SLOW_POLL_S if now - w.since > SLOW_AFTER_S else POLL_S)
            if not (mat.complete() and mat.cipher_id):
                w.last = None
                if not any(mat.client_random) and not read(ssl, 8):
                    del self.watch[key]  # the process is gone: BPF's exit sweep read what there was
                continue
            if w.last != mat:
                w.last = mat  # complete: written once the next read agrees
                w.next_at = now + POLL_S
                continue
            del self.watch[key]
            self.read_from_memory += 1
            self.on_material(pid, ssl, mat)
