"""Key log without data-call hooks (issue 12): sessions whose handshake runs inside SSL_write.

The client is Python with do_handshake_on_connect=False, so no hooked handshake function runs:
the handshake happens inside its first SSL_write, like node's. The tracer watches the client
only (--name ctcli), so every line it writes came from the client's own objects (read from
memory by keys/pending.py, at SSL_free's entry, or at exit_group), and must equal the client's
own key log (keylog_filename), each line once.
"""

import subprocess
import sys

import pytest

from tests.harness import Tracer, free_port, make_cert, need_root, need_tool, nginx_conf, wait_port, wait_until
from tests.tls_helpers import by_client_random, read_keylog

PORT = free_port()
CLIENT = r'''
import ctypes, os, socket, ssl, sys
ctypes.CDLL(None).prctl(15, b"ctcli-keys", 0, 0, 0)  # the tracer's --name, before any SSL object exists
port, count, mode, version, keylog = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, "TLSv" + version.replace(".", "_"))
ctx.keylog_filename = keylog
for i in range(count):
    raw = socket.create_connection(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, do_handshake_on_connect=False)  # the handshake runs inside SSL_write
    s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    if mode == "exit":
        os._exit(0)  # right after the handshake: no SSL_free, no Python cleanup
    assert b"resp-/x" in s.recv(4096)
    if mode == "hold":  # the object stays alive until the test has seen its keys
        print("handshaken", flush=True)
        sys.stdin.readline()
    s.close()
print("done", flush=True)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_root()
    need_tool("nginx")
    d = tmp_path_factory.mktemp("keysessions")
    cert, key = make_cert(d)
    nginx = subprocess.Popen(["nginx", "-c", nginx_conf(d, PORT, cert, key), "-p", str(d)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(PORT)
        yield d
    finally:
        nginx.terminate()
        nginx.wait(10)


def _run(d, name, count, mode, version):
    peer_keys, tracer_keys = d / f"{name}.peer.keys", d / f"{name}.tracer.keys"
    tracer = Tracer(["tls", "-m", "keylog", "-k", str(tracer_keys), "--name", "ctcli"])
    try:
        out = subprocess.run([sys.executable, "-c", CLIENT, str(PORT), str(count), mode, version, str(peer_keys)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        want = read_keylog(peer_keys)
        per_session = 5 if version == "1.3" else 1
        assert len(by_client_random(want)) == count and len(want) == count * per_session
        # the lines arrive while the tracer runs (no drain needed): within the wait below
        wait_until(lambda: read_keylog(tracer_keys) >= want, 10, fail=False)
    finally:
        result = tracer.stop()
    got = read_keylog(tracer_keys)
    assert by_client_random(got) == by_client_random(want)
    raw_lines = [line for line in tracer_keys.read_text().splitlines() if line.strip()]
    assert len(raw_lines) == len(got), "a key line was written twice"
    return result


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_sessions_shorter_than_the_polling_interval(server, version):
    """connect, one request, close: each object is freed within a few ms, before any poll."""
    _run(server, f"short-{version}", 20, "short", version)


def test_thousand_sessions_as_fast_as_possible(server):
    result = _run(server, "thousand", 1000, "short", "1.3")
    assert "1000 TLS sessions" in result.err


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_process_exiting_right_after_its_handshake(server, version):
    """os._exit right after the SSL_write that ran the handshake: exit_group reads the object."""
    _run(server, f"exit-{version}", 1, "exit", version)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_keys_of_a_live_session_arrive_before_it_is_freed(server, version):
    """An open connection whose handshake ran inside SSL_write: its keys come from memory reads."""
    d = server
    peer_keys, tracer_keys = d / f"hold-{version}.peer.keys", d / f"hold-{version}.tracer.keys"
    tracer = Tracer(["tls", "-m", "keylog", "-k", str(tracer_keys), "--name", "ctcli"])
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(PORT), "1", "hold", version, str(peer_keys)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "handshaken"
        want = read_keylog(peer_keys)
        assert want
        got = wait_until(lambda: read_keylog(tracer_keys) >= want and read_keylog(tracer_keys), 5, fail=False)
        assert by_client_random(got or set()) == by_client_random(want), "keys not written while the session lives"
    finally:
        client.communicate("\n", timeout=30)
        tracer.stop()
