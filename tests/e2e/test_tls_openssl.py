"""tls -m json against real OpenSSL peers: curl, Python's ssl (the _ex calls), nginx (HTTP/1.1
and HTTP/2), node (static OpenSSL) as client and server. Every test asserts the exact bytes of
random bodies in both directions, on both sides, and the 4-tuple of the connection."""

import os
import re
import subprocess

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import assert_tuple, free_port, need_root, need_tool

pytestmark = pytest.mark.ebpf

# Free ports, chosen per run: two runs of these tests on one machine must not meet.
PY_PORT = free_port()
NODE_PORT = free_port()
MANY_PORT = free_port()


@pytest.fixture(scope="module")
def certs(rsa_certs):
    need_root()
    need_tool("openssl", "curl")
    return rsa_certs


def bodies(tmp_path, size, tag):
    req, resp = tp.body(size, tag + b"-req-"), tp.body(size, tag + b"-resp-")
    rq, rs = tmp_path / f"req{size}", tmp_path / f"resp{size}"
    rq.write_bytes(req)
    rs.write_bytes(resp)
    return req, resp, str(rq), str(rs)


def side(events, direction, match, h2):
    """What one side sent or received: HTTP/2 frames are undone per connection (pid, fd, remote port)."""
    if not h2:
        return tp.stream(events, direction=direction, **match)
    mine = tp.data_events(events, direction=direction, **match)
    conns = {(e["pid"], e["fd"], e["remote_port"]) for e in mine}
    return b"|".join(tp.h2_data(tp.stream(mine, pid=pid, fd=fd, remote_port=rport)) for pid, fd, rport in sorted(conns))


def check_exchange(events, client, server, req, resp, h2=False):
    assert req in side(events, "write", client, h2), "client write side"
    assert req in side(events, "read", server, h2), "server read side"
    assert resp in side(events, "write", server, h2), "server write side"
    assert resp in side(events, "read", client, h2), "client read side"


