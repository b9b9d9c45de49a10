"""tls against real Go programs (tests/go built by tests/gobuild.py with the oldest, a middle and the newest
Go reachable, normal/stripped/PIE) and esbuild (npm, stripped, no build info): exact random bodies both ways
with the 4-tuple, 50 concurrent connections with every byte accounted for, key log lines equal to Go's own
KeyLogWriter's, tshark decrypting a Go session from the pcapng alone.

Cost: every toolchain x variant gets one exact-bytes run (1 B, 10 KiB, 1 MiB each way); the concurrency,
key log, pcapng and exec-discovery checks run on chosen combinations only."""

import base64
import os
import re
import subprocess

import pytest
from cryptography import x509

from tests import gobuild
from tests.e2e import tlspeers as tp
from tests.harness import data_events, free_port, need_tool, wait_port, wait_until
from tests.tls_helpers import read_keylog

pytestmark = pytest.mark.ebpf

MATRIX = gobuild.matrix()
CASES = [(label, variant) for label in MATRIX for variant in gobuild.VARIANTS]
SERVER_NAME, CLIENT_NAME = f"{tp.PEER_PREFIX}-gosrv", f"{tp.PEER_PREFIX}-gocli"


def programs(label, variant, where):
    """The build, reached through links named ctpeer-go* in where (the kernel takes comm from the name run,
    so `--name ctpeer` keeps the host's other TLS out)."""
    try:
        progs = gobuild.build(gobuild.toolchain(MATRIX[label]), variant)
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))
    os.makedirs(where, exist_ok=True)
    links = []
    for name, target in ((SERVER_NAME, progs.server), (CLIENT_NAME, progs.client)):
        link = os.path.join(where, name)
        if not os.path.islink(link):
            os.symlink(target, link)
        links.append(link)
    return progs, links[0], links[1]


class GoServer:
    """tests/go/tlsserver on a free port (stdin kept open: it exits when stdin closes)."""

    def __init__(self, path, cert, key, keylog=None, body=None):
        args = [path, "-cert", cert, "-key", key]
        if keylog:
            args += ["-keylog", keylog]
        if body:
            args += ["-body", body]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, GOMAXPROCS="2"))
        line = self.proc.stdout.readline()
        m = re.match(r"listening (\d+)", line)
        if not m:
            self.stop()
            raise AssertionError(f"tlsserver did not start: {line} {self.proc.stderr.read()}")
        self.port = int(m.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def client(path, port, *args, keylog=None):
    cmd = [path, "-url", f"https://127.0.0.1:{port}/", *args] + (["-keylog", keylog] if keylog else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, GOMAXPROCS="2"))
    assert out.returncode == 0 and out.stdout.endswith("done\n"), out.stderr
    return out.stdout


