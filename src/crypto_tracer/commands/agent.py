"""``crypto-tracer agent``: the long-running sensor. It wires existing layers together:

  monitor's probes and pipeline -> Fanout -> rotated JSON Lines (sinks/rotating, behind a bounded
  queue and a writer thread: sinks/queued) and OTLP logs (sinks/otlp, its own queue and thread);
  the TLS handshake posture (commands/tls/handshake.HandshakeSource, as `tls -m handshake`) -> the same Fanout;
  a periodic snapshot (commands/snapshot.take_snapshot) in its own thread, to JSON files;
  Prometheus metrics read from the same accounting (sinks/metrics); configuration from one TOML
  file (config.py) overridden by flags; SIGHUP reopens files and reloads the configuration.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import signal
import socket
import threading
import time
from collections import Counter

import orjson

from crypto_tracer import __version__, config
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready

LOCK_FILE = ".agent.lock"
SNAPSHOT_DIR = "snapshots"
HANDSHAKE_POLL_MS = 100  # the TC classifier wakes no reader: its ring is read at least this often


# --- checks before privileges (cli calls check()) ----------------------------------------------

def check(opts) -> None:
    path = opts.config
    if path is None and os.path.exists(config.DEFAULT_CONFIG_PATH):
        path = config.DEFAULT_CONFIG_PATH
    opts.config_path = path
    opts.cfg = config.apply_flags(config.load(path), opts)
    if opts.cfg["otlp"]["endpoint"]:
        otlp_class()
    if "cyclonedx" in opts.cfg["snapshot"]["formats"]:
        from crypto_tracer.sinks import cyclonedx

        cyclonedx.check_available()


def otlp_class():
    try:
        from crypto_tracer.sinks.otlp import OtlpSink
    except ModuleNotFoundError as exc:
        if exc.name == "crypto_tracer.sinks.otlp":
            raise TracerError("OTLP export is not part of this build (crypto_tracer.sinks.otlp is missing)",
                              ExitStatus.ERROR, "leave --otlp-endpoint and [otlp] endpoint unset") from None
        raise TracerError(f"OTLP export needs the {exc.name} package", ExitStatus.ERROR,
                          "install crypto-tracer's OpenTelemetry dependencies, or leave the OTLP endpoint unset") \
            from None
    return OtlpSink


# --- what a killed run can leave behind ----------------------------------------------------------

LIBBPF_LEGACY = re.compile(r"^[pr]:(\S+)/(libbpf_(\d+)_\S+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def cleanup_leftovers(output_dir: str) -> list[str]:
    """Remove what a killed run left: TC filters and qdiscs (probes/tc_capture's state files),
    libbpf's legacy k/uprobe events of dead processes (made only where the kernel lacks the
    perf-event probe PMUs; fd-based links, uprobes and tracepoints die with their process),
    half-written files of a rotation or a snapshot. Returns what was removed."""
    removed = []
    from crypto_tracer.probes import tc_capture

    if tc_capture.cleanup_leftovers():
        removed.append("TC capture filters")
    from crypto_tracer.engine.preflight import tracefs_path

    tracefs = tracefs_path()
    for name in ("uprobe_events", "kprobe_events"):
        path = os.path.join(tracefs, name) if tracefs else None
        if not path or not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                lines = f.read().splitlines()
            for line in lines:
                m = LIBBPF_LEGACY.match(line)
                if m and not _alive(int(m.group(3))):
                    with open(path, "a") as f:
                        f.write(f"-:{m.group(1)}/{m.group(2)}\n")
                    removed.append(f"{name} {m.group(2)}")
        except OSError as exc:
            log.debug("cannot clean %s: %s", path, exc.strerror)
    for tmp in glob.glob(os.path.join(output_dir, SNAPSHOT_DIR, "*.tmp")) + \
            glob.glob(os.path.join(output_dir, "*.gz.tmp")):
        os.unlink(tmp)
        removed.append(tmp)
    for what in removed:
        log.info("removed what a previous run left behind: %s", what)
    return removed


def lock_output_dir(output_dir: str) -> int:
    """One agent per output directory (the lock dies with its process, also on kill -9)."""
    try:
        os.makedirs(output_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TracerError(f"cannot use output directory {output_dir}: {exc.strerror}", ExitStatus.ERROR,
                          "choose a writable --output-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TracerError(f"another agent (pid {other}) writes to {output_dir}", ExitStatus.ERROR,
                          "stop it, or give this one another --output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# --- sinks --------------------------------------------------------------------------------------

class EventsFile:
    """[events]: JSON Lines with rotation, behind a bounded queue and a writer thread."""

    def __init__(self, cfg: dict):
        from crypto_tracer.sinks.queued import QueuedSink
        from crypto_tracer.sinks.rotating import RotatingFile

        e = cfg["events"]
        self.file = RotatingFile(os.path.join(cfg["agent"]["output_dir"], e["file"]), self._bytes(e),
                                 e["max_backups"], e["compress"])
        dumps, opt = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        write_lines = self.file.write_lines
        self.queue = QueuedSink("events_file", lambda evs: write_lines([dumps(ev, option=opt) for ev in evs]),
                                cfg["agent"]["queue_size"], self.file.stats)

    def write_many(self, events: list) -> None:
        self.queue.write_many(events)

    def stats(self) -> dict:
        return self.queue.stats()

    @staticmethod
    def _bytes(e: dict) -> int:
        return max(int(e["max_size_mb"] * 1024 * 1024), 1)

    def reload(self, cfg: dict) -> None:
        """SIGHUP: new knobs, the file opened again (maybe moved away, maybe in a new directory)."""
        e = cfg["events"]
        path = os.path.join(cfg["agent"]["output_dir"], e["file"])

        def apply():
            self.file.configure(self._bytes(e), e["max_backups"], e["compress"])
            self.file.reopen(path)
        self.queue.control(apply)

    def close(self) -> None:
        self.queue.close()
        self.file.close()


class OtlpOutput:
    """[otlp]: the OTLP sink (its own queue and thread); events handed over one by one."""

    def __init__(self, cfg: dict):
        o = cfg["otlp"]
        tls = {k: o[k] for k in ("ca_file", "cert_file", "key_file") if o[k]}
        self.endpoint = o["endpoint"]
        self.sink = otlp_class()(o["endpoint"], protocol=o["protocol"], headers=dict(o["headers"]) or None,
                                 resource={"service.name": o["service_name"], "service.version": __version__,
                                           "host.name": socket.gethostname()},
                                 queue_size=cfg["agent"]["queue_size"], **tls)
        self.capacity = cfg["agent"]["queue_size"]

    def write_many(self, events: list) -> None:
        write = self.sink.write
        for ev in events:
            write(ev)

    def stats(self) -> dict:
        s = self.sink.stats()
        return {"written": s["sent"], "dropped": {"queue_full": s["dropped"], "export_failed": s.get("failed", 0)},
                "queued": s["queued"], "capacity": self.capacity}

    def close(self) -> None:
        self.sink.close()


class Fanout:
    """The pipeline's sink: counts events by type, hands each batch to every output."""

    def __init__(self):
        self.outputs: dict[str, object] = {}  # name -> object with write_many(events)
        self.by_type: Counter = Counter()
        self.libraries: set[str] = set()

    def write_many(self, events: list) -> None:
        if not events:
            return
        by_type = self.by_type
        by_type.update(ev["event_type"] for ev in events)
        if "lib_load" in by_type:
            self.libraries.update(ev["library"] for ev in events if ev["event_type"] == "lib_load")
        for out in list(self.outputs.values()):
            out.write_many(events)

    def flush(self) -> None:
        pass  # the outputs' writer threads write on their own