def test_curl_and_python_ssl_server(certs, tmp_path):
    cert, key = certs
    port = PY_PORT
    out = str(tmp_path / "events.json")
    exchanges = [bodies(tmp_path, size, b"py%d" % size) for size in tp.SIZES]
    resp_file = str(tmp_path / "resp")
    with open(resp_file, "wb") as f:
        f.write(exchanges[-1][1])  # the server answers the 1 MiB body to each request
    with tp.python_server(port, cert, key, resp_file) as server:
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        pids = [tp.curl(f"https://127.0.0.1:{port}/x", data_file=rq) for _req, _resp, rq, _rs in exchanges]
        _, err, _ = tracer.stop(settle=[port])
    assert tracer.proc.returncode == 0, err
    events = tp.read_events(out)
    srv = {"pid": server.pid}
    for pid, (req, _resp, _rq, _rs) in zip(pids, exchanges):
        check_exchange(events, {"pid": pid}, srv, req, exchanges[-1][1])
        assert_tuple(events, port, {"pid": pid}, srv)
    # Python uses the _ex calls; its 1 MiB SSL_write_ex arrives whole, in chunks with offsets.
    big = [e for e in tp.data_events(events, pid=server.pid, function="SSL_write_ex") if e["length"] == 1 << 20]
    assert big and not any(e["truncated"] for e in big)
    calls = [[]]  # chunks in capture order; each call's offsets start at 0
    for e in big:
        if e["offset"] == 0 and calls[-1]:
            calls.append([])
        calls[-1].append(e)
    for chunks in calls:
        assert [e["offset"] for e in chunks] == list(range(0, 1 << 20, 30720))
        assert tp.stream(chunks) == exchanges[-1][1]  # the whole 1 MiB body of one SSL_write_ex
    assert {e["function"] for e in tp.data_events(events, pid=server.pid)} <= {"SSL_read_ex", "SSL_write_ex"}
    # role and version from the SSL object: OpenSSL 3.0's flat ssl_st and 3.2+'s ssl_connection_st
    # alike (curl calls SSL_connect; Python's server SSL_do_handshake, which does not say the role)
    hs = [e for e in events if e["event_type"] == "tls_handshake"]
    assert sorted((e["pid"], e["role"], e["result"], e["tls_version"]) for e in hs if e["pid"] in pids) == \
        sorted((pid, "client", "success", "TLSv1.3") for pid in pids)
    served = [(e["role"], e["result"], e["tls_version"]) for e in hs if e["pid"] == server.pid]
    assert served == [("server", "success", "TLSv1.3")] * len(pids)
    assert "Events dropped: 0" in err


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_curl_and_nginx(certs, tmp_path, http2):
    need_tool("nginx")
    cert, key = certs
    port = free_port()
    out = str(tmp_path / "events.json")
    www = tmp_path / "www"
    www.mkdir()
    exchanges = [bodies(tmp_path, size, b"ngx%d" % size) for size in tp.SIZES]
    for i, (_req, resp, _rq, _rs) in enumerate(exchanges):
        (www / f"r{i}").write_bytes(resp)
    proto = ["--http2"] if http2 else ["--http1.1"]
    with tp.nginx(str(tmp_path), port, cert, key):
        tracer = tp.tls_tracer(["-m", "json", "-o", out])
        pids = []
        for i, (_req, _resp, rq, _rs) in enumerate(exchanges):
            pids.append(tp.curl(f"https://127.0.0.1:{port}/upload/u{i}", data_file=rq, extra=proto, put=True))
            pids.append(tp.curl(f"https://127.0.0.1:{port}/r{i}", extra=proto))
        # TLS 1.2 too: role and version of both sides read from the SSL objects (nginx and curl
        # on Debian 12 use OpenSSL 3.0, on Debian 13 3.5)
        pid12 = tp.curl(f"https://127.0.0.1:{port}/r0", extra=proto + ["--tls-max", "1.2"])
        _, err, _ = tracer.stop(settle=[port])
    assert tracer.proc.returncode == 0, err
    events = tp.read_events(out)
    srv = {"process": "ctpeer-nginx", "local_port": port}  # our nginx: other tests may run one too
    hs = [e for e in events if e["event_type"] == "tls_handshake"]
    assert sorted((e["pid"], e["role"], e["result"], e["tls_version"]) for e in hs if e["pid"] in pids + [pid12]) == \
        sorted([(pid, "client", "success", "TLSv1.3") for pid in pids] + [(pid12, "client", "success", "TLSv1.2")])
    ports = {e["local_port"]: e["pid"] for e in hs if e["pid"] in pids + [pid12]}
    served = sorted((ports[e["remote_port"]], e["role"], e["result"], e["tls_version"]) for e in hs
                    if e["process"] == "ctpeer-nginx" and e["local_port"] == port)
    assert served == sorted([(pid, "server", "success", "TLSv1.3") for pid in pids] +
                            [(pid12, "server", "success", "TLSv1.2")])
    for i, (req, resp, _rq, _rs) in enumerate(exchanges):
        put, get = {"pid": pids[2 * i]}, {"pid": pids[2 * i + 1]}
        assert req in side(events, "write", put, http2) and req in side(events, "read", srv, http2)
        assert resp in side(events, "write", srv, http2) and resp in side(events, "read", get, http2)
        assert_tuple(events, port, put, srv)
        assert_tuple(events, port, get, srv)
    # every event of the curl runs (all gone before the tracer stopped) has their ppid and exe, sent
    # by the kernel with the process image's first TLS event
    curl_exe = os.path.realpath(tp.peer("curl"))
    mine = [e for e in events if e["event_type"].startswith("tls_") and e["pid"] in pids + [pid12]]
    assert mine and {(e["ppid"], e["exe"]) for e in mine} == {(os.getpid(), curl_exe)}
    nginx_exe = {e["exe"] for e in events if e["event_type"].startswith("tls_") and e["process"] == "ctpeer-nginx"}
    assert nginx_exe == {os.path.realpath(tp.peer("nginx"))}
    assert "Events dropped: 0" in err


def test_node_client_and_server(certs, tmp_path):
    need_tool("node")
    cert, key = certs
    port = NODE_PORT
    out = str(tmp_path / "events.json")
    for size in tp.SIZES:
        req, resp, rq, rs = bodies(tmp_path, size, b"node%d" % size)
        with tp.node_server(port, cert, key, rs) as server:
            # node sends headers and the 1 MiB body in one SSL_write: over the default 1 MiB limit
            tracer = tp.tls_tracer(["-m", "json", "-o", out, "--max-payload", "2M"])
            got = str(tmp_path / "got")
            tp.node_client(port, rq, got)
            _, err, _ = tracer.stop(settle=[port])
        assert tracer.proc.returncode == 0, err
        assert open(got, "rb").read() == resp
        events = tp.read_events(out)
        server_events = {"pid": server.pid}
        client = [e for e in tp.data_events(events, process="ctpeer-node", remote_port=port) if e["pid"] != server.pid]
        cpid = client[0]["pid"]
        check_exchange(events, {"pid": cpid}, server_events, req, resp)
        assert_tuple(events, port, {"pid": cpid}, server_events)
        assert all(e["library"] == "openssl" for e in tp.data_events(events, pid=cpid))
        assert "Events dropped: 0" in err


