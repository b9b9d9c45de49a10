"""What `tls -m keylog` and `tls -m pcapng` share: every TLS session's secrets, read by
keys/ from the hooked libraries, kept to the sessions whose connection matches the filter,
written to the key log (sinks/keylog.py) and handed to the packet sink when there is one;
the run loop, and the figures at the end.
"""

from __future__ import annotations

import select
import time

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready
from crypto_tracer.keys.pending import POLL_S
from crypto_tracer.pipeline.stats import DropWarner


def run(opts, keylog_path: str | None, packets=None) -> int:
    """packets: pcapng.Packets (the TC capture and its pcapng), or None for the key log alone."""
    from crypto_tracer.pipeline import runloop
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.pipeline.filters.connections import SessionFilter, compile_connection_filter
    from crypto_tracer.keys.extractor import KeyExtractor
    from crypto_tracer.probes.tls import TlsTracer
    from crypto_tracer.sinks.keylog import KeyLog

    # keys (key log and Decryption Secrets Blocks) only of sessions whose connection matches. A
    # pcapng alone needs no connections: its sink keeps the secrets of the ClientHellos it
    # captured, which the same filter selected in the kernel.
    match = compile_connection_filter(opts.filter, with_packets=packets is not None)
    if packets is not None and keylog_path is None:
        match = None
    sessions = SessionFilter(match) if match is not None else None

    clock = WallClock()
    keylog = KeyLog(keylog_path)
    tracer = TlsTracer(pids=[opts.pid] if opts.pid else None, uid=opts.uid, name=opts.name,
                       libssl=opts.libssl or (), capture_data=False, mapsize=opts.mapsize,
                       connections=sessions is not None)

    failures: list[TracerError] = []  # raised inside ring-buffer callbacks, re-raised by the loop

    def write_lines(lines):
        try:
            text = keylog.add(lines)
            if text and packets is not None and packets.sink is not None:
                packets.sink.add_secrets(bytes.fromhex(lines[0][1]), text)
        except TracerError as exc:  # e.g. the disk is full
            failures.append(exc)

    def on_lines(lines, rec):
        if sessions is None:
            write_lines(lines)
        else:
            if getattr(rec, "connection", None):  # Go: the record carries its connection
                sessions.connection(rec.pid, rec.ssl, rec.connection)
            sessions.keys(rec.pid, rec.ssl, lambda: write_lines(lines))

    keys = KeyExtractor(tracer, on_lines)
    if sessions is not None:
        from crypto_tracer.probes.common import CT_EV_TLS_HANDSHAKE
        from crypto_tracer.probes.tls import decode_handshake

        def on_handshake(raw):  # the connection of the session whose keys may be waiting
            hs = decode_handshake(raw)
            sessions.connection(hs.pid, hs.ssl, (hs.local_addr, hs.local_port, hs.remote_addr, hs.remote_port))

        tracer.on(CT_EV_TLS_HANDSHAKE, on_handshake)
    stop = runloop.StopFlag().install()
    t0 = time.monotonic()
    try:
        if packets is not None:
            packets.start(clock)
        tracer.start()
        if not tracer.libraries:
            log.warning("no TLS library found yet; processes started from now on are followed")
        what = packets.describe() if packets is not None else \
            f"TLS keys to {keylog_path if keylog_path not in (None, '-') else 'stdout'}"
        ready(f"tls -m {opts.model}", t0, f"writing {what}; Ctrl-C to stop")
        fds = [tracer.epoll_fd] + ([packets.epoll_fd] if packets is not None else [])

        def poll(timeout_ms: int) -> None:
            select.select(fds, [], [], timeout_ms / 1000)
            tracer.poll(0)  # keys first: their DSB must precede the packets they decrypt
            keys.poll()  # objects whose handshake runs inside SSL_read/SSL_write (keys/pending.py)
            if sessions is not None:
                sessions.expire()
            if failures:
                raise failures[0]
            if packets is not None:
                packets.poll()

        drops = _DropWatch(tracer, packets, clock)
        runloop.run(poll, opts.duration or None, stop, tick=drops.tick, poll_ms=int(POLL_S * 1000))
    finally:
        stop.restore()
        if packets is not None:
            packets.detach()  # nothing new arrives; what is in the ring is still read
        try:
            tracer.drain()  # the last keys first, so that their DSBs precede the last packets
            keys.pending.poll(float("inf"))  # objects still open: what their memory holds now
            keys.pending.poll(float("inf"))  # (a complete read is written once a second read agrees)
            if sessions is not None:
                sessions.expire(everything=True)
            if packets is not None:
                packets.finish()
        finally:
            tracer.close()
            if packets is not None:
                packets.close()
            keylog.close()
    _report(keylog, keys, packets, sessions)
    return ExitStatus.OK


class _DropWatch:
    """Warns while running when the kernel had to drop records (ring buffer full)."""

    def __init__(self, tracer, packets, clock):
        self.tracer, self.packets, self.clock = tracer, packets, clock
        self.drops = DropWarner(" (raise --mapsize)")

    def tick(self) -> None:
        self.clock.resync()
        self.drops.check(self.tracer.counters()["dropped"]
                         + (self.packets.counters()["dropped"] if self.packets is not None else 0))


def _report(keylog, keys, packets, sessions) -> None:
    """End-of-run figures through the logger (INFO is hidden by --quiet, warnings are not)."""
    log.info("%d TLS sessions, %d key log lines", keylog.sessions, keylog.lines_written)
    if sessions is not None and sessions.dropped:
        log.info("keys of %d sessions left out by the filter (%d of them with an unknown connection)",
                 sessions.dropped, sessions.unknown_dropped)
    if packets is not None:
        packets.report()
    if keys.pending.freed_incomplete:
        log.info("%d TLS objects were freed with a handshake started and its secrets incomplete (failed or "
                 "unfinished handshakes: no keys existed to write)", keys.pending.freed_incomplete)
    if keys.pending.watch:
        log.info("%d TLS objects still open had no complete secrets when the run ended", len(keys.pending.watch))
    if keys.unreadable_labels:
        log.warning("%d key lines were lost: their label could not be read from their process's memory "
                    "(it had exited)", keys.unreadable_labels)
    if keys.unsupported:
        log.info("session secrets are not read from %s (OpenSSL, BoringSSL, GnuTLS and Go only)", ", ".join(keys.unsupported))
    if keys.unusable:  # each was said when its library was hooked
        log.info("%d TLS libraries got no keys: their layout could not be learned", len(keys.unusable))
