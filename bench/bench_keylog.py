#!/usr/bin/env python3
"""Benchmark of `crypto-tracer tls -m keylog` and `-m pcapng` under wrk load.

Run as root from the repository: python3 bench/bench_keylog.py [--seconds N] [--rounds R]
Load: nginx (one worker, small response, keep-alive) and wrk on loopback over TLS 1.3.
Figures, all measured in this same run:
  * requests/s untraced, with the empty-probe floor (empty programs on the same SSL_*
    entries and returns crypto-tracer hooks), with the TLS hooks alone (TlsTracer without
    key layouts), and with `tls -m keylog`; ratios keylog/floor (target >= 0.95) and
    keylog/hooks (what reading keys adds per data call);
  * `tls -m pcapng`: packets written against packets the kernel saw on lo for the port
    and against TCP segments sent (/proc/net/snmp OutSegs), drops (target: none lost).
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
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tls import EmptyFloor  # noqa: E402  the issue's one floor: tls's uprobes, empty programs
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer"]
PORT = 18540
HOOKS_ONLY = r'''
import signal, sys, time
from crypto_tracer.probes.tls import TlsTracer
t = TlsTracer(capture_data=False)
t.start()
print("ready", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop:
    t.poll(100)
t.close()
'''


def wrk(seconds: int) -> float:
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", f"https://127.0.0.1:{PORT}/bench"],
                         capture_output=True, text=True, check=True).stdout
    errors = re.findall(r"(Socket errors:.*|Non-2xx or 3xx responses:.*)", out)
    if errors:  # a failing request is quick: such a run measures nothing
        print(f"  warning: wrk saw errors ({'; '.join(errors)}): this run is not comparable")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def start_and_wait(args: list[str], ready: str, timeout: float = 60) -> subprocess.Popen:
    p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream = p.stdout if ready == "ready" else p.stderr
    end = time.monotonic() + timeout
    for line in stream:
        if ready in line:
            return p
        if time.monotonic() > end:
            break
    p.kill()
    sys.exit(f"{' '.join(args)} did not start")


def stop(p: subprocess.Popen, sig=signal.SIGINT) -> str:
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return err or ""


def tcp_out_segs() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each mode (default 2)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for tool in ("nginx", "wrk", "capinfos"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install nginx wrk tshark")
    from tests.tls_helpers import make_cert, nginx_conf, wait_port

    tmp = tempfile.mkdtemp(prefix="bench-keylog-")
    cert, key = make_cert(tmp)
    nginx = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, PORT, cert, key), "-p", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[float]] = {"untraced": [], "floor": [], "hooks": [], "keylog": []}
    try:
        wait_port(PORT)
        wrk(1)  # warm-up
        for _ in range(args.rounds):
            results["untraced"].append(wrk(args.seconds))
            floor = EmptyFloor()
            results["floor"].append(wrk(args.seconds))
            floor.close()
            hooks = start_and_wait([sys.executable, "-c", HOOKS_ONLY], "ready")
            results["hooks"].append(wrk(args.seconds))
            stop(hooks, signal.SIGTERM)
            keylog = start_and_wait(TRACER + ["tls", "-m", "keylog", "-k", os.path.join(tmp, "keys.txt")],
                                    "crypto-tracer ready:")
            results["keylog"].append(wrk(args.seconds))
            err = stop(keylog)
            sessions = re.search(r"(\d+) TLS sessions", err)
            print(f"  keylog run: {sessions.group(0) if sessions else err.strip()}")
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\nwrk -t1 -c16 -d{args.seconds}s against nginx (TLS 1.3, keep-alive), median of {args.rounds} rounds")
        for k in results:
            print(f"  {k:9s} {med[k]:10.0f} req/s  (runs: {', '.join(f'{x:.0f}' for x in results[k])})"
                  f"  ratio to untraced {med[k] / med['untraced']:.3f}")
        # each round's modes ran back to back: their ratio is less exposed to slow drifts of the host
        per_round = {base: statistics.median(k / b for k, b in zip(results["keylog"], results[base]))
                     for base in ("floor", "hooks")}
        print(f"  keylog / empty-probe floor: {med['keylog'] / med['floor']:.3f} (medians), "
              f"{per_round['floor']:.3f} (median of per-round ratios)  (target >= 0.95)")
        print(f"  keylog / TLS hooks alone:   {med['keylog'] / med['hooks']:.3f} (medians), "
              f"{per_round['hooks']:.3f} (median of per-round ratios)  (cost of reading keys)")

        pcap = os.path.join(tmp, "bench.pcapng")
        tracer = start_and_wait(TRACER + ["tls", "-m", "pcapng", "-w", pcap, "port", str(PORT)], "crypto-tracer ready:")
        segs0 = tcp_out_segs()
        rate = wrk(args.seconds)
        segs = tcp_out_segs() - segs0
        err = stop(tracer)
        m = re.search(r"(\d+) packets written to .*\(seen (\d+), filtered out (\d+), dropped (\d+), "
                      r"submitted (\d+)", err)
        if not m:
            print(err)
            return 1
        written, seen, filtered, dropped, submitted = (int(x) for x in m.groups())
        info = subprocess.run(["capinfos", "-M", "-c", pcap], capture_output=True, text=True).stdout
        in_file = int(re.search(r"Number of packets:\s+(\d+)", info).group(1))
        print(f"\npcapng under the same load: {rate:.0f} req/s (ratio to untraced {rate / med['untraced']:.3f})")
        print(f"  packets in the file {in_file}, written {written}; TC saw {seen}: {filtered} other traffic "
              f"filtered out, {submitted} submitted, {dropped} dropped")
        print(f"  in the file / matching packets seen by TC: {in_file / max(seen - filtered, 1):.4f}"
              f"  (target 1.0, none lost)")
        print(f"  written / TCP segments sent (OutSegs, whole host): {written / max(segs, 1):.4f}")
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
