"""Unit tests of the tls pieces that need no privileges: the text sink, record decoding,
addresses and the ELF reader of discovery (the filter: test_connection_filter.py)."""

import os
import ssl
import sys

import pytest

from crypto_tracer.errors import TracerError
from crypto_tracer.host import discovery, proc
from crypto_tracer.probes import common
from crypto_tracer.probes import tls as probe
from crypto_tracer.sinks.text import TextSink, as_text, endpoint, hex_dump

CONN = ("127.0.0.1", 40000, "10.0.0.1", 443)


def _data_record(payload, family=2, laddr=bytes([127, 0, 0, 1]) + bytes(12), func=5, length=None, offset=0,
                 truncated=0, fd=7, stream_id=-1):
    header = probe.HEADER.pack(123, common.CT_EV_TLS_DATA, 10, 11, 0, b"curl")
    body = probe.DATA.pack(0xABC, length or len(payload), offset, len(payload), fd, 1, func, truncated, family,
                           40000, 443, laddr, bytes([10, 0, 0, 1]) + bytes(12), stream_id)
    return header + body + payload


def test_decode_data_record():
    rec = probe.decode_data(_data_record(b"GET / HTTP/1.1\r\n"))
    assert (rec.pid, rec.tid, rec.comm, rec.library, rec.function, rec.direction, rec.fd) == \
        (10, 11, "curl", "openssl", "SSL_write", "write", 7)
    assert (rec.local_addr, rec.local_port, rec.remote_addr, rec.remote_port) == CONN
    assert rec.data == b"GET / HTTP/1.1\r\n" and rec.truncated is False
    assert probe.DATA_OFFSET == 128  # offsetof(struct tls_data_rec, data)
    assert rec.stream_id is None  # TCP
    rec = probe.decode_data(_data_record(b"", family=0, fd=-1, func=2))
    assert (rec.fd, rec.local_addr, rec.direction, rec.function) == (None, None, "read", "SSL_read_ex")
    rec = probe.decode_data(_data_record(b"quic", stream_id=4))
    assert rec.stream_id == 4  # a QUIC stream


def test_addresses():
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])
    for _ in range(2):  # computed, then cached
        assert proc.address_text(10, mapped) == "192.168.1.2"  # IPv4-mapped IPv6 prints as IPv4
        assert proc.address_text(10, bytes(15) + b"\x01") == "::1"
        assert proc.address_text(2, bytes([10, 0, 0, 1])) == "10.0.0.1"
        assert proc.address_text(0, bytes(16)) is None
    assert endpoint("::1", 443) == "[::1]:443" and endpoint(None, None) == "?"


class _Buf:
    def __init__(self):
        self.data = b""

    def write(self, d):
        self.data += d

    def flush(self):
        pass


def _event(**kw):
    ev = dict(event_type="tls_data", timestamp="2026-01-01T00:00:00.000000Z", pid=1, ppid=0, uid=0,
              process="curl", exe="/usr/bin/curl", tid=1, library="openssl", function="SSL_write",
              direction="write", fd=5, local_addr="127.0.0.1", local_port=40000, remote_addr="127.0.0.1",
              remote_port=443, length=5, offset=0, truncated=False)
    ev.update(kw)
    return ev


def test_text_sink_header_payload_and_tsize():
    out = _Buf()
    sink = TextSink(out, tsize=3)
    sink.write(_event(), b"hello")
    sink.flush()
    text = out.data.decode()
    assert text.startswith("2026-01-01T00:00:00.000000Z curl pid=1 tid=1 fd=5 127.0.0.1:40000 -> "
                           "127.0.0.1:443 write 5 bytes [openssl SSL_write]\nhel\n")
    assert "... (2 more bytes not shown, -t 3)" in text


def test_text_sink_chunks_and_truncation():
    out = _Buf()
    sink = TextSink(out)
    sink.write(_event(length=100, offset=60, truncated=True), b"x" * 20, last_chunk=True)
    sink.flush()
    text = out.data.decode()
    assert "write 100 bytes (bytes 60-80 of the call)" in text
    assert "[TRUNCATED: the call moved 100 bytes, 20 beyond --max-payload were not captured]" in text


