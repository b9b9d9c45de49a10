"""The C formatting loop (pipeline/fastfmt.c) against the pure-Python one: the same records, laid
out in a ring as the kernel lays them out, give byte-identical files and the same counts, whichever
way each record goes (C, or the general path where C stops: unknown connections, chunks,
truncation, non-ASCII text, a record that wraps the ring's end, a full output buffer)."""

import os
import struct
import types

import pytest

from crypto_tracer.engine.ringread import DirectRing
from crypto_tracer.pipeline import fastfmt
from crypto_tracer.probes import common
from crypto_tracer.probes import tls as probe
from tests.unit.test_tls_units import _data_record, _varied_records

PAGE, SIZE = 4096, 1 << 18


def _records():
    recs = _varied_records()
    recs += [_data_record(os.urandom(30000), fd=20), _data_record(b"\xe2\x82\xac" * 5000, fd=21),  # binary, UTF-8
             _data_record(bytes(range(128)) * 100, fd=22), _data_record(b"x" * 30000, fd=23, length=90000)]
    recs += [_data_record(bytes(range(200, 200 + n)), fd=30) for n in range(1, 8)]  # every base64 remainder
    recs += [_data_record(b"conn %d" % i, fd=100 + i) for i in range(12)]  # more connections than the C table keeps
    recs += [_data_record(b"again", fd=100), _data_record(b"filtered", fd=7, laddr=bytes([10, 9, 9, 9]) + bytes(12))]
    other = probe.HEADER.pack(5, common.CT_EV_TLS_PROCESS, 10, 10, 0, b"curl") + bytes(64)  # not a data record
    recs.insert(3, other)
    return [(123 + i * 1000).to_bytes(8, "little") + raw[8:] for i, raw in enumerate(recs)]


class _Ring(DirectRing):
    """A DirectRing over bytearrays (page 0: consumer position; then the producer page and the data area)."""

    def __init__(self, start: int):
        self._cons_map, self._data_map = bytearray(PAGE), bytearray(PAGE + SIZE)
        self._page, self._mask, self._native = PAGE, SIZE - 1, None
        self._cons, self._prod = memoryview(self._cons_map).cast("Q"), memoryview(self._data_map).cast("Q")
        self._words = memoryview(self._data_map).cast("I")
        self._cons[0] = self._prod[0] = start

    def put(self, payload: bytes) -> None:
        pos = self._prod[0]
        rec = struct.pack("<II", len(payload), 0) + payload
        for i in range(0, len(rec)):
            self._data_map[PAGE + (pos + i) % SIZE] = rec[i]
        self._prod[0] = pos + ((len(rec) + 7) & ~7)

    def wait(self, timeout_ms):
        pass


class _Tracer:
    def __init__(self, ring, pipe):
        self.rb, self.pipe = ring, pipe

    def dispatch_many(self, raws):
        for raw in raws:
            if raw[8:12] == common.CT_EV_TLS_DATA.to_bytes(4, "little"):
                self.pipe.batch.append(bytes(raw))
        return len(raws)

    def run_rescans(self):
        pass


def _run(tmp_path, name, mode, fmt, recs, fast: bool):
    from crypto_tracer.commands.tls.plaintext import fast_loop, make_pipeline
    from crypto_tracer.pipeline.clock import WallClock

    out = tmp_path / name
    opts = types.SimpleNamespace(model=mode, format=fmt, filter=["not host 10.9.9.9"], no_redact=False,
                                 output=str(out), hex=False, tsize=0, max_payload=1 << 20)
    clock = WallClock()
    clock.offset_ns = 1_790_000_000_999_999_000  # crosses a second within the records
    stats = types.SimpleNamespace(received=0, user_filtered=0, output=0)
    pipe = make_pipeline(opts, clock, stats)
    pipe.procs.get = lambda pid: (None, None)
    ring = _Ring(start=SIZE - 3 * 8192)  # the records wrap the ring's end
    tracer = _Tracer(ring, pipe)
    loop = fast_loop(opts, tracer, pipe) if fast else None
    if fast:
        assert loop is not None
    for part in (recs[:9], recs[9:], recs):  # the second time, most connections are known
        for raw in part:
            ring.put(raw)
        if fast:
            loop.poll(0) if part is not recs else loop.drain()  # drain: how a run ends
        else:
            tracer.dispatch_many(ring.read(1 << 20))
            pipe.process()
    assert ring.consumer == ring._prod[0]  # everything read, and its space given back
    pipe.sink.close()
    formatted = 0
    if loop is not None:
        formatted = loop.formatted
        loop.close()
    return out.read_bytes(), (stats.received, stats.user_filtered, stats.output), formatted


