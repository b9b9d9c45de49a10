"""Key logs for OpenSSL builds other than the system's, in the same run as the system's:
the OpenSSL 1.1.1 bundled in psycopg2-binary (s3 behind a pointer) and the 3.5 bundled in
psycopg-binary. Each is calibrated on its own file and gets its own layout slot; the
tracer's lines must equal the library's own key log (SSL_CTX_set_keylog_callback)."""

import subprocess
import sys

import pytest

from tests.harness import (
    Tracer,
    free_port,
    https_server_cmd,
    make_cert,
    need_root,
    tracer_env,
    wait_port,
    wait_until,
)
from tests.tls_helpers import CTYPES_CLIENT, bundled_libssl, read_keylog

BUNDLES = {"1.1.1": ("psycopg2-binary", "2.9.5"), "3.5": ("psycopg-binary", "3.3.9")}


@pytest.mark.parametrize("openssl", list(BUNDLES))
def test_bundled_openssl_keys_match_its_own_key_log(tmp_path, openssl):
    need_root()
    lib = bundled_libssl(*BUNDLES[openssl])
    if lib is None:
        pytest.skip(f"cannot download {BUNDLES[openssl][0]} from PyPI (it bundles OpenSSL {openssl})")
    cert, key = make_cert(tmp_path)
    port = free_port()
    srv = subprocess.Popen(https_server_cmd(port, cert, key, keylog=tmp_path / "srv.keys"))
    tracer = None
    try:
        wait_port(port)
        tracer = Tracer(["tls", "-m", "keylog", "-k", str(tmp_path / "tracer.keys"), "--libssl", lib,
                         "--name", "ctclient", "-v"])
        want = set()
        for version in ("0x304", "0x303"):
            peer = tmp_path / f"peer-{version}.keys"
            out = subprocess.run([sys.executable, "-c", CTYPES_CLIENT, lib, str(port), str(peer), version],
                                 capture_output=True, text=True, timeout=30, env=tracer_env())
            assert "resp-/ctypes" in out.stdout, out.stderr
            want |= read_keylog(peer)
        wait_until(lambda: read_keylog(tmp_path / "tracer.keys") == want, 5, fail=False)
    finally:
        if tracer:
            tracer.stop()
        srv.terminate()
        srv.wait(10)
    assert len(want) == 6  # five TLS 1.3 lines and one TLS 1.2 line
    assert read_keylog(tmp_path / "tracer.keys") == want
    assert f"openssl {openssl}" in tracer.stderr  # its own layout, learned on that file
