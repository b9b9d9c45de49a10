"""Accounting for a run: produced = output + filtered + dropped, every term counted.

The kernel counts what its probes saw, filtered, dropped (ring buffer full) and submitted;
user space counts what it received, filtered and wrote. At the end the kernel's
`submitted` equals user space's `received` (the ring is drained after the probes are
detached), so seen = kernel_filtered + user_filtered + output + dropped exactly.
"""

from __future__ import annotations

import time

from crypto_tracer.log import log

DROP_WARNING_INTERVAL = 5.0  # seconds between backpressure warnings


class DropWarner:
    """Warns while running when the kernel had to drop records (ring buffer full), at most
    once every DROP_WARNING_INTERVAL seconds; remembers what it already reported."""

    def __init__(self, hint: str = ""):
        self.reported = 0
        self._last = 0.0
        self._hint = hint

    def check(self, dropped: int, final: bool = False) -> None:
        now = time.monotonic()
        if dropped > self.reported and (final or now - self._last >= DROP_WARNING_INTERVAL):
            log.warning("Ring buffer backpressure detected, %d events dropped%s", dropped - self.reported,
                        self._hint)
            self.reported, self._last = dropped, now


class RunStats:
    def __init__(self, counters_fn):
        """counters_fn() -> dict(seen, kernel_filtered, dropped, submitted), summed over objects."""
        self._counters_fn = counters_fn
        self.received = 0
        self.user_filtered = 0
        self.output = 0
        self.started = time.monotonic()
        self.drops = DropWarner()
        self._last_tick = (self.started, 0, 0, 0)

    def kernel(self) -> dict[str, int]:
        return self._counters_fn()

    def tick(self, verbose: bool) -> None:
        """Called about once a second: warn about new drops (rate limited); per-second figures."""
        k = self.kernel()
        now = time.monotonic()
        dropped = k["dropped"]
        self.drops.check(dropped)
        if verbose:
            t0, recv0, out0, drop0 = self._last_tick
            dt = max(now - t0, 1e-6)
            log.debug("%.0f events/s received, %.0f/s output, %.0f/s dropped (kernel saw %d, filtered %d)",
                      (self.received - recv0) / dt, (self.output - out0) / dt, (dropped - drop0) / dt,
                      k["seen"], k["kernel_filtered"])
        self._last_tick = (now, self.received, self.output, dropped)

    def final(self) -> dict[str, int | float]:
        k = self.kernel()
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return {
            "processed": k["seen"],
            "filtered": k["kernel_filtered"] + self.user_filtered,
            "filtered_kernel": k["kernel_filtered"],
            "filtered_user": self.user_filtered,
            "output": self.output,
            "dropped": k["dropped"],
            "received": self.received,
            "submitted": k["submitted"],
            "elapsed": elapsed,
            "rate": self.output / elapsed,
        }

    def report(self) -> dict:
        """Log the end-of-run statistics (INFO: hidden by --quiet) and return them."""
        s = self.final()
        self.drops.check(s["dropped"], final=True)
        log.info("Events processed: %d", s["processed"])
        log.info("Events filtered: %d (kernel %d, user space %d)", s["filtered"], s["filtered_kernel"],
                 s["filtered_user"])
        log.info("Events output: %d", s["output"])
        log.info("Events dropped: %d", s["dropped"])
        log.info("Rate: %.1f events/second over %.1f s", s["rate"], s["elapsed"])
        if s["submitted"] != s["received"]:
            log.warning("accounting mismatch: kernel submitted %d, user space received %d",
                        s["submitted"], s["received"])
        return s
