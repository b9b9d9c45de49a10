"""Keys of node 20, 22 and 24 (static OpenSSL 3.0.13+quic, 3.5.2, 3.5.7; no shared libssl twin on the host):
the tracer learns each binary's layout by running it as a calibration child (keys/calibrate_node.py), in a
fresh layout cache, so every run here calibrates. node as client (against the Python HTTPS server) and as
server (for curl), TLS 1.3 and 1.2: the tracer's key log equals node's own --tls-keylog, and a pcapng of the
same traffic decrypts in tshark alone.
"""

import json
import signal
import subprocess
import types

import pytest

from tests.harness import (
    Tracer,
    free_port,
    https_server_cmd,
    need_root,
    need_tool,
    wait_port,
    wait_until,
)
from tests.nodewheels import NODE_OPENSSL, NODE_VERSIONS, NodeWheelError, node_binary
from tests.tls_helpers import (
    NODE_CLIENT,
    NODE_SERVER,
    by_client_random,
    read_keylog,
    secrets_before_packets,
    token,
)

# node's client: TLS 1.3 with its first suite (AES-256-GCM), TLS 1.2 ECDHE-ECDSA-AES256-GCM; curl: ChaCha20 on both
CURL_VERSION = {"1.3": ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"],
                "1.2": ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305"]}


@pytest.fixture(scope="module", params=list(NODE_VERSIONS))
def node(request, tmp_path_factory, certs):
    """One node version with its peers: a node server (own key log) and the Python HTTPS server; the
    tracers started meanwhile use a fresh layout cache."""
    need_root()
    need_tool("curl", "tshark", "tc")
    try:
        path = node_binary(request.param)
    except NodeWheelError as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp(f"node{request.param}")
    cert, key = certs
    node_port, py_port = free_port(), free_port()
    procs = [subprocess.Popen([path, f"--tls-keylog={d / 'server.keys'}", "-e", NODE_SERVER, str(node_port), key, cert]),
             subprocess.Popen(https_server_cmd(py_port, cert, key, comm="ctsrv-py"))]
    try:
        for port in (node_port, py_port):
            wait_port(port)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(d / "layouts"))
            yield types.SimpleNamespace(major=request.param, path=path, dir=d, node_port=node_port, py_port=py_port,
                                        server_keys=d / "server.keys")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _traffic(node, name):
    """node as client (TLS 1.3 and 1.2) and as server (curl, TLS 1.3 and 1.2); returns (node's own key log
    lines of these sessions, the tokens requested). Waits for node's key log: node writes it from a JS
    event, which may come after the peer has its reply."""
    keys, tokens = node.dir / f"{name}-client.keys", []
    before = read_keylog(node.server_keys)
    for version in ("1.3", "1.2"):
        tok = token()
        out = subprocess.run([node.path, f"--tls-keylog={keys}", "-e", NODE_CLIENT, str(node.py_port), f"/{tok}",
                              version], capture_output=True, text=True, timeout=30, check=False)
        assert out.stdout.strip() == f"resp-/{tok}", out.stderr
        tokens.append(tok)
    for version in ("1.3", "1.2"):
        tok = token()
        out = subprocess.run(["curl", "-sk", *CURL_VERSION[version], f"https://127.0.0.1:{node.node_port}/{tok}"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.stdout.strip() == f"resp-/{tok}"
        tokens.append(tok)
    # 2 sessions per side: 5 lines for TLS 1.3, 1 for 1.2
    wait_until(lambda: len(read_keylog(keys)) == 6, 10, "node's own client key log")
    wait_until(lambda: len(read_keylog(node.server_keys) - before) == 6, 10, "node's own server key log")
    return read_keylog(keys) | (read_keylog(node.server_keys) - before), tokens


def _calibrated(node):
    """The layout the tracer learned from this very node (the cache is fresh, nothing else provides it)."""
    # BoringSSL's and QUIC's cached facts (bssl-*.json, *.quic.json) sit beside the SSL layouts
    found = [json.loads(p.read_text()) for p in (node.dir / "layouts").glob("*.json")]
    mine = [lay for lay in found if (lay.get("source") or {}).get("path") == node.path]
    assert len(mine) == 1, found
    assert mine[0]["version"] == NODE_OPENSSL[node.major].split("+")[0] and mine[0]["verified"] >= 12
    return mine[0]


def test_keylog_equals_nodes_own(node):
    out = node.dir / "tracer.keys"
    tracer = Tracer(["tls", "-m", "keylog", "-k", str(out)])
    try:
        want, _ = _traffic(node, "keylog")
        randoms = {line[1] for line in want}
        wait_until(lambda: {line for line in read_keylog(out) if line[1] in randoms} >= want, 10, fail=False)
    finally:
        result = tracer.stop()
    assert result.rc == 0, result.err
    assert f"no TLS keys for {node.path}" not in result.err, result.err
    got = by_client_random(line for line in read_keylog(out) if line[1] in randoms)
    assert len(by_client_random(want)) == 4 and got == by_client_random(want)
    _calibrated(node)


def _http(path) -> list[tuple[str, str]]:
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "http", "-T", "fields", "-e", "http.request.uri",
                          "-e", "http.file_data"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [tuple((line.split("\t") + ["", ""])[:2]) for line in out.stdout.splitlines()]


def _body(text: str) -> str:
    try:  # tshark prints a body as text or as hex, depending on its content type
        return bytes.fromhex(text.replace(":", "")).decode(errors="replace")
    except ValueError:
        return text


def test_pcapng_decrypts_in_tshark_alone(node):
    pcap, keys = node.dir / "cap.pcapng", node.dir / "pcapng-tracer.keys"
    tracer = Tracer(["tls", "-m", "pcapng", "-w", str(pcap), "-k", str(keys), "-i", "lo",
                     "port", str(node.node_port), "or", "port", str(node.py_port)])
    try:
        want, tokens = _traffic(node, "pcapng")
        wait_until(lambda: want <= read_keylog(keys), 10, fail=False)  # the key log written alongside
    finally:
        result = tracer.stop(signal.SIGTERM)
    assert result.rc == 0, result.err
    rows = _http(pcap)
    uris = {uri for uri, body in rows if uri and not body}
    bodies = " ".join(_body(body) for _, body in rows if body)
    for tok in tokens:
        assert f"/{tok}" in uris, f"request /{tok} not decrypted"
        assert f"resp-/{tok}" in bodies, f"response to /{tok} not decrypted"
    given, hellos, early = secrets_before_packets(str(pcap))
    randoms = {line[1] for line in want}
    assert randoms <= hellos and randoms <= given
    assert not [cr for cr in early if cr in randoms]
