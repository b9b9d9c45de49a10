"""JSON sinks: json-stream (JSON Lines), json-array and json-pretty (each one valid array).

Arrays are opened at start and closed by close(), which also runs after SIGINT/SIGTERM,
--duration and write failures, so the file is always one valid JSON document.
"""

from __future__ import annotations

from binascii import b2a_base64

import orjson

from crypto_tracer.sinks.output import Output

from crypto_tracer.pipeline.events import TLS_DATA

# The json-stream template of a tls_data event, derived once from the schema: the fields the hot
# path fills per record (their %-placeholders, in schema order) and the connection's fields
# between them, encoded by orjson per connection (prepare_tls).
_STREAM_SLOTS = {"timestamp": b'"%s.%06dZ"', "length": b"%d", "offset": b"%d", "truncated": b"%s",
                 "data_b64": b'"%s"'}
_F = TLS_DATA.fields
_T, _L = _F.index("timestamp"), _F.index("length")
# the hot path's %-arguments are (timestamp, length, offset, truncated, data) in this order
assert _F[:_T] == ("event_type",) and _F[_T + 1:_L] and tuple(f for f in _F if f in _STREAM_SLOTS) == \
    tuple(_STREAM_SLOTS) and all(f in _STREAM_SLOTS for f in _F[_L:]), "tls_data schema vs json-stream template"
_TLS_STREAM_MIDDLE = _F[_T + 1:_L]
_STREAM_HEAD = orjson.dumps({"event_type": TLS_DATA.name})[:-1] + b',"timestamp":' + _STREAM_SLOTS["timestamp"] + b","
_STREAM_TAIL = b"".join(b"," + orjson.dumps(f) + b":" + _STREAM_SLOTS[f] for f in _F[_L:]) + b"}\n"
del _F, _T, _L


