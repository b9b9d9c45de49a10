"""The pcapng capture filter: what is accepted goes to the kernel, the rest is refused."""

import ipaddress
import socket
import struct

import pytest

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.probes.capture import CONFIG, parse_filter


def test_ports_hosts_and_protocol():
    f = parse_filter(["tcp", "and", "(port", "443", "or", "port", "8443)", "and", "host", "::1"])
    assert f.proto == socket.IPPROTO_TCP and f.ports == [443, 8443] and f.hosts == [ipaddress.ip_address("::1")]
    value = f.value(262144)
    assert len(value) == CONFIG.size
    assert struct.unpack_from("<IIII", value) == (262144, 6, 2, 1)


def test_empty_filter_captures_everything():
    f = parse_filter([])
    assert (f.proto, f.ports, f.hosts) == (0, [], [])


@pytest.mark.parametrize("words", [["net", "10.0.0.0/8"], ["port", "70000"], ["host", "nothost"],
                                   ["port", "1", "or", "host", "127.0.0.1"]])
def test_unsupported_filters_are_refused(words):
    with pytest.raises(TracerError) as exc:
        parse_filter(words)
    assert exc.value.status == ExitStatus.BAD_ARGS
