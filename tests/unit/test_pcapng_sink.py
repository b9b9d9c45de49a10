"""PacketSink: the records of tc_capture.bpf.c (Enhanced Packet Blocks as the kernel builds them,
and cap_hello records announcing a ClientHello) written as they are, each session's secrets in a
Decryption Secrets Block right before its ClientHello, held back HOLD_S for keys to arrive."""

import struct
import types

import pytest

from crypto_tracer.probes.tc_capture import CAP_HELLO, CAP_HELLO_TYPE, CAP_REC, EPB_TYPE
from crypto_tracer.sinks import pcapng
from crypto_tracer.sinks.pcapng import PacketSink, PcapngWriter, epb
from tests.tls_helpers import TcpFlow, epb_fields, pcapng_blocks

LO = types.SimpleNamespace(name="lo", linktype=pcapng.LINKTYPE_ETHERNET)
ETH0 = types.SimpleNamespace(name="eth0", linktype=pcapng.LINKTYPE_RAW)
T0 = 1_700_000_000_123_456_789


def _hello(client_random: bytes) -> bytes:
    return struct.pack("=II32s", CAP_HELLO_TYPE, 0, client_random)


def _packet(i: int, if_id: int = 0) -> bytes:
    flow = TcpFlow(40000, 443)
    return epb(if_id, T0 + i, flow.frame(i % 2 == 0, f"payload {i}".encode()), outbound=i % 2 == 0,
               comment=f"pid={100 + i} comm=curl")


def _blocks(path):
    """(kind, detail) in file order: ('dsb', key log text), ('epb', (if_id, ts)), ..."""
    out = []
    for btype, body in pcapng_blocks(str(path)):
        if btype == pcapng.DSB_TYPE:
            _, length = struct.unpack_from("<II", body)
            out.append(("dsb", body[8:8 + length]))
        elif btype == pcapng.EPB_TYPE:
            out.append(("epb", epb_fields(body)[:2]))
    return out


def test_records_have_the_kernel_layout():
    """probes/tc_capture.py's view of the kernel's records, and the first byte that tells them apart."""
    rec = _packet(1)
    assert CAP_REC.struct.unpack_from(rec)[:3] == (EPB_TYPE, len(rec), 0)
    assert rec[0] == 6 and _hello(b"r" * 32)[0] == 0xC7
    assert CAP_HELLO.size == 40 and CAP_HELLO.offset("client_random") == 8


def test_blocks_are_written_unchanged_and_secrets_precede_their_hello(tmp_path, monkeypatch):
    path = tmp_path / "cap.pcapng"
    sink = PacketSink(PcapngWriter(str(path)), [LO, ETH0])
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    sink.add_secrets(a, b"CLIENT_RANDOM " + a.hex().encode() + b" 00\n")
    sink.add_secrets(c, b"CLIENT_RANDOM " + c.hex().encode() + b" 11\n")  # its handshake is never captured
    batch1 = [_packet(0), _hello(a), _packet(1), _packet(2, if_id=1)]
    batch2 = [_hello(b), _packet(3), _packet(4)]
    sink.add(batch1)
    sink.add([])
    sink.add(batch2)
    sink.flush()  # nothing is old enough yet
    assert sink.writer.packets == 0
    sink.add_secrets(b, b"CLIENT_RANDOM " + b.hex().encode() + b" 22\n")  # in time: still held
    monkeypatch.setattr(pcapng.time, "monotonic", lambda: 1e12)
    sink.flush()
    sink.writer.close()
    assert sink.writer.packets == 5 and sink.late_secrets == 0
    assert not sink.pending  # c: never in the file, and forgotten once KEYS_WAIT_S had passed
    assert _blocks(path) == [("epb", (0, T0)), ("dsb", b"CLIENT_RANDOM " + a.hex().encode() + b" 00\n"),
                             ("epb", (0, T0 + 1)), ("epb", (1, T0 + 2)),
                             ("dsb", b"CLIENT_RANDOM " + b.hex().encode() + b" 22\n"),
                             ("epb", (0, T0 + 3)), ("epb", (0, T0 + 4))]
    # every packet block is byte for byte the record
    data = path.read_bytes()
    for rec in batch1 + batch2:
        if rec[0] == 6:
            assert rec in data


def test_secrets_after_their_hello_are_written_at_once_and_counted(tmp_path):
    path = tmp_path / "late.pcapng"
    sink = PacketSink(PcapngWriter(str(path)), [LO])
    a = b"a" * 32
    sink.add([_hello(a), _packet(0)])
    sink.flush(everything=True)
    sink.add_secrets(a, b"CLIENT_RANDOM " + a.hex().encode() + b" 00\n")
    sink.add([_packet(1)])
    sink.flush(everything=True)
    sink.writer.close()
    assert sink.late_secrets == 1 and not sink.pending
    assert [k for k, _ in _blocks(path)] == ["epb", "dsb", "epb"]


def test_beyond_max_held_the_oldest_reads_go_out(tmp_path, monkeypatch):
    monkeypatch.setattr(pcapng, "MAX_HELD", 3)
    sink = PacketSink(PcapngWriter(str(tmp_path / "x.pcapng")), [LO])
    sink.add([_packet(0), _packet(1)])
    sink.add([_packet(2), _packet(3)])
    assert sink.writer.packets == 2 and sink.held_records == 2
    sink.flush(everything=True)
    assert sink.writer.packets == 4 and sink.held_records == 0


def test_an_unknown_record_is_an_error(tmp_path):
    sink = PacketSink(PcapngWriter(str(tmp_path / "x.pcapng")), [LO])
    sink.add([b"\xff" * 40])
    with pytest.raises(ValueError, match="unknown tc_capture record"):
        sink.flush(everything=True)


