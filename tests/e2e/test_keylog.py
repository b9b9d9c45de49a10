"""crypto-tracer tls -m keylog against real peers on loopback.

Every peer writes its own key log (curl SSLKEYLOGFILE, Python keylog_filename, node
--tls-keylog, openssl s_client -keylogfile); for each of its sessions, the tracer's lines
must be exactly the peer's lines. Server-side extraction is proven by a second tracer that
only watches the servers (their command names start with ctsrv: --name ctsrv).
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.harness import (
    Tracer,
    free_port,
    https_server_cmd,
    make_cert,
    need_root,
    need_tool,
    nginx_conf,
    static_node,
    wait_port,
    wait_until,
)
from tests.tls_helpers import NODE_CLIENT, NODE_SERVER, PYCLIENT, by_client_random, read_keylog, token

NGINX_PORT, PY_PORT, NODE_PORT = free_port(), free_port(), free_port()
# TLS 1.2 with an ECDSA certificate (the cases below name these suites)
CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"


def _wait_lines(path, want, timeout=5.0):
    """The tracer's lines for the client randoms of `want`, once they are all there."""
    randoms = {line[1] for line in want}

    def got():
        return {line for line in read_keylog(path) if line[1] in randoms}

    wait_until(lambda: got() >= want, timeout, fail=False)
    return got()


