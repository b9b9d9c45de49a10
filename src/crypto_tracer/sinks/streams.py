"""tls -m streams -o DIR: each connection's plaintext, per direction, in its own file (as tcpflow
does for TCP), the cheapest output for bulk captures.

  DIR/<pid>-<comm>-<local ip.port>-<remote ip.port>.sent      what the process wrote
  DIR/<pid>-<comm>-<local ip.port>-<remote ip.port>.received  what it read
                         (QUIC: -stream<id> before the suffix, a file per stream)
  DIR/connections.jsonl  a JSON line per stream when it opens (the connection's fields and the
                         file), the tls_handshake events, and at the end one line per stream with
                         its bytes and any gaps (calls cut by --max-payload)

Files are 0600 in a 0700 directory. Per record the hot path does one dict lookup and keeps a view
of the payload in the ring's record; a batch is written with one os.writev per stream. A 4-tuple
that is not known is "unknown" in the name, never guessed.
"""

from __future__ import annotations

import errno
import os
import re
from collections import OrderedDict

import orjson

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.sinks.output import Output

INDEX = "connections.jsonl"
MAX_OPEN = 128  # stream files kept open at once (least recently written ones are closed)
IOV_MAX = 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_CHANGING = ("timestamp", "tid", "function", "length", "offset", "truncated", "data_b64")


def _endpoint(addr: str | None, port: int | None) -> str:
    return "unknown" if addr is None else f"{addr}.{'unknown' if port is None else port}"


class Stream:
    """One direction of one connection: its file and what the current batch adds to it."""

    __slots__ = ("name", "path", "fd", "pending", "bytes", "gaps", "missing")

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.fd: int | None = None
        self.pending: list = []
        self.bytes = self.gaps = self.missing = 0


class StreamsSink:
    def __init__(self, directory: str, max_payload: int):
        self.dir = directory
        self.max_payload = max_payload
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise TracerError(f"cannot use {directory} for streams: {exc.strerror}", ExitStatus.BAD_ARGS,
                              "give -o a directory (it is created if needed)") from None
        self.index = Output(os.path.join(directory, INDEX))
        self.streams: dict[tuple, Stream] = {}
        self.open: OrderedDict[Stream, None] = OrderedDict()
        self.dirty: list[Stream] = []
        self.failed = False

    # --- per connection ----------------------------------------------------------------

    def prepare_tls(self, base: dict) -> Stream:
        """The stream of a connection's direction (shared by its threads' cache entries)."""
        direction = "sent" if base["direction"] == "write" else "received"
        key = (base["pid"], base["fd"], base["local_addr"], base["local_port"], base["remote_addr"],
               base["remote_port"], base["library"], direction, base.get("stream_id"))
        stream = self.streams.get(key)
        if stream is None:
            comm = _SAFE.sub("_", base["process"] or "") or "unknown"
            stem = (f"{base['pid']}-{comm}-{_endpoint(base['local_addr'], base['local_port'])}-"
                    f"{_endpoint(base['remote_addr'], base['remote_port'])}")
            if base.get("stream_id") is not None:  # a QUIC connection: a file per stream
                stem += f"-stream{base['stream_id']}"
            name = self._free_name(stem, direction)
            stream = self.streams[key] = Stream(name, os.path.join(self.dir, name))
            info = {k: v for k, v in base.items() if k not in _CHANGING}
            info["event_type"], info["file"] = "tls_stream", name
            self.index.write(orjson.dumps(info) + b"\n")
        return stream

    def _free_name(self, stem: str, direction: str) -> str:
        """A name no other stream of this run (or an earlier file in DIR) has: a reconnection from
        the same ports, or a reused pid, gets -2, -3..."""
        taken = {s.name for s in self.streams.values()}
        n = 1
        while True:
            name = f"{stem}{'' if n == 1 else f'-{n}'}.{direction}"
            if name not in taken and not os.path.lexists(os.path.join(self.dir, name)):
                return name
            n += 1

    # --- the hot path (pipeline/tls_data.py) -------------------------------------------

    def write_tls(self, raws: list[bytes], pipe) -> int:
        get, new_entry, handshake = pipe.conns.get, pipe.entry, pipe.handshake
        missing, not_data = pipe.MISSING, pipe.NOT_DATA
        unpack = pipe.CHANGING.unpack_from
        (k0, k1), (k2, k3) = pipe.KEY_SPANS
        trunc, dat = pipe.TRUNCATED, pipe.DATA
        max_payload = self.max_payload
        dirty = self.dirty
        written = 0
        for raw in raws:
            entry = get(raw[k0:k1] + raw[k2:k3], missing)  # DATA_KEY_SPANS
            if entry is missing:
                entry = new_entry(raw, raw[k0:k1] + raw[k2:k3])
            if entry is None:
                continue
            if entry is not_data:
                ev = handshake(raw)
                if ev is not None:
                    self.index.write(orjson.dumps(ev) + b"\n")
                    written += 1
                continue
            _ts, length, offset, chunk = unpack(raw)
            stream = entry[1]
            if not stream.pending:
                dirty.append(stream)
            if chunk:
                stream.pending.append(memoryview(raw)[dat:dat + chunk])
                stream.bytes += chunk
            if raw[trunc] and offset + chunk >= min(length, max_payload):  # the call's last chunk
                stream.gaps += 1
                stream.missing += length - offset - chunk
            written += 1
        return written

    def flush(self) -> None:
        for stream in self.dirty:
            self._write(stream)
        self.dirty.clear()
        self.index.flush()

    def _write(self, stream: Stream) -> None:
        parts, stream.pending = stream.pending, []
        if self.failed:
            return
        try:
            fd = self._fd(stream)
            for i in range(0, len(parts), IOV_MAX):
                batch = parts[i:i + IOV_MAX]
                done, want = os.writev(fd, batch), sum(map(len, batch))
                while done < want:  # a short write (rare on files): the rest, from where it stopped
                    rest = b"".join(batch)[done:]
                    done += os.write(fd, rest)
        except OSError as exc:
            self.failed = True
            raise TracerError(f"writing {stream.path} failed: {exc.strerror}", ExitStatus.ERROR,
                              "what came before is in the stream files; free space or choose another -o") from None

    def _fd(self, stream: Stream) -> int:
        if stream.fd is not None:
            self.open.move_to_end(stream)
            return stream.fd
        if len(self.open) >= MAX_OPEN:
            old, _ = self.open.popitem(last=False)
            os.close(old.fd)
            old.fd = None
        stream.fd = os.open(stream.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.open[stream] = None
        return stream.fd

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for stream in self.streams.values():
                if stream.fd is not None:
                    os.close(stream.fd)
                    stream.fd = None
                self.index.write(orjson.dumps({"event_type": "tls_stream_end", "file": stream.name,
                                               "bytes": stream.bytes, "gaps": stream.gaps,
                                               "missing_bytes": stream.missing}) + b"\n")
            self.open.clear()
            self.index.close()
