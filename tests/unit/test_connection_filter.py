"""The connection filter of `tls`: one grammar for text/json, keylog and pcapng. Connections
are matched in user space; pcapng compiles the same expression to the kernel packet filter,
and what the kernel cannot hold is refused."""

import ipaddress
import itertools
import socket
import struct

import pytest

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.pipeline.filters.connections import (SessionFilter, compile_connection_filter, compile_packet_filter)
from crypto_tracer.probes.tc_capture import CONFIG, config_value

compile_filter = compile_connection_filter
CONN = ("127.0.0.1", 40000, "10.0.0.1", 443)


# --- connections (text/json events, key log sessions) ------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("port 443", True), ("port 80", False), ("host 10.0.0.1", True), ("host 10.0.0.2", False),
    ("port 443 and host 10.0.0.1", True), ("port 80 or host 127.0.0.1", True), ("not port 443", False),
    ("src port 40000", True), ("dst port 40000", False), ("dst host 10.0.0.1", True),
    ("tcp port 443", True), ("net 10.0.0.0/8", True), ("( port 1 or port 2 ) and host 10.0.0.1", False),
    ("portrange 400-500", True), ("port 443 && !host 10.0.0.1", False), ("port 80 || port 443", True),
])
def test_capture_filter(expr, expected):
    assert compile_filter(expr.split())(CONN) is expected


def test_capture_filter_unknown_addresses_never_match():
    assert compile_filter(["port", "443"])((None, None, None, None)) is False
    assert compile_filter(["not", "port", "443"])((None, None, None, None)) is True
    assert compile_filter([]) is None


@pytest.mark.parametrize("expr", ["port", "port x", "port 70000", "host nothost", "foo 1", "( port 1", "port 1 )"])
def test_capture_filter_errors_are_bad_arguments(expr):
    with pytest.raises(TracerError) as exc:
        compile_filter(expr.split())
    assert exc.value.status == ExitStatus.BAD_ARGS


def test_udp_is_refused_for_connections_and_matches_none_next_to_packets():
    with pytest.raises(TracerError) as exc:
        compile_filter(["udp"])
    assert exc.value.status == ExitStatus.BAD_ARGS and "\n" not in str(exc.value)
    assert str(exc.value) == "capture filter: 'udp' only applies to -m pcapng (TLS connections are TCP)"
    assert compile_connection_filter(["udp"], with_packets=True)(CONN) is False


# --- packets (pcapng: the kernel filter) --------------------------------------------------------

def test_ports_hosts_and_protocol():
    f = compile_packet_filter(["tcp", "and", "(port", "443", "or", "port", "8443)", "and", "host", "::1"])
    assert f.proto == socket.IPPROTO_TCP and f.ports == [443, 8443] and f.hosts == [ipaddress.ip_address("::1")]
    value = config_value(f, 262144)
    assert len(value) == CONFIG.size
    assert struct.unpack_from("<IIII", value) == (262144, 6, 2, 1)


def test_empty_filter_captures_everything():
    f = compile_packet_filter([])
    assert (f.proto, f.ports, f.hosts) == (0, [], [])


@pytest.mark.parametrize("words", [["net", "10.0.0.0/8"], ["port", "70000"], ["host", "nothost"],
                                   ["port", "1", "or", "host", "127.0.0.1"]])
def test_unsupported_filters_are_refused(words):
    with pytest.raises(TracerError) as exc:
        compile_packet_filter(words)
    assert exc.value.status == ExitStatus.BAD_ARGS


