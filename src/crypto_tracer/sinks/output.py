"""Output files: created 0600, written in whole records, valid even when the disk fills.

``Output`` buffers whole records and writes them with os.write, so it always knows the
offset after the last complete record. If a write fails (disk full, I/O error), it
truncates the file back to that offset, so that what was written stays valid and the
closing bytes (e.g. a JSON array's ']') still fit, and raises ``TracerError`` once.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from itertools import accumulate

from crypto_tracer.errors import ExitStatus, TracerError

BUFFER_BYTES = 1 << 16


def open_private_fd(path: str) -> int:
    """Create or truncate path with mode 0600 (it may hold plaintext or secrets)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if stat.S_ISREG(os.fstat(fd).st_mode):  # never a device such as /dev/null
            os.fchmod(fd, 0o600)  # an existing file keeps its mode with O_CREAT: tighten it
        return fd
    except IsADirectoryError:
        raise TracerError(f"cannot write {path}: it is a directory", ExitStatus.BAD_ARGS) from None
    except OSError as exc:
        raise TracerError(f"cannot open output {path}: {exc.strerror}", ExitStatus.ERROR,
                          "choose a writable path with -o") from None


def open_private(path: str, binary: bool = True):
    """The same, as a Python file object."""
    return os.fdopen(open_private_fd(path), "wb" if binary else "w")


class Output:
    """A byte stream to a file or stdout, written in whole records, failure-safe."""

    def __init__(self, path: str | None, line_flush: bool = False):
        self.path = path
        self.to_stdout = path is None or path == "-"
        self._fd = sys.stdout.fileno() if self.to_stdout else open_private_fd(path)
        self._line_flush = line_flush or (self.to_stdout and sys.stdout.isatty())
        self._buf = bytearray()
        self._ends: list[int] = []  # end offset in _buf of each record
        self._good = 0  # bytes known to be in the file, in whole records
        self.failed: str | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.failed or self.closed:
            return
        if len(data) >= BUFFER_BYTES:  # a big record (e.g. a batch of bulk lines): from the caller's memory
            self.flush()
            self._write_through(data)
            return
        self._buf += data
        self._ends.append(len(self._buf))
        if self._line_flush or len(self._buf) >= BUFFER_BYTES:
            self.flush()

    def write_many(self, records) -> None:
        """Several records at once, each keeping its own boundary."""
        if self.failed or self.closed:
            return
        if not isinstance(records, (list, tuple)):
            records = list(records)
        # the boundaries are the running sum of the lengths (a C loop, not one per record)
        ends = accumulate(map(len, records), initial=len(self._buf))
        next(ends)
        self._ends += ends
        buf = self._buf
        buf += b"".join(records)
        if self._line_flush or len(buf) >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.failed or not self._buf:
            return
        written = 0
        try:
            while written < len(self._buf):
                written += os.write(self._fd, self._buf[written:] if written else self._buf)
        except OSError as exc:
            # keep the records that made it whole; the partial one is cut off in _fail
            self._good += max((end for end in self._ends if end <= written), default=0)
            self._fail(exc)
            return
        self._good += written
        self._buf.clear()
        self._ends.clear()

    def _write_through(self, data) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:] if written else data)
        except OSError as exc:
            self._fail(exc)  # cuts the part of this record that was written
            return
        self._good += written

    def _fail(self, exc: OSError) -> None:
        self._buf.clear()
        self._ends.clear()
        if exc.errno == errno.EPIPE:  # the reader went away (e.g. | head): not our error
            self.failed = "reader closed the pipe"
            return
        where = "stdout" if self.to_stdout else self.path
        self.failed = f"writing {where} failed: {exc.strerror or exc}"
        if not self.to_stdout:
            try:  # drop the partial record so the file stays valid
                os.ftruncate(self._fd, self._good)
                os.lseek(self._fd, self._good, os.SEEK_SET)
            except OSError:
                pass
        raise TracerError(self.failed, ExitStatus.ERROR,
                          "every event before the failure is in the file; free space or choose another -o")

    def write_final(self, data: bytes) -> None:
        """Closing bytes (e.g. ']'): written even after a failure, into the space freed by truncation."""
        if self.closed:
            return
        if not self.failed:
            try:
                self.flush()
            except TracerError:
                pass
        try:
            os.write(self._fd, data)
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        except TracerError:
            pass
        self.closed = True
        if not self.to_stdout:
            os.close(self._fd)