@pytest.fixture(scope="module")
def peers(tmp_path_factory, static_node_keys, certs):
    need_root()
    need_tool("nginx", "curl", "openssl")
    d = tmp_path_factory.mktemp("keylog")
    cert, key = certs
    nginx = d / "ctsrv-nginx"  # a copy, for its command name
    shutil.copy(shutil.which("nginx"), nginx)
    procs = [subprocess.Popen([str(nginx), "-c", nginx_conf(d, NGINX_PORT, cert, key, ciphers=CIPHERS), "-p", str(d)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen(https_server_cmd(PY_PORT, cert, key, keylog=d / "pyserver.keys", comm="ctsrv-py")),
             subprocess.Popen([static_node_keys, f"--tls-keylog={d / 'nodeserver.keys'}", "-e", NODE_SERVER,
                               str(NODE_PORT), key, cert])]
    tracers = {}
    try:
        for port in (NGINX_PORT, PY_PORT, NODE_PORT):
            wait_port(port)
        for name, extra in (("all", []), ("servers", ["--name", "ctsrv"])):
            tracers[name] = Tracer(["tls", "-m", "keylog", "-k", str(d / f"tracer-{name}.keys")] + extra)
        yield d, tracers
    finally:
        for t in tracers.values():
            t.stop()
        for p in procs:
            p.terminate()
            p.wait(10)


def _check(d, tracer_names, peer_keys):
    want = read_keylog(peer_keys)
    assert want, f"the peer wrote no key log ({peer_keys})"
    for name in tracer_names:
        got = _wait_lines(d / f"tracer-{name}.keys", want)
        assert by_client_random(got) == by_client_random(want), f"tracer '{name}' differs from the peer's key log"


CURL_CASES = {
    "tls13-aes128": ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256"],
    "tls13-aes256": ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384"],
    "tls13-chacha": ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"],
    "tls12-aesgcm": ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    "tls12-chacha": ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305"],
}


@pytest.mark.parametrize("case", list(CURL_CASES))
def test_curl_client_and_nginx_server(peers, case):
    d, _ = peers
    keys = d / f"curl-{case}.keys"
    tok = token()
    out = subprocess.run(["curl", "-sk", *CURL_CASES[case], f"https://127.0.0.1:{NGINX_PORT}/{tok}"],
                         env=dict(os.environ, SSLKEYLOGFILE=str(keys)), capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == f"resp-/{tok}"
    _check(d, ["all", "servers"], keys)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_python_client_and_server(peers, version):
    d, _ = peers
    keys = d / f"pyclient-{version}.keys"
    tok = token()
    out = subprocess.run([sys.executable, "-c", PYCLIENT, str(PY_PORT), f"/{tok}", version, str(keys)],
                         capture_output=True, text=True, timeout=20)
    assert f"resp-/{tok}" in out.stdout
    _check(d, ["all"], keys)
    # the server's own key log has the same session, seen by a tracer watching only the server
    server_lines = {line for line in read_keylog(d / "pyserver.keys") if line[1] in
                    {x[1] for x in read_keylog(keys)}}
    (d / f"pyserver-{version}.keys").write_text("".join(" ".join(x) + "\n" for x in server_lines))
    _check(d, ["servers"], d / f"pyserver-{version}.keys")


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_node_client_static_openssl(peers, static_node_keys, version):
    d, _ = peers
    keys = d / f"nodeclient-{version}.keys"
    tok = token()
    out = subprocess.run([static_node_keys, f"--tls-keylog={keys}", "-e", NODE_CLIENT, str(NGINX_PORT), f"/{tok}", version],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == f"resp-/{tok}"
    _check(d, ["all", "servers"], keys)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_node_server_static_openssl(peers, version):
    d, _ = peers
    keys = d / f"curl-to-node-{version}.keys"
    tok = token()
    flag = ["--tlsv1.3"] if version == "1.3" else ["--tls-max", "1.2"]
    out = subprocess.run(["curl", "-sk", *flag, f"https://127.0.0.1:{NODE_PORT}/{tok}"],
                         env=dict(os.environ, SSLKEYLOGFILE=str(keys)), capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == f"resp-/{tok}"
    _check(d, ["servers"], keys)


def test_openssl_s_client(peers):
    d, _ = peers
    keys = d / "s_client.keys"
    tok = token()
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{NGINX_PORT}", "-keylogfile", str(keys),
                          "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", "-quiet", "-ign_eof"],
                         input=f"GET /{tok} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                         capture_output=True, text=True, timeout=20)
    assert f"resp-/{tok}" in out.stdout
    _check(d, ["all", "servers"], keys)


def test_keylog_file_is_private(peers):
    d, _ = peers
    assert oct(os.stat(d / "tracer-all.keys").st_mode & 0o777) == "0o600"


def test_unknown_layout_gives_a_message_and_no_keys(tmp_path):
    """A static OpenSSL whose version cannot be identified: said so, and no keys from it."""
    need_root()
    need_tool("curl")
    node = tmp_path / "node-unknown"
    data = open(static_node(), "rb").read()
    patched = data.replace(b"OpenSSL 3.", b"OpenXYZ 3.")
    assert patched != data
    node.write_bytes(patched)
    node.chmod(0o755)
    cert, key = make_cert(tmp_path)
    peer_keys = tmp_path / "node.keys"
    port = free_port()
    srv = subprocess.Popen([str(node), f"--tls-keylog={peer_keys}", "-e", NODE_SERVER, str(port), key, cert])
    tracer = None
    try:
        wait_port(port)
        tracer = Tracer(["tls", "-m", "keylog", "-k", str(tmp_path / "tracer.keys"), "--pid", str(srv.pid)])
        out = subprocess.run(["curl", "-sk", f"https://127.0.0.1:{port}/x"], capture_output=True, text=True,
                             timeout=30)
        assert "resp-/x" in out.stdout
        wait_until(lambda: read_keylog(peer_keys), 10, "node's own key log")  # written by a JS event, after the reply
        tracer.wait_stderr(f"no TLS keys for {node}", 10)  # said when the handshake's keys are looked for
    finally:
        rc = tracer.stop().rc if tracer else None
        srv.terminate()
        srv.wait(10)
    assert rc == 0
    assert f"no TLS keys for {node}" in tracer.stderr
    assert "no OpenSSL version string" in tracer.stderr
    assert read_keylog(tmp_path / "tracer.keys") == set()


def test_key_log_to_stdout_without_k(peers):
    d, _ = peers
    keys = d / "curl-stdout.keys"
    tracer = Tracer(["tls", "-m", "keylog", "--name", "curl"])
    try:
        subprocess.run(["curl", "-sk", f"https://127.0.0.1:{NGINX_PORT}/{token()}"],
                       env=dict(os.environ, SSLKEYLOGFILE=str(keys)), capture_output=True, timeout=20, check=True)
        want = {" ".join(line) for line in read_keylog(keys)}
        wait_until(lambda: want <= set(tracer.out.splitlines()), 5, fail=False)
    finally:
        out = tracer.stop().out
    assert want and want <= set(out.splitlines())


def test_filter_keeps_the_keys_of_matching_connections_only(peers):
    """`tls -m keylog port N`: the same connection filter as text/json, over each session's handshake."""
    d, _ = peers
    path = d / "tracer-nginx-port.keys"
    tracer = Tracer(["tls", "-m", "keylog", "-k", str(path), "port", str(NGINX_PORT)])
    try:
        curl_keys, py_keys = d / "curl-filtered.keys", d / "pyclient-filtered.keys"
        subprocess.run(["curl", "-sk", f"https://127.0.0.1:{NGINX_PORT}/{token()}"],
                       env=dict(os.environ, SSLKEYLOGFILE=str(curl_keys)), capture_output=True, timeout=20, check=True)
        want = read_keylog(curl_keys)
        assert want and by_client_random(_wait_lines(path, want)) == by_client_random(want)
        out = subprocess.run([sys.executable, "-c", PYCLIENT, str(PY_PORT), f"/{token()}", "1.3", str(py_keys)],
                             capture_output=True, text=True, timeout=20)
        assert "resp-/" in out.stdout
    finally:
        assert tracer.stop().rc == 0
    # after the drain: the other port's session is not in the key log, the filtered one is
    assert read_keylog(py_keys) and not {x[1] for x in read_keylog(py_keys)} & {x[1] for x in read_keylog(path)}
    assert {x[1] for x in read_keylog(path)} == {x[1] for x in want}
    assert "left out by the filter" in tracer.stderr
