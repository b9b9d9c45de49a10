"""Snapshot speed with N real sleeping processes, half of them holding a crypto file or library.

    python bench/bench_snapshot.py [--processes 1000] [--runs 5]

Half of the extra processes are plain `sleep`; a quarter hold a certificate on stdin, a quarter
map libcrypto (LD_PRELOAD). Reports the wall time of `take_snapshot()` (in-process, warm
caches after the first run) and of the whole `crypto-tracer snapshot` command (cold start).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"


def make_cert(directory: str) -> str:
    cert = os.path.join(directory, "bench.crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", os.path.join(directory, "bench.key"), "-out", cert, "-days", "30",
                    "-subj", "/CN=bench"], check=True, capture_output=True)
    return cert


def spawn(n: int, cert: str) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        kind = i % 4
        env = dict(os.environ, LD_PRELOAD=LIBCRYPTO) if kind == 1 else None
        stdin = open(cert, "rb") if kind == 3 else subprocess.DEVNULL
        procs.append(subprocess.Popen(["sleep", "600"], stdin=stdin, env=env))
        if kind == 3:
            stdin.close()
    time.sleep(0.5)  # let every LD_PRELOAD finish mapping
    return procs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from crypto_tracer.commands.snapshot import take_snapshot

    with tempfile.TemporaryDirectory() as tmp:
        cert = make_cert(tmp)
        procs = spawn(args.processes, cert)
        try:
            total = len([p for p in os.listdir("/proc") if p.isdigit()])
            times, doc = [], None
            for _ in range(args.runs):
                t0 = time.perf_counter()
                doc = take_snapshot()
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "crypto_tracer", "snapshot", "-q", "-o", os.devnull], check=True,
                           env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
            cli = time.perf_counter() - t0
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    print(f"processes on host: {total} ({args.processes} spawned, {args.processes // 2} using crypto)")
    print(f"crypto processes found: {doc['summary']['total_processes']}")
    print(f"take_snapshot: first {times[0] * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)})")
    print(f"crypto-tracer snapshot command (cold, incl. interpreter start): {cli * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
