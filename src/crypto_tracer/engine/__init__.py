"""The eBPF engine: load CO-RE objects, attach probes, read maps and ring buffers.

A thin, typed layer over libbpf (see ``libbpf.py``). Everything here raises
``TracerError`` with the documented exit status on failure (5 for load/attach).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
from importlib import resources
from typing import Callable, Iterator

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log

_libbpf = None  # imported lazily: loading libbpf.so costs a few ms
_recent_libbpf_lines: collections.deque[str] = collections.deque(maxlen=40)
_print_cb_ref = None


def lb():
    global _libbpf
    if _libbpf is None:
        from crypto_tracer.engine import libbpf as module

        _libbpf = module
        _route_libbpf_log(module)
    return _libbpf


def _route_libbpf_log(module) -> None:
    """libbpf's messages go to our logger at DEBUG; the last ones are kept for error messages."""
    global _print_cb_ref
    buf = ctypes.create_string_buffer(256 * 1024)  # verifier logs are long

    def _print(level: int, fmt: bytes, va_list: int) -> int:
        n = module.vsnprintf(buf, len(buf), fmt, va_list)
        line = buf.value.decode(errors="replace").rstrip("\n")
        _recent_libbpf_lines.append(line)
        log.debug("%s", line)
        return n

    _print_cb_ref = module.PRINT_CB(_print)
    module.libbpf_set_print(_print_cb_ref)


def libbpf_tail(n: int = 8) -> str:
    return "\n".join(list(_recent_libbpf_lines)[-n:])


def bpf_object_path(name: str) -> str:
    """Path of a compiled object shipped in the package (crypto_tracer/bpf/NAME.bpf.o)."""
    path = resources.files("crypto_tracer") / "bpf" / f"{name}.bpf.o"
    if not path.is_file():
        raise TracerError(f"BPF object {name}.bpf.o is missing from the package", ExitStatus.BPF_FAILURE,
                          "rebuild it with 'python -m crypto_tracer.bpf.build' or reinstall crypto-tracer")
    return str(path)


def num_possible_cpus() -> int:
    return lb().libbpf_num_possible_cpus()


def _err(ret: int | None) -> int:
    """errno of a failed libbpf call (negative int return, or NULL + errno)."""
    if ret is not None and ret < 0:
        return -ret
    return ctypes.get_errno() or errno.EINVAL


class Map:
    def __init__(self, obj: "BpfObject", ptr: int, name: str):
        self._obj, self._ptr, self.name = obj, ptr, name

    @property
    def fd(self) -> int:
        return lb().bpf_map__fd(self._ptr)

    @property
    def key_size(self) -> int:
        return lb().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lb().bpf_map__value_size(self._ptr)

    def set_max_entries(self, n: int) -> None:
        ret = lb().bpf_map__set_max_entries(self._ptr, n)
        if ret:
            raise TracerError(f"cannot size map {self.name} to {n}: {os.strerror(_err(ret))}", ExitStatus.BPF_FAILURE)

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        size = value_size if value_size is not None else self.value_size
        out = ctypes.create_string_buffer(size)
        if lb().bpf_map_lookup_elem(self.fd, key, out) != 0:
            return None
        return out.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """Per-CPU map value, one slice per possible CPU (each padded to 8 bytes)."""
        stride = (self.value_size + 7) & ~7
        ncpu = num_possible_cpus()
        raw = self.lookup(key, stride * ncpu)
        if raw is None:
            return []
        return [raw[i * stride:i * stride + self.value_size] for i in range(ncpu)]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        ret = lb().bpf_map_update_elem(self.fd, key, value, flags)
        if ret:
            raise TracerError(f"cannot update map {self.name}: {os.strerror(_err(ret))}", ExitStatus.BPF_FAILURE)

    def delete(self, key: bytes) -> bool:
        return lb().bpf_map_delete_elem(self.fd, key) == 0

    def keys(self) -> Iterator[bytes]:
        size = self.key_size
        cur, nxt = None, ctypes.create_string_buffer(size)
        while lb().bpf_map_get_next_key(self.fd, cur, nxt) == 0:
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, size)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value


class Program:
    def __init__(self, obj: "BpfObject", ptr: int, name: str):
        self._obj, self._ptr, self.name = obj, ptr, name

    @property
    def fd(self) -> int:
        return lb().bpf_program__fd(self._ptr)

    @property
    def section(self) -> str:
        return lb().bpf_program__section_name(self._ptr).decode()

    def set_autoload(self, on: bool) -> None:
        lb().bpf_program__set_autoload(self._ptr, on)

    @property
    def autoload(self) -> bool:
        return bool(lb().bpf_program__autoload(self._ptr))