def http_bodies(raw: bytes) -> list[bytes]:
    """The bodies of the HTTP/1.1 messages one after the other in raw (Content-Length or chunked)."""
    bodies, pos = [], 0
    while pos < len(raw):
        end = raw.index(b"\r\n\r\n", pos)
        head = raw[pos:end].decode("latin-1").lower()
        pos = end + 4
        m = re.search(r"content-length: (\d+)", head)
        if m:
            n = int(m.group(1))
            bodies.append(raw[pos:pos + n])
            pos += n
        elif "transfer-encoding: chunked" in head:
            body = bytearray()
            while True:
                eol = raw.index(b"\r\n", pos)
                n = int(raw[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                body += raw[pos:pos + n]
                pos += n + 2
                if n == 0:
                    break
            bodies.append(bytes(body))
        else:
            bodies.append(b"")
    return bodies


def by_connection(events, direction, port_key):
    """{port: bytes} of one side's tls_data events of one direction, per connection."""
    out: dict[int, bytearray] = {}
    for e in data_events(events, direction=direction):
        out.setdefault(e[port_key], bytearray()).extend(base64.b64decode(e["data_b64"]))
    return {k: bytes(v) for k, v in out.items()}


def check_exact(events, port, body, requests):
    """Each side's POST bodies (requests of them) and the echoed responses, per connection, with the 4-tuple:
    the server's events are 127.0.0.1:port -> the client's port, the client's the other way round."""
    srv = [e for e in events if e["event_type"] == "tls_data" and e["process"] == SERVER_NAME]
    cli = [e for e in events if e["event_type"] == "tls_data" and e["process"] == CLIENT_NAME]
    assert srv and cli, f"server events {len(srv)}, client events {len(cli)}"
    for e in srv:
        assert (e["library"], e["local_addr"], e["local_port"], e["remote_addr"]) == ("go", "127.0.0.1", port,
                                                                                    "127.0.0.1"), e
        assert e["fd"] is not None and e["function"] in ("Read", "Write") and not e["truncated"]
    for e in cli:
        assert (e["library"], e["local_addr"], e["remote_addr"], e["remote_port"]) == ("go", "127.0.0.1",
                                                                                     "127.0.0.1", port), e
        assert e["fd"] is not None
    assert {e["local_port"] for e in cli} == {e["remote_port"] for e in srv}
    for side, key, sent, got in ((srv, "remote_port", "write", "read"), (cli, "local_port", "write", "read")):
        for direction in (sent, got):
            streams = by_connection(side, direction, key)
            bodies = [b for conn in sorted(streams) for b in http_bodies(streams[conn])]
            assert len(bodies) == requests, (direction, len(bodies))
            assert all(b == body for b in bodies), f"{direction}: a body differs"


def Tracer(args):
    """tls on our Go peers only (--name ctpeer), once its probes are attached."""
    return tp.tls_tracer(args)


@pytest.mark.parametrize("label,variant", CASES)
def test_exact_bodies_both_ways(certs, tmp_path, label, variant):
    cert, key = certs
    progs, server, cli = programs(label, variant, str(tmp_path / "bin"))
    srv = GoServer(server, cert, key)
    out = str(tmp_path / "events.json")
    try:
        tracer = Tracer(["-m", "json", "-o", out, "--libssl", progs.client])
        bodies = [tp.body(size, b"%s-%s-%d-" % (label.encode(), variant.encode(), size)) for size in tp.SIZES]
        for i, body in enumerate(bodies):
            path = tmp_path / f"req{i}"
            path.write_bytes(body)
            client(cli, srv.port, "-post", str(path))
        err = tracer.stop().err
    finally:
        srv.stop()
    assert "Events dropped: 0" in err, err
    events = tp.read_events(out)
    by_port: dict[int, list] = {}
    for e in events:
        if e["event_type"] == "tls_data":
            by_port.setdefault(e["local_port"] if e["process"] == CLIENT_NAME else e["remote_port"], []).append(e)
    assert len(by_port) == len(bodies), sorted(by_port)
    for port_events, body in zip((by_port[p] for p in sorted(by_port, key=lambda p: by_port[p][0]["timestamp"])),
                                 bodies):
        check_exact(port_events, srv.port, body, 1)
    # each connection is announced once per side at its first data call, with the hello packets' facts
    hs = [e for e in events if e["event_type"] == "tls_handshake"]
    sides = sorted((e["process"] == CLIENT_NAME, e["local_port"] if e["process"] == CLIENT_NAME else e["remote_port"],
                    e["library"], e["role"], e["tls_version"]) for e in hs)
    assert sides == sorted([(False, p, "go", "server", "TLSv1.3") for p in by_port] +
                           [(True, p, "go", "client", "TLSv1.3") for p in by_port]), hs
    assert all(e["cipher"].startswith("TLS_") and e["group"] and e["sni"] is None for e in hs), hs
    # TLS 1.3's encrypted facts, decrypted with the secrets go_keylog reads: net/http's ALPN, the server's certificate
    with open(cert, "rb") as f:
        subject = x509.load_pem_x509_certificate(f.read()).subject.rfc4514_string()
    assert sorted({(e["role"], e["alpn"], e["peer_cert_subject"], e["peer_key_type"], e["peer_key_bits"])
                   for e in hs}) == [("client", "http/1.1", subject, "EC", 256), ("server", "http/1.1", None, None, None)]


def test_50_concurrent_connections_every_byte(certs, tmp_path):
    """GOMAXPROCS=2, 50 goroutines, 50 keep-alive connections, 200 POSTs of 10 KiB echoed: every body in both
    directions on both sides, per connection; nothing lost."""
    cert, key = certs
    progs, server, cli = programs("middle", "normal", str(tmp_path / "bin"))
    srv = GoServer(server, cert, key)
    out = str(tmp_path / "events.json")
    body = tp.body(10 * 1024, b"many-")
    (tmp_path / "req").write_bytes(body)
    try:
        tracer = Tracer(["-m", "json", "-o", out, "--libssl", progs.client])
        client(cli, srv.port, "-post", str(tmp_path / "req"), "-c", "50", "-n", "200")
        err = tracer.stop().err
    finally:
        srv.stop()
    assert "Events dropped: 0" in err, err
    events = tp.read_events(out)
    conns = {e["local_port"] for e in events if e["event_type"] == "tls_data" and e["process"] == CLIENT_NAME}
    assert len(conns) == 50
    check_exact(events, srv.port, body, 200)
    threads = {e["tid"] for e in events if e["event_type"] == "tls_data" and e["process"] == SERVER_NAME}
    assert len(threads) > 1  # goroutines ran on several threads


@pytest.mark.parametrize("label", ["oldest", "newest"])
def test_keylog_equals_keylogwriter(certs, tmp_path, label):
    """TLS 1.3 and 1.2 sessions, the client and the server Go: the tracer's lines are the lines both
    KeyLogWriters wrote (each session's lines written by both ends, the same)."""
    cert, key = certs
    progs, server, cli = programs(label, "stripped" if label == "newest" else "normal", str(tmp_path / "bin"))
    srv_log, cli_log, ours = str(tmp_path / "srv.keys"), str(tmp_path / "cli.keys"), str(tmp_path / "ours.keys")
    srv = GoServer(server, cert, key, keylog=srv_log)
    try:
        tracer = Tracer(["-m", "keylog", "-k", ours, "--libssl", progs.client])
        client(cli, srv.port, "-n", "3", "-newconn", keylog=cli_log)
        client(cli, srv.port, "-n", "2", "-newconn", "-tls12", keylog=cli_log)
        err = tracer.stop().err
    finally:
        srv.stop()
    theirs = read_keylog(cli_log)
    assert read_keylog(srv_log) == theirs
    assert {line[0] for line in theirs} == {"CLIENT_RANDOM", "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
                                            "SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0",
                                            "SERVER_TRAFFIC_SECRET_0"}
    assert len({line[1] for line in theirs}) == 5
    assert read_keylog(ours) == theirs, err
    assert os.stat(ours).st_mode & 0o777 == 0o600


def test_pcapng_decrypts_go_session_alone(certs, tmp_path):
    """A Go server started after the tracer (found through its exec), a Go client: tshark decrypts the HTTP
    from the pcapng alone, the packets carry the process comment."""
    need_tool("tshark")
    cert, key = certs
    progs, server, cli = programs("middle", "stripped", str(tmp_path / "bin"))
    cap = str(tmp_path / "cap.pcapng")
    body = tp.body(2000, b"pcap-go-")
    (tmp_path / "req").write_bytes(body)
    ours = str(tmp_path / "ours.keylog")
    tracer = Tracer(["-v", "-m", "pcapng", "-w", cap, "-k", ours, "-i", "lo", "--libssl", progs.client])
    srv = None
    try:
        srv = GoServer(server, cert, key)
        assert tracer.wait_stderr(f"tls: hooked {progs.server}", 20), tracer.stderr  # its exec, then its maps
        client(cli, srv.port, "-post", str(tmp_path / "req"))
        # the session's application secrets (both ends': the server's label is read from its live memory)
        # are in, so their DSB precedes the packets still held back
        wait_until(lambda: sum(line[0] == "CLIENT_TRAFFIC_SECRET_0" for line in read_keylog(ours)) >= 1,
                   20, "the Go session's key lines")
        err = tracer.stop().err
    finally:
        if srv:
            srv.stop()
    out = subprocess.run(["tshark", "-r", cap, "-Y", f"http && tcp.port == {srv.port}", "-T", "fields",
                          "-e", "frame.comment", "-e", "http.request.method", "-e", "http.response.code"],
                         capture_output=True, text=True, timeout=60)
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert any(r[1] == "POST" and f"comm={CLIENT_NAME}" in r[0] for r in rows), out.stdout + out.stderr + err
    assert any(r[2] == "200" and f"comm={SERVER_NAME}" in r[0] for r in rows), out.stdout + err


def test_esbuild_https_serve(certs, tmp_path):
    """esbuild from npm: third-party, stripped, no build info, found by itself; what it serves is traced."""
    need_tool("curl")
    cert, key = certs
    try:
        esbuild = gobuild.esbuild()
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))
    site = tmp_path / "site"
    site.mkdir()
    content = tp.body(10 * 1024, b"esbuild-")
    (site / "page.txt").write_bytes(content)
    port = free_port()
    link = tmp_path / f"{tp.PEER_PREFIX}-esbuild"
    os.symlink(esbuild, link)
    proc = subprocess.Popen([str(link), f"--servedir={site}", f"--serve=127.0.0.1:{port}", f"--keyfile={key}",
                             f"--certfile={cert}"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = str(tmp_path / "events.json")
    try:
        wait_port(port)
        tracer = Tracer(["-m", "json", "-o", out])
        got = subprocess.run(["curl", "-sk", "--http1.1", f"https://127.0.0.1:{port}/page.txt"], capture_output=True,
                             timeout=30)
        assert got.stdout == content
        tracer.stop()
    finally:
        proc.stdin.close()
        proc.wait(10)
    events = [e for e in tp.read_events(out) if e["event_type"] == "tls_data"]
    assert events and {e["library"] for e in events} == {"go"}
    assert content in tp.stream(events, direction="write")
    assert b"GET /page.txt HTTP/1.1" in tp.stream(events, direction="read")
    for e in events:
        assert (e["local_addr"], e["local_port"], e["remote_addr"]) == ("127.0.0.1", port, "127.0.0.1"), e
