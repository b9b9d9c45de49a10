"""tls: TLS plaintext as text or JSON (-m text|json); key logs and pcapng live in tls_secrets.

kernel (tls.bpf.c) -> ring buffer -> decode -> enrich -> connection filter -> text/json sink
"""

from __future__ import annotations

import time
from binascii import b2a_base64

import orjson

from crypto_tracer import events
from crypto_tracer.probes.common import CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, TYPE_SPAN
from crypto_tracer.probes.tls import DATA_CHANGING, DATA_KEY_SPANS, DATA_OFFSET, DATA_TRUNCATED, TLS_DATA_REC
from crypto_tracer.sinks.text import PRINTABLE, as_text, endpoint
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import is_verbose, log, ready
from crypto_tracer.host.proc import read_exe, read_stat
from crypto_tracer.redact import redact

# the hot loops slice with these (struct tls_data_rec, probes/tls.py), bound to locals
(_K0, _K1), (_K2, _K3) = DATA_KEY_SPANS
_TRUNC, _DATA = DATA_TRUNCATED, DATA_OFFSET

DEFAULT_RINGBUF = 8 << 20
SECRET_MODELS = ("keylog", "key", "pcap", "pcapng")


def run(opts) -> int:
    if opts.model in SECRET_MODELS:
        from crypto_tracer.commands import tls_secrets

        return tls_secrets.run(opts)
    return Capture(opts).run()


class ProcessInfo:
    """ppid and exe (redacted unless --no-redact) by pid, read once from /proc (None when gone)."""

    def __init__(self, redact_paths: bool = True):
        self.redact = redact_paths
        self._cache: dict[int, tuple[int | None, str | None]] = {}

    def get(self, pid: int) -> tuple[int | None, str | None]:
        info = self._cache.get(pid)
        if info is None:
            stat = read_stat(pid)
            ppid = stat[1] if stat else None
            exe = read_exe(pid) if stat else None
            if exe and self.redact:
                exe = redact(exe)
            info = self._cache[pid] = (ppid, exe)
            if len(self._cache) > 4096:
                self._cache.clear()
        return info


