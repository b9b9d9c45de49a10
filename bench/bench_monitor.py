#!/usr/bin/env python3
"""Benchmark of `crypto-tracer monitor` (the seed's method, plus paced loads and a flood).

Run as root from the repository: python3 bench/bench_monitor.py [--seconds N]
Prints each figure and its ratio to its baseline or target measured in this same run.
Figures: start-up to probes attached, CPU (% of one core) and RSS of the tracer at
500, 50,000 and 100,000 crypto events/s written as json-stream to a file, events lost,
bytes per event, and the slowdown of the workload (its max open rate traced vs untraced).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer"]


def build_generator(tmp: str) -> str:
    out = os.path.join(tmp, "opengen")
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang-16")
    subprocess.run([cc, "-O2", "-o", out, os.path.join(REPO, "bench", "opengen.c")], check=True)
    return out


def workload(tmp: str) -> tuple[str, str]:
    """(the open() generator, the certificate it opens), built in tmp; prints the machine line."""
    gen = build_generator(tmp)
    target = os.path.join(tmp, "bench-cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", os.path.join(tmp, "k.pem"), "-out", target, "-subj", "/CN=bench", "-days", "1"],
                   check=True, capture_output=True)
    print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}, python {sys.version.split()[0]}")
    return gen, target


def cpu_seconds(pid: int) -> float:
    """CPU time of the process's main thread in ns resolution (schedstat), not 10 ms ticks;
    the tracer does its work on that thread."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Tracer:
    def __init__(self, args):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(TRACER + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.err = []
        for line in self.proc.stderr:
            self.err.append(line)
            if "crypto-tracer ready:" in line:
                self.ready_s = time.monotonic() - self.t0
                self.attach_ms = float(re.search(r"attached in (\d+) ms", line).group(1))
                return
        raise SystemExit("tracer failed to start:\n" + "".join(self.err))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, rest = self.proc.communicate(timeout=60)
        return "".join(self.err) + rest


def stat(err: str, name: str) -> int:
    return int(re.search(rf"Events {name}: (\d+)", err).group(1))


def run_load(gen: str, target: str, rate: int, seconds: float, out_path: str) -> dict:
    t = Tracer(["files", "--name", "opengen", "-o", out_path])
    c0, wall0 = cpu_seconds(t.proc.pid), time.monotonic()
    g = subprocess.run([gen, target, str(rate), str(seconds)], capture_output=True, text=True, check=True)
    time.sleep(0.3)
    c1, wall1 = cpu_seconds(t.proc.pid), time.monotonic()
    rss, hwm = rss_kb(t.proc.pid), rss_kb(t.proc.pid, "VmHWM")
    err = t.stop()
    opens, achieved = g.stdout.split()
    size = os.path.getsize(out_path)
    written = stat(err, "output")
    return {"rate": float(achieved), "opens": int(opens), "cpu": 100 * (c1 - c0) / (wall1 - wall0),
            "rss_mb": rss / 1024, "hwm_mb": hwm / 1024, "output": written, "dropped": stat(err, "dropped"),
            "bytes_per_event": size / max(written, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_monitor: run as root", file=sys.stderr)
        return 3
    tmp = tempfile.mkdtemp(prefix="ct-bench-")
    gen, target = workload(tmp)

    # 1. start-up (seed test 1): to probes attached, and a whole 1 s run
    starts = []
    for _ in range(3):
        t = Tracer(["monitor", "-o", os.devnull])
        starts.append((t.ready_s, t.attach_ms))
        t.stop()
    ready = min(s[0] for s in starts)
    attach = min(s[1] for s in starts)
    print(f"startup: command to probes attached {ready:.2f} s (ratio to 1 s target {ready / 1.0:.2f}); "
          f"load+attach inside the tool {attach:.0f} ms (ratio to seed's 2 s promise {ready / 2.0:.2f})")

    # 2. events on an ordinary machine for 10 s (seed test 2)
    t = Tracer(["monitor", "-o", os.path.join(tmp, "idle.json")])
    c0 = cpu_seconds(t.proc.pid)
    time.sleep(args.seconds)
    cpu_idle = 100 * (cpu_seconds(t.proc.pid) - c0) / args.seconds
    rss_idle = rss_kb(t.proc.pid) / 1024
    err = t.stop()
    print(f"idle host {args.seconds:.0f} s: events processed {stat(err, 'processed')}, output {stat(err, 'output')}, "
          f"tracer CPU {cpu_idle:.2f}% of a core, RSS {rss_idle:.1f} MB")

    # 3. the workload's own cost: max open rate without and with the tracer
    base = subprocess.run([gen, target, "0", "3"], capture_output=True, text=True, check=True).stdout.split()
    traced = run_load(gen, target, 0, 3, os.path.join(tmp, "max.json"))
    print(f"workload max open() rate: untraced {float(base[1]):,.0f}/s, traced {traced['rate']:,.0f}/s "
          f"(ratio {traced['rate'] / float(base[1]):.2f}); at that rate the tracer wrote {traced['output']:,} "
          f"events, dropped {traced['dropped']:,}, CPU {traced['cpu']:.0f}%, peak RSS {traced['hwm_mb']:.1f} MB")

    # 4. paced loads, json-stream to a file
    for rate, cpu_target in ((500, 0.5), (50_000, 50.0), (100_000, None)):
        r = run_load(gen, target, rate, args.seconds, os.path.join(tmp, f"paced-{rate}.json"))
        lost = r["opens"] - r["output"]
        line = (f"paced {rate:>7,}/s: achieved {r['rate']:,.0f}/s, written {r['output']:,}/{r['opens']:,} "
                f"(lost {lost}, dropped {r['dropped']}), tracer CPU {r['cpu']:.2f}% of a core")
        if cpu_target:
            line += f" (ratio to {cpu_target}% target {r['cpu'] / cpu_target:.2f})"
        line += f", RSS {r['rss_mb']:.1f} MB (peak {r['hwm_mb']:.1f}), {r['bytes_per_event']:.0f} bytes/event"
        print(line)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
