"""Reading what crypto-tracer monitor wrote: the JSON stream and the end-of-run statistics; running a workload."""

from __future__ import annotations

import json
import re
import subprocess


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
