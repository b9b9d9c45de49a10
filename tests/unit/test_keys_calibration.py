"""Calibration on the real system libssl: learned, verified, cached by build-id, reused for a
static build of the same version, refused when it cannot be learned."""

import ctypes.util
import os
import shutil

import pytest

from crypto_tracer.keys import calibrate, calibrate_node
from crypto_tracer.keys.extractor import _same
from crypto_tracer.host.elf import build_id_or_digest as build_id, openssl_version
from tests.harness import STATIC_NODE_OPENSSL, static_node, static_node_layout_cache


def _system_libssl():
    for path in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib64/libssl.so.3", "/usr/lib64/libssl.so.3"):
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library("ssl")
    if not name:
        pytest.skip("no libssl on this system")
    return name


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path / "layouts"))
    return tmp_path / "layouts"


def test_shared_libssl_is_calibrated_then_cached(cache):
    path = _system_libssl()
    first = calibrate.layout_for(path)
    assert first.layout is not None, first.how
    assert first.how == "calibrated"
    assert first.layout.verified >= calibrate.MIN_VERIFIED
    assert (cache / f"{build_id(path)}.json").exists()
    again = calibrate.layout_for(path)
    assert again.how == "cache" and again.layout == first.layout


def test_static_build_reuses_a_layout_of_the_same_version(cache, tmp_path):
    """A real pair: the test extra's node (static OpenSSL 3.5.4) and psycopg-binary's shared libssl 3.5.4.
    The node copy is made unrecognisable as node (its --tls-keylog option renamed), so it cannot learn its
    own layout and takes the one of the same version."""
    other = tmp_path / "static-openssl"
    with open(static_node(), "rb") as f:
        data = f.read()
    other.write_bytes(data.replace(b"--tls-keylog", b"--tls-keylox"))
    assert not calibrate_node.is_node(str(other))
    assert openssl_version(str(other)) == STATIC_NODE_OPENSSL
    lib = static_node_layout_cache(cache)
    result = calibrate.layout_for(str(other))
    assert result.layout is not None and result.how == f"same version as {lib}"
    assert result.layout == calibrate.layout_for(lib).layout


def test_node_learns_its_own_layout(cache):
    """node runs as a calibration child; its layout, verified on its own key log and cached by build-id,
    is the one learned independently on the shared libssl of the same OpenSSL version (psycopg-binary's)."""
    node = static_node()
    assert calibrate_node.is_node(node)
    result = calibrate.layout_for(node)
    assert result.layout is not None and result.how == "calibrated", result.how
    assert result.layout.version == STATIC_NODE_OPENSSL and result.layout.verified >= calibrate.MIN_VERIFIED
    assert result.layout.source == {"build_id": build_id(node), "path": node}
    assert (cache / f"{build_id(node)}.json").exists()
    assert calibrate.layout_for(node).how == "cache"
    lib = calibrate.layout_for(static_node_layout_cache(cache)).layout
    assert _same(result.layout, lib)


def test_node_without_version_string_is_not_run(cache, tmp_path):
    """No OpenSSL banner: nothing is known of what is linked in, so node is not run and gets no layout."""
    other = tmp_path / "node-unknown"
    with open(static_node(), "rb") as f:
        other.write_bytes(f.read().replace(b"OpenSSL 3.", b"OpenXYZ 3."))
    other.chmod(0o755)
    result = calibrate.layout_for(str(other))
    assert result.layout is None and result.how == "no OpenSSL version string in it"


def test_no_layout_for_files_without_openssl(cache, tmp_path):
    assert calibrate.layout_for("/bin/true").layout is None
    fake = tmp_path / "libssl.so.3"
    shutil.copy("/bin/true", fake)
    result = calibrate.layout_for(str(fake))
    assert result.layout is None and "calibration failed" in result.how
    assert not list(cache.glob("*.json")) or all("sha256" not in p.name for p in cache.glob("*.json"))


def test_a_library_others_could_write_is_not_run(cache, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the check applies to root, whose privileges calibration would lend to the library")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    lib = shared / "libssl.so.3"
    shutil.copy(_system_libssl(), lib)
    result = calibrate.layout_for(str(lib))
    assert result.layout is None and "writable by others than root" in result.how


def test_gnutls_layout_is_learned_on_libgnutls(cache):
    for path in ("/usr/lib/x86_64-linux-gnu/libgnutls.so.30", "/usr/lib64/libgnutls.so.30"):
        if os.path.exists(path):
            break
    else:
        pytest.skip("needs libgnutls30")
    result = calibrate.layout_for(path, "gnutls")
    assert result.layout is not None, result.how
    assert result.layout.hs_direct and result.layout.version.startswith("gnutls ")
    assert result.layout.verified >= calibrate.MIN_VERIFIED
    assert calibrate.layout_for(path, "nss").layout is None
