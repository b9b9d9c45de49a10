"""monitor, libs and files: the live stream of crypto events.

kernel (monitor.bpf.c) -> ring buffer -> decode -> enrich -> event filter -> redact -> sink
"""

from __future__ import annotations

import os
import time

from crypto_tracer.pipeline.clock import WallClock
from crypto_tracer.pipeline.enrich import Enricher
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.pipeline.filters.events import EventFilter
from crypto_tracer.log import is_verbose, log, ready
from crypto_tracer.probes.monitor import MonitorProbe, ProcessFilter, decode
from crypto_tracer.pipeline.redact import Redactor
from crypto_tracer.pipeline.runloop import StopFlag, run as run_loop
from crypto_tracer.sinks.output import Output
from crypto_tracer.pipeline.stats import RunStats

# 4 MiB: ~150 ms of slack at 100k events/s. Its pages are mapped twice (for wrap-around)
# and count in RSS, so bigger costs memory for nothing (--mapsize raises it).
DEFAULT_RINGBUF = 4 << 20


def make_sink(fmt: str, path: str | None):
    out = Output(path)
    if fmt == "summary":
        from crypto_tracer.sinks.summary import SummarySink

        return SummarySink(out)
    from crypto_tracer.sinks.json import make_json_sink

    return make_json_sink(fmt, out)


class Pipeline:
    """Turns batches of raw records into written events, counting every step."""

    def __init__(self, sink, stats: RunStats, event_filter: EventFilter, redact_paths: bool, clock: WallClock):
        self.sink, self.stats, self.filter = sink, stats, event_filter
        self.enrich = Enricher(clock)
        self.redactor = Redactor(redact_paths)

    def process(self, raws: list[bytes]) -> None:
        if not raws:
            return
        events = []
        enrich, redact = self.enrich, self.redactor.event
        keep = self.filter if self.filter.active else None
        for raw in raws:
            rec = decode(raw)
            ev = enrich(rec) if rec is not None else None
            if ev is None or (keep is not None and not keep(ev)):
                continue
            events.append(redact(ev))
        self.stats.received += len(raws)
        self.stats.user_filtered += len(raws) - len(events)
        self.sink.write_many(events)
        self.stats.output += len(events)
        raws.clear()


def run(opts, extra_pids=None, on_ready=None) -> int:
    """Run the stream (privileges checked by cli). extra_pids/on_ready let `demo` trace only its own workload."""
    if opts.pid is not None and not os.path.exists(f"/proc/{opts.pid}"):
        raise TracerError(f"no process with pid {opts.pid}", ExitStatus.ERROR,
                          "check the pid with ps, or use --name to follow processes by name")
    probe = MonitorProbe(
        event_types=opts.event_types,
        proc_filter=ProcessFilter(pid=opts.pid, uid=getattr(opts, "uid", None), name=opts.name,
                                  use_pid_set=extra_pids is not None),
        ringbuf_size=opts.mapsize or DEFAULT_RINGBUF,
        follow_children=extra_pids is not None,
    )
    sink = None
    stop = StopFlag().install()
    try:
        t0 = time.monotonic()
        probe.load()
        if extra_pids is not None:
            probe.add_pids(extra_pids)
        sink = make_sink(opts.format, opts.output)
        clock = WallClock()
        stats = RunStats(probe.counters)
        pipeline = Pipeline(sink, stats, EventFilter(opts.file, opts.library), not opts.no_redact, clock)
        batch: list[bytes] = []
        ring = probe.open_ring(batch.append)
        probe.attach()
        ready("monitor", t0)
        if on_ready is not None:
            on_ready()

        def poll(timeout_ms: int) -> None:
            ring.poll(timeout_ms)
            pipeline.process(batch)
            sink.flush()

        def tick() -> None:
            clock.resync()
            stats.tick(is_verbose())

        run_loop(poll, opts.duration, stop, tick, poll_ms=500)
        if stop.signal:
            log.info("Shutdown requested, cleaning up...")
        # Detach first so nothing new arrives, then drain: every submitted record is handled.
        probe.detach()
        ring.drain()
        pipeline.process(batch)
        stats.report()
        return ExitStatus.OK
    finally:
        stop.restore()
        if sink is not None:
            sink.close()
        probe.close()
