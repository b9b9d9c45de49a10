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
    port = "?" if port is None else port
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


def _who(ev: dict) -> str:
    conn = f"{endpoint(ev['local_addr'], ev['local_port'])} -> {endpoint(ev['remote_addr'], ev['remote_port'])}"
    fd = ev["fd"] if ev["fd"] is not None else "?"
    return f" {ev['process']} pid={ev['pid']} tid={ev['tid']} fd={fd} {conn}"


def data_header_parts(ev: dict) -> tuple[str, str]:
    """The parts of a tls_data header line that are the same for a whole connection: the line is
    timestamp + mid + size + lib (tls's hot path prepares them once per connection)."""
    stream = f"stream {ev['stream_id']} " if ev.get("stream_id") is not None else ""  # QUIC
    return f"{_who(ev)} {stream}{ev['direction']} ", f" [{ev['library']} {ev['function']}]"


def header_line(ev: dict, chunk: int = 0) -> str:
    if ev["event_type"] == "tls_handshake":
        extra = " ".join(str(x) for x in (ev["tls_version"], ev["cipher"], ev["group"]) if x)
        for name in ("sni", "alpn"):
            if ev[name]:
                extra += f" {name}={ev[name]}"
        if ev.get("transport") == "quic":
            extra += " quic"
        if ev["resumed"] is not None:
            extra += " resumed" if ev["resumed"] else " full-handshake"
        if ev["peer_cert_subject"]:
            key = " ".join(str(x) for x in (ev["peer_key_type"], ev["peer_key_bits"]) if x)
            extra += f" peer={ev['peer_cert_subject']!r}{' (' + key + ')' if key else ''}"
        return f"{ev['timestamp']}{_who(ev)} handshake {ev['role'] or 'unknown-role'} {ev['result']}" \
               f"{' ' + extra if extra else ''} [{ev['library']}]"
    mid, lib = data_header_parts(ev)
    size = f"{ev['length']} bytes"
    if ev["offset"] or chunk < ev["length"]:
        size += f" (bytes {ev['offset']}-{ev['offset'] + chunk} of the call)"
    return f"{ev['timestamp']}{mid}{size}{lib}"


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

    # --- tls -m text's hot path (pipeline/tls_data.py) -----------------------------------

    _second = (-1, "")  # the last timestamp's epoch second and its ISO prefix

    @staticmethod
    def prepare_tls(base: dict) -> tuple[str, str]:
        """A connection's header_line() is timestamp + mid + length + tail."""
        mid, lib = data_header_parts(base)
        return mid, " bytes" + lib

    def write_tls(self, raws: list[bytes], pipe) -> int:
        """Raw tls records -> text, as format() would; returns how many were written."""
        get, new_entry, handshake, data_event = pipe.conns.get, pipe.entry, pipe.handshake, pipe.data_event
        missing, not_data = pipe.MISSING, pipe.NOT_DATA
        unpack = pipe.CHANGING.unpack_from
        clock = pipe.clock
        offset_ns, (last_sec, prefix) = clock.offset_ns, self._second
        fmt = self.format
        # payloads longer than this, hex dumps, chunks and truncation go the general way
        plain_limit = -1 if self.hex else (self.tsize or 1 << 62)
        (k0, k1), (k2, k3) = pipe.KEY_SPANS
        trunc, dat = pipe.TRUNCATED, pipe.DATA
        lines = []
        append = lines.append
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
                    append(fmt(ev))
                continue
            ts, length, offset, chunk = unpack(raw)
            sec, ns = divmod(ts + offset_ns, 1_000_000_000)
            if sec != last_sec:
                last_sec, prefix = sec, clock.second_prefix(sec)
            if offset or chunk != length or chunk > plain_limit or raw[trunc]:
                append(fmt(*data_event(entry, raw, f"{prefix}.{ns // 1000:06d}Z")))
                continue
            mid, tail = entry[1]
            if chunk:
                data = raw[dat:dat + chunk]
                body = data.translate(PRINTABLE).decode("ascii") if data.isascii() else as_text(data)
                append(f"{prefix}.{ns // 1000:06d}Z{mid}{length}{tail}\n{body}\n\n")
            else:
                append(f"{prefix}.{ns // 1000:06d}Z{mid}{length}{tail}\n\n")
        self._second = (last_sec, prefix)
        self.write_formatted(lines)
        return len(lines)

    # --- the same in C (pipeline/fastfmt.py) ---------------------------------------------

    @staticmethod
    def fast_recipe(prepared: tuple[str, str]) -> bytes:
        """write_tls's line for a whole call, as a fastfmt recipe."""
        from crypto_tracer.pipeline import fastfmt as ff

        mid, tail = (part.encode("utf-8", "replace") for part in prepared)
        return ff.recipe([(ff.SLOT_PREFIX, None), (ff.SLOT_LITERAL, b"."), (ff.SLOT_MICROS, None),
                          (ff.SLOT_LITERAL, b"Z" + mid), (ff.SLOT_LENGTH, None), (ff.SLOT_LITERAL, tail),
                          (ff.SLOT_TEXT_BODY, None), (ff.SLOT_LITERAL, b"\n\n")])

    def write_fast(self, text, events: int) -> None:
        """events already formatted (encoded) by the C loop, after what is pending."""
        self._move_pending()
        self.out.write(text)
        self.count += events

    def _move_pending(self) -> None:
        if self._pending:  # one write per batch of events
            self.out.write("".join(self._pending).encode("utf-8", "replace"))
            self._pending.clear()

    def flush(self) -> None:
        self._move_pending()
        self.out.flush()

    def close(self) -> None:
        self.flush()
        self.out.close()
