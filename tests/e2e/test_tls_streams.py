"""tls -m streams -o DIR against real peers: nginx serving a 24 MB file and taking a 3 MB upload, curl as
the client. Each direction of each connection is a file equal, byte for byte, to what the process sent or
received (the HTTP headers around the bodies included); the index names every stream with its 4-tuple and
holds the handshakes; a call cut by --max-payload is a counted gap, never silent."""

import json
import os

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import free_port, need_root, need_tool

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module")
def server(rsa_certs, tmp_path_factory):
    need_root()
    need_tool("curl", "nginx")
    cert, key = rsa_certs
    d = tmp_path_factory.mktemp("streams")
    (d / "www").mkdir()
    big = os.urandom(24 << 20)
    (d / "www" / "big").write_bytes(big)
    port = free_port()
    with tp.nginx(str(d), port, cert, key):
        yield d, port, big


def read_index(directory):
    with open(os.path.join(directory, "connections.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_each_direction_is_a_file_equal_to_what_crossed(server, tmp_path):
    d, port, big = server
    upload = os.urandom(3 << 20)
    (tmp_path / "up").write_bytes(upload)
    out = tmp_path / "streams"
    tracer = tp.tls_tracer(["-m", "streams", "-o", str(out)])
    got = tmp_path / "got"
    get_pid = tp.curl(f"https://127.0.0.1:{port}/big", out=str(got), extra=["--http1.1"])
    put_pid = tp.curl(f"https://127.0.0.1:{port}/upload/u", data_file=str(tmp_path / "up"), put=True,
                      extra=["--http1.1"])
    res = tracer.stop(settle=[port])
    assert res.rc == 0, res.err
    assert got.read_bytes() == big
    assert "Events dropped: 0" in res.err
    assert oct(os.stat(out).st_mode & 0o777) == "0o700"
    index = read_index(out)
    streams = {e["file"]: e for e in index if e["event_type"] == "tls_stream"}
    ends = {e["file"]: e for e in index if e["event_type"] == "tls_stream_end"}
    assert set(ends) == set(streams)
    by = {(e["pid"], e["direction"]): name for name, e in streams.items()}
    for name in streams:
        assert oct(os.stat(out / name).st_mode & 0o777) == "0o600"
        assert ends[name]["gaps"] == 0 and ends[name]["bytes"] == os.path.getsize(out / name)

    def content(pid, direction):
        return (out / by[(pid, direction)]).read_bytes()

    # the GET: curl received the headers, then exactly the file; what it sent is its request
    received = content(get_pid, "read")
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and body == big
    assert content(get_pid, "write").startswith(b"GET /big HTTP/1.1\r\n")
    # the PUT: curl's sent stream is the request headers and then the upload, byte for byte
    head, body = content(put_pid, "write").split(b"\r\n\r\n", 1)
    assert head.startswith(b"PUT /upload/u HTTP/1.1\r\n") and body == upload
    # nginx's side of each connection: the same bytes the other way
    nginx = [e for e in streams.values() if e["process"] == "ctpeer-nginx" and e["local_port"] == port]
    for pid in (get_pid, put_pid):
        cport = next(e["local_port"] for e in streams.values() if e["pid"] == pid)
        mine = {e["direction"]: name for name, e in streams.items() if e in nginx and e["remote_port"] == cport}
        assert (out / mine["write"]).read_bytes() == content(pid, "read")
        assert (out / mine["read"]).read_bytes() == content(pid, "write")
        s = streams[by[(pid, "read")]]
        assert (s["local_addr"], s["remote_addr"], s["remote_port"]) == ("127.0.0.1", "127.0.0.1", port)
        assert by[(pid, "read")] == f"{pid}-ctpeer-curl-127.0.0.1.{cport}-127.0.0.1.{port}.received"
    hs = [e for e in index if e["event_type"] == "tls_handshake" and e["pid"] in (get_pid, put_pid)]
    assert sorted(e["pid"] for e in hs) == sorted([get_pid, put_pid])


def test_a_call_cut_by_max_payload_is_a_counted_gap(server, tmp_path):
    d, port, big = server
    out = tmp_path / "streams"
    tracer = tp.tls_tracer(["-m", "streams", "-o", str(out), "--max-payload", "1000"])
    pid = tp.curl(f"https://127.0.0.1:{port}/big", extra=["--http1.1"])
    res = tracer.stop(settle=[port])
    assert res.rc == 0, res.err
    index = read_index(out)
    name = next(e["file"] for e in index if e["event_type"] == "tls_stream" and e["pid"] == pid
                and e["direction"] == "read")
    end = next(e for e in index if e["event_type"] == "tls_stream_end" and e["file"] == name)
    size = os.path.getsize(out / name)
    assert end["bytes"] == size and end["gaps"] > 0
    # what is missing plus what is there is everything curl read: headers and the 24 MB body
    head = (out / name).read_bytes().split(b"\r\n\r\n", 1)[0]
    assert size + end["missing_bytes"] == len(head) + 4 + len(big)

