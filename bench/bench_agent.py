#!/usr/bin/env python3
"""Cost of `crypto-tracer agent`: CPU (% of one core, all its threads) and RSS, idle and under load.

Run as root from the repository: python3 bench/bench_agent.py [--seconds N]
The agent runs with its defaults (JSON Lines rotated at 10 MB with gzip, a snapshot at start) and
metrics enabled, scraped once a second by this script (as Prometheus would). Loads: opengen opening a
certificate at a paced rate (file_open events). Figures per phase: CPU, RSS (and peak), events written
and dropped by the agent's own accounting.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_monitor import ENV, TRACER, rss_kb, workload  # noqa: E402 (after the path)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of the process (schedstat, ns resolution)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, out_dir: str):
        self.port = free_port()
        self.proc = subprocess.Popen(TRACER + ["agent", "--output-dir", out_dir, "--metrics-address",
                                               f"127.0.0.1:{self.port}"], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.err = []
        for line in self.proc.stderr:
            self.err.append(line)
            if "crypto-tracer ready:" in line:
                break
        else:
            raise SystemExit("agent failed to start:\n" + "".join(self.err))
        self._stop = threading.Event()
        self.scrapes = 0
        self._scraper = threading.Thread(target=self._scrape, daemon=True)
        self._scraper.start()

    def _scrape(self) -> None:
        while not self._stop.wait(1.0):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read()
                self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> dict:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        _, rest = self.proc.communicate(timeout=120)
        err = "".join(self.err) + rest
        return json.loads(re.search(r"Final accounting: (\{.*\})$", err, re.M).group(1))


def measure(agent: Agent, seconds: float, load=None) -> dict:
    time.sleep(1.0)  # past the start-up snapshot
    c0, w0 = cpu_seconds(agent.proc.pid), time.monotonic()
    achieved = None
    if load is None:
        time.sleep(seconds)
    else:
        achieved = float(subprocess.run(load, capture_output=True, text=True, check=True).stdout.split()[1])
    c1, w1 = cpu_seconds(agent.proc.pid), time.monotonic()
    return {"cpu": 100 * (c1 - c0) / (w1 - w0), "rss": rss_kb(agent.proc.pid) / 1024,
            "hwm": rss_kb(agent.proc.pid, "VmHWM") / 1024, "rate": achieved}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_agent: run as root", file=sys.stderr)
        return 3
    tmp = tempfile.mkdtemp(prefix="ct-bench-agent-")
    gen, target = workload(tmp)
    for label, rate in (("idle", None), ("5,000 events/s", 5000), ("50,000 events/s", 50000)):
        out = os.path.join(tmp, f"out-{rate or 0}")
        agent = Agent(out)
        load = None if rate is None else [gen, target, str(rate), str(args.seconds)]
        m = measure(agent, args.seconds, load)
        acc = agent.stop()
        s = acc["sinks"]["events_file"]
        dropped = acc["kernel"]["dropped"] + sum(s["dropped"].values())
        files = len(glob.glob(os.path.join(out, "events.jsonl*")))
        line = (f"{label:>16}: agent CPU {m['cpu']:.2f}% of a core, RSS {m['rss']:.1f} MB (peak {m['hwm']:.1f}), "
                f"events written {s['written']:,}, dropped {dropped:,}, files {files}, scrapes {agent.scrapes}")
        if m["rate"] is not None:
            line += f", load achieved {m['rate']:,.0f}/s"
        print(line)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