class Handshakes:
    """[handshake]: tls -m handshake's source; its events (redacted) go to the Fanout in batches, counted by
    TLS version and by whether the key exchange is post-quantum (ML-KEM hybrid)."""

    def __init__(self, fanout: Fanout, clock, redact: bool):
        from crypto_tracer.commands.tls.handshake import HandshakeSource
        from crypto_tracer.pipeline.redact import Redactor

        self.fanout = fanout
        self.redactor = Redactor(redact)
        self.batch: list[dict] = []
        self.by_kind: Counter = Counter()  # (tls_version, post_quantum) -> handshakes
        self.source = HandshakeSource(self.batch.append, clock)

    def start(self) -> bool:
        """False (one warning) when the classifier cannot run here: the agent goes on without it."""
        from crypto_tracer.engine import preflight as pf

        caps = pf.effective_caps()
        try:
            if not (caps >> pf.CAP_NET_ADMIN & 1 or caps >> pf.CAP_SYS_ADMIN & 1):
                raise TracerError("its TC classifier needs CAP_NET_ADMIN", ExitStatus.NO_PRIVILEGES)
            self.source.start()
        except TracerError as exc:
            log.warning("TLS handshake posture is off: %s", str(exc).splitlines()[0])
            self.source.close()
            self.source = None
            return False
        return True

    def drain(self, follow_links: bool = True) -> None:
        if self.source is None:
            return
        self.source.drain()
        if follow_links:
            self.source.follow_links()
        if self.batch:
            events = [self.redactor.event(ev) for ev in self.batch]
            self.batch.clear()
            for ev in events:
                pq = ev["not_quantum_safe_key_exchange"]
                self.by_kind[(ev["tls_version"] or "unknown", "unknown" if pq is None else str(not pq).lower())] += 1
            self.fanout.write_many(events)

    def stats(self) -> dict:
        k = self.source.counters() if self.source is not None else {"seen": 0, "dropped": 0, "images_dropped": 0}
        return {"active": self.source is not None, "events": sum(self.by_kind.values()),
                "by_kind": [{"tls_version": v, "post_quantum": pq, "count": n} for (v, pq), n in sorted(self.by_kind.items())],
                "packets_seen": k["seen"], "packets_dropped": k["dropped"], "process_records_dropped": k["images_dropped"],
                "attached": self.source.attached() if self.source is not None else 0}

    def detach(self) -> None:
        if self.source is not None:
            self.source.detach()

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


