"""The main loop shared by streaming commands: poll until --duration, SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import time


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop then ends cleanly (exit status 0)."""

    def __init__(self):
        self.stopped = False
        self.signal = None
        self._old = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.stopped = True
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(poll, duration: float | None, stop: StopFlag, tick=None, tick_interval: float = 1.0,
        poll_ms: int = 100) -> None:
    """Call poll(timeout_ms) until the duration ends or stop is set; tick() about once a second."""
    start = time.monotonic()
    deadline = start + duration if duration else None
    next_tick = start + tick_interval
    while not stop.stopped:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        timeout = poll_ms if deadline is None else max(0, min(poll_ms, int((deadline - now) * 1000)))
        poll(timeout)
        if tick is not None and time.monotonic() >= next_tick:
            tick()
            next_tick = time.monotonic() + tick_interval
