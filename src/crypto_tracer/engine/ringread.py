"""A BPF ring buffer read straight from its mmap'ed pages, records returned as a list of bytes.

libbpf's ring_buffer__consume calls back into Python through ctypes for every record (plus
a ctypes string_at to copy it): about 0.9 us per record here, a sizeable part of what
`tls` costs at ~50,000 records/s. Reading the ring's pages directly costs a fraction of it.

The layout is the kernel's (kernel/bpf/ringbuf.c), as libbpf reads it: page 0 holds the
consumer position (we write it), page 1 the producer position, then the data area (which
the kernel offers twice in a row so that a wrapping record is contiguous; we map it once). Each record starts with
an 8-byte header: u32 length with BUSY (not committed yet) and DISCARD bits, u32 page
offset; records are 8-byte aligned. libbpf uses acquire loads and a release store for the
positions and the header; on x86-64 ordinary aligned loads and stores have those semantics
(TSO), so this reader is used there only (``supported``), and libbpf's elsewhere. The
positions and headers are read and the consumer position written as single aligned
native words (memoryview casts), never byte by byte.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select

BUSY_BIT, DISCARD_BIT = 1 << 31, 1 << 30
HEADER_SIZE = 8


class DirectRing:
    supported = os.uname().machine == "x86_64"

    def __init__(self, map_fd: int, size: int):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # The kernel maps the data area twice in a row so that a wrapping record is contiguous; we map
        # it once (half the resident pages: a 64 MiB ring is 64 MiB of RSS, not 128) and join the
        # two parts of the rare record that wraps.
        self._data_map = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = memoryview(self._cons_map).cast("Q")  # [0]: consumer position
        self._prod = memoryview(self._data_map).cast("Q")  # [0]: producer position
        self._words = memoryview(self._data_map).cast("I")  # record headers, by byte offset // 4
        self._page, self._mask = page, size - 1
        self._native: _PyBuffer | None = None  # see native()
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    @property
    def epoll_fd(self) -> int:
        return self._epoll.fileno()

    def wait(self, timeout_ms: int) -> None:
        """Until the kernel signals data (the programs rarely wake us) or timeout_ms."""
        try:
            self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        except InterruptedError:
            pass

    def read(self, limit: int, max_bytes: int = 1 << 62) -> list[bytes]:
        """Up to limit committed records (and about max_bytes: bulk records are 30 KB each), in
        order; their space is returned to the kernel."""
        data, words, page, mask = self._data_map, self._words, self._page, self._mask
        limit_end = page + mask + 1  # the end of the data area
        cons = self._cons[0]
        prod = self._prod[0]
        out: list[bytes] = []
        append = out.append
        stop = cons + max_bytes
        while cons < prod and len(out) < limit and cons < stop:
            pos = page + (cons & mask)
            header = words[pos >> 2]
            if header & BUSY_BIT:  # reserved, not committed yet: stop here, in order
                break
            size = header & ~(BUSY_BIT | DISCARD_BIT)
            if not header & DISCARD_BIT:
                start, end = pos + HEADER_SIZE, pos + HEADER_SIZE + size
                if end <= limit_end:
                    append(data[start:end])
                else:  # wraps around the end of the data area (headers are 8-aligned: never split)
                    append(data[start:limit_end] + data[page:page + end - limit_end])
            cons += (size + HEADER_SIZE + 7) & ~7
            if cons >= prod:
                prod = self._prod[0]
        self._cons[0] = cons  # one aligned 8-byte store
        return out

    def native(self) -> tuple[int, int, int]:
        """(address of the data area, address of the producer position, size - 1), for a reader in
        C (pipeline/fastfmt.c) that reads records where they are and hands back the consumer
        position it reached (the consumer property). The mapping is read-only, so its address
        comes from the buffer protocol (ctypes' from_buffer wants a writable one)."""
        if self._native is None:
            view = _PyBuffer()
            if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(self._data_map), ctypes.byref(view), 0):
                raise OSError("the ring's pages give no buffer")
            self._native = view
        return self._native.buf + self._page, self._native.buf, self._mask

    @property
    def consumer(self) -> int:
        return self._cons[0]

    @consumer.setter
    def consumer(self, position: int) -> None:
        self._cons[0] = position  # one aligned 8-byte store: the records' space back to the kernel

    def close(self) -> None:
        if self._epoll is None:
            return
        self._epoll.close()
        self._epoll = None
        if self._native is not None:
            ctypes.pythonapi.PyBuffer_Release(ctypes.byref(self._native))
            self._native = None
        for view in (self._cons, self._prod, self._words):
            view.release()
        self._cons_map.close()
        self._data_map.close()


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (obj as a plain pointer: PyBuffer_Release drops its reference)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


class RingLevel:
    """How full a BPF ring buffer is, from its consumer and producer pages (read-only maps of
    their own, beside whichever reader consumes it): for metrics, read at any time."""

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self.size = size
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self._prod_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = memoryview(self._cons_map).cast("Q")
        self._prod = memoryview(self._prod_map).cast("Q")

    def fill(self) -> float:
        """Bytes waiting to be read / ring size, 0..1."""
        if self._cons is None:
            return 0.0
        used = self._prod[0] - self._cons[0]
        return min(max(used / self.size, 0.0), 1.0)

    def close(self) -> None:
        if self._cons is None:
            return
        self._cons.release()
        self._prod.release()
        self._cons, self._prod = None, None
        self._cons_map.close()
        self._prod_map.close()
