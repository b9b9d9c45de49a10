"""JSON sinks: json-stream (JSON Lines), json-array and json-pretty (each one valid array).

Arrays are opened at start and closed by close(), which also runs after SIGINT/SIGTERM,
--duration and write failures, so the file is always one valid JSON document.
"""

from __future__ import annotations

import orjson

from crypto_tracer.sinks.output import Output


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


class JsonArraySink(JsonStreamSink):
    """json-array: one compact event per line inside '[' ... ']'; json-pretty: indented."""

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
