"""Human-readable TLS output (`tls -m text`): one header line per event, then the payload
as text (control bytes shown as '.') or, with --hex, as a hex dump. --tsize N limits what
is printed of each payload; what was captured is unchanged.
"""

from __future__ import annotations

from crypto_tracer.sinks.output import Output

PRINTABLE = bytes(b if (32 <= b < 127 or b in (9, 10, 13)) else ord(".") for b in range(256))
_PRINTABLE = PRINTABLE
_VISIBLE = bytes(b if 32 <= b < 127 else ord(".") for b in range(256))  # hex dump column


def endpoint(addr: str | None, port: int | None) -> str:
    if addr is None:
        return "?"
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def as_text(data: bytes) -> str:
    if data.isascii():  # the common case, and much faster
        return data.translate(_PRINTABLE).decode("ascii")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.translate(_PRINTABLE).decode("ascii")
    return "".join(c if c.isprintable() or c in "\n\t\r" else "." for c in text)


def hex_dump(data: bytes, start: int = 0) -> str:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i:i + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        lines.append(f"{start + i:08x}  {hexes:<47}  |{row.translate(_VISIBLE).decode('ascii')}|")
    return "\n".join(lines)


def header_line(ev: dict, chunk: int = 0) -> str:
    conn = f"{endpoint(ev['local_addr'], ev['local_port'])} -> {endpoint(ev['remote_addr'], ev['remote_port'])}"
    fd = ev["fd"] if ev["fd"] is not None else "?"
    who = f"{ev['timestamp']} {ev['process']} pid={ev['pid']} tid={ev['tid']} fd={fd} {conn}"
    if ev["event_type"] == "tls_handshake":
        extra = " ".join(str(x) for x in (ev["tls_version"], ev["cipher"]) if x)
        return f"{who} handshake {ev['role'] or 'unknown-role'} {ev['result']}{' ' + extra if extra else ''} " \
               f"[{ev['library']}]"
    size = f"{ev['length']} bytes"
    if ev["offset"] or chunk < ev["length"]:
        size += f" (bytes {ev['offset']}-{ev['offset'] + chunk} of the call)"
    return f"{who} {ev['direction']} {size} [{ev['library']} {ev['function']}]"


class TextSink:
    def __init__(self, out: Output, hex_output: bool = False, tsize: int = 0):
        self.out, self.hex, self.tsize = out, hex_output, tsize
        self.count = 0
        self._pending: list[str] = []

    def format(self, ev: dict, data: bytes = b"", last_chunk: bool = True) -> str:
        lines = [header_line(ev, len(data))]
        if ev["event_type"] == "tls_data":
            shown = data[:self.tsize] if self.tsize else data
            if shown:
                lines.append(hex_dump(shown, ev["offset"]) if self.hex else as_text(shown))
            if len(shown) < len(data):
                lines.append(f"... ({len(data) - len(shown)} more bytes not shown, -t {self.tsize})")
            if ev["truncated"] and last_chunk:
                lines.append(f"[TRUNCATED: the call moved {ev['length']} bytes, "
                             f"{ev['length'] - ev['offset'] - len(data)} beyond --max-payload were not captured]")
        return "\n".join(lines) + "\n\n"

    def write(self, ev: dict, data: bytes = b"", last_chunk: bool = True) -> None:
        self._pending.append(self.format(ev, data, last_chunk))
        self.count += 1

    def write_formatted(self, texts: list[str]) -> None:
        """Events already formatted as format() would (tls's hot path)."""
        self._pending += texts
        self.count += len(texts)

    def flush(self) -> None:
        if self._pending:  # one write per batch of events
            self.out.write("".join(self._pending).encode("utf-8", "replace"))
            self._pending.clear()
        self.out.flush()

    def close(self) -> None:
        self.flush()
        self.out.close()
