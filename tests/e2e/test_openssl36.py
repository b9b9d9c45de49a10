"""OpenSSL 3.6: libcurl's own build in PyPI's pycurl 7.49.0 (OpenSSL 3.6.5, loaded from the wheel's
pycurl.libs/, nothing of it on the host) against nginx, traced whole-host with no --libssl: the library is
found when the process maps it, its layout is learnt on that file, and it gets the same as the
system's OpenSSL: exact plaintext both ways, handshake facts field by field (TLS 1.3 and 1.2, AES-GCM
and ChaCha20) and key lines equal to the ones libcurl writes itself (SSLKEYLOGFILE)."""

import os
import subprocess
import uuid

import pytest

from tests.e2e import tlspeers as tp
from tests.e2e.test_tls_handshake_facts import FACTS, subject_of
from tests.harness import free_port, need_root, need_tool, tracer_env, wait_until
from tests.tls_helpers import read_keylog

pytestmark = pytest.mark.ebpf

# pycurl's libcurl reads SSLKEYLOGFILE; the options pin the version, suite and group
PYCURL_CLIENT = r'''
import sys, pycurl
url, version, suites, group = sys.argv[1:5]
c = pycurl.Curl()
c.setopt(pycurl.URL, url)
c.setopt(pycurl.SSL_VERIFYPEER, 0)
c.setopt(pycurl.SSL_VERIFYHOST, 0)
c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
c.setopt(pycurl.SSL_EC_CURVES, group)
if version == "1.3":
    c.setopt(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_3 | pycurl.SSLVERSION_MAX_TLSv1_3)
    c.setopt(pycurl.TLS13_CIPHERS, suites)
else:
    c.setopt(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2 | pycurl.SSLVERSION_MAX_TLSv1_2)
    c.setopt(pycurl.SSL_CIPHER_LIST, suites)
sys.stdout.write(c.perform_rb().decode())
'''

CASES = {
    "tls13-aes256gcm": ("1.3", "TLS_AES_256_GCM_SHA384", "X25519", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "x25519"),
    "tls13-chacha20": ("1.3", "TLS_CHACHA20_POLY1305_SHA256", "P-256", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256",
                       "secp256r1"),
    # TLS 1.2: the client's groups must hold the curve of the server's ECDSA key (P-256)
    "tls12-aes128gcm": ("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "X25519:P-256", "TLSv1.2",
                        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "x25519"),
}


@pytest.fixture(scope="module")
def pycurl_openssl(tmp_path_factory):
    need_root()
    need_tool("nginx")
    import pycurl

    assert "OpenSSL/3.6" in pycurl.version, pycurl.version  # the test extra pins the wheel with 3.6.5
    with pytest.MonkeyPatch.context() as mp:  # the layout is learnt in this run, not taken from a cache
        mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path_factory.mktemp("layouts")))
        yield pycurl.version


def run_client(url, case, keylog):
    version, suites, group = CASES[case][:3]
    import pycurl  # the peer runs as ctpeer-python, outside the venv: pointed at the venv's pycurl

    env = {**tracer_env(), "SSLKEYLOGFILE": str(keylog), "PYTHONPATH": os.path.dirname(os.path.dirname(pycurl.__file__))}
    p = subprocess.Popen([tp.peer("python"), "-c", PYCURL_CLIENT, url, version, suites, group], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return p.pid, out


@pytest.mark.parametrize("case", list(CASES))
def test_pycurl_openssl36_plaintext_and_facts(pycurl_openssl, certs, tmp_path, case):
    cert, key = certs
    port = free_port()
    out = str(tmp_path / "events.json")
    with tp.nginx(tmp_path, port, cert, key):
        tracer = tp.tls_tracer(["-m", "json", "-o", out, "-v"])
        pid, body = run_client(f"https://localhost:{port}/pycurl-36", case, tmp_path / "client.keys")
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    assert body == "resp-/pycurl-36\n"
    events = tp.read_events(out)
    sent = tp.stream(events, pid=pid, direction="write")
    assert sent.startswith(b"GET /pycurl-36 HTTP/1.1\r\nHost: localhost:%d\r\n" % port), sent
    assert tp.stream(events, pid=pid, direction="read").endswith(b"\r\n\r\nresp-/pycurl-36\n")
    mine = [e for e in events if e["event_type"] == "tls_handshake" and e["pid"] == pid]
    assert len(mine) == 1, mine
    subject, issuer = subject_of(cert)
    want_version, want_cipher, want_group = CASES[case][3:]
    assert {k: mine[0][k] for k in FACTS} == {
        "role": "client", "tls_version": want_version, "cipher": want_cipher, "group": want_group,
        "sni": "localhost", "alpn": "http/1.1", "resumed": False, "peer_cert_subject": subject,
        "peer_cert_issuer": issuer, "peer_key_type": "EC", "peer_key_bits": 256}
    assert "openssl 3.6" in err  # its own layout, learned on that file


@pytest.mark.parametrize("case", ["tls13-aes256gcm", "tls12-aes128gcm"])
def test_pycurl_openssl36_keys_equal_its_own_key_log(pycurl_openssl, certs, tmp_path, case):
    cert, key = certs
    port = free_port()
    keys = tmp_path / "tracer.keys"
    with tp.nginx(tmp_path, port, cert, key):
        tracer = tp.tls_tracer(["-m", "keylog", "-k", str(keys)])
        run_client(f"https://localhost:{port}/k", case, tmp_path / "client.keys")
        want = read_keylog(tmp_path / "client.keys")
        wait_until(lambda: read_keylog(keys) >= want, 5, fail=False)
        _, err, rc = tracer.stop()
    assert rc == 0, err
    assert len(want) == (5 if case.startswith("tls13") else 1), want
    assert read_keylog(keys) == want


def test_pycurl_openssl36_pcapng_decrypts_in_tshark(pycurl_openssl, certs, tmp_path):
    need_tool("tshark", "tc")
    cert, key = certs
    port = free_port()
    cap = tmp_path / "cap.pcapng"
    paths = {case: f"/{uuid.uuid4().hex}" for case in ("tls13-aes256gcm", "tls12-aes128gcm")}
    with tp.nginx(tmp_path, port, cert, key):
        tracer = tp.tls_tracer(["-m", "pcapng", "-w", str(cap), "-i", "lo", "port", str(port)])
        for case, path in paths.items():
            run_client(f"https://localhost:{port}{path}", case, tmp_path / "client.keys")
        _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    out = subprocess.run(["tshark", "-r", str(cap), "-Y", "http.request", "-T", "fields", "-e", "http.request.uri"],
                         capture_output=True, text=True, timeout=120)
    assert set(out.stdout.split()) == set(paths.values()), out.stdout + out.stderr
