"""Running crypto-tracer against real workloads: start, wait until probes are attached, stop."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from tests.conftest import start_tracer

READY = "monitoring started"


class Tracer:
    """A running crypto-tracer process; stop() returns (events or text, stderr)."""

    def __init__(self, args, ready_text=READY, timeout=20):
        self.proc = start_tracer(args)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            if ready_text in line:
                return
        self.proc.kill()
        raise AssertionError("tracer did not start: " + "".join(self.stderr_lines) + self.proc.stderr.read())

    def stop(self, sig=signal.SIGINT, timeout=30) -> tuple[str, str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return out, "".join(self.stderr_lines) + err, self.proc.returncode

    def wait(self, timeout=60) -> tuple[str, str, int]:
        out, err = self.proc.communicate(timeout=timeout)
        return out, "".join(self.stderr_lines) + err, self.proc.returncode


def parse_stream(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stats_from(stderr: str) -> dict[str, int]:
    """The end-of-run statistics printed on stderr."""
    out = {}
    for key, pattern in (("processed", r"Events processed: (\d+)"), ("output", r"Events output: (\d+)"),
                         ("dropped", r"Events dropped: (\d+)"),
                         ("filtered", r"Events filtered: (\d+) \(kernel (\d+), user space (\d+)\)")):
        m = re.search(pattern, stderr)
        assert m, f"no '{key}' statistic in: {stderr}"
        out[key] = int(m.group(1))
        if key == "filtered":
            out["filtered_kernel"], out["filtered_user"] = int(m.group(2)), int(m.group(3))
    return out


def run_workload(script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, **kw)