class Link:
    """An attachment; destroy() detaches it. Safe to call twice."""

    def __init__(self, ptr: int, what: str):
        self._ptr, self.what = ptr, what

    def destroy(self) -> None:
        if self._ptr:
            lb().bpf_link__destroy(self._ptr)
            self._ptr = None


# Slots of every object's per-CPU `counters` map (bpf/common.h, enum ct_counter).
COUNTER_NAMES = ("seen", "kernel_filtered", "dropped", "submitted")


class BpfObject:
    """One CO-RE object: open, tune maps, load, attach; close() detaches everything."""

    def __init__(self, path: str):
        self.path = path
        ptr = lb().bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise TracerError(f"cannot open BPF object {path}: {os.strerror(_err(None))}", ExitStatus.BPF_FAILURE)
        self._ptr = ptr
        self.links: list[Link] = []
        self._loaded = False

    @classmethod
    def from_package(cls, name: str) -> "BpfObject":
        return cls(bpf_object_path(name))

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, name: str) -> Map:
        ptr = lb().bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise KeyError(f"no map {name} in {self.path}")
        return Map(self, ptr, name)

    def program(self, name: str) -> Program:
        ptr = lb().bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise KeyError(f"no program {name} in {self.path}")
        return Program(self, ptr, name)

    def programs(self) -> list[Program]:
        out, ptr = [], None
        while True:
            ptr = lb().bpf_object__next_program(self._ptr, ptr)
            if not ptr:
                return out
            out.append(Program(self, ptr, lb().bpf_program__name(ptr).decode()))

    def counter_totals(self, slots: int = len(COUNTER_NAMES)) -> list[int]:
        """The `counters` map summed over CPUs, slot by slot."""
        m = self.map("counters")
        return [sum(int.from_bytes(v, "little") for v in m.lookup_percpu(i.to_bytes(4, "little")))
                for i in range(slots)]

    def counters(self) -> dict[str, int]:
        """The accounting counters every object keeps: seen, kernel_filtered, dropped, submitted."""
        return dict(zip(COUNTER_NAMES, self.counter_totals()))

    def load(self) -> None:
        ret = lb().bpf_object__load(self._ptr)
        if ret:
            code = _err(ret)
            status = ExitStatus.NO_PRIVILEGES if code == errno.EPERM and os.geteuid() != 0 else ExitStatus.BPF_FAILURE
            raise TracerError(f"loading BPF object {os.path.basename(self.path)} failed: {os.strerror(code)}",
                              status, "run with --verbose to see libbpf's log" if not log.isEnabledFor(10)
                              else libbpf_tail())
        self._loaded = True
        # libbpf parsed the kernel's BTF (several MB) for CO-RE and freed it: give it back to the OS.
        if lb().malloc_trim is not None:
            lb().malloc_trim(0)

    def _attached(self, ptr: int | None, what: str) -> Link:
        if not ptr:
            code = _err(None)
            raise TracerError(f"attaching {what} failed: {os.strerror(code)}", ExitStatus.BPF_FAILURE,
                              libbpf_tail(3) or None)
        link = Link(ptr, what)
        self.links.append(link)
        return link

    def attach(self, prog: str) -> Link:
        """Attach by the program's SEC() name (tracepoints, raw tracepoints)."""
        p = self.program(prog)
        return self._attached(lb().bpf_program__attach(p._ptr), f"{prog} ({p.section})")

    def attach_tracepoint(self, prog: str, category: str, name: str) -> Link:
        p = self.program(prog)
        return self._attached(lb().bpf_program__attach_tracepoint(p._ptr, category.encode(), name.encode()),
                              f"tracepoint {category}:{name}")

    def attach_uprobe(self, prog: str, binary: str, func_name: str | None = None, offset: int = 0,
                      pid: int = -1, retprobe: bool = False, cookie: int = 0) -> Link:
        """Attach a uprobe (or uretprobe) to a function of a file, for one pid or all (-1)."""
        m = lb()
        p = self.program(prog)
        opts = m.bpf_uprobe_opts(sz=ctypes.sizeof(m.bpf_uprobe_opts), retprobe=retprobe, bpf_cookie=cookie,
                                 func_name=func_name.encode() if func_name else None)
        ptr = m.bpf_program__attach_uprobe_opts(p._ptr, pid, binary.encode(), offset, ctypes.byref(opts))
        kind = "uretprobe" if retprobe else "uprobe"
        return self._attached(ptr, f"{kind} {binary}:{func_name or hex(offset)}")

    def detach(self) -> None:
        """Detach every link, in reverse order; maps stay readable until close()."""
        for link in reversed(self.links):
            link.destroy()
        self.links.clear()

    def close(self) -> None:
        """Detach everything and free the object."""
        self.detach()
        if self._ptr:
            lb().bpf_object__close(self._ptr)
            self._ptr = None