def test_hex_dump_and_text_rendering():
    assert hex_dump(b"GET /\r\n") == "00000000  47 45 54 20 2f 0d 0a" + " " * 27 + "  |GET /..|"
    assert as_text(b"a\x00b\r\n") == "a.b\r\n"
    assert as_text(b"\xff\xfe") == ".."


def test_elf_reader_on_this_system():
    libssl = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(libssl):
        pytest.skip("libssl3 not installed")
    elf = discovery.read_elf(libssl)
    assert elf.soname == "libssl.so.3" and len(elf.build_id) == 40
    assert {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_do_handshake"} <= elf.symbols
    assert discovery.kind_of(libssl, elf) == "openssl"
    assert discovery.read_elf(sys.executable).symbols == frozenset()
    assert discovery.read_elf(__file__) is None


def test_discovery_finds_each_file_once():
    d = discovery.Discovery()
    libssl = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(libssl):
        pytest.skip("libssl3 not installed")
    lib = d.examine(libssl, libssl, pid=1)
    major, minor = (int(x) for x in ssl.OPENSSL_VERSION.split()[1].split(".")[:2])  # the system's libssl.so.3
    want = discovery.SPLIT_SSL if (major, minor) >= (3, 2) else discovery.FLAT_SSL
    assert lib is not None and lib.kind == "openssl" and lib.openssl_layout == want
    assert ("SSL_write_ex2" in lib.functions) == ((major, minor) >= (3, 3))
    assert d.examine(libssl, libssl, pid=2) is None and lib.pids == {1, 2}


def test_json_events_follow_the_schema(tmp_path):
    import json
    import types

    from crypto_tracer.pipeline import events
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.commands.tls.plaintext import make_pipeline

    out = tmp_path / "events.json"
    opts = types.SimpleNamespace(model="json", format="json-stream", filter=["port", "443"], no_redact=False,
                                 output=str(out), hex=False, tsize=0, max_payload=1 << 20)
    cap = make_pipeline(opts, WallClock(), types.SimpleNamespace(received=0, user_filtered=0, output=0))
    cap.batch += [_data_record(b"secret"), _data_record(b"x", family=0)]  # the second has no address
    cap.process()
    cap.sink.close()
    (ev,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(ev) == list(events.TLS_DATA.fields)
    assert (ev["data_b64"], ev["length"], ev["truncated"], ev["remote_port"]) == ("c2VjcmV0", 6, False, 443)
    assert (cap.stats.received, cap.stats.user_filtered, cap.stats.output) == (2, 1, 1)


def _reference_event(raw, clock, max_payload=1 << 20):
    """The event as the general code builds it: decode_data, then the fields in schema order."""
    rec = probe.decode_data(raw)
    ev = dict(event_type="tls_data", timestamp=clock.iso(rec.ts_ns), pid=rec.pid, ppid=None, uid=rec.uid,
              process=rec.comm, exe=None, tid=rec.tid, library=rec.library, function=rec.function,
              direction=rec.direction, fd=rec.fd, local_addr=rec.local_addr, local_port=rec.local_port,
              remote_addr=rec.remote_addr, remote_port=rec.remote_port, stream_id=rec.stream_id, length=rec.length,
              offset=rec.offset,
              truncated=rec.truncated)
    last = rec.offset + len(rec.data) >= min(rec.length, max_payload)
    return ev, rec.data, last


def _varied_records():
    v6 = bytes(15) + b"\x01"
    recs = [_data_record(b"GET / HTTP/1.1\r\n"), _data_record(b"GET / HTTP/1.1\r\n"),  # the second from the cache
            _data_record(b"caf\xc3\xa9 \x00\x01"), _data_record(b"\xff\xfe\x00"), _data_record(b""),
            _data_record(b"x" * 40, length=100, offset=60, truncated=1), _data_record(b"y" * 30, length=90),
            _data_record(b"z", family=0, fd=-1, func=2), _data_record(b"six", family=10, laddr=v6),
            _data_record(b"%s %d \"q\" \\ \x7f\t\n", func=8), _data_record(b"on a QUIC stream", stream_id=8)]
    header = probe.HEADER.pack(2_000_000_000, common.CT_EV_TLS_DATA, 2**31, 3, 65534, b"a%s\"\\\xc3(\x01nul\0x")
    body = probe.DATA.pack(1, 5, 0, 5, 3, 3, 12, 0, 2, 1, 2, bytes(16), bytes(16), -1)
    recs.append(header + body + b"hello")  # an odd comm, NSS, no addresses
    return recs


@pytest.mark.parametrize("mode, fmt", [("json", "json-stream"), ("json", "json-array"), ("json", "json-pretty"),
                                       ("text", None), ("text-hex", None), ("text-tsize", None)])
def test_hot_path_matches_the_general_formatting(tmp_path, mode, fmt):
    """TlsDataPipeline.process's per-connection templates give exactly the bytes of the general code."""
    import base64
    import types

    import orjson

    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.commands.tls.plaintext import make_pipeline
    from crypto_tracer.sinks.json import make_json_sink
    from crypto_tracer.sinks.output import Output

    out = tmp_path / "fast"
    opts = types.SimpleNamespace(model="text" if mode.startswith("text") else "json", format=fmt or "json-stream",
                                 filter=[], no_redact=False, output=str(out), hex=mode == "text-hex",
                                 tsize=4 if mode == "text-tsize" else 0, max_payload=1 << 20)
    clock = WallClock()
    clock.offset_ns = 1_790_000_000_999_999_000  # crosses a second within the records
    cap = make_pipeline(opts, clock, types.SimpleNamespace(received=0, user_filtered=0, output=0))
    cap.procs.get = lambda pid: (None, None)  # no /proc lookups: the reference has none either
    recs = _varied_records()
    for i, raw in enumerate(recs):  # timestamps 1 us apart, then across the second
        recs[i] = (123 + i * 1000).to_bytes(8, "little") + raw[8:]
    cap.batch += recs[:5]
    cap.process()  # two batches: the cache and the second prefix carry over
    cap.batch += recs[5:]
    cap.process()
    cap.sink.close()
    assert cap.stats.output == len(recs)

    ref_path = tmp_path / "ref"
    if opts.model == "text":
        sink = TextSink(Output(str(ref_path)), hex_output=opts.hex, tsize=opts.tsize)
        for raw in recs:
            sink.write(*_reference_event(raw, clock))
    else:
        sink = make_json_sink(opts.format, Output(str(ref_path)))
        for raw in recs:
            ev, data, _ = _reference_event(raw, clock)
            ev["data_b64"] = base64.b64encode(data).decode("ascii")
            sink.write(ev)
    sink.close()
    assert out.read_bytes() == ref_path.read_bytes()
    if fmt == "json-stream":
        lines = out.read_bytes().splitlines()
        assert [orjson.loads(line)["process"] for line in lines][-1] == 'a%s"\\\ufffd(\x01nul'
        assert all(orjson.dumps(orjson.loads(line)) == line for line in lines)


def test_data_record_offsets():
    raw = _data_record(b"abc", length=9, offset=6, truncated=1)
    assert probe.DATA_CHANGING.unpack_from(raw) == (123, 9, 6, 3)
    assert raw[probe.DATA_TRUNCATED] == 1 and raw[probe.DATA_OFFSET:] == b"abc"
    # the key covers every field but ts, ssl, length, offset and chunk_len (and nothing of the payload)
    (a, b), (c, d) = probe.DATA_KEY_SPANS
    assert (a, b, c, d) == (8, probe.HEADER.size, probe.HEADER.size + 28, probe.DATA_OFFSET)


def test_output_write_many_keeps_record_boundaries(tmp_path, monkeypatch):
    """A disk that fills in the middle of a batch leaves only whole records in the file."""
    import errno

    from crypto_tracer.sinks import output as output_mod

    path = tmp_path / "out"
    out = output_mod.Output(str(path))
    out.write(b"a\n")
    out.write_many([b"bb\n", b"", b"ccc\n"])
    out.write_many(iter([b"dddd\n"]))
    assert out._ends == [2, 5, 5, 9, 14]
    real_write = os.write

    def short_write(fd, data):  # 7 bytes fit, then the disk is full
        if len(data) > 7:
            return real_write(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_mod.os, "write", short_write)
    with pytest.raises(TracerError):
        out.flush()
    monkeypatch.undo()
    out.close()
    assert path.read_bytes() == b"a\nbb\n"


def test_output_big_record_written_through_or_cut_whole(tmp_path, monkeypatch):
    """A record of BUFFER_BYTES or more goes straight to the file after what is buffered; when the disk
    fills in its middle, the part of it that was written is cut off."""
    import errno

    from crypto_tracer.sinks import output as output_mod

    path = tmp_path / "out"
    out = output_mod.Output(str(path))
    big = memoryview(b"B" * output_mod.BUFFER_BYTES + b"\n")
    out.write(b"a\n")
    out.write(big)
    assert path.read_bytes() == b"a\n" + bytes(big)
    real_write = os.write

    def short_write(fd, data):  # 100 bytes fit, then the disk is full
        if len(data) > 100:
            return real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    out.write(b"c\n")
    out.flush()
    monkeypatch.setattr(output_mod.os, "write", short_write)
    with pytest.raises(TracerError):
        out.write(big)
    monkeypatch.undo()
    out.close()
    assert path.read_bytes() == b"a\n" + bytes(big) + b"c\n"  # the 100 bytes of big that were written: cut off


def test_direct_ring_reader_layout():
    """DirectRing.read on a fake ring: committed records in order, discarded ones skipped,
    a record that wraps read whole (its two parts joined: the data area is mapped once), a busy one
    stops it, and a byte budget stops it after the record that reaches it."""
    import struct as st

    from crypto_tracer.engine.ringread import BUSY_BIT, DISCARD_BIT, DirectRing

    page, size = 4096, 128
    ring = object.__new__(DirectRing)
    cons_buf, data_buf = bytearray(page), bytearray(page + size)
    ring._cons_map, ring._data_map, ring._page, ring._mask = cons_buf, data_buf, page, size - 1
    ring._cons, ring._prod = memoryview(cons_buf).cast("Q"), memoryview(data_buf).cast("Q")
    ring._words = memoryview(data_buf).cast("I")

    def put(pos, payload, flags=0):  # pos: producer-side position
        rec = st.pack("<II", len(payload) | flags, 0) + payload
        for i, b in enumerate(rec):
            data_buf[page + (pos + i) % size] = b
        return pos + ((len(rec) + 7) & ~7)

    start = 96  # records are 8-byte aligned
    ring._cons[0] = start
    pos = put(start, b"abc")              # 96..106, next at 112
    pos = put(pos, b"0123456789")         # 112..129: wraps (128 is 0), next at 136
    pos = put(pos, b"gone", DISCARD_BIT)  # 136..147, next at 152
    busy = pos
    pos = put(pos, b"later", BUSY_BIT)
    ring._prod[0] = pos
    assert list(map(bytes, ring.read(10, max_bytes=1))) == [b"abc"]
    ring._cons[0] = start
    assert list(map(bytes, ring.read(10))) == [b"abc", b"0123456789"]
    assert data_buf[page + 120:page + 128] == b"01234567" and data_buf[page:page + 2] == b"89"  # it did wrap
    assert ring._cons[0] == busy
    assert ring.read(10) == []
    ring._words[(page + (busy & (size - 1))) >> 2] &= ~BUSY_BIT  # committed
    assert list(map(bytes, ring.read(1))) == [b"later"] and ring._cons[0] == pos


def test_a_port_of_zero_is_unknown():
    """A TCP socket gives its local port back when it closes: a write after the peer's reset reads
    port 0, which is no port (null, '?' in text), never printed as 0."""
    header = probe.HEADER.pack(123, common.CT_EV_TLS_DATA, 10, 11, 0, b"nginx")
    body = probe.DATA.pack(0xABC, 3, 0, 3, 7, 1, 5, 0, 2, 0, 55482, bytes([127, 0, 0, 1]) + bytes(12),
                           bytes([127, 0, 0, 1]) + bytes(12), -1)
    rec = probe.decode_data(header + body + b"abc")
    assert (rec.local_addr, rec.local_port, rec.remote_addr, rec.remote_port) == ("127.0.0.1", None, "127.0.0.1", 55482)
    assert endpoint(rec.local_addr, rec.local_port) == "127.0.0.1:?"