@pytest.mark.parametrize("loop", ["c", "python"])
def test_twenty_concurrent_clients(certs, tmp_path, monkeypatch, loop):
    """Both formatting loops (pipeline/fastfmt.c and the pure-Python one) write every byte."""
    if loop == "python":
        monkeypatch.setenv("CRYPTO_TRACER_PURE_PYTHON", "1")
    cert, key = certs
    port = MANY_PORT
    out = str(tmp_path / "events.json")
    resp = tp.body(10 * 1024, b"shared-resp-")
    (tmp_path / "resp").write_bytes(resp)
    reqs = []
    for i in range(20):
        req = tp.body(10 * 1024, b"client%02d-" % i)
        (tmp_path / f"req{i}").write_bytes(req)
        reqs.append(req)
    with tp.python_server(port, cert, key, str(tmp_path / "resp")) as server:
        tracer = tp.tls_tracer(["-v", "-m", "json", "-o", out])
        procs = [subprocess.Popen([tp.peer("curl"), "-sSk", "--fail", "-o", os.devnull, "--data-binary",
                                   f"@{tmp_path}/req{i}", f"https://127.0.0.1:{port}/c{i}"]) for i in range(20)]
        assert all(p.wait(30) == 0 for p in procs)
        _, err, _ = tracer.stop(settle=[port])
    events = tp.read_events(out)
    for p, req in zip(procs, reqs):
        assert req in tp.stream(events, pid=p.pid, direction="write")
        assert resp in tp.stream(events, pid=p.pid, direction="read")
        # the server side of this very connection (20 threads interleave: match by the 4-tuple)
        (client_port,) = {e["local_port"] for e in tp.data_events(events, pid=p.pid)}
        assert req in tp.stream(events, pid=server.pid, direction="read", remote_port=client_port)
        assert resp in tp.stream(events, pid=server.pid, direction="write", remote_port=client_port)
    # every byte the server read is one of the 20 requests (headers + body), nothing else
    assert tp.stream(events, pid=server.pid, direction="write").count(resp) == 20
    m = re.search(r"Events dropped: (\d+)", err)
    assert m and m.group(1) == "0", err
    out_n = int(re.search(r"Events output: (\d+)", err).group(1))
    assert out_n == len(events)
    assert "accounting mismatch" not in err  # kernel submitted == user space received
    assert ("tls: data records are formatted in C" in err) == (loop == "c"), err


@pytest.mark.parametrize("loop", ["c", "python"])
def test_a_download_every_byte_through_each_loop(certs, tmp_path, monkeypatch, loop):
    """A 3 MB binary download from nginx in -m json: curl's reads and nginx's writes are exactly the file,
    whichever loop formats them (the C loop takes all but the first few records of the connection)."""
    need_tool("nginx")
    if loop == "python":
        monkeypatch.setenv("CRYPTO_TRACER_PURE_PYTHON", "1")
    cert, key = certs
    port = free_port()
    out = str(tmp_path / "events.json")
    (tmp_path / "www").mkdir()
    blob = os.urandom(3 << 20)
    (tmp_path / "www" / "blob").write_bytes(blob)
    with tp.nginx(str(tmp_path), port, cert, key):
        tracer = tp.tls_tracer(["-v", "-m", "json", "-o", out])
        pid = tp.curl(f"https://127.0.0.1:{port}/blob", extra=["--http1.1"])
        _, err, _ = tracer.stop(settle=[port])
    events = tp.read_events(out)
    got = tp.stream(events, pid=pid, direction="read")
    assert got.endswith(blob) and len(got) - len(blob) < 1024, len(got)  # the response headers, then the file
    sent = tp.stream(events, process="ctpeer-nginx", local_port=port, direction="write")
    assert sent.endswith(blob) and len(sent) - len(blob) < 1024, len(sent)
    assert "Events dropped: 0" in err, err
    in_c = re.search(r"tls: (\d+) records were formatted in C", err)
    assert (int(in_c.group(1)) >= 150 if loop == "c" else in_c is None), err
