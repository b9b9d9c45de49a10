"""Output files: created 0600, written in whole records, valid even when the disk fills.

``Output`` remembers the offset after the last complete record. If a write fails (disk
full, I/O error), it truncates the file back to that offset, so that what was written
stays valid and the closing bytes (e.g. a JSON array's ']') still fit, and raises
``TracerError`` once with a clear message.
"""

from __future__ import annotations

import errno
import os
import sys

from crypto_tracer.errors import ExitStatus, TracerError


def open_private(path: str, binary: bool = True):
    """Create or truncate path with mode 0600 (it may hold plaintext or secrets)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode with O_CREAT: tighten it
    except IsADirectoryError:
        raise TracerError(f"cannot write {path}: it is a directory", ExitStatus.BAD_ARGS) from None
    except OSError as exc:
        raise TracerError(f"cannot open output {path}: {exc.strerror}", ExitStatus.ERROR,
                          "choose a writable path with -o") from None
    return os.fdopen(fd, "wb" if binary else "w", buffering=1 << 16)


class Output:
    """A byte stream to a file or stdout, flushed per record batch, failure-safe."""

    def __init__(self, path: str | None, line_flush: bool = False):
        self.path = path
        self.to_stdout = path is None or path == "-"
        self._f = sys.stdout.buffer if self.to_stdout else open_private(path)
        self._line_flush = line_flush or (self.to_stdout and sys.stdout.isatty())
        self._good = 0  # bytes known to be on disk in whole records
        self._pending = 0
        self.failed: str | None = None

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self._f.write(data)
            self._pending += len(data)
            if self._line_flush:
                self.flush()
        except OSError as exc:
            self._fail(exc)

    def flush(self) -> None:
        if self.failed:
            return
        try:
            self._f.flush()
            self._good += self._pending
            self._pending = 0
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        where = "stdout" if self.to_stdout else self.path
        self.failed = f"writing {where} failed: {exc.strerror or exc}"
        if not self.to_stdout:
            try:  # drop the partial record so the file stays valid
                fd = self._f.fileno()
                os.ftruncate(fd, self._good)
                os.lseek(fd, self._good, os.SEEK_SET)
            except OSError:
                pass
            self._f = os.fdopen(os.dup(self._f.fileno()), "wb", buffering=0)
        if exc.errno == errno.EPIPE:
            self.failed = None  # reader went away: not our error
            self._f = open(os.devnull, "wb")
            return
        raise TracerError(self.failed, ExitStatus.ERROR)

    def write_final(self, data: bytes) -> None:
        """Closing bytes (e.g. ']'): written even after a failure, into the space freed by truncation."""
        try:
            self._f.write(data)
            self._f.flush()
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._f.flush()
        except OSError:
            pass
        if not self.to_stdout:
            try:
                self._f.close()
            except OSError:
                pass
