"""Argument errors of `tls -m keylog|pcapng` are caught before anything is loaded (exit 2)."""

import pytest

from tests.conftest import run_tracer


@pytest.mark.parametrize("args, message", [
    (["tls", "-m", "pcapng"], "needs an output file: -w FILE"),
    (["tls", "-m", "keylog", "port", "443"], "capture filter only applies to -m pcapng"),
    (["tls", "-m", "pcapng", "-w", "/tmp/x.pcapng", "net", "10.0.0.0/8"], "'net' is not supported"),
    (["tls", "-m", "pcapng", "-w", "/tmp/x.pcapng", "-i", "nosuchif0"], "no network interface 'nosuchif0'"),
])
def test_bad_arguments_exit_2(args, message):
    out = run_tracer(args, timeout=30)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
