"""Shared test setup.

Tests that need root, a BPF-capable kernel or an external peer skip with a reason when
those are missing; under CI=true every skip is turned into a failure, so CI cannot pass
without running the real eBPF tests.
"""

import os

import pytest

# the harness's helpers, for modules that still import them from here
from tests.harness import (REPO, STATIC_NODE_OPENSSL, kill_leftover_tracers, make_cert, need_root,  # noqa: F401
                           need_tool, run_tracer, running_tracers, start_tracer, static_node,
                           static_node_layout_cache, tracer_cmd)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def static_node_keys(tmp_path_factory):
    """static_node(), with CRYPTO_TRACER_LAYOUT_CACHE set for this module to a cache holding the layout of its
    OpenSSL version (learned on STATIC_NODE_PAIR's libssl); the tracers started here add node's own layout
    (learned by running it) and read its keys with that."""
    node = static_node()
    cache = tmp_path_factory.mktemp("layouts")
    static_node_layout_cache(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(cache))
        yield node


@pytest.fixture
def ebpf():
    need_root()


@pytest.fixture(autouse=True)
def _no_tracer_left_running():
    before = running_tracers()  # module fixtures' tracers are set up first and stay
    yield
    kill_leftover_tracers(keep=before)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A self-signed EC certificate for localhost, 127.0.0.1 and ::1: (cert path, key path)."""
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def rsa_certs(tmp_path_factory):
    """The same with an RSA 2048 key (NSS's selfserv takes its -n certificate as RSA)."""
    return make_cert(tmp_path_factory.mktemp("rsa-certs"), rsa_bits=2048)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is a failure: {reason}"