class RingBuffer:
    """Consumer of one or more BPF ring buffers.

    Each record is handed to its handler as ``bytes``. libbpf <= 1.4 keeps looping inside
    poll()/consume() while producers refill the ring, so the trampoline stops a batch after
    ``batch`` records by returning a negative value (the record is still consumed).
    """

    def __init__(self, batch: int = 2048):
        self._ptr = None
        self._callbacks = []  # keep ctypes trampolines alive
        self._batch = batch
        self._count = 0

    def add(self, bpf_map: Map, handler: Callable[[bytes], None]) -> None:
        m = lb()
        string_at = ctypes.string_at
        batch = self._batch

        def _trampoline(_ctx, data, size):
            handler(string_at(data, size))
            self._count += 1
            return -1 if self._count >= batch else 0

        cb = m.RINGBUF_CB(_trampoline)
        self._callbacks.append(cb)
        if self._ptr is None:
            self._ptr = m.ring_buffer__new(bpf_map.fd, cb, None, None)
            if not self._ptr:
                raise TracerError(f"cannot create ring buffer reader: {os.strerror(_err(None))}",
                                  ExitStatus.BPF_FAILURE)
        else:
            ret = m.ring_buffer__add(self._ptr, bpf_map.fd, cb, None)
            if ret:
                raise TracerError(f"cannot add ring buffer: {os.strerror(_err(ret))}", ExitStatus.BPF_FAILURE)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and handle at most one batch; returns how many."""
        self._count = 0
        ret = lb().ring_buffer__poll(self._ptr, timeout_ms)
        if ret < 0 and self._count < self._batch and -ret != errno.EINTR:
            raise TracerError(f"ring buffer poll failed: {os.strerror(-ret)}", ExitStatus.ERROR)
        return self._count

    def drain(self) -> int:
        """Handle everything currently in the rings (used at shutdown)."""
        total = 0
        while True:
            self._count = 0
            lb().ring_buffer__consume(self._ptr)
            total += self._count
            if self._count < self._batch:
                return total

    @property
    def epoll_fd(self) -> int:
        return lb().ring_buffer__epoll_fd(self._ptr)

    def close(self) -> None:
        if self._ptr:
            lb().ring_buffer__free(self._ptr)
            self._ptr = None


class TcHook:
    """A clsact qdisc on one interface with our classifiers; destroy() removes all of it."""

    def __init__(self, ifindex: int):
        m = lb()
        self.ifindex = ifindex
        self._hook = m.bpf_tc_hook(sz=ctypes.sizeof(m.bpf_tc_hook), ifindex=ifindex,
                                   attach_point=m.BPF_TC_INGRESS | m.BPF_TC_EGRESS)
        ret = m.bpf_tc_hook_create(ctypes.byref(self._hook))
        if ret and ret != -errno.EEXIST:
            raise TracerError(f"cannot create clsact qdisc on ifindex {ifindex}: {os.strerror(-ret)}",
                              ExitStatus.BPF_FAILURE)

    def attach(self, program: Program, ingress: bool, handle: int = 1, priority: int = 1) -> None:
        m = lb()
        hook = m.bpf_tc_hook(sz=ctypes.sizeof(m.bpf_tc_hook), ifindex=self.ifindex,
                             attach_point=m.BPF_TC_INGRESS if ingress else m.BPF_TC_EGRESS)
        opts = m.bpf_tc_opts(sz=ctypes.sizeof(m.bpf_tc_opts), prog_fd=program.fd, handle=handle,
                             priority=priority)
        ret = m.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
        if ret:
            raise TracerError(f"attaching TC program {program.name} failed: {os.strerror(-ret)}",
                              ExitStatus.BPF_FAILURE)

    def destroy(self) -> None:
        """Remove the qdisc with its filters (INGRESS|EGRESS, or the qdisc would stay)."""
        if self._hook is not None:
            lb().bpf_tc_hook_destroy(ctypes.byref(self._hook))
            self._hook = None
