"""``crypto-tracer profile``: everything one process (or every process named NAME) did with
cryptography over a period, as one document with a section per process.

Sources, each for the profiled pids only:
- monitor.bpf.c (the lead's MonitorProbe): exec/exit, crypto file opens, crypto library loads;
  with --follow-children the kernel adds every fork of a profiled process to its pid set;
- api.bpf.c (ApiProbe): crypto API calls counted in a kernel map, uprobes attached per pid;
- api.bpf.c also counts the TCP connections the profiled pids make (SYN_SENT) and accept
  (accept/accept4 returns), by peer, in the kernel: exact, however short they are;
- /proc: the process facts, the libraries mapped before the profile started, and the open
  TCP sockets, sampled every 200 ms (their states; connections shorter than that are missed).
"""

from __future__ import annotations

import os
import time

from crypto_tracer.host import inventory, proc
from crypto_tracer.pipeline.clock import now_iso
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready
from crypto_tracer.pipeline.profile import PROFILE_VERSION, ProcessProfile

DEFAULT_RINGBUF = 4 << 20  # profile events are few; monitor uses the same default
SOCKET_SAMPLE_SECONDS = 0.2


class Profiler:
    def __init__(self, opts):
        self.opts = opts
        self.follow = bool(opts.follow_children)
        self.sections: dict[int, ProcessProfile] = {}
        self.own_pid = os.getpid()
        self.monitor = None
        self.api = None
        self.tcp_sample_at = 0.0
        self.interrupted = False

    # -- targets --
    def initial_pids(self) -> list[int]:
        if self.opts.pid is not None:
            if not os.path.exists(f"/proc/{self.opts.pid}"):
                raise TracerError(f"Process {self.opts.pid} not found", ExitStatus.ERROR,
                                  "check the pid with 'ps', or use --name NAME to wait for a process")
            return [self.opts.pid]
        pids = inventory.pids_named(self.opts.name, exclude=self.own_pid)
        if not pids:
            log.info("No process named '%s' yet: waiting for one (up to %d s)", self.opts.name, self.opts.duration)
        return pids

    def track(self, pid: int, started_before: bool = False) -> ProcessProfile | None:
        if pid in self.sections or pid == self.own_pid:
            return self.sections.get(pid)
        section = ProcessProfile(pid, inventory.process_info(pid), started_before)
        self.sections[pid] = section
        section.add_mapped_libraries(inventory.crypto_libraries(pid), now_iso(), started_before)
        if self.follow:
            self.monitor.add_pids([pid])
        self.attach_api(pid)
        log.debug("profiling pid %d (%s)", pid, section.process.get("name"))
        return section

    def attach_api(self, pid: int) -> None:
        try:
            self.api.attach(pid)
        except TracerError as exc:
            log.debug("api probes for pid %d: %s", pid, exc)

    # -- the run --
    def run(self) -> int:
        from crypto_tracer.pipeline.clock import WallClock
        from crypto_tracer.pipeline.enrich import Enricher
        from crypto_tracer.probes.api import ApiProbe
        from crypto_tracer.probes.monitor import MonitorProbe, ProcessFilter, decode
        from crypto_tracer.pipeline.runloop import StopFlag, run as run_loop

        opts = self.opts
        pids = self.initial_pids()
        if self.follow:  # the kernel follows forks of pid-set members
            proc_filter = ProcessFilter(use_pid_set=True)
        else:
            proc_filter = ProcessFilter(pid=opts.pid, name=opts.name)
        stop = StopFlag().install()
        t0 = time.monotonic()
        try:
            self.monitor = MonitorProbe(proc_filter=proc_filter, ringbuf_size=opts.mapsize or DEFAULT_RINGBUF,
                                        follow_children=self.follow)
            self.api = ApiProbe()
            self.monitor.load()
            self.api.load()
            clock = WallClock()
            enrich = Enricher(clock)
            batch: list[bytes] = []
            ring = self.monitor.open_ring(batch.append)
            self.monitor.attach()
            for pid in pids:
                self.track(pid, started_before=True)
            started, started_at = time.monotonic(), now_iso()  # the profile covers from here on
            ready("profile", t0, "profiling %s for %d s, %d API probes attached" % (
                f"pid {opts.pid}" if opts.pid else f"processes named '{opts.name}'", opts.duration, self.api.links))

            def handle(raws: list[bytes]) -> None:
                for raw in raws:
                    rec = decode(raw)
                    ev = enrich(rec) if rec is not None else None
                    if ev is not None:
                        self.on_event(ev)
                raws.clear()

            def poll(timeout_ms: int) -> None:
                ring.poll(timeout_ms)
                handle(batch)
                self.sample()
                if opts.pid is not None and self.sections and all(s.exit for s in self.sections.values()):
                    stop.stopped = True  # every profiled process has exited: the document is complete

            def tick() -> None:
                clock.resync()
                if opts.name and self.follow:  # new NAME processes are not in the pid set yet
                    for pid in inventory.pids_named(opts.name, exclude=self.own_pid):
                        self.track(pid)

            run_loop(poll, opts.duration, stop, tick)
            duration = time.monotonic() - started
            self.interrupted = stop.signal is not None
            log.debug("profile ended after %.2f s, collecting", duration)
            self.monitor.detach()
            ring.drain()
            handle(batch)
            doc = self.document(started_at, duration, self.interrupted)
            self.write(doc)  # before the slow part: detaching uprobes
            log.debug("document written")
        finally:
            stop.restore()
            for probe in (self.monitor, self.api):
                if probe is not None:
                    probe.close()
            log.debug("probes detached")
        return ExitStatus.OK

    def on_event(self, ev: dict) -> None:
        pid = ev["pid"]
        section = self.sections.get(pid) or self.track(pid)  # e.g. a fork gone before sample() saw it
        if section is None:
            return
        section.add_event(ev)
        if ev["event_type"] == "process_exec":
            info = inventory.process_info(pid)
            if info:
                section.process.update(info)
            self.attach_api(pid)  # a statically linked exe (node) is hooked right away
        elif ev["event_type"] == "lib_load" and ev["library_name"] in ("libssl", "libcrypto"):
            self.attach_api(pid)

    def sample(self) -> None:
        """Every 200 ms: new pid-set members (forks), late libraries, and the TCP peers."""
        now = time.monotonic()
        if now < self.tcp_sample_at:
            return
        self.tcp_sample_at = now + SOCKET_SAMPLE_SECONDS
        if self.follow:
            for pid in self.monitor.pid_set():
                self.track(pid)
        when = now_iso()
        tables = inventory.TcpTables()
        for pid, section in self.sections.items():
            if section.exit:
                continue
            if not os.path.exists(f"/proc/{pid}"):  # exited before the exit tracepoint was attached
                section.exit = {"time": when, "exit_code": None, "signal": None}
                continue
            section.add_sockets(tables.sockets(pid, proc.socket_inodes(pid)), when)
            libs = inventory.crypto_libraries(pid)
            if any(lib["path"] not in section.libraries for lib in libs):
                section.add_mapped_libraries(libs, when, False)
                self.attach_api(pid)

    def document(self, started_at: str, duration: float, ended_early: bool) -> dict:
        from crypto_tracer.pipeline.redact import Redactor

        counts, connections = self.api.counts(), self.api.connections()
        sections = [s.document(counts.get(pid, []), ended_early, connections.get(pid))
                    for pid, s in sorted(self.sections.items())
                    if s.process["name"] is not None or s.events or pid in counts or pid in connections]
        redactor = Redactor(not self.opts.no_redact)  # the sections are built: redact, then the sink
        for section in sections:
            redactor.entry(section["process"])
            redactor.entry(section, "libraries", "files_accessed")
        # (a forked pid that vanished before /proc was read and left no trace is not reported)
        monitor = self.monitor.counters()
        api = self.api.counters()
        return {
            "profile_version": PROFILE_VERSION,
            "generated_at": now_iso(),
            "started_at": started_at,
            "duration_seconds": round(duration, 3),
            "target": {"pid": self.opts.pid, "name": self.opts.name, "follow_children": self.follow},
            "partial": any(s["partial"] for s in sections),
            "interrupted": self.interrupted,
            "processes": sections,
            "statistics": {
                "processes": len(sections),
                "total_events": sum(s["statistics"]["total_events"] for s in sections),
                "api_calls_made": sum(s["statistics"]["api_calls_made"] for s in sections),
                "events_dropped": monitor.get("dropped", 0),
                "api_counts_dropped": api.get("dropped", 0),
                "api_probes_attached": self.api.links,
                "api_probes_failed": len(self.api.failed),
            },
        }

    def write(self, doc: dict) -> None:
        from crypto_tracer.sinks.output import Output

        out = Output(self.opts.output)
        if self.opts.format == "summary":
            from crypto_tracer.sinks.profile_summary import render_summary

            out.write(render_summary(doc).encode())
            out.flush()
            out.close()
        else:
            from crypto_tracer.sinks.json import dump_document

            dump_document(doc, self.opts.format, out)
        if not doc["processes"]:
            log.warning("No process matched: the document has no process sections")



def run(opts) -> int:
    return Profiler(opts).run()