@pytest.mark.parametrize("mode, fmt", [("json", "json-stream"), ("text", "json-stream")])
@pytest.mark.parametrize("out_bytes, slots", [(fastfmt.OUT_BYTES, fastfmt.CONN_SLOTS), (4096, 8)])
def test_the_c_loop_writes_what_python_writes(tmp_path, monkeypatch, mode, fmt, out_bytes, slots):
    if fastfmt.load() is None:
        pytest.skip("the C loop is not built (./setup builds it)")
    monkeypatch.setattr(fastfmt, "OUT_BYTES", out_bytes)
    monkeypatch.setattr(fastfmt, "CONN_SLOTS", slots)
    monkeypatch.setattr(fastfmt, "PYTHON_BATCH", 1)  # the general path takes only the record C stopped at
    recs = _records()
    got, counts, in_c = _run(tmp_path, "fast", mode, fmt, recs, fast=True)
    want, want_counts, _ = _run(tmp_path, "python", mode, fmt, recs, fast=False)
    assert got == want
    # the C loop wrote the second sight of most connections (all but chunks, truncation, UTF-8 text, the
    # wrapping record and, with a 4 KB buffer, the 30 KB records; the 8-slot table forgets some)
    assert in_c >= {("json", 8): 10, ("json", 8192): 20, ("text", 8): 6, ("text", 8192): 14}[mode, slots], in_c
    assert counts == want_counts == (2 * (len(recs) - 1), 2, 2 * (len(recs) - 2))


def test_recipes_from_templates():
    from crypto_tracer.sinks.json import JsonStreamSink

    r = fastfmt.recipe_from_template(b'{"a":"%s.%06dZ","b%%":%d}', (fastfmt.SLOT_PREFIX, fastfmt.SLOT_MICROS,
                                                                    fastfmt.SLOT_LENGTH))
    lit = lambda b: bytes((fastfmt.SLOT_LITERAL,)) + len(b).to_bytes(4, "little") + b  # noqa: E731
    assert r == (lit(b'{"a":"') + bytes((fastfmt.SLOT_PREFIX,)) + lit(b".") + bytes((fastfmt.SLOT_MICROS,)) +
                 lit(b'Z","b') + lit(b"%") + lit(b'":') + bytes((fastfmt.SLOT_LENGTH,)) + lit(b"}") +
                 bytes((fastfmt.SLOT_END,)))
    assert JsonStreamSink.fast_recipe(JsonStreamSink.prepare_tls(
        {"pid": 1, "process": "a%b"} | dict.fromkeys(("ppid", "uid", "exe", "tid", "library", "function", "direction",
                                                      "fd", "local_addr", "local_port", "remote_addr", "remote_port",
                                                      "stream_id")))).count(b"%") == 1


def test_a_stale_build_is_not_loaded(tmp_path, monkeypatch):
    """The library's name carries the source's digest: another source finds no library."""
    src = tmp_path / "fastfmt.c"
    src.write_text(open(fastfmt.SOURCE).read() + "\n/* changed */\n")
    monkeypatch.setattr(fastfmt, "SOURCE", str(src))
    monkeypatch.setattr(fastfmt, "_lib", None)
    assert fastfmt.library_path() != os.path.join(os.path.dirname(fastfmt.__file__), "x")
    assert not os.path.exists(fastfmt.library_path()) and fastfmt.load() is None
