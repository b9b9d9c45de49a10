"""The NSS key log file (SSLKEYLOGFILE format): one 'LABEL client_random secret' per line,
each line once, flushed as soon as a session's secrets are known, file mode 0600."""

from __future__ import annotations

from crypto_tracer.sinks.output import Output


class KeyLog:
    """Deduplicates key log lines by (label, client_random); writes new ones to a file if given."""

    def __init__(self, path: str | None = None):
        self._seen: set[tuple[str, str]] = set()
        self._out = Output(path) if path else None
        self.lines_written = 0

    def add(self, lines: list[tuple[str, str, str]]) -> bytes:
        """Record a session's lines; returns the new ones as key log text (b'' if none)."""
        new = []
        for label, client_random, secret in lines:
            if (label, client_random) in self._seen:
                continue
            self._seen.add((label, client_random))
            new.append(f"{label} {client_random} {secret}\n")
        text = "".join(new).encode()
        if text and self._out is not None:
            self._out.write(text)
            self._out.flush()
        self.lines_written += len(new)
        return text

    @property
    def sessions(self) -> int:
        """Distinct sessions (client randoms) with at least one line."""
        return len({client_random for _, client_random in self._seen})

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
