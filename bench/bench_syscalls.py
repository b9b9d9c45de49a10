#!/usr/bin/env python3
"""What crypto-tracer costs the host's other processes: the syscalls of a program that never
touches TLS, untraced and under each `tls` mode.

Run as root from the repository: python3 bench/bench_syscalls.py [--count N] [--rounds R]
Load: dd if=/dev/zero of=/dev/null bs=1 count=N (2N syscalls: one-byte reads and writes).
In one run, alternating, each mode R times (the median is reported):
  untraced     no tracer
  keylog       tls -m keylog (key hooks, and the mmap and exit_group syscall tracepoints)
  handshake    tls -m handshake (TC classifier, connect/accept tracepoints)
  text, json   tls -m text / -m json to /dev/null (plaintext hooks and socket-I/O tracepoints)
For each: dd's wall time, its ratio to untraced, and the added nanoseconds per syscall.
Any syscall tracepoint puts every task on the kernel's syscall slow path; a BPF program on
raw sys_enter also runs on every syscall. Neither may cost a process that never uses TLS much.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
MODES = {
    "untraced": None,
    "keylog": ["-m", "keylog", "-k", "/dev/null"],
    "handshake": ["-m", "handshake", "-o", "/dev/null"],
    "text": ["-m", "text", "-o", "/dev/null"],
    "json": ["-m", "json", "-o", "/dev/null"],
}


def dd(count: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={count}"], stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t


def traced(args: list[str], count: int) -> float:
    p = subprocess.Popen([sys.executable, "-m", "crypto_tracer", "tls", *args], env=ENV, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        sys.exit(f"tls {' '.join(args)} did not start")
    try:
        return dd(count)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            sys.exit(f"tls {' '.join(args)} failed: {err.strip()[-300:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2_000_000, help="dd's one-byte blocks (default 2000000)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    results: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode, targs in MODES.items():
            results[mode].append(dd(args.count) if targs is None else traced(targs, args.count))
    base = statistics.median(results["untraced"])
    syscalls = 2 * args.count
    print(f"dd if=/dev/zero of=/dev/null bs=1 count={args.count} ({syscalls} syscalls); median of {args.rounds} rounds")
    print(f"{'mode':10s} {'seconds':>8s} {'x untraced':>10s} {'ns/syscall added':>17s}")
    for mode, times in results.items():
        m = statistics.median(times)
        print(f"{mode:10s} {m:8.3f} {m / base:10.3f} {(m - base) / syscalls * 1e9:17.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
