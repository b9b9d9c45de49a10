"""`crypto-tracer tls -m keylog|key` and `-m pcapng|pcap`: session secrets and captures.

keylog: every TLS session's secrets, as an NSS key log (-k FILE, else -o FILE, else stdout).
pcapng: packets captured by TC on the -i interfaces (default lo), each with the pid and
command of its process where known, and each session's secrets in a Decryption Secrets
Block just before its ClientHello (packets are held back HOLD_S so the keys of their
session, known when its handshake returns, are there in time). -k writes the key log too.
"""

from __future__ import annotations

import collections
import select
import time

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log, ready
from crypto_tracer.stats import DropWarner

HOLD_S = 1.0  # how long a packet waits for its session's keys
MAX_HELD = 200_000  # packets; beyond this the oldest go out without waiting


class PacketSink:
    """Writes held packets to the pcapng once their keys had time to arrive.

    A session's secrets go into a Decryption Secrets Block just before its ClientHello
    (found by its client_random), so they precede every packet they decrypt; secrets of
    sessions that are not in the capture are not put in the file at all.
    """

    def __init__(self, writer, interfaces, clock):
        self.writer = writer
        self.clock = clock
        self.ids = {ifc.ifindex: writer.add_interface(ifc.name, ifc.linktype) for ifc in interfaces}
        self.has_l2 = {ifc.ifindex: ifc.has_l2 for ifc in interfaces}
        self.held: collections.deque = collections.deque()
        self.truncated = 0
        self.pending: dict[bytes, bytes] = {}  # client_random -> key log text, ClientHello not written yet
        self.hellos: set[bytes] = set()  # client randoms whose ClientHello is in the file
        self.late_secrets = 0  # sessions whose keys came after their ClientHello had been written

    def add_secrets(self, client_random: bytes, text: bytes) -> None:
        if client_random in self.hellos:
            self.late_secrets += 1  # the packets written from now on still decrypt
            self.writer.add_secrets(text)
        else:
            self.pending[client_random] = self.pending.get(client_random, b"") + text

    def add(self, raw: bytes) -> None:
        self.held.append((time.monotonic(), raw))
        if len(self.held) > MAX_HELD:
            self._write(self.held.popleft()[1])

    def flush(self, everything: bool = False) -> None:
        limit = time.monotonic() - HOLD_S
        while self.held and (everything or self.held[0][0] <= limit):
            self._write(self.held.popleft()[1])
        self.writer.flush()

    def _write(self, raw: bytes) -> None:
        from crypto_tracer.probes.capture import client_hello_random, decode

        pkt = decode(raw)
        client_random = client_hello_random(pkt.data, self.has_l2.get(pkt.ifindex, True))
        if client_random is not None:
            self.hellos.add(client_random)
            if client_random in self.pending:
                self.writer.add_secrets(self.pending.pop(client_random))
        if pkt.orig_len > len(pkt.data):
            self.truncated += 1
        comment = f"pid={pkt.pid} comm={pkt.comm}" if pkt.pid else None
        self.writer.add_packet(self.ids.get(pkt.ifindex, 0), self.clock.epoch_ns(pkt.ts_ns), pkt.data,
                               orig_len=pkt.orig_len, outbound=pkt.egress, comment=comment)


