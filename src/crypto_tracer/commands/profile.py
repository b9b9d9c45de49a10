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

from crypto_tracer import inventory
from crypto_tracer.clock import now_iso
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready

PROFILE_VERSION = "1.1"
DEFAULT_RINGBUF = 4 << 20  # profile events are few; monitor uses the same default
SOCKET_SAMPLE_SECONDS = 0.2
TLS_LIBRARY_CATEGORIES = {"handshake", "tls_read", "tls_write", "session", "context"}


class ProcessProfile:
    """The aggregation for one pid: fed with event dicts (events.py schema) and samples."""

    def __init__(self, pid: int, info: dict | None, started_before: bool):
        self.pid = pid
        self.process = info or {"pid": pid, "ppid": None, "name": None, "exe": None, "root": None, "mnt_ns": None,
                                "cmdline": None, "uid": None, "gid": None, "start_time": None}
        self.started_before_profile = started_before
        self.libraries: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.peers: dict[tuple, dict] = {}
        self.listening: dict[tuple, dict] = {}
        self.events = 0
        self.execs = 0
        self.exit: dict | None = None

    # -- inputs --
    def add_mapped_libraries(self, libs: list[dict], when: str, at_start: bool) -> None:
        for lib in libs:
            if lib["path"] not in self.libraries:
                self.libraries[lib["path"]] = {"name": lib["name"], "path": lib["path"], "version": lib["version"],
                                               "first_seen": when, "mapped_before_profile": at_start}

    def add_event(self, ev: dict) -> None:
        self.events += 1
        kind = ev["event_type"]
        if self.process["name"] is None:  # gone before /proc could be read: what the event knows
            self.process.update(name=ev["process"], ppid=ev["ppid"], uid=ev["uid"], exe=ev.get("exe"),
                                root=ev.get("root"), mnt_ns=ev.get("mnt_ns"))
        if kind == "file_open":
            f = self.files.get(ev["file"])
            if f is None:
                f = self.files[ev["file"]] = {"path": ev["file"], "type": ev["file_type"], "access_count": 0,
                                              "failed_count": 0, "first_access": ev["timestamp"],
                                              "last_access": None, "flags": []}
            f["access_count"] += 1
            f["last_access"] = ev["timestamp"]
            if ev["result"] is not None and ev["result"] < 0:
                f["failed_count"] += 1
            if ev["flags"] and ev["flags"] not in f["flags"]:
                f["flags"].append(ev["flags"])
        elif kind == "lib_load":
            if ev["library"] not in self.libraries:
                self.libraries[ev["library"]] = {"name": ev["library_name"], "path": ev["library"],
                                                 "version": ev["version"], "first_seen": ev["timestamp"],
                                                 "mapped_before_profile": False}
        elif kind == "process_exec":
            self.execs += 1
            self.process.update({k: ev[k] for k in ("ppid", "uid", "exe", "root", "mnt_ns", "cmdline")
                                 if ev.get(k) is not None})
            self.process["name"] = ev["process"]
        elif kind == "process_exit":
            self.exit = {"time": ev["timestamp"], "exit_code": ev["exit_code"], "signal": ev["signal"]}

    def add_sockets(self, sockets: list[dict], when: str) -> None:
        for s in sockets:
            if s["state"] == "LISTEN":
                key = (s["local_addr"], s["local_port"])
                self.listening.setdefault(key, {"local_addr": s["local_addr"], "local_port": s["local_port"],
                                                "first_seen": when})
                continue
            key = (s["remote_addr"], s["remote_port"], s["local_addr"], s["local_port"])
            peer = self.peers.get(key)
            if peer is None:
                peer = self.peers[key] = {**{k: s[k] for k in ("remote_addr", "remote_port", "local_addr",
                                                              "local_port")}, "first_seen": when}
            peer["last_seen"] = when
            peer["state"] = s["state"]

    # -- output --
    def document(self, api_calls: list[dict], redact, redact_text, ended_early: bool,
                 connections: list[dict] | None = None) -> dict:
        process = dict(self.process)
        process["exe"] = redact(process.get("exe"))
        process["root"] = redact(process.get("root"))
        process["cmdline"] = redact_text(process.get("cmdline"))
        libraries = [dict(lib, path=redact(lib["path"])) for lib in self.libraries.values()]
        files = [self._file_entry(f, redact) for f in self.files.values()]
        calls = list(api_calls)
        tls = tls_summary(calls)
        tls["connections"] = connections or []
        tls["peers"] = sorted(self.peers.values(), key=lambda p: p["first_seen"])
        tls["listening"] = sorted(self.listening.values(), key=lambda p: (p["local_addr"], p["local_port"]))
        return {
            "process": process,
            "started_before_profile": self.started_before_profile,
            "partial": self.exit is not None or ended_early,
            "exit": self.exit,
            "libraries": libraries,
            "files_accessed": files,
            "api_calls": calls,
            "tls": tls,
            "statistics": {
                "total_events": self.events,
                "execs": self.execs,
                "libraries_loaded": len(libraries),
                "files_accessed": len(files),
                "file_opens": sum(f["access_count"] for f in files),
                "api_calls_made": sum(c["count"] for c in calls),
                "api_functions": len({c["function_name"] for c in calls}),
            },
        }


    def _file_entry(self, f: dict, redact) -> dict:
        """The file with snapshot's certificate/key insight (read through the process's root
        while it runs, else from here)."""
        from crypto_tracer import certinfo

        entry = dict(f, path=redact(f["path"]))
        read_path = inventory.root_path(self.pid, f["path"]) if self.exit is None else f["path"]
        insight = certinfo.describe(read_path, f["type"]) or certinfo.describe(f["path"], f["type"])
        if insight is not None:
            entry["certificate" if f["type"] == "certificate" else "key"] = insight
        return entry


