"""Kernel monotonic timestamps to wall-clock ISO-8601 UTC with microseconds."""

import time


class WallClock:
    """Converts bpf_ktime_get_ns() values (CLOCK_MONOTONIC) to wall-clock time."""

    def __init__(self):
        self.resync()
        self._sec = -1
        self._prefix = ""

    def resync(self) -> None:
        # Offset between the clocks, read back to back; re-read periodically to follow NTP steps.
        self.offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def epoch_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def iso(self, mono_ns: int) -> str:
        # iso_from_ns(mono_ns + offset_ns, self) inlined: once per event on monitor's hot path
        sec, ns = divmod(mono_ns + self.offset_ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return "%s.%06dZ" % (self._prefix, ns // 1000)  # noqa: UP031 (faster than the f-string)

    def second_prefix(self, sec: int) -> str:
        """'YYYY-MM-DDTHH:MM:SS' of an epoch second (cached: events come second by second);
        iso() is this + f".{us:06d}Z"."""
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return self._prefix


def iso_from_ns(epoch_ns: int, cache: WallClock | None = None) -> str:
    sec, ns = divmod(epoch_ns, 1_000_000_000)
    if cache is None:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    else:
        prefix = cache.second_prefix(sec)
    return f"{prefix}.{ns // 1000:06d}Z"


def now_iso() -> str:
    return iso_from_ns(time.time_ns())
