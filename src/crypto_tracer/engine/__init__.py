"""The eBPF engine: load CO-RE objects, attach probes, read maps and ring buffers.

A thin, typed layer over libbpf (see ``libbpf.py``): ``BpfObject`` (programs, maps, the
`counters` map), ``Link`` (tracepoints, uprobes, uprobe_multi links), ``TcHook`` (clsact
qdisc and classifiers), ``RingBuffer`` (libbpf's callback reader) and ``ring_reader`` (records
in lists: ``ringread.DirectRing`` on x86-64). Start-up checks live in ``preflight.py``.
Everything here raises ``TracerError`` with the documented exit status on failure (5 for
load/attach); attach failures are ``AttachError``, which carries the errno.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import struct
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


class AttachError(TracerError):
    """An attachment the kernel refused; ``errno`` says why (callers may fall back or rephrase)."""

    def __init__(self, message: str, code: int, hint: str | None = None):
        super().__init__(message, ExitStatus.BPF_FAILURE, hint)
        self.errno = code
        self.strerror = os.strerror(code)


# errno of a uprobe_multi link on a kernel without them (before 6.6): EINVAL, EOPNOTSUPP, ENOTSUPP, ENOSYS
UPROBE_MULTI_UNSUPPORTED = frozenset((errno.EINVAL, errno.EOPNOTSUPP, 524, errno.ENOSYS))


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

    @property
    def max_entries(self) -> int:
        return lb().bpf_map__max_entries(self._ptr)

    def set_max_entries(self, n: int) -> None:
        ret = lb().bpf_map__set_max_entries(self._ptr, n)
        if ret:
            raise TracerError(f"cannot size map {self.name} to {n}: {os.strerror(_err(ret))}", ExitStatus.BPF_FAILURE)

    def reuse_fd(self, fd: int) -> None:
        """Before load: use another loaded object's map (e.g. its ring buffer) instead of a new one."""
        ret = lb().bpf_map__reuse_fd(self._ptr, fd)
        if ret:
            raise TracerError(f"cannot share map {self.name}: {os.strerror(_err(ret))}", ExitStatus.BPF_FAILURE)

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

    def expect_uprobe_multi(self) -> None:
        """Before load: make the program attachable with attach_uprobe_multi (Linux 6.6+);
        such a program cannot be attached as a classic uprobe."""
        lb().bpf_program__set_expected_attach_type(self._ptr, lb().BPF_TRACE_UPROBE_MULTI)


