"""tls -m text / -m json-stream's per-record loop in C (fastfmt.c), beside the pure-Python one.

Measured (docs/PERFORMANCE.md): formatting ~70,000 small records a second in Python costs the
tracer ~0.17 of a core, and on a 2-core host that CPU is taken from the traced programs; a bulk
download's plaintext is copied ~7 times on its way to the file. In C the loop reads each record
where it is in the ring and writes its line straight into one buffer.

Division of work: Python still decodes, filters, enriches and redacts each connection once
(pipeline/tls_data.py) and its sink prepares the connection's format; learn() hands that format
to C as a recipe (literal pieces and slots for the changing fields). The C loop formats the data
records of known connections and stops at anything else, which the general path handles.

`setup` builds the library from fastfmt.c (`python -m crypto_tracer.pipeline.fastfmt`); the
file's name carries the source's digest, so a stale build is never loaded. Without it (or with
CRYPTO_TRACER_PURE_PYTHON=1) the pure-Python loop runs, with the same output.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import subprocess
import sys

from crypto_tracer.log import log

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastfmt.c")
PURE_ENV = "CRYPTO_TRACER_PURE_PYTHON"
OUT_BYTES = 1 << 20  # one C call's output at most (a bulk record formats to ~42 KB)
CONN_SLOTS = 8192  # the C table (emptied when half full, like pipeline/tls_data's cache)
# When the C loop stops at a record, the general path takes it and the records after it, up to this
# many and about this many bytes: they leave the ring at once, as in the pure-Python loop (a burst of
# new connections, slow in Python for their handshake facts, must not keep their records in the ring)
PYTHON_BATCH = 64
PYTHON_BYTES = 256 << 10
MAX_CALLS = 1024  # C calls per poll, and
MAX_POLL_BYTES = 16 << 20  # bytes of output, before other work (hello links, rescans) gets its turn

# slots of a recipe (fastfmt.c enum slot)
(SLOT_END, SLOT_LITERAL, SLOT_PREFIX, SLOT_MICROS, SLOT_LENGTH, SLOT_OFFSET, SLOT_TRUNCATED, SLOT_BASE64,
 SLOT_TEXT_BODY) = range(9)
STOP_EMPTY, STOP_PYTHON, STOP_FULL = range(3)


def library_path() -> str:
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return os.path.join(os.path.dirname(SOURCE), f"_fastfmt-{digest}.so")


def build() -> str:
    """Compile fastfmt.c next to itself (what `setup` runs; $CC, else gcc); returns the library's path."""
    cc = os.environ.get("CC") or "gcc"
    path = library_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        subprocess.run([cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", tmp, SOURCE], check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in glob.glob(os.path.join(os.path.dirname(path), "_fastfmt-*.so")):  # builds of other sources
        if old != path:
            os.unlink(old)
    return path


class _Layout(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in (
        "type_off", "data_type", "ts_off", "length_off", "offset_off", "chunk_off", "trunc_off", "data_off",
        "key0", "key1", "key2", "key3", "text")] + [("plain_limit", ctypes.c_uint64),
                                                    ("printable", ctypes.c_uint8 * 256)]


class _Result(ctypes.Structure):
    _fields_ = [("cons", ctypes.c_uint64), ("records", ctypes.c_uint64), ("written", ctypes.c_uint64),
                ("out_len", ctypes.c_uint64)]


_lib = None


def load():
    """The C library, or None (not built, or CRYPTO_TRACER_PURE_PYTHON=1): the pure-Python loop runs."""
    global _lib
    if _lib is None:
        if os.environ.get(PURE_ENV) == "1":
            return None
        path = library_path()
        if not os.path.exists(path):
            log.debug("no %s (./setup builds it): formatting records in Python", os.path.basename(path))
            return None
        lib = ctypes.CDLL(path)
        lib.ct_fmt_new.restype = ctypes.c_void_p
        lib.ct_fmt_new.argtypes = [ctypes.POINTER(_Layout), ctypes.c_uint32]
        lib.ct_fmt_free.argtypes = [ctypes.c_void_p]
        lib.ct_fmt_learn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                     ctypes.c_uint32]
        lib.ct_fmt_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                   ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                   ctypes.POINTER(_Result)]
        _lib = lib
    return _lib


_PLACEHOLDER = re.compile(rb"(%%|%06d|%d|%s)")


def recipe(parts) -> bytes:
    """A recipe from (slot, literal bytes or None) pairs."""
    out = bytearray()
    for slot, literal in parts:
        if slot == SLOT_LITERAL:
            if not literal:
                continue
            out += bytes((SLOT_LITERAL,)) + len(literal).to_bytes(4, "little") + literal
        else:
            out.append(slot)
    out.append(SLOT_END)
    return bytes(out)


