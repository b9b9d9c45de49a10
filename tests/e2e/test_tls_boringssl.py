"""BoringSSL: Debian's android-libboringssl (bssl-tool as client and server) and the static copy in
PyPI's curl_cffi, in every tls mode: the plaintext of each direction byte for byte, the key log equal
to the library's own SSLKEYLOGFILE, and tshark decrypting the sessions from the pcapng alone; TLS 1.3
and 1.2.
"""

import os
import re
import subprocess

import pytest

from tests.e2e.tlspeers import peer, python_server, read_events, stream, tls_tracer
from tests.harness import free_port, need_root, need_tool, wait_port
from tests.tls_helpers import read_keylog, token

VERSIONS = {"1.3": "tls1.3", "1.2": "tls1.2"}
BSSL_LIB = "/usr/lib/x86_64-linux-gnu/android/libssl.so.0"

# curl_cffi's client: imports (maps the static BoringSSL), says so, waits for a line on stdin (the test
# lets it go once the tracer has hooked the library), then GETs the URL and prints the body
CFFI_CLIENT = r"""
import sys
from io import BytesIO
from curl_cffi import Curl, CurlOpt
print("imported", flush=True)
sys.stdin.readline()
c, out = Curl(), BytesIO()
c.setopt(CurlOpt.URL, sys.argv[1].encode())
c.setopt(CurlOpt.SSL_VERIFYPEER, 0)
c.setopt(CurlOpt.SSL_VERIFYHOST, 0)
version = {"1.3": 7, "1.2": 6}[sys.argv[2]]  # CURL_SSLVERSION_TLSv1_x, also as the maximum (<< 16)
c.setopt(CurlOpt.SSLVERSION, version | version << 16)
c.setopt(CurlOpt.WRITEDATA, out)
c.perform()
sys.stdout.buffer.write(out.getvalue())
"""


def _have_cffi() -> bool:
    try:
        import curl_cffi  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def bssl(tmp_path_factory, certs):
    """A looping bssl-tool -www server on a free port (its own key log in server.keys) and a layout cache
    of this module's own (the BoringSSL calibration runs here, not from an older cache)."""
    need_root()
    need_tool("bssl-tool")
    d = tmp_path_factory.mktemp("bssl")
    cert, key = certs
    port = free_port()
    env = dict(os.environ, SSLKEYLOGFILE=str(d / "server.keys"))
    srv = subprocess.Popen([peer("bssl-tool"), "server", "-accept", str(port), "-www", "-loop", "-key", key,
                            "-cert", cert], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path_factory.mktemp("layouts")))
            yield type("B", (), {"dir": d, "port": port, "pid": srv.pid})
    finally:
        srv.terminate()
        srv.wait(10)


def _bssl_client(b, path: str, version: str, keylog) -> bytes:
    """bssl-tool client sending one HTTP/1.0 GET; its stdout (handshake facts, then the response)."""
    out = subprocess.run([peer("bssl-tool"), "client", "-connect", f"127.0.0.1:{b.port}",
                          "-min-version", VERSIONS[version], "-max-version", VERSIONS[version]],
                         input=f"GET {path} HTTP/1.0\r\n\r\n".encode(), capture_output=True, timeout=20,
                         env=dict(os.environ, SSLKEYLOGFILE=str(keylog)))
    assert b"HTTP/1.0 200 OK" in out.stdout, out.stderr
    return out.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_bssl_plaintext(bssl, tmp_path, version):
    out = tmp_path / "events.json"
    tracer = tls_tracer(["-m", "json", "-o", str(out)])
    request = f"GET /{token()} HTTP/1.0\r\n\r\n".encode()
    printed = _bssl_client(bssl, request.split()[1].decode(), version, tmp_path / "client.keys")
    assert tracer.stop(settle=(bssl.port,)).rc == 0, tracer.stderr
    events = read_events(str(out))
    client_pid = next(e["pid"] for e in events if e["event_type"] == "tls_data" and e["pid"] != bssl.pid)
    assert {e["library"] for e in events if e["pid"] in (bssl.pid, client_pid)} == {"boringssl"}
    assert stream(events, pid=client_pid, direction="write") == request
    assert stream(events, pid=bssl.pid, direction="read") == b"GET "  # all that bssl-tool -www reads before it answers
    response = stream(events, pid=bssl.pid, direction="write")
    assert response.startswith(b"HTTP/1.0 200 OK") and response == stream(events, pid=client_pid, direction="read")
    assert printed.endswith(response)  # what the client printed is what it read
    hs = {e["pid"]: e for e in events if e["event_type"] == "tls_handshake" and e["result"] == "success"}
    assert hs[client_pid]["role"] == "client" and hs[client_pid]["remote_port"] == bssl.port
    # BoringSSL's SSL object is not OpenSSL's: nothing is read from it; the version is the ServerHello's
    # (handshake facts from packets, tests/e2e/test_tls_handshake_facts.py)
    assert hs[client_pid]["tls_version"] == hs[bssl.pid]["tls_version"] == f"TLSv{version}"


def test_bssl_keylog_equals_its_own(bssl, tmp_path):
    keys, own = tmp_path / "tracer.keys", tmp_path / "client.keys"
    tracer = tls_tracer(["-m", "keylog", "-k", str(keys)])
    for version in VERSIONS:
        _bssl_client(bssl, f"/{token()}", version, own)
    assert tracer.stop(settle=(bssl.port,)).rc == 0, tracer.stderr
    want = read_keylog(own)
    assert len({line[1] for line in want}) == 2 and {line[0] for line in want} >= {"CLIENT_RANDOM",
                                                                                   "CLIENT_TRAFFIC_SECRET_0"}
    assert read_keylog(keys) == want  # both ends' lines: the same sessions, the same lines
    assert want <= read_keylog(bssl.dir / "server.keys")


