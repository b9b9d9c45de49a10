"""BoringSSL: how discovery tells it from OpenSSL (shared: Debian's android-libboringssl; static: curl_cffi's
module with a .symtab), what cookies its probes get, and the calibration that verifies ssl_log_secret and
ssl->s3->client_random on the exact file (run here for real, in its subprocess)."""

import os

import pytest

from crypto_tracer.host import discovery, elf
from crypto_tracer.keys import calibrate
from crypto_tracer.probes import tls

ANDROID = "/usr/lib/x86_64-linux-gnu/android/libssl.so.0"


def _cffi() -> str:
    try:
        import curl_cffi
    except ImportError:
        pytest.skip("curl_cffi is not installed (the test extra)")
    return os.path.join(os.path.dirname(curl_cffi.__file__), "_wrapper.abi3.so")


def _android() -> str:
    if not os.path.exists(ANDROID):
        pytest.skip("android-libboringssl is not installed")
    return ANDROID


def test_shared_android_lib_is_boringssl():
    lib = discovery.Discovery().examine(_android(), _android())
    assert lib.kind == "boringssl" and lib.openssl_layout is None
    assert {"SSL_read", "SSL_write", "SSL_do_handshake", "SSL_free"} <= set(lib.functions)
    assert "SSL_new" not in lib.functions  # it feeds OpenSSL's layout reads only
    tracer = tls.TlsTracer(capture_data=True)
    cookie = tracer._cookie(lib, "SSL_read", 5 << 16)
    # the BoringSSL bit, the function id, and nothing of an OpenSSL layout or key slot
    assert cookie == tls.FUNC_IDS["SSL_read"] | tls.COOKIE_BORINGSSL
    assert tracer._cookie(lib, tls.BSSL_LOG_SECRET, tls.bssl_cookie(0x30, 0x30)) == 0x30 | 0x30 << 16 | 1 << 32


def test_openssl_is_still_openssl():
    lib = discovery.Discovery().examine("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.3")
    assert lib.kind == "openssl"
    assert discovery.static_boringssl("/usr/lib/x86_64-linux-gnu/libssl.so.3") is None


def test_static_boringssl_from_symtab():
    path = _cffi()
    info = discovery.static_boringssl(path)
    with elf.ElfFile.open(path) as f:
        local = f.symbols(["SSL_read", "SSL_write"], table=elf.SYMTAB)
        mangled = f.name_starting(b"_ZN4bssl14ssl_log_secretE")
        log_secret = f.symbols([mangled], table=elf.SYMTAB)[mangled]
    assert info.offsets["SSL_read"] == local["SSL_read"].offset and info.offsets["SSL_write"] == local["SSL_write"].offset
    assert info.offsets["ssl_log_secret"] == log_secret.offset
    lib = discovery.Discovery().examine(path, path)
    assert lib.kind == "boringssl" and "ssl_log_secret" in lib.functions
    assert discovery.static_tls(path) == {"library": "boringssl", "version": None, "symbols": ["SSL_read", "SSL_write"]}


@pytest.mark.parametrize("which", ["android", "curl_cffi"])
def test_calibration_verifies_log_secret_and_client_random(which, tmp_path, monkeypatch):
    path = _android() if which == "android" else _cffi()
    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path))
    hook, how = calibrate.bssl_hook_for(path)
    assert how == "calibrated" and hook is not None, how
    assert (hook.s3, hook.client_random) == (0x30, 0x30)  # measured on both builds (see the reference notes)
    assert hook.verified >= calibrate.BSSL_MIN_VERIFIED
    if which == "curl_cffi":  # the .symtab's function, where the worker found it
        assert hook.log_secret == discovery.static_boringssl(path).offsets["ssl_log_secret"]
    assert calibrate.bssl_hook_for(path) == (hook, "cache")


def test_calibration_refuses_a_file_without_boringssl(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(tmp_path))
    hook, how = calibrate.bssl_hook_for("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    assert hook is None and "ssl_log_secret not found" in how
