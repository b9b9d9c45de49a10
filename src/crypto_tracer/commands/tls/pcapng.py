"""tls -m pcapng|pcap: packets captured by TC on the -i interfaces (default lo), each with the
pid and command of its process where known, and each session's secrets in a Decryption
Secrets Block just before its ClientHello (sinks/pcapng.PacketSink holds packets back until
their keys had time to arrive). -k writes the key log too.
"""

from __future__ import annotations

from crypto_tracer.commands.tls import secrets
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import log


def _interfaces(opts) -> list:
    from crypto_tracer.probes.tc_capture import interface

    return [interface(name) for name in dict.fromkeys(opts.ifname or ["lo"])]


def check(opts) -> None:
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter, compile_packet_filter

    if not opts.pcapfile:
        raise TracerError(f"-m {opts.model} needs an output file: -w FILE", ExitStatus.BAD_ARGS)
    _interfaces(opts)  # an unknown interface is an argument error
    compile_packet_filter(opts.filter)
    compile_connection_filter(opts.filter, with_packets=True)


def run(opts) -> int:
    return secrets.run(opts, keylog_path=opts.keylogfile, packets=Packets(opts))


class Packets:
    """The TC capture (probes/capture.py) feeding a PacketSink and its pcapng file."""

    def __init__(self, opts):
        from crypto_tracer.pipeline.filters.connections import compile_packet_filter

        self.path, self.mapsize = opts.pcapfile, opts.mapsize
        self.interfaces = _interfaces(opts)
        self.packet_filter = compile_packet_filter(opts.filter)
        self.sink = self.capture = self.clock = None
        self.counters_at_end: dict | None = None

    def start(self, clock) -> None:
        from crypto_tracer.probes.tc_capture import TcCapture
        from crypto_tracer.sinks.pcapng import PacketSink, PcapngWriter

        self.clock = clock
        self.sink = PacketSink(PcapngWriter(self.path), self.interfaces, clock)
        # the kernel writes each packet's EPB, wall-clock timestamp included
        self.capture = TcCapture(self.interfaces, self.packet_filter, self.sink.add, mapsize=self.mapsize,
                                 epoch_offset=clock.offset_ns)
        self.capture.start()

    def describe(self) -> str:
        return f"packets on {', '.join(i.name for i in self.interfaces)} to {self.path}"

    @property
    def epoll_fd(self) -> int:
        return self.capture.epoll_fd

    def poll(self) -> None:
        self.capture.set_epoch_offset(self.clock.offset_ns)  # after WallClock.resync (a map update when it moved)
        self.capture.poll(0)
        self.sink.flush()

    def counters(self) -> dict:
        return self.capture.counters() if self.capture is not None else {"dropped": 0}

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()

    def finish(self) -> None:
        """After the last keys: the last packets, then everything held."""
        if self.capture is not None:
            self.capture.drain()
        if self.sink is not None:
            self.sink.flush(everything=True)

    def close(self) -> None:
        if self.capture is not None:
            self.counters_at_end = self.capture.counters()  # the figures of the report
            self.capture.close()
        if self.sink is not None:
            self.sink.writer.close()

    def report(self) -> None:
        sink, c = self.sink, self.counters_at_end
        log.info("%d packets written to %s (seen %d, filtered out %d, dropped %d, submitted %d%s)",
                 sink.writer.packets, self.path, c["seen"], c["kernel_filtered"], c["dropped"], c["submitted"],
                 f", truncated {c['truncated']}" if c.get("truncated") else "")
        if sink.pending:
            log.info("secrets of %d sessions whose handshake is not in the capture were left out of the pcapng",
                     len(sink.pending))
        if sink.late_secrets:
            log.warning("the secrets of %d sessions came after their first packets; those packets may not decrypt",
                        sink.late_secrets)
        if c["dropped"]:
            log.warning("packets were dropped (ring buffer full): raise --mapsize")