class JsonStreamSink:
    def __init__(self, out: Output):
        self.out = out
        self.count = 0

    def write(self, event: dict) -> None:
        self.out.write(orjson.dumps(event) + b"\n")
        self.count += 1

    @staticmethod
    def encode(event: dict) -> bytes:
        return orjson.dumps(event) + b"\n"

    def write_encoded(self, lines: list[bytes]) -> None:
        """Lines already encoded as encode() would (tls's hot path), one record each."""
        if lines:
            self.out.write_many(lines)
            self.count += len(lines)

    def write_many(self, events: list[dict]) -> None:
        if events:
            dumps = orjson.dumps
            self.out.write_many([dumps(e) + b"\n" for e in events])
            self.count += len(events)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()

    # --- tls -m json's hot path (pipeline/tls_data.py) -----------------------------------

    _second = (-1, b"")  # the last timestamp's epoch second and its ISO prefix

    @staticmethod
    def prepare_tls(base: dict) -> bytes:
        """A connection's template: the event's JSON with the changing values as %-placeholders;
        the fields between them are orjson's own encoding of them (any '%' in a name escaped),
        so a filled template is byte-identical to orjson.dumps of the whole event."""
        middle = orjson.dumps({k: base[k] for k in _TLS_STREAM_MIDDLE})[1:-1].replace(b"%", b"%%")
        return _STREAM_HEAD + middle + _STREAM_TAIL

    def write_tls(self, raws: list[bytes], pipe) -> int:
        """Raw tls records -> JSON lines; returns how many were written."""
        get, new_entry, handshake = pipe.conns.get, pipe.entry, pipe.handshake
        missing, not_data = pipe.MISSING, pipe.NOT_DATA
        unpack, b64 = pipe.CHANGING.unpack_from, b2a_base64
        clock = pipe.clock
        offset_ns, (last_sec, prefix) = clock.offset_ns, self._second
        encode = self.encode
        (k0, k1), (k2, k3) = pipe.KEY_SPANS
        trunc, dat = pipe.TRUNCATED, pipe.DATA
        lines = []
        append = lines.append
        for raw in raws:
            key = raw[k0:k1] + raw[k2:k3]  # DATA_KEY_SPANS
            entry = get(key, missing)
            if entry is missing:
                entry = new_entry(raw, key)
            if entry is None:  # filtered out, or a key record
                continue
            if entry is not_data:
                ev = handshake(raw)
                if ev is not None:
                    append(encode(ev))
                continue
            ts, length, offset, chunk = unpack(raw)
            sec, ns = divmod(ts + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, clock.second_prefix(sec).encode()
            append(entry[1] % (prefix, ns // 1000, length, offset, b"true" if raw[trunc] else b"false",
                               b64(raw[dat:dat + chunk], newline=False)))
        self._second = (last_sec, prefix)
        self.write_encoded(lines)
        return len(lines)

    # --- the same in C (pipeline/fastfmt.py) ---------------------------------------------

    @staticmethod
    def fast_recipe(template: bytes) -> bytes:
        """prepare_tls's template as a fastfmt recipe (its %-arguments, in write_tls's order)."""
        from crypto_tracer.pipeline import fastfmt as ff

        return ff.recipe_from_template(template, (ff.SLOT_PREFIX, ff.SLOT_MICROS, ff.SLOT_LENGTH, ff.SLOT_OFFSET,
                                                  ff.SLOT_TRUNCATED, ff.SLOT_BASE64))

    def write_fast(self, lines, events: int) -> None:
        """JSON lines already encoded by the C loop (one block: a failed write keeps whole lines)."""
        self.out.write(lines)
        self.count += events


class JsonArraySink(JsonStreamSink):
    """json-array: one compact event per line inside '[' ... ']'; json-pretty: indented."""

    fast_recipe = None  # separators between events: the Python loop only

    def __init__(self, out: Output, pretty: bool = False):
        super().__init__(out)
        self._opt = orjson.OPT_INDENT_2 if pretty else 0
        self.out.write(b"[\n")
        self.out.flush()

    def _encode(self, event: dict) -> bytes:
        sep = b",\n" if self.count else b""
        self.count += 1
        return sep + orjson.dumps(event, option=self._opt)

    def write(self, event: dict) -> None:
        self.out.write(self._encode(event))

    def write_many(self, events: list[dict]) -> None:
        if events:
            self.out.write_many([self._encode(e) for e in events])

    def close(self) -> None:
        self.out.flush()
        self.out.write_final(b"\n]\n")
        self.out.close()

    _second = (-1, "")

    @staticmethod
    def prepare_tls(base: dict) -> None:
        return None  # each record is a copy of the connection's prepared event

    def write_tls(self, raws: list[bytes], pipe) -> int:
        """json-array and json-pretty: a copy of the connection's prepared event per record."""
        get, new_entry, handshake, data_event = pipe.conns.get, pipe.entry, pipe.handshake, pipe.data_event
        missing, not_data, raw_ts = pipe.MISSING, pipe.NOT_DATA, pipe.raw_ts
        clock = pipe.clock
        offset_ns, (last_sec, prefix) = clock.offset_ns, self._second
        (k0, k1), (k2, k3) = pipe.KEY_SPANS
        evs = []
        for raw in raws:
            key = raw[k0:k1] + raw[k2:k3]  # DATA_KEY_SPANS
            entry = get(key, missing)
            if entry is missing:
                entry = new_entry(raw, key)
            if entry is None:
                continue
            if entry is not_data:
                ev = handshake(raw)
                if ev is not None:
                    evs.append(ev)
                continue
            sec, ns = divmod(raw_ts(raw) + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, clock.second_prefix(sec)
            ev, data, _ = data_event(entry, raw, f"{prefix}.{ns // 1000:06d}Z")
            ev["data_b64"] = b2a_base64(data, newline=False).decode("ascii")
            evs.append(ev)
        self._second = (last_sec, prefix)
        self.write_many(evs)
        return len(evs)


def make_json_sink(fmt: str, out: Output):
    if fmt == "json-stream":
        return JsonStreamSink(out)
    if fmt in ("json-array", "json-pretty"):
        return JsonArraySink(out, pretty=fmt == "json-pretty")
    raise ValueError(fmt)


def dump_document(doc, fmt: str, out: Output) -> None:
    """Write one document (profile, snapshot) in a JSON format and close the output."""
    if fmt == "json-stream":
        out.write(orjson.dumps(doc) + b"\n")
    elif fmt == "json-array":
        out.write(b"[" + orjson.dumps(doc) + b"]\n")
    else:
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    out.flush()
    out.close()
