"""Interfaces created after the tool started (a container's veth): the TC handshake classifier
follows them from the kernel's link notifications (host/links.py), so a handshake over one has
its facts, in `tls -m handshake` and in `tls -m json`'s tls_handshake events."""

import os
import subprocess

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import free_port, make_cert, need_root, need_tool, wait_until

pytestmark = pytest.mark.ebpf


def has_our_filter(dev: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", dev, "ingress"], capture_output=True, text=True).stdout
    return "hello_ingress" in out


@pytest.fixture
def late_veth():
    """Made by the test once the tracer runs: (make, namespace, host-side name)."""
    need_root()
    need_tool("ip", "tc")
    n = os.getpid() % 10000
    ns, host_if, ns_if = f"ctlate{n}", f"ctl{n}h", f"ctl{n}n"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731

    def make():
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_if, "mtu", "1500", "type", "veth", "peer", "name", ns_if, "mtu", "1500")
        run("ip", "link", "set", ns_if, "netns", ns)
        run("ip", "addr", "add", "10.201.9.1/24", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", "10.201.9.2/24", "dev", ns_if)
        run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")

    try:
        yield make, ns, host_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


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
