"""A sink behind a bounded queue and its own writer thread, so a slow or failing output never
blocks tracing: when the queue is full, new events are dropped and counted (reason queue_full).

The writer thread is the only one that touches the output; control calls (reopen, configure)
are queued to it and run between batches.
"""

from __future__ import annotations

import threading
from collections import deque

REASON_QUEUE_FULL = "queue_full"


class QueuedSink:
    def __init__(self, name: str, handler, capacity: int, stats_fn=None):
        """handler(events) writes a list of events (in the writer thread); stats_fn() -> its own
        dict(written=, dropped={reason: n}) (e.g. RotatingFile's counts)."""
        self.name = name
        self.capacity = capacity
        self._handler = handler
        self._stats_fn = stats_fn
        self._batches: deque[list] = deque()
        self._controls: deque = deque()
        self._depth = 0  # events queued, not yet handed to handler
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self.queue_dropped = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)
        self._thread.start()

    # --- producer side (the tracing loop): never waits for the output -------------------------

    def write_many(self, events: list) -> None:
        if not events:
            return
        with self._cond:
            room = self.capacity - self._depth
            if room <= 0:
                self.queue_dropped += len(events)
                return
            if len(events) > room:
                self.queue_dropped += len(events) - room
                events = events[:room]
            self._batches.append(events)
            self._depth += len(events)
            self.accepted += len(events)
            self._cond.notify_all()  # flush() waiters share the condition

    def control(self, fn) -> None:
        """Run fn() in the writer thread before the next batch (reopen, new settings)."""
        with self._cond:
            self._controls.append(fn)
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return self._depth

    def stats(self) -> dict:
        own = self._stats_fn() if self._stats_fn else {"written": 0, "dropped": {}}
        dropped = dict(own["dropped"])
        dropped[REASON_QUEUE_FULL] = self.queue_dropped
        return {"written": own["written"], "dropped": dropped, "queued": self._depth, "capacity": self.capacity}

    # --- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        from crypto_tracer.log import log

        while True:
            with self._cond:
                while not self._batches and not self._controls and not self._closing:
                    self._cond.wait()
                controls = list(self._controls)
                self._controls.clear()
                batches = list(self._batches)
                self._batches.clear()
                if not batches and not controls and self._closing:
                    return
                self._busy = True
            for fn in controls:
                try:
                    fn()
                except Exception as exc:  # a control must not kill the writer
                    log.warning("sink %s: %s", self.name, exc)
            for batch in batches:
                try:
                    self._handler(batch)
                except Exception as exc:  # counted by the handler where it can; never fatal
                    log.warning("sink %s: %s: %s", self.name, type(exc).__name__, exc)
                with self._cond:
                    self._depth -= len(batch)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is handled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._batches and not self._controls and not self._busy,
                                       timeout)

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
