"""Bad input: one clear message on stderr, the documented exit code, no traceback."""

import os
import subprocess
import sys

import pytest

from tests.harness import REPO, run_tracer

CASES = [
    # (argv, exit code, text the message must contain)
    (["bogus"], 2, "Unknown command 'bogus'"),
    (["help", "bogus"], 2, "Unknown command 'bogus'"),
    ([], 2, "Usage:"),
    (["monitor", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["files", "--invalid-option"], 2, "unrecognized arguments"),
    (["monitor", "--duration", "-10"], 2, "invalid value '-10': must not be negative"),
    (["monitor", "--duration", "ten"], 2, "invalid value 'ten'"),
    (["monitor", "--duration"], 2, "expected one argument"),
    (["monitor", "--pid", "0"], 2, "must be greater than 0"),
    (["profile", "--pid", "-1"], 2, "invalid value '-1'"),
    (["monitor", "--pid", "abc"], 2, "expected a positive integer"),
    (["monitor", "--verbose", "--quiet"], 2, "--verbose and --quiet cannot be used together"),
    (["monitor", "--format", "xml"], 2, "invalid choice: 'xml'"),
    (["monitor", "-o", "/nonexistent-dir/x.json"], 2, "does not exist"),
    (["monitor", "-o", "/tmp"], 2, "is a directory"),
    (["monitor", "-o", ""], 2, "empty file name"),
    (["monitor", "--mapsize", "1000"], 2, "power of two"),
    (["monitor", "--uid", "no-such-user-xyz"], 2, "not a number or a known user"),
    (["profile"], 2, "--pid PID or --name NAME"),
    (["profile", "--pid", "1", "--name", "x"], 2, "not both"),
    (["monitor", "extra-positional"], 2, "unrecognized arguments: extra-positional"),
    (["tls", "-m", "bogus"], 2, "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("argv,code,text", CASES, ids=[" ".join(c[0]) or "(none)" for c in CASES])
def test_bad_arguments(argv, code, text):
    r = run_tracer(argv)
    assert r.returncode == code, r.stderr
    out = r.stderr + r.stdout
    assert text in out
    assert "Traceback" not in out


def test_dead_pid_is_a_clear_error(ebpf):
    r = run_tracer(["monitor", "--pid", "4194304", "-d", "1"])
    assert r.returncode == 1
    assert "no process with pid 4194304" in r.stderr and "Traceback" not in r.stderr


def _world_readable(*paths) -> bool:
    """Every directory on the way to each path lets others in (o+x), and the path is o+r."""
    for path in paths:
        parts = os.path.abspath(path).split(os.sep)
        dirs = [os.sep + os.path.join(*parts[1:i]) for i in range(2, len(parts))]
        if any(not os.stat(d).st_mode & 0o001 for d in dirs) or not os.stat(path).st_mode & 0o004:
            return False
    return True


def test_unprivileged_run_exits_3():
    if os.geteuid() != 0:
        r = run_tracer(["monitor", "-d", "1"])
    else:
        # As nobody when nobody can reach the checkout and its venv; else (a checkout under /root,
        # mode 0700) as root with every capability dropped: the same check refuses both.
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
        user = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"] if _world_readable(REPO, sys.executable) else []
        r = subprocess.run(["setpriv", *user, "--inh-caps=-all", "--bounding-set=-all",
                            *__import__("tests.conftest").conftest.tracer_cmd(),
                            "monitor", "-d", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "Insufficient privileges" in r.stderr and "CAP_BPF" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_and_version():
    r = run_tracer(["--help"])
    assert r.returncode == 0 and all(c in r.stdout for c in ("Usage:", "monitor", "profile", "snapshot", "tls"))
    r = run_tracer(["help", "monitor"])
    assert r.returncode == 0 and "Monitor cryptographic operations" in r.stdout
    r = run_tracer(["-V"])
    assert r.returncode == 0 and "crypto-tracer version 1.0.0" in r.stdout
    r = run_tracer(["monitor", "-h"])
    assert r.returncode == 0 and "--duration" in r.stdout
