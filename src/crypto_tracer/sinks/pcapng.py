"""A small pcapng writer: section header, one interface block per captured interface,
enhanced packet blocks (with direction flags and a per-packet comment), and Decryption
Secrets Blocks carrying TLS key log lines, so Wireshark decrypts the file on its own.

Every block is written whole; the file is valid after each write (pcapng has no trailer).
PacketSink feeds a writer with captured packets and the TLS secrets that decrypt them.

Byte order: the host's ("=" below). bpf/tc_capture.bpf.c builds the Enhanced Packet Blocks of
captured packets in the kernel, in host order, and PacketSink writes them unchanged; the Section
Header Block's magic tells readers which order that is.
"""

from __future__ import annotations

import collections
import struct
import sys
import time

from crypto_tracer.sinks.output import Output

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
DSB_TYPE = 0x0000000A
BYTE_ORDER_MAGIC = 0x1A2B3C4D
SECRETS_TLS_KEYLOG = 0x544C534B

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101

OPT_END = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
SHB_OS = 3
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
INBOUND = 1
OUTBOUND = 2


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + _pad4(value)


def _options(opts: list[bytes]) -> bytes:
    return b"".join(opts) + struct.pack("=HH", OPT_END, 0) if opts else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("=II", block_type, total) + body + struct.pack("=I", total)


def epb(interface_id: int, ts_epoch_ns: int, data: bytes, orig_len: int | None = None,
        outbound: bool | None = None, comment: str | None = None) -> bytes:
    """An Enhanced Packet Block; bpf/tc_capture.bpf.c builds the same bytes for a captured packet
    (options in this order: epb_flags, opt_comment, opt_endofopt)."""
    orig = len(data) if orig_len is None else orig_len
    body = struct.pack("=IIIII", interface_id, ts_epoch_ns >> 32, ts_epoch_ns & 0xFFFFFFFF, len(data), orig)
    body += _pad4(data)
    opts = []
    if outbound is not None:
        opts.append(_option(EPB_FLAGS, struct.pack("=I", OUTBOUND if outbound else INBOUND)))
    if comment:
        opts.append(_option(OPT_COMMENT, comment.encode(errors="replace")))
    body += _options(opts)
    return _block(EPB_TYPE, body)


