"""Interfaces created after the tool started (a container's veth): the TC handshake classifier
follows them from the kernel's link notifications (host/links.py), so a handshake over one has
its facts, in `tls -m handshake` and in `tls -m json`'s tls_handshake events."""

import subprocess

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import (free_port, make_cert, make_veth_netns, need_root, need_tool, remove_veth_netns,
                           veth_netns_names, wait_until)

pytestmark = pytest.mark.ebpf


def has_our_filter(dev: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", dev, "ingress"], capture_output=True, text=True).stdout
    return "hello_ingress" in out


@pytest.fixture
def late_veth():
    """Made by the test once the tracer runs: (make, namespace, host-side name)."""
    need_root()
    need_tool("ip", "tc")
    v = veth_netns_names("late", 9)
    try:
        yield (lambda: make_veth_netns(v)), v.ns, v.host_if
    finally:
        remove_veth_netns(v)


@pytest.mark.parametrize("mode", ["handshake", "json"])
def test_handshake_over_an_interface_created_after_start(late_veth, tmp_path, mode):
    need_tool("curl", "openssl")
    make, ns, host_if = late_veth
    cert, key = make_cert(tmp_path, cn="late.facts.test")
    out = str(tmp_path / "events.out")
    tracer = tp.Tracer(["tls", "-m", mode, "--no-redact", "-o", out, "--name", tp.PEER_PREFIX])
    server = None
    try:
        make()
        wait_until(lambda: has_our_filter(host_if), 10, "the classifier on the new veth")
        port = free_port()
        server = subprocess.Popen(["ip", "netns", "exec", ns, tp.peer("openssl"), "s_server", "-accept",
                                   f"10.201.9.2:{port}", "-cert", cert, "-key", key, "-www"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
                                          capture_output=True, text=True).stdout.strip(), 10, "s_server listening")
        pid = tp.curl(f"https://late.facts.test:{port}/", extra=[
            "--resolve", f"late.facts.test:{port}:10.201.9.2", "--tlsv1.3", "--tls13-ciphers",
            "TLS_CHACHA20_POLY1305_SHA256", "--curves", "X25519"])
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        result = tracer.stop()
    assert result.rc == 0, result.err
    events = [e for e in tp.read_events(out) if e["event_type"] == "tls_handshake" and e["pid"] == pid]
    assert len(events) == 1, events
    ev = events[0]
    assert (ev["remote_addr"], ev["local_addr"], ev["role"]) == ("10.201.9.2", "10.201.9.1", "client")
    assert (ev["tls_version"], ev["cipher"], ev["group"], ev["sni"]) == (
        "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", "x25519", "late.facts.test")
    # stopping removed the classifier from the new veth too
    assert not has_our_filter(host_if)
