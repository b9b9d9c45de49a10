"""Argument errors of `tls -m keylog|pcapng` are caught before anything is loaded (exit 2)."""

import pytest

from tests.harness import run_tracer


@pytest.mark.parametrize("args, message", [
    (["tls", "-m", "pcapng"], "needs an output file: -w FILE"),
    (["tls", "-m", "keylog", "udp"], "capture filter: 'udp' only applies to -m pcapng"),
    (["tls", "-m", "json", "udp"], "capture filter: 'udp' only applies to -m pcapng"),
    (["tls", "-m", "keylog", "port", "x"], "capture filter: 'x' is not a port number"),
    (["tls", "-m", "pcapng", "-w", "/tmp/x.pcapng", "net", "10.0.0.0/8"], "'net' is not supported"),
    (["tls", "-m", "pcapng", "-w", "/tmp/x.pcapng", "not", "port", "22"],
     "capture filter: 'not' is not supported by the kernel packet filter of -m pcapng"),
    (["tls", "-m", "pcapng", "-w", "/tmp/x.pcapng", "-i", "nosuchif0"], "no network interface 'nosuchif0'"),
])
def test_bad_arguments_exit_2(args, message):
    out = run_tracer(args, timeout=30)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    if "capture filter" in message and "port number" not in message:  # refusals (not syntax errors) are one line
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_output_to_a_device_or_fifo_keeps_its_mode(tmp_path):
    """-w/-k/-o /dev/null must not chmod the device (it would lock every other user out)."""
    import os

    from crypto_tracer.sinks.output import open_private_fd

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.close(open_private_fd(str(fifo)))
    finally:
        os.close(reader)
    assert os.stat(fifo).st_mode & 0o777 == 0o666
    regular = tmp_path / "f"
    regular.write_text("x")
    regular.chmod(0o644)
    os.close(open_private_fd(str(regular)))
    assert os.stat(regular).st_mode & 0o777 == 0o600