@pytest.mark.parametrize("expr, message", [
    ("net 10.0.0.0/8", "'net' is not supported by the kernel packet filter of -m pcapng"),
    ("not port 22", "'not' is not supported by the kernel packet filter of -m pcapng"),
    ("src port 443", "'src' is not supported by the kernel packet filter of -m pcapng"),
    ("portrange 1-2", "'portrange' is not supported by the kernel packet filter of -m pcapng"),
    ("ip", "'ip' is not supported by the kernel packet filter of -m pcapng"),
    ("port 1 and port 2", "a second port condition joined with 'and' is not supported"),
    ("port 1 or port 2 and host ::1", "'and' inside 'or' is not supported"),
    ("port 1 or host ::1", "'or' is only supported between ports or between hosts in -m pcapng"),
    ("tcp and udp", "'tcp and udp' matches no packet"),
    (" or ".join(f"port {p}" for p in range(1, 10)), "at most 8 ports and 8 hosts"),
])
def test_what_the_kernel_cannot_hold_is_refused_in_one_line(expr, message):
    with pytest.raises(TracerError) as exc:
        compile_packet_filter(expr.split())
    assert exc.value.status == ExitStatus.BAD_ARGS
    assert message in str(exc.value) and "\n" not in str(exc.value)
    compile_connection_filter(expr.split(), with_packets=True)  # the grammar itself accepts it


def _kernel_match(f, packet):
    """tc_capture.bpf.c's test of a TCP packet (saddr, sport, daddr, dport) against cap_config."""
    saddr, sport, daddr, dport = packet
    if f.proto and f.proto != socket.IPPROTO_TCP:
        return False
    if f.ports and not (sport in f.ports or dport in f.ports):
        return False
    hosts = {str(h) for h in f.hosts}
    return not f.hosts or saddr in hosts or daddr in hosts


SAME_MEANING = ["port 443", "host 10.0.0.1", "tcp", "tcp port 443 and host 10.0.0.1",
                "(port 443 or port 8443) and (host 10.0.0.1 or host ::1)", "port 80 || port 443",
                "host 127.0.0.1 and port 40000"]


@pytest.mark.parametrize("expr", SAME_MEANING)
def test_the_same_string_means_the_same_for_connections_and_packets(expr):
    """Every packet of a connection passes the kernel filter exactly when the connection matches."""
    conn_match = compile_connection_filter(expr.split())
    pkt = compile_packet_filter(expr.split())
    addrs, ports = ["127.0.0.1", "10.0.0.1", "::1", "10.0.0.2"], [40000, 443, 8443, 80]
    for la, lp, ra, rp in itertools.product(addrs, ports, addrs, ports):
        want = conn_match((la, lp, ra, rp))
        assert _kernel_match(pkt, (la, lp, ra, rp)) is want, (la, lp, ra, rp)  # egress
        assert _kernel_match(pkt, (ra, rp, la, lp)) is want, (la, lp, ra, rp)  # ingress


# --- key log sessions ---------------------------------------------------------------------------

class _Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_session_keys_wait_for_their_handshake_then_follow_the_filter():
    clock, out = _Clock(), []
    s = SessionFilter(compile_filter(["port", "443"]), hold_s=1.0, clock=clock)
    s.keys(10, 0xA, lambda: out.append("a"))  # keys come first (same uretprobe, just before)
    s.keys(10, 0xB, lambda: out.append("b"))
    assert out == []
    s.connection(10, 0xA, CONN)
    s.connection(10, 0xB, ("127.0.0.1", 40001, "10.0.0.1", 80))
    assert out == ["a"] and (s.kept, s.dropped) == (1, 1)
    s.keys(10, 0xA, lambda: out.append("a2"))  # a later record of a known session: decided at once
    assert out == ["a", "a2"]


def test_session_keys_without_a_handshake_are_decided_as_unknown_connections():
    clock, out = _Clock(), []
    s = SessionFilter(compile_filter(["port", "443"]), hold_s=1.0, clock=clock)
    s.keys(10, 0xC, lambda: out.append("c"))
    s.expire()
    assert out == [] and s.held  # not yet: the handshake may still come
    clock.now += 1.5
    s.expire()
    assert out == [] and not s.held and (s.dropped, s.unknown_dropped) == (1, 1)
    kept = SessionFilter(compile_filter(["not", "port", "22"]), clock=clock)
    kept.keys(10, 0xD, lambda: out.append("d"))
    kept.expire(everything=True)
    assert out == ["d"]
