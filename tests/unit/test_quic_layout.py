"""keys/quic_layout.py and its worker on a real OpenSSL 3.5 (psycopg-binary's bundled libssl): the offsets
are learned on that file, cached by build-id, and unknown (None with a reason) where they cannot be."""

import json
import os

import pytest

from crypto_tracer.keys import quic_layout
from tests.tls_helpers import bundled_libssl


def test_learned_on_the_file_then_cached(tmp_path, monkeypatch):
    lib = bundled_libssl("psycopg-binary", "3.3.9")
    if lib is None:
        pytest.skip("cannot download psycopg-binary 3.3.9 from PyPI (it bundles OpenSSL 3.5.9)")
    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path))
    lay, how = quic_layout.quic_layout_for(lib)
    assert how == "calibrated" and lay is not None, how
    assert lay["verified"] >= quic_layout.MIN_VERIFIED
    # measured on 3.5.9 by hand: the network BIO's fd at +0x38 (struct bio_st's num)
    assert lay["bio_num"] == 0x38 and len(lay["bio_path"]) <= 2 and len(lay["peer_path"]) <= 2
    (cached,) = [p for p in os.listdir(tmp_path) if p.endswith(".quic.json")]
    assert json.loads((tmp_path / cached).read_text())["source"]["path"] == lib
    again, how = quic_layout.quic_layout_for(lib)
    assert how == "cache" and again == lay


def test_no_quic_no_layout(tmp_path, monkeypatch):
    """A libssl without OpenSSL 3.5's QUIC server (here: OpenSSL 1.1.1) gets no layout, and says why."""
    lib = bundled_libssl("psycopg2-binary", "2.9.5")
    if lib is None:
        pytest.skip("cannot download psycopg2-binary 2.9.5 from PyPI")
    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path))
    lay, how = quic_layout.quic_layout_for(lib)
    assert lay is None and how.startswith("QUIC calibration failed"), how
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".quic.json")]
