#!/usr/bin/env python3
"""Benchmark of `crypto-tracer tls` on a bulk transfer: one TLS 1.3 download of a big file.

Run as root from the repository: python3 bench/bench_bulk.py [--mb N] [--rounds R] [--modes a,b]
Load: nginx (one worker) serves an N MB file (default 400) over TLS 1.3 on loopback; `curl -o
/dev/null` downloads it; both ends use libssl and both are traced (whole host). In one run,
alternating, each mode R times (the median is reported):
  untraced       no probes
  floor          empty programs on every uprobe `tls` uses (the trap alone)
  keylog         tls -m keylog (no data hooks)
  count          the real programs, capture on, a reader that only counts records (bench_tls.py's):
                 the kernel side's copy into the ring, what no output mode can beat
  text           tls -m text -o FILE
  streams        tls -m streams -o DIR (each connection's plaintext per direction in its own file)
  json           tls -m json -o FILE
  json-paced     tls -m json -o FILE with curl --limit-rate 200M
  text-py, json-py   text and json with the pure-Python formatting loop (CRYPTO_TRACER_PURE_PYTHON=1)
                 instead of the C one (pipeline/fastfmt.c)
For each: MB/s and its ratios to untraced and to the floor, the tracer's CPU (user+sys seconds
per wall second) and peak RSS, events written and dropped, and plaintext bytes captured against
the bytes that crossed (2 x the file: nginx's writes and curl's reads).
Targets (issue 13): text and streams 0 drops at >= 0.8x the floor's MB/s; json paced 0 drops;
RSS <= 50 MB.
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
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tls import EmptyFloor, counting_reader, proc_cpu, proc_hwm_mb  # noqa: E402  (same directory)

ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer", "tls"]
PORT = 18640
COUNTING = counting_reader("capture_data=True, mapsize=8 << 20", ready_file="sys.stderr")  # text/json's ring
MODES = ("untraced", "floor", "keylog", "count", "text", "streams", "json", "json-paced", "text-py", "json-py")


def download(url: str, limit: str | None = None) -> tuple[float, int]:
    """(MB/s, bytes) of one curl download to /dev/null."""
    args = ["curl", "-sk", "--tlsv1.3", "-o", os.devnull, "-w", "%{size_download} %{time_total}", url]
    if limit:
        args[1:1] = ["--limit-rate", limit]
    size, secs = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return int(size) / float(secs) / 1e6, int(size)


def traced(mode: str, tmp: str, url: str, limit: str | None, extra: list[str]) -> dict:
    out = os.path.join(tmp, "out." + mode)
    model = mode.split("-")[0]
    args = ["-m", model] + (["-k", out] if model == "keylog" else ["-o", out]) + extra
    env = dict(ENV, CRYPTO_TRACER_PURE_PYTHON="1") if mode.endswith("-py") else ENV
    command = [sys.executable, "-c", COUNTING, "count"] if mode == "count" else TRACER + args
    p = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        sys.exit(f"tracer did not start ({mode})")
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    mbs, size = download(url, limit)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    found = dict(re.findall(r"Events (dropped|output): (\d+)", err))
    captured = 0
    if model in ("streams",):
        captured = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                       if f.endswith((".sent", ".received")))
    if os.path.isdir(out):
        shutil.rmtree(out)
    elif os.path.exists(out):
        os.unlink(out)
    return {"mbs": mbs, "cpu": cpu, "rss": rss, "events": int(found.get("output", 0)),
            "lost": int(found.get("dropped", 0)), "captured": captured / (2 * size) if captured else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=400, help="size of the file in MB (default 400)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each mode (default 3)")
    ap.add_argument("--tracer-args", default="", help="more options for every tracer run, e.g. '--mapsize 16M'")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    modes = [m for m in MODES if m in args.modes.split(",") or m in ("untraced", "floor")]
    from harness import make_cert, nginx_conf, wait_port

    tmp = tempfile.mkdtemp(prefix="bench-bulk-")
    cert, key = make_cert(tmp)
    www = os.path.join(tmp, "www")  # what nginx_conf serves
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "big"), "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(args.mb):
            f.write(block)
    conf = nginx_conf(tmp, PORT, cert, key, master=True)
    nginx = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{PORT}/big"
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        wait_port(PORT)
        download(url)  # warm-up: the file in the page cache
        for _ in range(args.rounds):
            for mode in modes:
                if mode == "untraced":
                    results[mode].append({"mbs": download(url)[0]})
                elif mode == "floor":
                    floor = EmptyFloor()
                    try:
                        results[mode].append({"mbs": download(url)[0]})
                    finally:
                        floor.close()
                else:
                    results[mode].append(traced(mode, tmp, url, "200M" if mode == "json-paced" else None,
                                                  args.tracer_args.split()))
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {m: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
           for m, rs in results.items()}
    base, floor = med["untraced"]["mbs"], med["floor"]["mbs"]
    print(f"one {args.mb} MB download over TLS 1.3 (nginx -> curl -o /dev/null, both traced); "
          f"median of {args.rounds} rounds")
    print(f"{'mode':11s} {'MB/s':>7s} {'x untraced':>10s} {'x floor':>8s} {'CPU':>5s} {'RSS MB':>7s} "
          f"{'events':>8s} {'dropped':>8s} {'captured':>8s}")
    for m in modes:
        r = med[m]
        extra = (f"{r['cpu']:5.2f} {r['rss']:7.1f} {r['events']:8.0f} {r['lost']:8.0f} "
                 f"{'-' if r['captured'] is None else format(r['captured'], '.4f'):>8s}" if "cpu" in r else "")
        print(f"{m:11s} {r['mbs']:7.0f} {r['mbs'] / base:10.3f} {r['mbs'] / floor:8.3f} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