class Link:
    """An attachment (a libbpf link, or the fd of a link made with the bpf syscall);
    destroy() detaches it. Safe to call twice."""

    def __init__(self, what: str, ptr: int | None = None, fd: int = -1):
        self.what, self._ptr, self._fd = what, ptr, fd

    def destroy(self) -> None:
        if self._ptr:
            lb().bpf_link__destroy(self._ptr)
            self._ptr = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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

    def counters(self, names: tuple[str, ...] = COUNTER_NAMES) -> dict[str, int]:
        """The accounting counters every object keeps (seen, kernel_filtered, dropped, submitted),
        and the object's own slots after them when names lists them."""
        return dict(zip(names, self.counter_totals(len(names))))

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
            raise AttachError(f"attaching {what} failed: {os.strerror(code)}", code, libbpf_tail(3) or None)
        link = Link(what, ptr=ptr)
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

    def attach_uprobe_multi(self, prog: str, binary: str, offsets: list[int], cookies: list[int],
                            retprobe: bool = False, pid: int = 0, what: str | None = None) -> Link:
        """One uprobe_multi link (Linux 6.6+) for every file offset of binary, each with its cookie,
        for one pid or all (0). The program must have been marked with expect_uprobe_multi().
        Detaching it costs one RCU grace period instead of one per probe (~0.1 s each here).
        Made with the bpf syscall: libbpf 1.1 has no API for it."""
        m = lb()
        n = len(offsets)
        path = ctypes.create_string_buffer(binary.encode())
        offs = (ctypes.c_uint64 * n)(*offsets)
        cks = (ctypes.c_uint64 * n)(*cookies)
        # union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags, then .uprobe_multi:
        # path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid (ends at byte 60)
        attr = ctypes.create_string_buffer(64)
        struct.pack_into("<IIII", attr, 0, self.program(prog).fd, 0, m.BPF_TRACE_UPROBE_MULTI, 0)
        struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(path), ctypes.addressof(offs), 0,
                         ctypes.addressof(cks), n, m.BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, max(pid, 0))
        fd = m.syscall(m.SYS_BPF, m.BPF_LINK_CREATE, attr, ctypes.sizeof(attr))
        what = what or f"{prog} {binary} ({n} uprobe_multi offsets)"
        if fd < 0:
            code = ctypes.get_errno() or errno.EINVAL
            raise AttachError(f"attaching {what} failed: {os.strerror(code)}", code)
        link = Link(what, fd=int(fd))
        self.links.append(link)
        return link

    def detach(self, parallel: bool = False) -> None:
        """Detach every link, in reverse order; maps stay readable until close().

        Each uprobe detach waits for an RCU-tasks grace period (~0.2 s on these VMs):
        parallel=True runs them in threads (close() and ctypes calls release the GIL)."""
        links = list(reversed(self.links))
        self.links.clear()
        if parallel and len(links) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(16, len(links))) as pool:
                list(pool.map(Link.destroy, links))
            return
        for link in links:
            link.destroy()

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

    @property
    def batch(self) -> int:
        return self._batch

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and handle at most one batch; returns how many."""
        self._count = 0
        ret = lb().ring_buffer__poll(self._ptr, timeout_ms)
        if ret < 0 and self._count < self._batch and -ret != errno.EINTR:
            raise TracerError(f"ring buffer poll failed: {os.strerror(-ret)}", ExitStatus.ERROR)
        return self._count

    def consume(self) -> int:
        """Handle at most one batch of what is in the rings now, without waiting; returns how many."""
        self._count = 0
        lb().ring_buffer__consume(self._ptr)
        return self._count

    def drain(self) -> int:
        """Handle everything currently in the rings (used at shutdown)."""
        total = 0
        while True:
            got = self.consume()
            total += got
            if got < self._batch:
                return total

    @property
    def epoll_fd(self) -> int:
        return lb().ring_buffer__epoll_fd(self._ptr)

    def close(self) -> None:
        if self._ptr:
            lb().ring_buffer__free(self._ptr)
            self._ptr = None


class ListRing:
    """libbpf's reader behind DirectRing's interface (wait, read, epoll_fd, close), where
    DirectRing is not used: read() returns at most the ``batch`` given here."""

    def __init__(self, bpf_map: Map, batch: int):
        self._records: list[bytes] = []
        self._rb = RingBuffer(batch)
        self._rb.add(bpf_map, self._records.append)

    @property
    def epoll_fd(self) -> int:
        return self._rb.epoll_fd

    def wait(self, timeout_ms: int) -> None:
        import select

        try:
            select.select([self.epoll_fd], [], [], timeout_ms / 1000 if timeout_ms >= 0 else None)
        except InterruptedError:
            pass

    def read(self, limit: int, max_bytes: int = 0) -> list[bytes]:
        self._rb.consume()
        out = self._records[:]
        self._records.clear()
        return out

    def close(self) -> None:
        self._rb.close()


def ring_reader(bpf_map: Map, batch: int):
    """A reader of one ring that returns records in lists (wait, read(batch), epoll_fd, close):
    ringread.DirectRing on x86-64 (no ctypes call per record), else ListRing."""
    from crypto_tracer.engine.ringread import DirectRing

    if DirectRing.supported:
        return DirectRing(bpf_map.fd, bpf_map.max_entries)
    return ListRing(bpf_map, batch)


class TcHook:
    """The clsact qdisc of one interface and our classifiers on it, named by (handle, priority).

    Nothing is kept but the interface, so a later run can remove what a dead one attached."""

    def __init__(self, ifindex: int, handle: int = 1, priority: int = 1):
        self.ifindex, self.handle, self.priority = ifindex, handle, priority

    def _hook(self, attach_point: int):
        m = lb()
        return m.bpf_tc_hook(sz=ctypes.sizeof(m.bpf_tc_hook), ifindex=self.ifindex, attach_point=attach_point)

    def _opts(self, prog_fd: int = 0):
        m = lb()
        return m.bpf_tc_opts(sz=ctypes.sizeof(m.bpf_tc_opts), prog_fd=prog_fd, handle=self.handle,
                             priority=self.priority)

    def create(self) -> bool:
        """Add the clsact qdisc; False when it was there already (then it is not ours to remove)."""
        m = lb()
        ret = m.bpf_tc_hook_create(ctypes.byref(self._hook(m.BPF_TC_INGRESS | m.BPF_TC_EGRESS)))
        if ret == -errno.EEXIST:
            return False
        if ret:
            raise AttachError(f"cannot add a clsact qdisc on ifindex {self.ifindex}: {os.strerror(-ret)}", -ret)
        return True

    def attach(self, program: Program, egress: bool) -> None:
        m = lb()
        hook = self._hook(m.BPF_TC_EGRESS if egress else m.BPF_TC_INGRESS)
        ret = m.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(self._opts(program.fd)))
        if ret:
            raise AttachError(f"attaching TC program {program.name} failed: {os.strerror(-ret)}", -ret)

    def detach(self) -> None:
        """Remove our classifiers from both directions (absent ones are not an error)."""
        m = lb()
        for point in (m.BPF_TC_INGRESS, m.BPF_TC_EGRESS):
            m.bpf_tc_detach(ctypes.byref(self._hook(point)), ctypes.byref(self._opts()))

    def destroy(self) -> None:
        """Remove the qdisc with every filter on it (INGRESS|EGRESS, or the qdisc would stay)."""
        m = lb()
        m.bpf_tc_hook_destroy(ctypes.byref(self._hook(m.BPF_TC_INGRESS | m.BPF_TC_EGRESS)))
