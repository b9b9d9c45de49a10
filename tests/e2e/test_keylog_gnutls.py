"""Key logs from GnuTLS: gnutls-cli as a client and gnutls-serv as a server, TLS 1.3 and 1.2,
AES-GCM and ChaCha20. The layout of the GnuTLS session is learned on libgnutls itself; the
tracer's lines must equal the key log GnuTLS writes (SSLKEYLOGFILE) for the same sessions."""

import os
import subprocess

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
from tests.tls_helpers import by_client_random, read_keylog, token

PY_PORT, GNUTLS_PORT = free_port(), free_port()
PRIORITIES = {
    "tls13-aesgcm": "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM",
    "tls13-chacha": "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305",
    "tls12-aesgcm": "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM",
    "tls12-chacha": "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+CHACHA20-POLY1305",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, certs):
    need_root()
    need_tool("gnutls-cli", "gnutls-serv", "curl")
    d = tmp_path_factory.mktemp("gnutls")
    cert, key = certs
    procs = [subprocess.Popen(https_server_cmd(PY_PORT, cert, key, keylog=d / "py.keys")),
             subprocess.Popen(["gnutls-serv", "--http", "--x509certfile", cert, "--x509keyfile", key,
                               "-p", str(GNUTLS_PORT)], env=dict(os.environ, SSLKEYLOGFILE=str(d / "serv.keys")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    tracer = None
    try:
        wait_port(PY_PORT)
        wait_port(GNUTLS_PORT)
        tracer = Tracer(["tls", "-m", "keylog", "-k", str(d / "tracer.keys"), "--name", "gnutls"])
        yield d, tracer
    finally:
        if tracer:
            tracer.stop()
        for p in procs:
            p.terminate()
            p.wait(10)


def _same_sessions(tracer_keys, peer_lines):
    want = by_client_random(peer_lines)

    def got():
        return {cr: lines for cr, lines in by_client_random(read_keylog(tracer_keys)).items() if cr in want}

    wait_until(lambda: got() == want, 5, fail=False)
    return got(), want


@pytest.mark.parametrize("case", list(PRIORITIES))
def test_gnutls_cli_client(setup, case):
    d, _ = setup
    keys = d / f"cli-{case}.keys"
    tok = token()
    out = subprocess.run(["gnutls-cli", "--insecure", "--priority", PRIORITIES[case], "-p", str(PY_PORT), "127.0.0.1"],
                         input=f"GET /{tok} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                         env=dict(os.environ, SSLKEYLOGFILE=str(keys)), capture_output=True, text=True, timeout=20)
    assert f"resp-/{tok}" in out.stdout
    got, want = _same_sessions(d / "tracer.keys", read_keylog(keys))
    assert want and got == want


@pytest.mark.parametrize("tls", ["--tlsv1.3", "--tls-max"])
def test_gnutls_serv_server(setup, tls):
    d, _ = setup
    keys = d / f"curl{tls}.keys"
    args = ["--tlsv1.3"] if tls == "--tlsv1.3" else ["--tls-max", "1.2"]
    out = subprocess.run(["curl", "-sk", *args, f"https://127.0.0.1:{GNUTLS_PORT}/"],
                         env=dict(os.environ, SSLKEYLOGFILE=str(keys)), capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    got, want = _same_sessions(d / "tracer.keys", read_keylog(keys))  # curl's lines, found on the server side
    assert want and got == want