def test_the_writer_and_the_kernel_agree_on_the_epb_layout():
    """epb() is the reference the e2e test compares the kernel's blocks with; its options: flags,
    comment, end, each padded to 4 bytes."""
    frame = b"\x01\x02\x03\x04\x05"
    block = epb(1, T0, frame, orig_len=9, outbound=False, comment="pid=7 comm=curl")
    btype, length = struct.unpack_from("<II", block)
    assert (btype, length, struct.unpack_from("<I", block, length - 4)[0]) == (6, len(block), len(block))
    assert epb_fields(block[8:-4]) == (1, T0, frame, 9, [(2, b"\x01\x00\x00\x00"), (1, b"pid=7 comm=curl"),
                                                         (0, b"")])


def test_flows_of_connections_opened_before_the_capture_carry_the_kernels_comment():
    """existing_flows() fills the flows map as note_socket() does: pid, and the packets' opt_comment
    ready to copy (header, "pid=N comm=X", zero padding); bytes outside ASCII become '?'."""
    from crypto_tracer.probes.tc_capture import FLOW_PROC, flow_proc

    pid, length, comm, opt, uid, ppid, start_ns, exec_id = FLOW_PROC.unpack(flow_proc(4242, b"nginx"))
    assert (pid, length, comm.rstrip(b"\0")) == (4242, 24, b"nginx")
    assert (uid, ppid, start_ns, exec_id) == (0, 0, 0, 0)  # seeded: no image (socket_owner reads /proc)
    assert opt[:length] == struct.pack("<HH", 1, 19) + b"pid=4242 comm=nginx\0" and not opt[length:].strip(b"\0")
    pid, length, comm, opt, *_image = FLOW_PROC.unpack(flow_proc(7, "wörker-with-a-long-name".encode()))
    text = b"pid=7 comm=w??rker-with-a-"  # 15 bytes of comm; each byte of the o-umlaut a "?"
    assert opt[:length] == struct.pack("<HH", 1, len(text)) + text + b"\0" * (-len(text) % 4)


def test_packet_ring_reads_committed_records_in_order_and_skips_discarded_ones():
    """PacketRing's loop on a ring laid out as kernel/bpf/ringbuf.c lays it out (8-byte headers with
    BUSY and DISCARD bits, records 8-byte aligned), the data area mapped once as DirectRing maps it:
    a record that wraps around its end comes back whole."""
    from crypto_tracer.engine.ringread import BUSY_BIT, DISCARD_BIT
    from crypto_tracer.probes.tc_capture import PacketRing

    page, size = 4096, 1 << 12
    area = bytearray(size)

    def put(pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            area[(pos + i) % size] = b

    records = [bytes([6]) + bytes([i]) * (300 + i) for i in range(8)]
    start = pos = size - 2 * 312 - 160  # the third record's bytes cross the end of the area
    flags = {3: DISCARD_BIT, 6: BUSY_BIT}
    for i, rec in enumerate(records):
        put(pos, struct.pack("<II", len(rec) | flags.get(i, 0), 0) + rec)
        pos += (len(rec) + 15) & ~7
    ring = object.__new__(PacketRing)
    ring._data_map = struct.pack("<Q", pos) + bytes(page - 8) + bytes(area)  # page 1: the producer position
    ring._words = memoryview(ring._data_map).cast("I")
    ring._cons = memoryview(bytearray(struct.pack("<Q", start))).cast("Q")
    ring._prod = memoryview(ring._data_map).cast("Q")
    ring._page, ring._mask = page, size - 1
    third = start + 2 * 312
    assert third + 8 < size < third + 8 + len(records[2])
    assert ring.read() == records[:3] + records[4:6]  # the busy one and all after it wait
    assert ring._cons[0] == start + sum((len(r) + 15) & ~7 for r in records[:6])


def test_uncaptured_sessions_are_forgotten_after_their_wait(tmp_path, monkeypatch):
    """Secrets whose ClientHello is never captured (filtered out in the kernel) and ClientHellos
    already written are kept KEYS_WAIT_S, then dropped: a long capture does not grow."""
    now = [1000.0]
    monkeypatch.setattr(pcapng.time, "monotonic", lambda: now[0])
    sink = PacketSink(PcapngWriter(str(tmp_path / "cap.pcapng")), [LO])
    a, c = b"a" * 32, b"c" * 32
    sink.add([_hello(a), _packet(0)])
    sink.add_secrets(c, b"CLIENT_RANDOM " + c.hex().encode() + b" 11\n")
    now[0] += pcapng.HOLD_S + 1
    sink.flush()
    assert list(sink.pending) == [c] and list(sink.hellos) == [a]
    now[0] += pcapng.KEYS_WAIT_S
    sink.flush()
    assert not sink.pending and not sink.hellos


def test_existing_flows_hold_connected_udp_sockets_not_unconnected_ones():
    """A QUIC client's connected UDP socket opened before the start has its owner, as a TCP
    connection does; an unconnected one (a server's) has no 4-tuple to name."""
    import os
    import socket

    from crypto_tracer.probes.tc_capture import FLOW_KEY, FLOW_PROC, existing_flows

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect(peer.getsockname())
    try:
        flows = existing_flows()
        lport, rport = connected.getsockname()[1], peer.getsockname()[1]
        lo = socket.inet_aton("127.0.0.1").ljust(16, b"\0")
        value = flows.get(FLOW_KEY.pack(socket.AF_INET, lport, rport, lo, lo))
        assert value is not None and FLOW_PROC.unpack(value)[0] == os.getpid()
        assert not any(FLOW_KEY.unpack(k)[1] == rport for k in flows)  # the unconnected peer: none
    finally:
        connected.close()
        peer.close()
