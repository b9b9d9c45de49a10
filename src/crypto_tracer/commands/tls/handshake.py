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
FLIGHT_WAIT_S = 1.0  # --decrypt-handshake: how long a TLS 1.3 handshake's event waits for its secrets


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


def start_keys(facts, libssl=(), mapsize=None):
    """--decrypt-handshake: the TLS libraries hooked as -m keylog hooks them (handshake returns,
    SSL_new, SSL_free: no data call), their sessions' handshake secrets to facts.add_secret."""
    from crypto_tracer.keys.extractor import KeyExtractor
    from crypto_tracer.pipeline import tls13_flight
    from crypto_tracer.probes.tls import TlsTracer

    tracer = TlsTracer(libssl=libssl or (), capture_data=False, mapsize=mapsize)

    def on_lines(lines, _rec) -> None:
        for label, client_random, secret in lines:
            facts.add_secret(label, bytes.fromhex(client_random), bytes.fromhex(secret))

    tls13_flight.preload()  # not at the first flight, in the middle of a burst (plaintext.flight_secrets)
    keys = KeyExtractor(tracer, on_lines, quiet=True)
    try:
        tracer.start()
    except Exception:
        tracer.close()
        raise
    return tracer, keys


class HandshakeSource:
    """The wiring of the handshake posture, shared by `tls -m handshake` and the agent: the TC classifier
    on its own ring, the socket owners (connect/accept tracepoints, their process records on the same
    ring), hello facts -> one tls_handshake event per handshake, handed to emit(event) as each completes
    (in the reading thread).

    start() raises TracerError (exit 4) when the classifier cannot run; poll()/drain() read the ring
    (the classifier wakes no reader: callers poll it on a timer) and follow interfaces that come and go;
    detach() removes the filters and the tracepoints (the ring and the owners' map stay readable for a
    last drain); close() frees it all. decrypt (--decrypt-handshake): the TLS libraries' key functions
    hooked too, TLS 1.3's encrypted ALPN and certificate read with their secrets (start_keys)."""

    def __init__(self, emit, clock, decrypt: bool = False, libssl=(), mapsize=None):
        self.emit, self.clock = emit, clock
        self.decrypt, self.libssl, self.mapsize = decrypt, libssl, mapsize
        self.owners = self.capture = self.reader = self.facts = None
        self.tracer = self.keys = None

    def start(self) -> None:
        from crypto_tracer.engine import ring_reader
        from crypto_tracer.pipeline.hello_facts import HelloFacts
        from crypto_tracer.probes.socket_owner import SocketOwners
        from crypto_tracer.probes.tls_hello import HelloCapture, HelloUnavailable

        self.facts = HelloFacts(completed=self._completed, flights=self.decrypt)
        if self.decrypt:
            self.tracer, self.keys = start_keys(self.facts, self.libssl, self.mapsize)
        self.capture = HelloCapture(None, flights=self.decrypt)
        try:
            self.capture.start()
        except HelloUnavailable as exc:
            raise TracerError(f"the TC handshake classifier cannot run: {exc}", ExitStatus.BPF_FAILURE) from None
        self.facts.done = self.capture.done
        # after the classifier: its ring also takes the owners' process records, each before the
        # hellos of the connections it owns
        self.owners = SocketOwners()
        self.owners.start(self.capture.obj.map("events"))
        self.reader = ring_reader(self.capture.obj.map("events"), 4096)

    def _completed(self, facts) -> None:
        from crypto_tracer.pipeline.tls_handshakes import handshake_event

        self.emit(handshake_event(facts, self.owners, self.clock))

    def drain(self, final: bool = False) -> None:
        """Read the ring; final (after detach()): also report the handshakes still waiting for a secret."""
        owners, facts = self.owners, self.facts
        if self.tracer is not None:  # the secrets first: the flights read below may need them
            self.tracer.drain() if final else self.tracer.poll(0)
            self.keys.poll()
        while True:
            records = self.reader.read(4096)
            for raw in records:
                if raw[_T0:_T1] == _PROCESS:
                    owners.learn(raw)
                else:
                    facts.add_raw(raw)
            if len(records) < 4096:
                break
        if self.decrypt:
            facts.expire(0 if final else FLIGHT_WAIT_S)

    def poll(self, timeout_ms: int) -> None:
        """Wait for at most timeout_ms (POLL_MS at most), read the ring, follow new interfaces."""
        self.reader.wait(min(timeout_ms, POLL_MS))
        self.drain()
        self.follow_links()

    def follow_links(self) -> None:
        """Attach to interfaces created since the last call (one non-blocking netlink read)."""
        self.capture.follow_links()

    def counters(self) -> dict:
        """The classifier's packet counters (seen, kernel_filtered, dropped: ring full, submitted) and the
        owners' process records lost (images_dropped)."""
        c = self.capture.counters() if self.capture is not None else \
            {"seen": 0, "kernel_filtered": 0, "dropped": 0, "submitted": 0}
        return dict(c, images_dropped=self.owners.counters()["images_dropped"] if self.owners is not None else 0)

    def attached(self) -> int:
        """Kernel attachments in place: TC interfaces and the owners' tracepoints."""
        return (self.capture.attached() if self.capture is not None else 0) + \
            (len(self.owners.obj.links) if self.owners is not None and self.owners.obj is not None else 0)

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()
        if self.owners is not None and self.owners.obj is not None:
            self.owners.obj.detach()
        if self.tracer is not None:
            self.tracer.detach()

    def warn_losses(self) -> None:
        c = self.counters()
        if c["dropped"]:
            log.warning("%d handshake packets were lost (ring buffer full): some handshakes are missing", c["dropped"])
        if c["images_dropped"]:
            log.warning("%d process records were lost (ring buffer full): exe read from /proc for those",
                        c["images_dropped"])

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.owners is not None:
            self.owners.close()
            self.owners = None
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None


def run(opts) -> int:
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter
    from crypto_tracer.pipeline.redact import Redactor
    from crypto_tracer.pipeline.runloop import StopFlag
    from crypto_tracer.pipeline.runloop import run as run_loop

    conn_filter = compile_connection_filter(opts.filter)
    redactor = Redactor(not opts.no_redact)
    stop = StopFlag().install()
    source = sink = None
    try:
        t0 = time.monotonic()
        clock = WallClock()
        sink = open_sink(opts)

        def emit(ev) -> None:
            if conn_filter is not None and not conn_filter((ev["local_addr"], ev["local_port"], ev["remote_addr"],
                                                            ev["remote_port"])):
                return
            if (opts.pid is not None and ev["pid"] != opts.pid) or (opts.uid is not None and ev["uid"] != opts.uid) \
                    or (opts.name and opts.name.lower() not in (ev["process"] or "").lower()):
                return
            sink.write(redactor.event(ev))

        source = HandshakeSource(emit, clock, decrypt=bool(getattr(opts, "decrypt_handshake", False)),
                                 libssl=opts.libssl, mapsize=opts.mapsize)
        source.start()
        ready("tls", t0, "TLS handshakes from packets on every interface")

        def poll(timeout_ms: int) -> None:
            source.poll(timeout_ms)
            sink.flush()

        run_loop(poll, opts.duration, stop, lambda: clock.resync())
        if stop.signal:
            log.info("Shutdown requested, cleaning up...")
        source.detach()
        source.drain(final=True)
        sink.flush()
        source.warn_losses()
        return ExitStatus.OK
    finally:
        stop.restore()
        if sink is not None:
            sink.close()
        if source is not None:
            source.close()