class Capture:
    def __init__(self, opts):
        from crypto_tracer.filters.connections import compile_connection_filter

        self.opts = opts
        if opts.model == "json" and opts.format == "summary":
            raise TracerError("-f summary is not available for tls", ExitStatus.BAD_ARGS,
                              "use -f json-stream, json-array or json-pretty")
        # bad filters are argument errors: before privileges
        self.conn_filter = compile_connection_filter(opts.filter)
        self.text = opts.model == "text"
        self.redact = not opts.no_redact
        self.procs = ProcessInfo(self.redact)
        self.batch: list[bytes] = []
        self._conns: dict[bytes, tuple | None] = {}  # see _entry
        self._second = (-1, "")  # the last timestamp's epoch second and its ISO prefix
        self.sink = None
        self.stats = None

    def _open_sink(self):
        from crypto_tracer.sinks.output import Output

        out = Output(self.opts.output)
        if self.text:
            from crypto_tracer.sinks.text import TextSink

            return TextSink(out, hex_output=self.opts.hex, tsize=self.opts.tsize)
        from crypto_tracer.sinks.json import make_json_sink

        return make_json_sink(self.opts.format, out)

    def run(self) -> int:
        from crypto_tracer.clock import WallClock
        from crypto_tracer.probes.common import CT_EV_TLS_KEYS
        from crypto_tracer.probes.tls import TlsTracer
        from crypto_tracer.runloop import StopFlag, run as run_loop
        from crypto_tracer.stats import RunStats

        opts = self.opts
        from crypto_tracer.engine.preflight import preflight

        preflight()
        tracer = TlsTracer(pids=[opts.pid] if opts.pid else None, uid=opts.uid, name=opts.name,
                           libssl=opts.libssl or (), capture_data=True,
                           mapsize=opts.mapsize or DEFAULT_RINGBUF, max_payload=opts.max_payload)
        stop = StopFlag().install()
        try:
            t0 = time.monotonic()
            self.sink = self._open_sink()
            self.clock = WallClock()
            self.stats = RunStats(tracer.counters)
            for rtype in (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS):
                tracer.on(rtype, self.batch.append)
            tracer.start()
            if not tracer.libraries:
                log.warning("no TLS library found in %s yet; waiting for processes that load one",
                            f"process {opts.pid}" if opts.pid else "running processes")
            ready("tls", t0, f"{len(tracer.libraries)} TLS libraries hooked")

            def poll(timeout_ms: int) -> None:
                tracer.poll(timeout_ms)
                self.process()

            def tick() -> None:
                self.clock.resync()
                self.stats.tick(is_verbose())

            run_loop(poll, opts.duration, stop, tick)
            if stop.signal:
                log.info("Shutdown requested, cleaning up...")
            tracer.detach()  # nothing new arrives; then every submitted record is handled
            tracer.drain()
            self.process()
            self.stats.report()
            return ExitStatus.OK
        finally:
            stop.restore()
            if self.sink is not None:
                self.sink.close()
            tracer.close()

    # --- the hot path -------------------------------------------------------------------
    #
    # ~50,000 data records/s whole-host: everything but ts/length/offset/truncated/data is the
    # same for every call on a connection, so it is decoded, filtered and formatted once per
    # connection (_entry) and looked up by the raw bytes that hold it (DATA_KEY_SPANS). Each
    # output mode then only formats the changing fields: json-stream fills a byte template
    # (byte-identical to orjson.dumps of the whole event), text an f-string; json-array and
    # json-pretty copy a prepared dict. Anything unusual goes the general way.

    def process(self) -> None:
        raws = self.batch
        if not raws:
            return
        if self.text:
            handle = self._process_text
        elif self.opts.format == "json-stream":
            handle = self._process_stream
        else:
            handle = self._process_dicts
        written = 0
        # a poll can bring 16k records: formatted and written a slice at a time, the text of
        # the whole batch is never in memory at once
        for i in range(0, len(raws), WRITE_SLICE):
            written += handle(raws[i:i + WRITE_SLICE])
            self.sink.flush()
        self.stats.received += len(raws)
        self.stats.user_filtered += len(raws) - written
        self.stats.output += written
        raws.clear()

    def _process_stream(self, raws: list[bytes]) -> int:
        get, new_entry = self._conns.get, self._entry
        unpack, b64 = DATA_CHANGING.unpack_from, b2a_base64
        offset_ns, (last_sec, prefix) = self.clock.offset_ns, self._second
        encode = self.sink.encode
        k0, k1, k2, k3, trunc, dat = _K0, _K1, _K2, _K3, _TRUNC, _DATA
        lines = []
        append = lines.append
        for raw in raws:
            key = raw[k0:k1] + raw[k2:k3]  # DATA_KEY_SPANS
            entry = get(key, _MISSING)
            if entry is _MISSING:
                entry = new_entry(raw, key)
            if entry is None:  # filtered out, or a key record
                continue
            if entry is _NOT_DATA:
                ev = self._handshake(raw)
                if ev is not None:
                    append(encode(ev))
                continue
            ts, length, offset, chunk = unpack(raw)
            sec, ns = divmod(ts + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, self.clock.second_prefix(sec).encode()
            append(entry[1] % (prefix, ns // 1000, length, offset, b"true" if raw[trunc] else b"false",
                               b64(raw[dat:dat + chunk], newline=False)))
        self._second = (last_sec, prefix)  # bytes here (a Capture has one output mode)
        self.sink.write_encoded(lines)
        return len(lines)

    def _process_text(self, raws: list[bytes]) -> int:
        get, new_entry = self._conns.get, self._entry
        unpack = DATA_CHANGING.unpack_from
        offset_ns, (last_sec, prefix) = self.clock.offset_ns, self._second
        sink = self.sink
        # payloads longer than this, hex dumps, chunks and truncation go the general way
        plain_limit = -1 if sink.hex else (sink.tsize or 1 << 62)
        k0, k1, k2, k3, trunc, dat = _K0, _K1, _K2, _K3, _TRUNC, _DATA
        lines = []
        append = lines.append
        for raw in raws:
            key = raw[k0:k1] + raw[k2:k3]  # DATA_KEY_SPANS
            entry = get(key, _MISSING)
            if entry is _MISSING:
                entry = new_entry(raw, key)
            if entry is None:
                continue
            if entry is _NOT_DATA:
                ev = self._handshake(raw)
                if ev is not None:
                    append(sink.format(ev))
                continue
            ts, length, offset, chunk = unpack(raw)
            sec, ns = divmod(ts + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, self.clock.second_prefix(sec)
            if offset or chunk != length or chunk > plain_limit or raw[trunc]:
                append(sink.format(*self._data_event(entry, raw, f"{prefix}.{ns // 1000:06d}Z")))
                continue
            _base, _fmt, mid, tail = entry
            if chunk:
                data = raw[dat:dat + chunk]
                body = data.translate(PRINTABLE).decode("ascii") if data.isascii() else as_text(data)
                append(f"{prefix}.{ns // 1000:06d}Z{mid}{length}{tail}\n{body}\n\n")
            else:
                append(f"{prefix}.{ns // 1000:06d}Z{mid}{length}{tail}\n\n")
        self._second = (last_sec, prefix)
        sink.write_formatted(lines)
        return len(lines)

    def _process_dicts(self, raws: list[bytes]) -> int:
        """json-array and json-pretty: a copy of the connection's prepared event per record."""
        get, new_entry = self._conns.get, self._entry
        offset_ns, (last_sec, prefix) = self.clock.offset_ns, self._second
        k0, k1, k2, k3 = _K0, _K1, _K2, _K3
        evs = []
        for raw in raws:
            key = raw[k0:k1] + raw[k2:k3]  # DATA_KEY_SPANS
            entry = get(key, _MISSING)
            if entry is _MISSING:
                entry = new_entry(raw, key)
            if entry is None:
                continue
            if entry is _NOT_DATA:
                ev = self._handshake(raw)
                if ev is not None:
                    evs.append(ev)
                continue
            sec, ns = divmod(raw_ts(raw) + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, self.clock.second_prefix(sec)
            ev, data, _ = self._data_event(entry, raw, f"{prefix}.{ns // 1000:06d}Z")
            ev["data_b64"] = b2a_base64(data, newline=False).decode("ascii")
            evs.append(ev)
        self._second = (last_sec, prefix)
        self.sink.write_many(evs)
        return len(evs)

    def _data_event(self, entry, raw: bytes, timestamp: str) -> tuple[dict, bytes, bool]:
        """(event, payload chunk, whether it is the last captured chunk of the call)."""
        ts, length, offset, chunk = DATA_CHANGING.unpack_from(raw)
        ev = entry[0].copy()  # keeps the schema order of the prepared event
        ev["timestamp"], ev["length"], ev["offset"], ev["truncated"] = timestamp, length, offset, bool(raw[_TRUNC])
        data = raw[DATA_OFFSET:DATA_OFFSET + chunk]
        return ev, data, offset + chunk >= min(length, self.opts.max_payload)

    def _entry(self, raw: bytes, key: bytes):
        """What a record's connection needs, cached under key: None when the connection filter
        drops it; _NOT_DATA for other record types (not cached)."""
        from crypto_tracer.probes.tls import decode_data

        rtype = int.from_bytes(raw[TYPE_SPAN[0]:TYPE_SPAN[1]], "little")
        if rtype != CT_EV_TLS_DATA:
            return _NOT_DATA if rtype == CT_EV_TLS_HANDSHAKE else None
        rec = decode_data(raw)
        entry = None
        if self.conn_filter is None or self.conn_filter((rec.local_addr, rec.local_port, rec.remote_addr,
                                                         rec.remote_port)):
            entry = self._prepare(rec)
        if len(self._conns) >= CONN_CACHE_SIZE:
            self._conns.clear()
        self._conns[key] = entry
        return entry

    def _prepare(self, rec) -> tuple[dict, bytes, str, str]:
        """(event with the connection's fields in schema order, json-stream template,
        text header middle and tail)."""
        ppid, exe = self.procs.get(rec.pid)  # exe already redacted
        base = {"event_type": "tls_data", "timestamp": None, "pid": rec.pid, "ppid": ppid, "uid": rec.uid,
                "process": rec.comm, "exe": exe, "tid": rec.tid, "library": rec.library, "function": rec.function,
                "direction": rec.direction, "fd": rec.fd, "local_addr": rec.local_addr,
                "local_port": rec.local_port, "remote_addr": rec.remote_addr, "remote_port": rec.remote_port,
                "length": None, "offset": None, "truncated": None, "data_b64": None}
        assert list(base) == list(events.COMMON_FIELDS) + list(events.EVENT_FIELDS["tls_data"])
        # json-stream: the event's JSON with the changing values as %-placeholders; the fields
        # between them are orjson's own encoding of them (any '%' in a name escaped).
        middle = orjson.dumps({k: base[k] for k in _STREAM_MIDDLE})[1:-1].replace(b"%", b"%%")
        template = (b'{"event_type":"tls_data","timestamp":"%s.%06dZ",' + middle +
                    b',"length":%d,"offset":%d,"truncated":%s,"data_b64":"%s"}\n')
        # text: header_line() of this connection is timestamp + mid + length + tail
        conn = f"{endpoint(rec.local_addr, rec.local_port)} -> {endpoint(rec.remote_addr, rec.remote_port)}"
        fd = rec.fd if rec.fd is not None else "?"
        mid = f" {rec.comm} pid={rec.pid} tid={rec.tid} fd={fd} {conn} {rec.direction} "
        tail = f" bytes [{rec.library} {rec.function}]"
        return base, template, mid, tail

    def _handshake(self, raw: bytes) -> dict | None:
        from crypto_tracer.probes.tls import decode_handshake

        rec = decode_handshake(raw)
        if self.conn_filter is not None and not self.conn_filter((rec.local_addr, rec.local_port, rec.remote_addr,
                                                                  rec.remote_port)):
            return None
        ppid, exe = self.procs.get(rec.pid)  # exe already redacted
        common = {"timestamp": self.clock.iso(rec.ts_ns), "pid": rec.pid, "ppid": ppid, "uid": rec.uid,
                  "process": rec.comm, "exe": exe}
        return events.make("tls_handshake", common, tid=rec.tid, library=rec.library, role=rec.role, fd=rec.fd,
                           local_addr=rec.local_addr, local_port=rec.local_port, remote_addr=rec.remote_addr,
                           remote_port=rec.remote_port, result=rec.result, tls_version=rec.tls_version,
                           cipher=None)


_MISSING = object()
_NOT_DATA = object()
WRITE_SLICE = 512  # records per write (~250 KB of json-stream)
CONN_CACHE_SIZE = 4096  # connections (per thread) remembered; cleared when full
_STREAM_MIDDLE = ("pid", "ppid", "uid", "process", "exe", "tid", "library", "function", "direction", "fd",
                  "local_addr", "local_port", "remote_addr", "remote_port")


_TS0, _TS1 = TLS_DATA_REC.span("h.ts_ns", "h.ts_ns")


def raw_ts(raw: bytes) -> int:
    return int.from_bytes(raw[_TS0:_TS1], "little")