def tls_summary(calls: list[dict]) -> dict:
    """Handshakes (SSL_do_handshake returning 1, which SSL_connect/SSL_accept go through), SSL
    objects created, and the plaintext bytes SSL_read*/SSL_write* returned, all from the kernel."""
    def total(category, field="count"):
        return sum(c.get(field, 0) for c in calls if c["category"] == category)

    return {"handshakes": total("handshake"), "sessions_created": total("session"),
            "contexts_created": total("context"), "read_calls": total("tls_read"),
            "bytes_read": total("tls_read", "bytes"), "write_calls": total("tls_write"),
            "bytes_written": total("tls_write", "bytes")}


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
        from crypto_tracer.clock import WallClock
        from crypto_tracer.enrich import Enricher
        from crypto_tracer.probes.api import ApiProbe
        from crypto_tracer.probes.monitor import MonitorProbe, ProcessFilter, decode
        from crypto_tracer.runloop import StopFlag, run as run_loop

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
            section.add_sockets(tables.sockets(pid, inventory.socket_inodes(pid)), when)
            libs = inventory.crypto_libraries(pid)
            if any(lib["path"] not in section.libraries for lib in libs):
                section.add_mapped_libraries(libs, when, False)
                self.attach_api(pid)

    def document(self, started_at: str, duration: float, ended_early: bool) -> dict:
        if self.opts.no_redact:
            def redact(p):
                return p
            redact_text = redact
        else:
            from crypto_tracer.redact import redact, redact_text
        counts, connections = self.api.counts(), self.api.connections()
        sections = [s.document(counts.get(pid, []), redact, redact_text, ended_early, connections.get(pid))
                    for pid, s in sorted(self.sections.items())
                    if s.process["name"] is not None or s.events or pid in counts or pid in connections]
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
            out.write(render_summary(doc).encode())
            out.flush()
            out.close()
        else:
            from crypto_tracer.sinks.json import dump_document

            dump_document(doc, self.opts.format, out)
        if not doc["processes"]:
            log.warning("No process matched: the document has no process sections")



def render_summary(doc: dict) -> str:
    """The -f summary digest of a profile."""
    lines = ["Crypto Profile Summary", f"Generated: {doc['generated_at'][:19].replace('T', ' ')} UTC",
             f"Duration: {doc['duration_seconds']:.1f} s{' (partial)' if doc['partial'] else ''}",
             f"Processes: {len(doc['processes'])}", ""]
    for s in doc["processes"]:
        p = s["process"]
        lines.append(f"PID {p['pid']}: {p['name']} ({p['exe']})")
        libs = ", ".join(f"{lib['name']} {lib['version'] or ''}".strip() for lib in s["libraries"])
        files = ", ".join(f"{f['path']} x{f['access_count']}" for f in s["files_accessed"])
        lines.append(f"  Libraries: {libs or '-'}")
        lines.append(f"  Files: {files or '-'}")
        t = s["tls"]
        lines.append(f"  TLS: {t['handshakes']} handshakes, {t['bytes_read']} bytes read, "
                     f"{t['bytes_written']} bytes written, {len(t['peers'])} peers")
        lines.append("  API calls:")
        for c in s["api_calls"][:20]:
            alg = f" [{c['algorithm']}]" if c["algorithm"] else ""
            lines.append(f"    {c['count']:>10}  {c['function_name']}{alg}")
        if s["exit"]:
            lines.append(f"  Exited: code {s['exit']['exit_code']} signal {s['exit']['signal']}")
        lines.append("")
    return "\n".join(lines)


def run(opts) -> int:
    from crypto_tracer.engine.preflight import preflight

    preflight()
    return Profiler(opts).run()
