"""tls -m handshake: one tls_handshake event per TLS handshake on the host, from packets alone
(no library hooks, so any implementation): tls_hello.bpf.c's TC classifier -> its own ring ->
pipeline/hello_facts.py -> pipeline/tls_handshakes.py (owner process from
probes/socket_owner.py, JA4, flags) -> JSON events, or with -f summary one table at the end.
"""

from __future__ import annotations

import time

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready
from crypto_tracer.probes.common import CT_EV_TLS_PROCESS, TYPE_SPAN

_T0, _T1 = TYPE_SPAN
_PROCESS = CT_EV_TLS_PROCESS.to_bytes(4, "little")

POLL_MS = 50  # the classifier wakes no reader: its ring is read on this timer


def check(opts) -> None:
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter

    compile_connection_filter(opts.filter)  # a bad filter is an argument error


def open_sink(opts):
    from crypto_tracer.sinks.output import Output

    out = Output(opts.output)
    if opts.format == "summary":
        from crypto_tracer.pipeline.tls_handshakes import HandshakeSummary

        return HandshakeSummary(out)
    from crypto_tracer.sinks.json import make_json_sink

    return make_json_sink(opts.format, out)


def run(opts) -> int:
    from crypto_tracer.engine import ring_reader
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter
    from crypto_tracer.pipeline.hello_facts import HelloFacts
    from crypto_tracer.pipeline.redact import Redactor
    from crypto_tracer.pipeline.runloop import StopFlag
    from crypto_tracer.pipeline.runloop import run as run_loop
    from crypto_tracer.pipeline.tls_handshakes import handshake_event
    from crypto_tracer.probes.socket_owner import SocketOwners
    from crypto_tracer.probes.tls_hello import HelloCapture, HelloUnavailable

    conn_filter = compile_connection_filter(opts.filter)
    redactor = Redactor(not opts.no_redact)
    stop = StopFlag().install()
    capture = owners = sink = reader = None
    try:
        t0 = time.monotonic()
        clock = WallClock()
        sink = open_sink(opts)

        def completed(facts) -> None:
            ev = handshake_event(facts, owners, clock)
            if conn_filter is not None and not conn_filter((ev["local_addr"], ev["local_port"], ev["remote_addr"],
                                                            ev["remote_port"])):
                return
            if (opts.pid is not None and ev["pid"] != opts.pid) or (opts.uid is not None and ev["uid"] != opts.uid) \
                    or (opts.name and opts.name.lower() not in (ev["process"] or "").lower()):
                return
            sink.write(redactor.event(ev))

        facts = HelloFacts(completed=completed)
        capture = HelloCapture(None)
        try:
            capture.start()
        except HelloUnavailable as exc:
            raise TracerError(f"the TC handshake classifier cannot run: {exc}", ExitStatus.BPF_FAILURE) from None
        facts.done = capture.done
        # after the classifier: its ring also takes the owners' process records, each before the
        # hellos of the connections it owns
        owners = SocketOwners()
        owners.start(capture.obj.map("events"))
        reader = ring_reader(capture.obj.map("events"), 4096)
        ready("tls", t0, "TLS handshakes from packets on every interface")

        def drain() -> None:
            while True:
                records = reader.read(4096)
                for raw in records:
                    if raw[_T0:_T1] == _PROCESS:
                        owners.learn(raw)
                    else:
                        facts.add_raw(raw)
                if len(records) < 4096:
                    break
            sink.flush()

        def poll(timeout_ms: int) -> None:
            reader.wait(min(timeout_ms, POLL_MS))
            drain()
            capture.follow_links()

        run_loop(poll, opts.duration, stop, lambda: clock.resync())
        if stop.signal:
            log.info("Shutdown requested, cleaning up...")
        capture.detach()
        drain()
        dropped = capture.counters()["dropped"]
        if dropped:
            log.warning("%d handshake packets were lost (ring buffer full): some handshakes are missing", dropped)
        lost = owners.counters()["images_dropped"]
        if lost:
            log.warning("%d process records were lost (ring buffer full): exe read from /proc for those", lost)
        return ExitStatus.OK
    finally:
        stop.restore()
        if sink is not None:
            sink.close()
        if reader is not None:
            reader.close()
        if capture is not None:
            capture.close()
        if owners is not None:
            owners.close()