def recipe_from_template(template: bytes, slots) -> bytes:
    """A %-template's recipe: its placeholders are slots, in order; '%%' is a literal '%'."""
    parts, slots = [], iter(slots)
    for i, piece in enumerate(_PLACEHOLDER.split(template)):
        if i % 2 == 0:
            parts.append((SLOT_LITERAL, piece))
        elif piece == b"%%":
            parts.append((SLOT_LITERAL, b"%"))
        else:
            parts.append((next(slots), None))
    return recipe(parts)


class FastLoop:
    """The C loop over a TlsTracer's ring, feeding a TlsDataPipeline's sink."""

    def __init__(self, lib, tracer, pipe, *, text: bool, plain_limit: int, printable: bytes):
        from crypto_tracer.probes.common import CT_EV_TLS_DATA, TYPE_SPAN
        from crypto_tracer.probes.tls import DATA_KEY_SPANS, DATA_OFFSET, DATA_TRUNCATED, TLS_DATA_REC

        self.lib, self.tracer, self.pipe = lib, tracer, pipe
        (k0, k1), (k2, k3) = DATA_KEY_SPANS
        lay = _Layout(type_off=TYPE_SPAN[0], data_type=CT_EV_TLS_DATA, ts_off=TLS_DATA_REC.offset("h.ts_ns"),
                      length_off=TLS_DATA_REC.offset("length"), offset_off=TLS_DATA_REC.offset("offset"),
                      chunk_off=TLS_DATA_REC.offset("chunk_len"), trunc_off=DATA_TRUNCATED, data_off=DATA_OFFSET,
                      key0=k0, key1=k1, key2=k2, key3=k3, text=int(text), plain_limit=plain_limit)
        lay.printable[:] = printable
        self.ctx = lib.ct_fmt_new(ctypes.byref(lay), CONN_SLOTS)
        if not self.ctx:
            raise MemoryError("fastfmt")
        self.out = ctypes.create_string_buffer(OUT_BYTES)
        self.view = memoryview(self.out).cast("B")
        self.result = _Result()
        self._more = False
        self.formatted = 0  # records written by the C loop (the rest went the general way)

    def learn(self, key: bytes, prepared) -> bool:
        """A connection's sink format (None: filtered out) for the C loop; True when the C table
        was emptied to make room (the caller empties its own cache: every connection is learned again)."""
        rec = None if prepared is None else self.pipe.sink.fast_recipe(prepared)
        got = self.lib.ct_fmt_learn(self.ctx, key, len(key), rec, len(rec) if rec is not None else 0)
        if got < 0:
            raise MemoryError("fastfmt")
        return got == 1

    def poll(self, timeout_ms: int, rescan: bool = True) -> None:
        """As TlsTracer.poll, with the data records of known connections formatted in C."""
        tracer, pipe, rb = self.tracer, self.pipe, self.tracer.rb
        rb.wait(0 if self._more else timeout_ms)
        data, prod, mask = rb.native()
        run, ctx, out, res = self.lib.ct_fmt_run, self.ctx, self.out, self.result
        stats, sink = pipe.stats, pipe.sink
        self._more = True
        budget = MAX_POLL_BYTES
        for _ in range(MAX_CALLS):
            stop = run(ctx, data, mask, prod, rb.consumer, pipe.clock.offset_ns, out, OUT_BYTES, ctypes.byref(res))
            if res.records:
                if res.out_len:
                    sink.write_fast(self.view[:res.out_len], res.written)
                rb.consumer = res.cons  # after the output holds what it needs of them
                stats.received += res.records
                stats.user_filtered += res.records - res.written
                stats.output += res.written
                self.formatted += res.written
                budget -= res.out_len
            if stop == STOP_EMPTY:
                self._more = False
                break
            if budget <= 0:
                break
            if stop == STOP_PYTHON:  # the general path, in order: the record the C loop stopped at
                tracer.dispatch_many(rb.read(PYTHON_BATCH, PYTHON_BYTES))
                pipe.process(flush=False)  # its lines stay buffered before the C loop's next ones
        sink.flush()
        if rescan:
            tracer.run_rescans()

    def drain(self) -> None:
        """Everything in the ring (after the tracer's detach: every record submitted), the same way."""
        self._more = True
        while self._more:
            self.poll(0, rescan=False)  # nothing is hooked any more

    def close(self) -> None:
        if self.ctx:
            self.lib.ct_fmt_free(self.ctx)
            self.ctx = None


def main() -> int:
    try:
        print(build())
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"building {SOURCE} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
