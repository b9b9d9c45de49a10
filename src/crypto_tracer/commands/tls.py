"""tls: TLS plaintext as text or JSON (-m text|json); key logs and pcapng live in tls_secrets.

kernel (tls.bpf.c) -> ring buffer -> decode -> enrich -> capture filter -> text/json sink
"""

from __future__ import annotations

import os
import time
from base64 import b64encode

from crypto_tracer import events
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import is_verbose, log
from crypto_tracer.redact import redact

CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE = 7, 6  # bpf/common.h

DEFAULT_RINGBUF = 8 << 20
SECRET_MODELS = ("keylog", "key", "pcap", "pcapng")


def run(opts) -> int:
    if opts.model in SECRET_MODELS:
        try:
            from crypto_tracer.commands import tls_secrets
        except ModuleNotFoundError as exc:
            if exc.name != "crypto_tracer.commands.tls_secrets":
                raise
            raise TracerError(f"-m {opts.model} is not available in this build", ExitStatus.ERROR,
                              "use -m text or -m json") from None
        return tls_secrets.run(opts)
    return Capture(opts).run()


class ProcessInfo:
    """ppid and exe (redacted unless --no-redact) by pid, read once from /proc (None when gone)."""

    def __init__(self, redact_paths: bool = True):
        self.redact = redact_paths
        self._cache: dict[int, tuple[int | None, str | None]] = {}

    def get(self, pid: int) -> tuple[int | None, str | None]:
        info = self._cache.get(pid)
        if info is None:
            ppid = exe = None
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
            except (OSError, ValueError, IndexError):
                pass
            if exe and self.redact:
                exe = redact(exe)
            info = self._cache[pid] = (ppid, exe)
            if len(self._cache) > 4096:
                self._cache.clear()
        return info


class Capture:
    def __init__(self, opts):
        from crypto_tracer.netfilter import compile_filter

        self.opts = opts
        if opts.model == "json" and opts.format == "summary":
            raise TracerError("-f summary is not available for tls", ExitStatus.BAD_ARGS,
                              "use -f json-stream, json-array or json-pretty")
        self.net_filter = compile_filter(opts.filter)  # bad filters are argument errors: before privileges
        self.text = opts.model == "text"
        self.redact = not opts.no_redact
        self.procs = ProcessInfo(self.redact)
        self.batch: list[bytes] = []
        self.sink = None
        self.stats = None

    def _preflight(self) -> None:
        try:
            from crypto_tracer.preflight import check_bpf_privileges, check_kernel_features
        except ImportError:
            return
        check_bpf_privileges()
        check_kernel_features()

    def _open_sink(self):
        from crypto_tracer.sinks.output import Output

        out = Output(self.opts.output)
        if self.text:
            from crypto_tracer.sinks.text import TextSink

            return TextSink(out, hex_output=self.opts.hex, tsize=self.opts.tsize)
        from crypto_tracer.sinks.json import make_json_sink

        return make_json_sink(self.opts.format, out)

    def run(self) -> int:
        from crypto_tracer.clock import WallClock
        from crypto_tracer.probes.tls import CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS, TlsTracer
        from crypto_tracer.runloop import StopFlag, run as run_loop
        from crypto_tracer.stats import RunStats

        opts = self.opts
        self._preflight()
        tracer = TlsTracer(pids=[opts.pid] if opts.pid else None, uid=opts.uid, name=opts.name,
                           libssl=opts.libssl or (), capture_data=True,
                           mapsize=opts.mapsize or DEFAULT_RINGBUF, max_payload=opts.max_payload)
        stop = StopFlag().install()
        try:
            t0 = time.monotonic()
            self.sink = self._open_sink()
            self.clock = WallClock()
            self.stats = RunStats(tracer.counters)
            for rtype in (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS):
                tracer.on(rtype, self.batch.append)
            tracer.start()
            if not tracer.libraries:
                log.warning("no TLS library found in %s yet; waiting for processes that load one",
                            f"process {opts.pid}" if opts.pid else "running processes")
            log.info("crypto-tracer ready, tls capture started: %d TLS libraries hooked (%.0f ms)",
                     len(tracer.libraries), (time.monotonic() - t0) * 1000)

            def poll(timeout_ms: int) -> None:
                tracer.poll(timeout_ms)
                self.process()

            def tick() -> None:
                self.clock.resync()
                self.stats.tick(is_verbose())

            run_loop(poll, opts.duration, stop, tick)
            if stop.signal:
                log.info("Shutdown requested, cleaning up...")
            tracer.detach()  # nothing new arrives; then every submitted record is handled
            tracer.drain()
            self.process()
            self.stats.report()
            return ExitStatus.OK
        finally:
            stop.restore()
            if self.sink is not None:
                self.sink.close()
            tracer.close()

    def process(self) -> None:
        from crypto_tracer.probes.tls import decode_data, decode_handshake

        raws = self.batch
        if not raws:
            return
        written = 0
        keep = self.net_filter
        for raw in raws:
            rtype = int.from_bytes(raw[8:12], "little")
            if rtype == CT_EV_TLS_DATA:
                rec = decode_data(raw)
            elif rtype == CT_EV_TLS_HANDSHAKE:
                rec = decode_handshake(raw)
            else:
                continue  # key records are for -m keylog/pcapng
            if keep is not None and not keep((rec.local_addr, rec.local_port, rec.remote_addr, rec.remote_port)):
                continue
            self._write(rtype, rec)
            written += 1
        self.stats.received += len(raws)
        self.stats.user_filtered += len(raws) - written
        self.stats.output += written
        raws.clear()
        self.sink.flush()

    def _write(self, rtype: int, rec) -> None:
        ppid, exe = self.procs.get(rec.pid)  # exe already redacted
        # The fields in the order of events.EVENT_FIELDS (built inline: this is the hot path).
        if rtype == CT_EV_TLS_DATA:
            ev = {"event_type": "tls_data", "timestamp": self.clock.iso(rec.ts_ns), "pid": rec.pid, "ppid": ppid,
                  "uid": rec.uid, "process": rec.comm, "exe": exe, "tid": rec.tid, "library": rec.library,
                  "function": rec.function, "direction": rec.direction, "fd": rec.fd,
                  "local_addr": rec.local_addr, "local_port": rec.local_port, "remote_addr": rec.remote_addr,
                  "remote_port": rec.remote_port, "length": rec.length, "offset": rec.offset,
                  "truncated": rec.truncated}
            if self.text:
                captured = min(rec.length, self.opts.max_payload)
                self.sink.write(ev, rec.data, last_chunk=rec.offset + len(rec.data) >= captured)
                return
            ev["data_b64"] = b64encode(rec.data).decode("ascii")
        else:
            common = {"timestamp": self.clock.iso(rec.ts_ns), "pid": rec.pid, "ppid": ppid, "uid": rec.uid,
                      "process": rec.comm, "exe": exe}
            ev = events.make("tls_handshake", common, tid=rec.tid, library=rec.library, role=rec.role, fd=rec.fd,
                             local_addr=rec.local_addr, local_port=rec.local_port, remote_addr=rec.remote_addr,
                             remote_port=rec.remote_port, result=rec.result, tls_version=rec.tls_version,
                             cipher=None)
        self.sink.write(ev)