# --- periodic snapshot --------------------------------------------------------------------------

def _without_cbom_fields(doc: dict) -> dict:
    """The snapshot document as `snapshot` writes it: without what only the CBOM uses."""
    out = dict(doc)
    out["processes"] = [dict(p, open_crypto_files=[{k: v for k, v in f.items()
                                                    if k not in ("certificates", "public_key_sha256")}
                                                   for f in p["open_crypto_files"]]) for p in doc["processes"]]
    return out


class Snapshots:
    """[snapshot]: take_snapshot() in a thread every interval, each to its own JSON file (0600)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.count = self.failed = 0
        self.last: dict = {"time": None, "duration": 0.0, "processes": 0, "libraries": 0, "files": 0}
        self.next_due = time.monotonic()
        self._thread: threading.Thread | None = None
        self.write_errors: dict[str, int] = {}

    def tick(self) -> None:
        s = self.cfg["snapshot"]
        if not s["enabled"] or time.monotonic() < self.next_due:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self.next_due = time.monotonic() + s["interval"]
        self._thread = threading.Thread(target=self._take, name="snapshot", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        from crypto_tracer.commands.snapshot import take_snapshot

        cfg = self.cfg
        formats = list(cfg["snapshot"]["formats"])
        started, wall = time.monotonic(), time.time()
        try:
            doc = take_snapshot(redact_paths=cfg["agent"]["redact"], cbom="cyclonedx" in formats)
            files = {}
            if "cyclonedx" in formats:
                from crypto_tracer.sinks import cyclonedx

                files[".cdx.json"] = cyclonedx.build(doc).encode() + b"\n"
            if "json" in formats:
                files[".json"] = orjson.dumps(_without_cbom_fields(doc) if "cyclonedx" in formats else doc,
                                              option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        except Exception as exc:  # a snapshot must never stop the agent
            self.failed += 1
            log.warning("snapshot failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
            return
        directory = os.path.join(cfg["agent"]["output_dir"], SNAPSHOT_DIR)
        stem = time.strftime("snapshot-%Y%m%dT%H%M%SZ", time.gmtime(wall))
        for suffix, data in files.items():
            if not self._write(os.path.join(directory, stem + suffix), data):
                self.failed += 1
                return
        for suffix in files:
            self._prune(directory, suffix)
        summary = doc["summary"]
        self.last = {"time": wall, "duration": time.monotonic() - started,
                     "processes": summary["total_processes"], "libraries": summary["total_libraries"],
                     "files": summary["total_files"]}
        self.count += 1
        log.debug("snapshot %s: %d processes use crypto", stem, summary["total_processes"])

    def _write(self, path: str, data: bytes) -> bool:
        """path.tmp then renamed: a reader never sees half a snapshot; False (counted) when it fails."""
        from crypto_tracer.sinks.rotating import REASON_DISK_FULL, REASON_IO

        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            finally:
                os.close(fd)
            os.replace(path + ".tmp", path)
            return True
        except OSError as exc:
            reason = REASON_DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else REASON_IO
            self.write_errors[reason] = self.write_errors.get(reason, 0) + 1
            log.warning("snapshot %s not written: %s", path, exc.strerror or exc)
            try:
                os.unlink(path + ".tmp")
            except OSError:
                pass
            return False

    def _prune(self, directory: str, suffix: str) -> None:
        files = sorted(f for f in glob.glob(os.path.join(directory, "snapshot-*" + suffix))
                       if suffix == ".cdx.json" or not f.endswith(".cdx.json"))
        for old in files[:max(len(files) - self.cfg["snapshot"]["keep"], 0)]:
            try:
                os.unlink(old)
            except OSError:
                pass

    def stats(self) -> dict:
        return {"count": self.count, "failed": self.failed, "last_time": self.last["time"],
                "duration": self.last["duration"], "processes": self.last["processes"],
                "libraries": self.last["libraries"], "files": self.last["files"]}

    def join(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


# --- the agent ----------------------------------------------------------------------------------

class Agent:
    def __init__(self, opts):
        self.opts = opts
        self.cfg = opts.cfg
        self.reloads = 0
        self._hup = False
        self.outputs: dict[str, object] = {}
        self.fanout = Fanout()
        self.snapshots = Snapshots(self.cfg)
        self.metrics = None
        self._sink_drops: dict[str, int] = {}
        self._drop_warned = 0.0
        self.probe = self.stats = self.level = None
        self.handshakes: Handshakes | None = None

    # the one accounting: the final report and every /metrics scrape read it
    def accounting(self) -> dict:
        sinks = {name: out.stats()
                 for name, out in list(self.outputs.items())}
        sinks["snapshot"] = {"written": self.snapshots.count, "dropped": dict(self.snapshots.write_errors),
                             "queued": 0, "capacity": None}
        hs = self.handshakes.stats() if self.handshakes is not None else \
            {"active": False, "events": 0, "by_kind": [], "packets_seen": 0, "packets_dropped": 0,
             "process_records_dropped": 0, "attached": 0}
        return {
            "kernel": self.stats.kernel(),
            "received": self.stats.received,
            "filtered_user": self.stats.user_filtered,
            "output": self.stats.output,
            "events_by_type": dict(self.fanout.by_type),
            "sinks": sinks,
            "ring_buffer": {"fill": self.level.fill() if self.level else 0.0,
                            "size": self.cfg["agent"]["ring_buffer_size"]},
            "handshakes": hs,  # events_by_type["tls_handshake"] == hs["events"]; not in output (monitor's)
            "probes_attached": len(self.probe.obj.links) + hs["attached"],
            "libraries_hooked": 0,  # the handshake posture reads packets: no library is hooked
            "libraries_seen": len(self.fanout.libraries),
            "snapshot": self.snapshots.stats(),
            "reloads": self.reloads,
        }

    def _warn_sink_drops(self) -> None:
        """Queue-full drops of a sink: one warning at most every 5 s (disk errors warn in the sink)."""
        now = time.monotonic()
        if now - self._drop_warned < 5:
            return
        for name, out in list(self.outputs.items()):
            s = out.stats()
            n = s["dropped"].get("queue_full", 0)
            if n > self._sink_drops.get(name, 0):
                log.warning("sink %s cannot keep up: %d events dropped (queue full)", name,
                            n - self._sink_drops.get(name, 0))
                self._sink_drops[name] = n
                self._drop_warned = now

    def _open_outputs(self, cfg: dict) -> None:
        if cfg["events"]["enabled"] and "events_file" not in self.outputs:
            self.outputs["events_file"] = EventsFile(cfg)
        if cfg["otlp"]["endpoint"] and "otlp" not in self.outputs:
            self.outputs["otlp"] = OtlpOutput(cfg)
        self.fanout.outputs = self.outputs

    def _on_hup(self, _signum, _frame) -> None:
        self._hup = True

    def reload(self) -> None:
        """SIGHUP: read the configuration again (flags still win), reopen files, apply what can be applied
        live; a bad file keeps the running configuration."""
        self._hup = False
        self.reloads += 1
        try:
            new = config.apply_flags(config.load(self.opts.config_path), self.opts)
        except TracerError as exc:
            log.error("reload: %s; keeping the running configuration", str(exc).splitlines()[0])
            new = self.cfg
        for key in config.restart_needed(self.cfg, new):
            log.warning("reload: %s changed; it takes effect at the next start", key)
        old = self.cfg
        old_otlp = dict(old["otlp"])
        for section, keys in config.SCHEMA.items():  # in place: the snapshot thread reads the same dict
            for name, key in keys.items():
                if key.live:
                    old[section][name] = new[section][name]
        cfg = old
        os.makedirs(cfg["agent"]["output_dir"], mode=0o700, exist_ok=True)
        events = self.outputs.get("events_file")
        if events is not None and not cfg["events"]["enabled"]:
            del self.outputs["events_file"]
            events.close()
        elif events is not None:
            events.reload(cfg)
        otlp = self.outputs.get("otlp")
        if otlp is not None and old_otlp != cfg["otlp"]:
            del self.outputs["otlp"]
            otlp.close()
        try:
            self._open_outputs(cfg)
        except TracerError as exc:
            log.error("reload: %s", str(exc).splitlines()[0])
        log.info("configuration reloaded%s, files reopened",
                 f" from {self.opts.config_path}" if self.opts.config_path else "")

    def run(self) -> int:
        from crypto_tracer.commands.monitor import Pipeline
        from crypto_tracer.engine.ringread import RingLevel
        from crypto_tracer.pipeline.clock import WallClock
        from crypto_tracer.pipeline.filters.events import EventFilter
        from crypto_tracer.pipeline.runloop import StopFlag, run as run_loop
        from crypto_tracer.pipeline.stats import RunStats
        from crypto_tracer.probes.monitor import MonitorProbe, ProcessFilter

        cfg = self.cfg
        a = cfg["agent"]
        t0 = time.monotonic()
        lock_fd = lock_output_dir(a["output_dir"])
        cleanup_leftovers(a["output_dir"])
        stop = StopFlag().install()
        old_hup = signal.signal(signal.SIGHUP, self._on_hup)
        self.probe = probe = MonitorProbe(event_types=tuple(cfg["events"]["event_types"]), proc_filter=ProcessFilter(),
                                          ringbuf_size=a["ring_buffer_size"])
        ring = None
        try:
            probe.load()
            self.stats = stats = RunStats(probe.counters)
            self._open_outputs(cfg)
            clock = WallClock()
            pipeline = Pipeline(self.fanout, stats, EventFilter(), a["redact"], clock)
            batch: list[bytes] = []
            ring = probe.open_ring(batch.append)
            events_map = probe.obj.map("events")
            self.level = RingLevel(events_map.fd, events_map.max_entries)
            probe.attach()
            if cfg["handshake"]["enabled"]:
                self.handshakes = Handshakes(self.fanout, clock, a["redact"])
                self.handshakes.start()
            hs_poll = self.handshakes is not None and self.handshakes.source is not None
            if cfg["metrics"]["address"]:
                from crypto_tracer.sinks.metrics import MetricsServer

                host, port = config.parse_address(cfg["metrics"]["address"])
                self.metrics = MetricsServer(host, port, self.accounting)
                log.info("metrics on http://%s/metrics", self.metrics.address)
            self.snapshots.tick()
            ready("agent", t0, f"writing to {a['output_dir']}")

            def poll(timeout_ms: int) -> None:
                ring.poll(min(timeout_ms, HANDSHAKE_POLL_MS) if hs_poll else timeout_ms)
                pipeline.process(batch)
                if hs_poll:
                    self.handshakes.drain()

            def tick() -> None:
                clock.resync()
                stats.tick(False)
                if self._hup:
                    self.reload()
                self.snapshots.tick()
                self._warn_sink_drops()

            run_loop(poll, a["duration"] or None, stop, tick, poll_ms=250)
            if stop.signal:
                log.info("Shutdown requested, cleaning up...")
            probe.detach()
            if self.handshakes is not None:
                self.handshakes.detach()
            ring.drain()
            pipeline.process(batch)
            if self.handshakes is not None:
                self.handshakes.drain(follow_links=False)
                if self.handshakes.source is not None:
                    self.handshakes.source.warn_losses()
            self.snapshots.join()
            for out in list(self.outputs.values()):
                out.close()
            acc = self.accounting()
            if self.metrics is not None:
                self.metrics.final(acc)  # every scrape from now on: exactly these figures
            stats.report()
            log.info("Final accounting: %s", orjson.dumps(acc).decode())
            if self.metrics is not None:
                wait = cfg["metrics"]["final_scrape_wait"]
                if wait > 0 and not self.metrics.final_scraped.wait(wait):
                    log.warning("metrics: no scrape of the final figures within %s s", wait)
            return ExitStatus.OK
        finally:
            stop.restore()
            signal.signal(signal.SIGHUP, old_hup)
            for out in list(self.outputs.values()):
                out.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.level is not None:
                self.level.close()
            if self.handshakes is not None:
                self.handshakes.close()
            probe.close()
            os.close(lock_fd)


def run(opts) -> int:
    return Agent(opts).run()
