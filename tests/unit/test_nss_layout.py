"""keys/nss_layout.py and its worker on the host's own NSS (Debian 12: 3.87, Debian 13: 3.110, whose
sslSocket layouts differ): the offsets are learned on that file, cached by build-id, and hold on a
handshake the calibration never saw; an unverified cache entry is not used."""

import glob
import json
import os
import struct

import pytest

from crypto_tracer.keys import calibrate_nss_worker as worker
from crypto_tracer.keys import nss_layout


@pytest.fixture(scope="module")
def libssl3() -> str:
    found = sorted(glob.glob("/usr/lib/*-linux-gnu/libssl3.so") + glob.glob("/usr/lib64/libssl3.so"))
    assert found, "no libssl3.so (Debian: libnss3, installed with libnss3-tools by ./setup test)"
    return found[0]


@pytest.fixture(scope="module")
def learned(libssl3, tmp_path_factory):
    cache = tmp_path_factory.mktemp("layouts")
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(cache))
    try:
        lay, how = nss_layout.nss_layout_for(libssl3)
        again, how_again = nss_layout.nss_layout_for(libssl3)
    finally:
        mp.undo()
    return cache, lay, how, again, how_again


def test_learned_on_the_file_then_cached(libssl3, learned):
    cache, lay, how, again, how_again = learned
    assert how == "calibrated" and lay is not None, how
    assert lay["verified"] >= nss_layout.MIN_VERIFIED
    # public or first-member facts: CERTCertificate's derCert (certt.h), sslSocket's fd (sslimpl.h)
    assert lay["cert_der"] == 0x78 and lay["fd"] == 0
    (cached,) = os.listdir(cache)
    assert cached.startswith("nss-") and json.loads((cache / cached).read_text())["source"]["path"] == libssl3
    assert how_again == "cache" and again == lay


def test_offsets_hold_on_another_handshake(libssl3, learned):
    """A fourth handshake (its own certificate, key type and ALPN) read at the learned offsets."""
    lay = learned[1]
    alpn, name = b"another/alpn-never-calibrated", "crypto-tracer nss layout test"
    cert_pem, key_pem = worker._certificate("rsa", name)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)

    def at(addr):
        return struct.unpack("<Q", worker.read(addr, 8))[0]

    def secitem(addr):
        return worker.read(at(addr + 8), struct.unpack("<I", worker.read(addr + 16, 4))[0])

    def inspect(fd, ss):
        return at(ss + lay["fd"]) == fd, secitem(ss + lay["next_proto"]), secitem(at(ss + lay["peer_cert"]) +
                                                                              lay["cert_der"])

    server = worker.Server(cert_pem, key_pem, alpn)
    got = worker.Nss(libssl3).handshake(server.port, alpn, inspect)
    server.thread.join(20)
    assert server.error is None
    assert got["alpn"] == alpn and got["der"] == der  # NSS's API agrees with the server
    assert got["inspected"] == (True, alpn, der)


def test_unverified_cache_is_not_used(libssl3, tmp_path, monkeypatch):
    from crypto_tracer.host.elf import build_id_or_digest

    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path))
    bogus = {"fd": 0, "peer_cert": 8, "next_proto": 16, "cert_der": 0x78, "verified": 1}
    (tmp_path / f"nss-{build_id_or_digest(libssl3)}.json").write_text(json.dumps(bogus))
    lay, how = nss_layout.nss_layout_for(libssl3)
    assert how == "calibrated" and lay["verified"] >= nss_layout.MIN_VERIFIED and lay["peer_cert"] != 8