class PcapngWriter:
    def __init__(self, path: str, application: str = "crypto-tracer", os_name: str = "Linux"):
        self._out = Output(path)
        self._interfaces: dict[str, int] = {}
        body = struct.pack("=IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
        body += _options([_option(SHB_OS, os_name.encode()), _option(SHB_USERAPPL, application.encode())])
        self._out.write(_block(SHB_TYPE, body))
        self.packets = 0
        self.secrets_blocks = 0

    def add_interface(self, name: str, linktype: int = LINKTYPE_ETHERNET, snaplen: int = 262144) -> int:
        """Write an IDB (nanosecond timestamps); returns its interface id."""
        if name in self._interfaces:
            return self._interfaces[name]
        body = struct.pack("=HHI", linktype, 0, snaplen)
        body += _options([_option(IF_NAME, name.encode()), _option(IF_TSRESOL, bytes([9]))])
        self._out.write(_block(IDB_TYPE, body))
        self._interfaces[name] = len(self._interfaces)
        return self._interfaces[name]

    def add_secrets(self, keylog: bytes) -> None:
        """A DSB with TLS key log lines; it must precede the packets it decrypts."""
        if not keylog:
            return
        body = struct.pack("=II", SECRETS_TLS_KEYLOG, len(keylog)) + _pad4(keylog)
        self._out.write(_block(DSB_TYPE, body))
        self.secrets_blocks += 1

    def add_packet(self, interface_id: int, ts_epoch_ns: int, data: bytes, orig_len: int | None = None,
                   outbound: bool | None = None, comment: str | None = None) -> None:
        self._out.write(epb(interface_id, ts_epoch_ns, data, orig_len, outbound, comment))
        self.packets += 1

    def add_blocks(self, blocks: list[bytes]) -> None:
        """Enhanced Packet Blocks built elsewhere (bpf/tc_capture.bpf.c), written as they are."""
        self._out.write_many(blocks)
        self.packets += len(blocks)

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()


HOLD_S = 1.0  # how long a packet waits for its session's keys
MAX_HELD = 200_000  # packets; beyond this the oldest go out without waiting
KEYS_WAIT_S = 30.0  # a session's secrets come this soon after its ClientHello, or not at all


class PacketSink:
    """Writes the records of tc_capture.bpf.c to a pcapng once their keys had time to arrive
    (HOLD_S), one list of records (one read of the ring) at a time.

    A packet record is a complete Enhanced Packet Block, written as it is. A cap_hello record
    announces the next ClientHello (by its client_random): the session's secrets go into a
    Decryption Secrets Block right there, so they precede every packet they decrypt; secrets of
    sessions that are not in the capture are not put in the file at all.
    """

    def __init__(self, writer: PcapngWriter, interfaces, clock=None):
        self.writer = writer
        self.clock = clock
        # interface ids in the order of interfaces: TcCapture stamps packets with the same
        self.ids = [writer.add_interface(ifc.name, ifc.linktype) for ifc in interfaces]
        if self.ids != list(range(len(self.ids))):
            raise ValueError("PacketSink needs a writer without interfaces yet")
        self.held: collections.deque = collections.deque()  # (time.monotonic() of the read, records)
        self.held_records = 0
        # client_random -> (time.monotonic(), key log text): ClientHello not written yet
        self.pending: dict[bytes, tuple[float, bytes]] = {}
        self.hellos: dict[bytes, float] = {}  # client randoms whose ClientHello is in the file, and when
        self.late_secrets = 0  # sessions whose keys came after their ClientHello had been written
        self._expired_at = time.monotonic()

    def add_secrets(self, client_random: bytes, text: bytes) -> None:
        if client_random in self.hellos:
            self.late_secrets += 1  # the packets written from now on still decrypt
            self.writer.add_secrets(text)
        else:
            t, before = self.pending.get(client_random, (time.monotonic(), b""))
            self.pending[client_random] = t, before + text

    def add(self, records: list[bytes]) -> None:
        """One read of the ring, in order."""
        if not records:
            return
        self.held.append((time.monotonic(), records))
        self.held_records += len(records)
        while self.held_records > MAX_HELD:
            self._write(self._pop())

    def _pop(self) -> list[bytes]:
        records = self.held.popleft()[1]
        self.held_records -= len(records)
        return records

    def flush(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self.held and (everything or self.held[0][0] <= now - HOLD_S):
            self._write(self._pop())
        self.writer.flush()
        if now - self._expired_at >= 1.0:
            self._expired_at = now
            self._expire(now - KEYS_WAIT_S)

    def _expire(self, before: float) -> None:
        """Forget the secrets of sessions whose ClientHello was not captured (filtered out, another
        interface) and the ClientHellos whose keys had their time to come."""
        self.pending = {cr: v for cr, v in self.pending.items() if v[0] > before}
        self.hellos = {cr: t for cr, t in self.hellos.items() if t > before}

    def _write(self, records: list[bytes]) -> None:
        # the only per-packet work: its first byte (0x06: an EPB; 0xC7: a cap_hello)
        hellos = [i for i, rec in enumerate(records) if rec[0] != 6]
        if not hellos:
            self.writer.add_blocks(records)
            return
        start = 0
        for i in hellos:
            self.writer.add_blocks(records[start:i])
            self._hello(records[i])
            start = i + 1
        self.writer.add_blocks(records[start:])

    def _hello(self, rec: bytes) -> None:
        from crypto_tracer.probes.tc_capture import CAP_HELLO_TYPE, HELLO_RANDOM

        if int.from_bytes(rec[:4], sys.byteorder) != CAP_HELLO_TYPE:
            raise ValueError(f"unknown tc_capture record {rec[:8].hex()}")
        client_random = rec[HELLO_RANDOM]
        self.hellos[client_random] = time.monotonic()
        if client_random in self.pending:
            self.writer.add_secrets(self.pending.pop(client_random)[1])
