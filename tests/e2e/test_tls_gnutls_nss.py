"""tls -m json against GnuTLS (gnutls-cli -> gnutls-serv --echo) and NSS (tstclnt -> selfserv):
the exact bytes in both directions, on both sides, with the 4-tuple."""

import subprocess
import threading

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import assert_tuple, free_port, need_root, need_tool, wait_until

pytestmark = pytest.mark.ebpf

# Free ports, chosen per run: two runs of these tests on one machine must not meet.
GNUTLS_PORT = free_port()
NSS_PORT = free_port()


@pytest.fixture(scope="module")
def certs(rsa_certs):
    need_root()
    need_tool("openssl")
    return rsa_certs


def gnutls_echo(port, data: bytes) -> tuple[int, bytes]:
    """Send data (lines) with gnutls-cli and wait until the echo came back; returns (pid, echo)."""
    p = subprocess.Popen([tp.peer("gnutls-cli"), "--insecure", "-p", str(port), "127.0.0.1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    got = bytearray()

    def reader():
        while chunk := p.stdout.read1(1 << 16):
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    wait_until(lambda: b"- Simple Client Mode:" in got, 10, "gnutls-cli's handshake")  # it then reads stdin
    p.stdin.write(data)
    p.stdin.flush()
    wait_until(lambda: data in bytes(got), 10, fail=False)
    p.stdin.close()
    p.wait(10)
    t.join(5)
    return p.pid, bytes(got)


def test_gnutls_cli_and_serv(certs, tmp_path):
    need_tool("gnutls-serv", "gnutls-cli")
    cert, key = certs
    port = GNUTLS_PORT
    out = str(tmp_path / "events.json")
    sizes = (2, 10 * 1024, 1 << 20)
    with tp.process([tp.peer("gnutls-serv"), "--echo", "-p", str(port), "--x509certfile", cert,
                     "--x509keyfile", key], port=port) as server:
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        runs = []
        for size in sizes:
            data = tp.body(size - 1, b"gnutls%d-" % size) + b"\n"  # gnutls-cli sends whole lines
            pid, echo = gnutls_echo(port, data)
            assert data in echo
            runs.append((pid, data))
        _, err, _ = tracer.stop(settle=[port])
    assert tracer.proc.returncode == 0, err
    events = tp.read_events(out)
    srv = {"pid": server.pid}
    for pid, data in runs:
        client = {"pid": pid}
        assert data in tp.stream(events, direction="write", **client)
        assert data in tp.stream(events, direction="read", **client)
        assert data in tp.stream(events, direction="read", **srv)
        assert data in tp.stream(events, direction="write", **srv)
        assert_tuple(events, port, client, srv)
    assert {e["library"] for e in tp.data_events(events, pid=server.pid)} == {"gnutls"}
    assert {e["function"] for e in tp.data_events(events, pid=server.pid)} == {"gnutls_record_recv",
                                                                                "gnutls_record_send"}
    hs = [e for e in events if e["event_type"] == "tls_handshake" and e["pid"] in (server.pid, runs[0][0])]
    assert {(e["role"], e["result"]) for e in hs} >= {("client", "success"), ("server", "success")}
    assert "Events dropped: 0" in err


@pytest.fixture(scope="module")
def nssdb(certs, tmp_path_factory):
    need_tool("certutil", "pk12util", "selfserv", "tstclnt")
    cert, key = certs
    d = tmp_path_factory.mktemp("nssdb")
    db = f"sql:{d}"
    p12 = str(d / "srv.p12")
    subprocess.run(["certutil", "-N", "-d", db, "--empty-password"], check=True, capture_output=True)
    subprocess.run(["openssl", "pkcs12", "-export", "-in", cert, "-inkey", key, "-out", p12, "-name", "srv",
                    "-passout", "pass:"], check=True, capture_output=True)
    subprocess.run(["pk12util", "-i", p12, "-d", db, "-W", ""], check=True, capture_output=True)
    return db


def test_nss_tstclnt_and_selfserv(nssdb, tmp_path):
    port = NSS_PORT
    out = str(tmp_path / "events.json")
    with tp.process([tp.peer("selfserv"), "-d", nssdb, "-n", "srv", "-p", str(port), "-V", "tls1.2:tls1.3"],
                    port=port) as server:
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        runs = []
        for size in (1, 4096, 2):  # three: the third's PRFileDesc has the first's address (glibc's malloc)
            token = tp.body(size, b"nss%d-" % size)
            request = b"GET /" + token + b" HTTP/1.0\r\n\r\n"
            (tmp_path / "request").write_bytes(request)
            with open(tmp_path / "request", "rb") as stdin:  # tstclnt hangs on a pipe's EOF, not a file's
                client = subprocess.run([tp.peer("tstclnt"), "-h", "127.0.0.1", "-p", str(port), "-d", nssdb, "-o",
                                         "-V", "tls1.2:tls1.3"], stdin=stdin, capture_output=True, timeout=20)
            assert token in client.stdout  # selfserv echoes the request
            runs.append(request)
        _, err, _ = tracer.stop(settle=[port])
    assert tracer.proc.returncode == 0, err
    events = tp.read_events(out)
    mine = tp.data_events(events, process="ctpeer-tstclnt", remote_port=port)  # not another run's
    clients = {e["pid"] for e in mine}
    assert len(clients) == 3
    srv = {"pid": server.pid}
    for request in runs:
        assert request in tp.stream(mine, direction="write")
        assert request in tp.stream(events, direction="read", **srv)
        assert request in tp.stream(events, direction="write", **srv)
        assert request in tp.stream(mine, direction="read")
    for pid in clients:
        assert_tuple(events, port, {"pid": pid}, srv)
    # one tls_handshake per connection on the server too, though a connection's PRFileDesc may have
    # the address of the one before it (PR_Close forgets it: tls.bpf.c tls_nss_close)
    client_ports = sorted({e["local_port"] for e in mine})
    assert sorted(e["remote_port"] for e in events if e["event_type"] == "tls_handshake" and
                  e["pid"] == server.pid) == client_ports, client_ports
    # only the SSL descriptors: tstclnt's stdin/stdout (plain PR_Read/PR_Write) never appear
    assert {e["library"] for e in tp.data_events(events, pid=min(clients))} == {"nss"}
    assert all(e["fd"] is not None and e["remote_port"] == port for e in tp.data_events(events, pid=min(clients)))
    assert "Events dropped: 0" in err
