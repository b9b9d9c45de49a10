"""A JSON Lines file with size-based rotation, gzip compression and a number of backups
(Tetragon's knobs: max size, max backups, compress), every file mode 0600.

Rotation: events.jsonl -> events.jsonl.1 (then gzip'ed to events.jsonl.1.gz), older backups
shift up by one, the one past max_backups is removed. A run killed in the middle leaves at
most an uncompressed .1 or a .gz.tmp; the next start finishes or removes them (recover()).

Writes are whole records: a failed write (disk full) is cut back to the last complete line, the
records counted as dropped, one warning logged; later writes retry and resume when space
returns. Only the sink's writer thread calls write()/reopen() (sinks/queued.py).
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil

from crypto_tracer.log import log

REASON_DISK_FULL = "disk_full"
REASON_IO = "io_error"


def _open(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode with O_CREAT: tighten it
    return fd


class RotatingFile:
    def __init__(self, path: str, max_bytes: int, max_backups: int, compress: bool):
        self.path = path
        self.max_bytes, self.max_backups, self.compress = max_bytes, max_backups, compress
        self.written = 0  # records written
        self.dropped: dict[str, int] = {}  # reason -> records
        self.rotations = 0
        self._failing: str | None = None  # the reason while writes fail (one warning per episode)
        self._fd = -1
        self.recover()
        self._reopen()

    def configure(self, max_bytes: int, max_backups: int, compress: bool) -> None:
        self.max_bytes, self.max_backups, self.compress = max_bytes, max_backups, compress

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = _open(self.path)
        self._size = os.fstat(self._fd).st_size

    def reopen(self, path: str | None = None) -> None:
        """SIGHUP: the file may have been moved away (logrotate): open the path again."""
        if path and path != self.path:
            self.path = path
            self.recover()
        try:
            self._reopen()
        except OSError as exc:
            self._fail(exc, 0)

    def _backup(self, i: int, gz: bool) -> str:
        return f"{self.path}.{i}{'.gz' if gz else ''}"

    def recover(self) -> None:
        """Finish what a killed run left: remove a partial .gz.tmp, compress a pending .1."""
        tmp = self._backup(1, True) + ".tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        if self.compress and os.path.exists(self._backup(1, False)) and not os.path.exists(self._backup(1, True)):
            self._compress(self._backup(1, False))

    def write_lines(self, lines: list[bytes]) -> None:
        """Whole lines, in chunks that each fit the current file, so no file passes max_bytes
        (unless one line alone is larger)."""
        chunk: list[bytes] = []
        total = limit = 0
        for line in lines:
            if chunk and total + len(line) > limit:
                self.write(b"".join(chunk), len(chunk))
                chunk, total = [], 0
            if not chunk:  # a chunk starts: the room left, or a whole file after the rotation it forces
                room = self.max_bytes - self._size
                limit = room if self._size == 0 or len(line) <= room else self.max_bytes
            chunk.append(line)
            total += len(line)
        if chunk:
            self.write(b"".join(chunk), len(chunk))

    def stats(self) -> dict:
        return {"written": self.written, "dropped": dict(self.dropped)}

    def write(self, data: bytes, records: int) -> bool:
        """Append records (whole lines) or count them dropped; True when written."""
        if self._fd < 0:
            try:
                self._reopen()
            except OSError as exc:
                return self._fail(exc, records)
        if self._size and self._size + len(data) > self.max_bytes:
            try:
                self._rotate()
            except OSError as exc:
                return self._fail(exc, records)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:] if done else data)
        except OSError as exc:
            if done:  # cut the partial write back to the last whole record
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
            return self._fail(exc, records)
        self._size += done
        self.written += records
        if self._failing:
            log.warning("%s: writing again (%s is over)", self.path, self._failing.replace("_", " "))
            self._failing = None
        return True

    def _fail(self, exc: OSError, records: int) -> bool:
        reason = REASON_DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else REASON_IO
        if records:
            self.dropped[reason] = self.dropped.get(reason, 0) + records
        if self._failing != reason:
            log.warning("%s: %s; events are dropped (and counted) until it can be written again",
                        self.path, exc.strerror or exc)
            self._failing = reason
        return False

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for i in range(self.max_backups, 0, -1):
            for gz in (True, False):
                src = self._backup(i, gz)
                if not os.path.exists(src):
                    continue
                if i >= self.max_backups:
                    os.unlink(src)
                else:
                    os.replace(src, self._backup(i + 1, gz))
        if self.max_backups:
            os.replace(self.path, self._backup(1, False))
        else:
            os.unlink(self.path)
        self.rotations += 1
        self._reopen()
        if self.max_backups and self.compress:
            self._compress(self._backup(1, False))

    def _compress(self, src: str) -> None:
        dst = src + ".gz"
        tmp = dst + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as raw, \
                    gzip.GzipFile(filename=os.path.basename(src), mode="wb", fileobj=raw, compresslevel=6) as gz:
                shutil.copyfileobj(fin, gz, 1 << 20)
            os.replace(tmp, dst)
            os.unlink(src)
        except OSError as exc:  # e.g. disk full: keep the uncompressed backup
            log.warning("%s: compressing failed (%s); kept uncompressed", src, exc.strerror or exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