def test_bssl_pcapng_decrypts_in_tshark(bssl, tmp_path):
    need_tool("tshark", "tc")
    cap = tmp_path / "cap.pcapng"
    tracer = tls_tracer(["-m", "pcapng", "-w", str(cap), "-i", "lo", "port", str(bssl.port)])
    paths = {v: f"/{token()}" for v in VERSIONS}
    for version, path in paths.items():
        _bssl_client(bssl, path, version, tmp_path / "client.keys")
    assert tracer.stop(settle=(bssl.port,)).rc == 0, tracer.stderr
    out = subprocess.run(["tshark", "-r", str(cap), "-Y", "http.request", "-T", "fields", "-e", "http.request.uri"],
                         capture_output=True, text=True, timeout=120)
    assert set(paths.values()) <= set(out.stdout.split()), out.stdout + out.stderr


# --- curl_cffi: a static BoringSSL found by its .symtab --------------------------------------------

@pytest.fixture(scope="module")
def pyserver(tmp_path_factory, certs):
    need_root()
    if not _have_cffi():
        pytest.skip("curl_cffi is not installed (./setup test installs the test extra)")
    d = tmp_path_factory.mktemp("cffi")
    (d / "response").write_bytes(f"cffi-body-{token()}\n".encode() * 50)
    port = free_port()
    with python_server(port, *certs, str(d / "response")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path_factory.mktemp("layouts")))
            yield type("S", (), {"dir": d, "port": port, "response": (d / "response").read_bytes()})


def _cffi_client(srv, path: str, keylog, tracer_first: bool, args, version: str = "1.3"):
    """(tracer, client process, url): the client imported curl_cffi and waits for a line on stdin; with
    tracer_first the tracer ran before the import (the library is found when it is mapped), else it starts
    after it (found by the start-up scan)."""
    url = f"https://127.0.0.1:{srv.port}{path}"
    start = lambda: tls_tracer(["-v"] + args)  # noqa: E731
    tracer = start() if tracer_first else None
    client = subprocess.Popen([peer("python"), "-c", CFFI_CLIENT, url, version], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, SSLKEYLOGFILE=str(keylog),
                                       PYTHONPATH=os.path.dirname(os.path.dirname(_cffi_file()))))
    assert client.stdout.readline() == b"imported\n"
    if tracer is None:
        tracer = start()
    assert tracer.wait_stderr(re.compile(r"hooked \S*_wrapper\.abi3\.so \(boringssl"), 20), tracer.stderr
    return tracer, client


def _cffi_file() -> str:
    import curl_cffi

    return curl_cffi.__file__


def _finish(client) -> bytes:
    out, _ = client.communicate(b"go\n", timeout=30)
    assert client.returncode == 0
    return out


@pytest.mark.parametrize("tracer_first,version", [(False, "1.3"), (True, "1.3"), (True, "1.2")],
                         ids=["running-1.3", "imported-later-1.3", "imported-later-1.2"])
def test_curl_cffi_plaintext(pyserver, tmp_path, tracer_first, version):
    out = tmp_path / "events.json"
    path = f"/{token()}"
    tracer, client = _cffi_client(pyserver, path, tmp_path / "c.keys", tracer_first, ["-m", "json", "-o", str(out)],
                                  version)
    body = _finish(client)
    assert body == pyserver.response
    assert tracer.stop(settle=(pyserver.port,)).rc == 0, tracer.stderr
    events = read_events(str(out))
    mine = [e for e in events if e["event_type"] == "tls_data" and e["pid"] == client.pid]
    assert mine and {e["library"] for e in mine} == {"boringssl"}
    sent = stream(events, pid=client.pid, direction="write")
    got = stream(events, pid=client.pid, direction="read")
    assert sent.startswith(f"GET {path} HTTP/1.1\r\n".encode()) and sent.endswith(b"\r\n\r\n")
    # the other end (the Python server, OpenSSL) saw exactly these bytes
    server = [e for e in events if e["event_type"] == "tls_data" and e["library"] == "openssl"
              and e["remote_port"] == next(m["local_port"] for m in mine)]
    srv_pid = server[0]["pid"]
    assert stream(events, pid=srv_pid, direction="read", remote_port=mine[0]["local_port"]) == sent
    assert stream(events, pid=srv_pid, direction="write", remote_port=mine[0]["local_port"]) == got
    assert got.endswith(b"\r\n\r\n" + pyserver.response)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
@pytest.mark.parametrize("mode", ["keylog", "pcapng"])
def test_curl_cffi_keys(pyserver, tmp_path, mode, version):
    own, keys, cap = tmp_path / "own.keys", tmp_path / "tracer.keys", tmp_path / "cap.pcapng"
    path = f"/{token()}"
    args = ["-m", "keylog", "-k", str(keys)] if mode == "keylog" else \
        ["-m", "pcapng", "-w", str(cap), "-i", "lo", "port", str(pyserver.port)]
    tracer, client = _cffi_client(pyserver, path, own, True, args, version)
    _finish(client)
    assert tracer.stop(settle=(pyserver.port,)).rc == 0, tracer.stderr
    if mode == "keylog":
        want = read_keylog(own)
        assert {line[0] for line in want} == ({"CLIENT_RANDOM"} if version == "1.2" else {
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0",
            "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"})
        assert read_keylog(keys) == want  # curl_cffi's own key log, line for line
    else:
        need_tool("tshark")
        out = subprocess.run(["tshark", "-r", str(cap), "-Y", "http.request", "-T", "fields", "-e",
                              "http.request.uri"], capture_output=True, text=True, timeout=120)
        assert path in out.stdout.split(), out.stdout + out.stderr
