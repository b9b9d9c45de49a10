"""Overhead of `crypto-tracer profile` on digest-heavy workloads, as a ratio to the same workload
unprofiled, measured in one run (uprobe costs vary a lot between machines; see docs/PERFORMANCE.md).

    python bench/bench_profile.py [--digests 200000] [--rounds 3] [--speed-seconds 3]

1. Python: N x hashlib.sha256(b"x").digest() (one EVP_DigestInit_ex per digest = one uprobe hit),
   timed by the workload itself; profiled with --pid after the probes are attached.
2. `openssl speed -evp sha256 -bytes 64`: digests per second, profiled with --name openssl
   (the profiler hooks libcrypto when openssl maps it, so the first milliseconds run unhooked).
Every profiled run also checks that the kernel counted exactly the digests made.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
WORKLOAD = r"""
import hashlib, sys, time
n = int(sys.argv[1])
hashlib.sha256(b"warm").digest()
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
for _ in range(n):
    hashlib.sha256(b"x").digest()
print(time.perf_counter() - t0, flush=True)
sys.stdin.readline()
"""


def tracer(*args):
    return subprocess.Popen([sys.executable, "-m", "crypto_tracer", "profile", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_attached(t):
    """The profiler logs 'crypto-tracer ready: profile ...' once its probes are attached."""
    for line in t.stderr:
        if "crypto-tracer ready:" in line:
            return
    raise RuntimeError("profiler did not start")


def python_round(n: int, profiled: bool) -> tuple[float, int | None]:
    w = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert w.stdout.readline().strip() == "ready"
    t = None
    if profiled:
        t = tracer("-p", str(w.pid), "-d", "120")
        wait_attached(t)
    w.stdin.write("go\n")
    w.stdin.flush()
    elapsed = float(w.stdout.readline())
    w.stdin.write("end\n")
    w.stdin.flush()
    w.wait()
    counted = None
    if t is not None:
        doc = json.loads(t.communicate(timeout=60)[0])
        counted = sum(c["count"] for c in doc["processes"][0]["api_calls"]
                      if c["function_name"] == "EVP_DigestInit_ex" and c["algorithm"] == "SHA256")
    return elapsed, counted


def speed_round(seconds: int, profiled: bool, size: int = 64) -> float:
    t = None
    if profiled:
        t = tracer("-n", "openssl", "-d", str(seconds + 10))
        wait_attached(t)
    out = subprocess.run(["openssl", "speed", "-evp", "sha256", "-bytes", str(size), "-seconds", str(seconds)],
                         capture_output=True, text=True).stderr
    if t is not None:
        t.terminate()
        t.communicate(timeout=60)
    m = re.search(rf"Doing sha256 for \d+s on {size} size blocks: (\d+) sha256", out)
    return int(m.group(1)) / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--speed-seconds", type=int, default=3)
    args = ap.parse_args()
    plain, prof = [], []
    for _ in range(args.rounds):
        plain.append(python_round(args.digests, False)[0])
        elapsed, counted = python_round(args.digests, True)
        prof.append(elapsed)
        assert counted == args.digests, f"kernel counted {counted} digests, expected {args.digests}"
    p, q = statistics.median(plain), statistics.median(prof)
    print(f"python hashlib.sha256 x {args.digests}: unprofiled {p:.3f} s ({p / args.digests * 1e6:.2f} us/digest), "
          f"profiled {q:.3f} s ({q / args.digests * 1e6:.2f} us/digest): ratio {q / p:.2f}x, "
          f"+{(q - p) / args.digests * 1e6:.2f} us per hooked call; kernel count exact")
    for size in (64, 16384):
        s_plain = statistics.median(speed_round(args.speed_seconds, False, size) for _ in range(args.rounds))
        s_prof = statistics.median(speed_round(args.speed_seconds, True, size) for _ in range(args.rounds))
        print(f"openssl speed -evp sha256 -bytes {size}: unprofiled {s_plain:,.0f} digests/s, profiled "
              f"{s_prof:,.0f} digests/s: time ratio {s_plain / s_prof:.2f}x "
              f"(+{(1 / s_prof - 1 / s_plain) * 1e6:.1f} us per digest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