def run(opts) -> int:
    from crypto_tracer import runloop
    from crypto_tracer.clock import WallClock
    from crypto_tracer.keys.extractor import KeyExtractor
    from crypto_tracer.probes.tls import TlsTracer
    from crypto_tracer.sinks.keylog import KeyLog

    from crypto_tracer.filters.connections import SessionFilter, compile_connection_filter, compile_packet_filter

    pcap = opts.model in ("pcap", "pcapng")
    interfaces, packet_filter = [], None
    if pcap:
        from crypto_tracer.probes.capture import interface

        if not opts.pcapfile:
            raise TracerError(f"-m {opts.model} needs an output file: -w FILE", ExitStatus.BAD_ARGS)
        interfaces = [interface(name) for name in dict.fromkeys(opts.ifname or ["lo"])]
        packet_filter = compile_packet_filter(opts.filter)
    # keys (key log and Decryption Secrets Blocks) only of sessions whose connection matches
    match = compile_connection_filter(opts.filter, with_packets=pcap)
    sessions = SessionFilter(match) if match is not None else None
    keylog_path = opts.keylogfile or (None if pcap else (opts.output or "-"))

    clock = WallClock()
    keylog = KeyLog(keylog_path)
    writer = sink = capture = None
    tracer = TlsTracer(pids=[opts.pid] if opts.pid else None, uid=opts.uid, name=opts.name,
                       libssl=opts.libssl or (), capture_data=False, mapsize=opts.mapsize)

    failures: list[TracerError] = []  # raised inside ring-buffer callbacks, re-raised by the loop

    def write_lines(lines):
        try:
            text = keylog.add(lines)
            if text and sink is not None:
                sink.add_secrets(bytes.fromhex(lines[0][1]), text)
        except TracerError as exc:  # e.g. the disk is full
            failures.append(exc)

    def on_lines(lines, rec):
        if sessions is None:
            write_lines(lines)
        else:
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
        if pcap:
            from crypto_tracer.probes.capture import TcCapture
            from crypto_tracer.sinks.pcapng import PcapngWriter

            writer = PcapngWriter(opts.pcapfile)
            sink = PacketSink(writer, interfaces, clock)
            capture = TcCapture(interfaces, packet_filter, sink.add, mapsize=opts.mapsize)
            capture.start()
        tracer.start()
        if not tracer.libraries:
            log.warning("no TLS library found yet; processes started from now on are followed")
        what = f"packets on {', '.join(i.name for i in interfaces)} to {opts.pcapfile}" if pcap else \
            f"TLS keys to {keylog_path if keylog_path not in (None, '-') else 'stdout'}"
        ready(f"tls -m {opts.model}", t0, f"writing {what}; Ctrl-C to stop")
        fds = [tracer.epoll_fd] + ([capture.epoll_fd] if capture else [])

        def poll(timeout_ms: int) -> None:
            select.select(fds, [], [], timeout_ms / 1000)
            tracer.poll(0)  # keys first: their DSB must precede the packets they decrypt
            if sessions is not None:
                sessions.expire()
            if failures:
                raise failures[0]
            if capture is not None:
                capture.poll(0)
                sink.flush()

        drops = _DropWatch(tracer, capture, clock)
        runloop.run(poll, opts.duration or None, stop, tick=drops.tick, poll_ms=50)
    finally:
        stop.restore()
        if capture is not None:
            capture.detach()  # nothing new arrives; what is in the ring is still read
        _finish(tracer, capture, sink, sessions)
        keylog.close()
        if writer is not None:
            writer.close()
    _report(opts, keylog, keys, tracer, capture, sink, sessions)
    return ExitStatus.OK


class _DropWatch:
    """Warns while running when the kernel had to drop records (ring buffer full)."""

    def __init__(self, tracer, capture, clock):
        self.tracer, self.capture, self.clock = tracer, capture, clock
        self.drops = DropWarner(" (raise --mapsize)")

    def tick(self) -> None:
        self.clock.resync()
        self.drops.check(self.tracer.counters()["dropped"]
                         + (self.capture.counters()["dropped"] if self.capture else 0))


def _finish(tracer, capture, sink, sessions) -> None:
    try:
        tracer.drain()  # the last keys first, so that their DSBs precede the last packets
        if sessions is not None:
            sessions.expire(everything=True)
        if capture is not None:
            capture.drain()
        if sink is not None:
            sink.flush(everything=True)
    finally:
        tracer.close()
        if capture is not None:
            capture.counters_at_end = capture.counters()
            capture.close()


def _report(opts, keylog, keys, tracer, capture, sink, sessions) -> None:
    """End-of-run figures through the logger (INFO is hidden by --quiet, warnings are not)."""
    log.info("%d TLS sessions, %d key log lines", keylog.sessions, keylog.lines_written)
    if sessions is not None and sessions.dropped:
        log.info("keys of %d sessions left out by the filter (%d of them with an unknown connection)",
                 sessions.dropped, sessions.unknown_dropped)
    if capture is not None:
        c = capture.counters_at_end
        log.info("%d packets written to %s (seen %d, filtered out %d, dropped %d, submitted %d%s)",
                 sink.writer.packets, opts.pcapfile, c["seen"], c["kernel_filtered"], c["dropped"], c["submitted"],
                 f", truncated {sink.truncated}" if sink.truncated else "")
        if sink.pending:
            log.info("secrets of %d sessions whose handshake is not in the capture were left out of the pcapng",
                     len(sink.pending))
        if sink.late_secrets:
            log.warning("the secrets of %d sessions came after their first packets; those packets may not decrypt",
                        sink.late_secrets)
        if c["dropped"]:
            log.warning("packets were dropped (ring buffer full): raise --mapsize")
    if keys.unsupported:
        log.info("session secrets are not read from %s (OpenSSL and GnuTLS only)", ", ".join(keys.unsupported))
    if keys.unusable:  # each was said when its library was hooked
        log.info("%d TLS libraries got no keys: their layout could not be learned", len(keys.unusable))
