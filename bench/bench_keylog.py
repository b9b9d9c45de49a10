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
    and against TCP segments sent (/proc/net/snmp OutSegs), drops (target: none lost), and
    whether every session's secrets (DSB) precede its ClientHello in the file;
  * key-line latency: a Python client (traced alone, --name ctlat) does N handshakes, each
    kept open, and measures from the end of its handshake to its client random appearing in
    the tracer's key log; "explicit" handshakes (SSL_do_handshake: read at its return) and
    "implicit" ones (inside the first SSL_write, like node: read from process memory).
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
t = TlsTracer(capture_data=False, connections=False)  # as -m keylog without a filter
t.start()
print("ready", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop:
    t.poll(100)
t.close()
'''


LATENCY_CLIENT = r'''
import ctypes, json, os, socket, ssl, sys, time
ctypes.CDLL(None).prctl(15, b"ctlat", 0, 0, 0)
port, n, mode, own_keys, tracer_keys = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.keylog_filename = own_keys
seen, lat, partial = set(), [], [""]
own = open(own_keys)
while not os.path.exists(tracer_keys):
    time.sleep(0.01)
theirs = open(tracer_keys)
for i in range(n):
    raw = socket.create_connection(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, do_handshake_on_connect=mode == "explicit")
    if mode == "implicit":
        s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")  # the handshake runs inside this SSL_write
    t0 = time.monotonic()
    cr = [line.split()[1] for line in own.read().splitlines() if line and not line.startswith("#")][-1]
    while cr not in seen and time.monotonic() - t0 < 2:
        *lines, partial[0] = (partial[0] + theirs.read()).split("\n")  # a line may be half written
        seen.update(line.split()[1] for line in lines if line.strip())
        if cr not in seen:
            time.sleep(0.0002)
    lat.append(time.monotonic() - t0 if cr in seen else None)
    s.close()
print(json.dumps(lat))
'''


def latency(tmp: str, mode: str, n: int) -> list:
    """Seconds from each handshake's end to its key line in the tracer's file (None: > 2 s)."""
    import json

    keys = os.path.join(tmp, f"lat-{mode}.keys")
    tracer = start_and_wait(TRACER + ["tls", "-m", "keylog", "-k", keys, "--name", "ctlat"], "crypto-tracer ready:")
    try:
        out = subprocess.run([sys.executable, "-c", LATENCY_CLIENT, str(PORT), str(n), mode,
                              os.path.join(tmp, f"lat-{mode}.own"), keys],
                             capture_output=True, text=True, timeout=300)
    finally:
        stop(tracer)
    if out.returncode:
        sys.exit(f"latency client failed: {out.stderr}")
    return json.loads(out.stdout)


def describe(lat: list) -> str:
    got = sorted(x for x in lat if x is not None)
    if not got:
        return "no key line arrived"
    q = lambda f: got[min(len(got) - 1, int(f * len(got)))] * 1000  # noqa: E731
    return (f"n={len(lat)}, missing {len(lat) - len(got)}; ms p50 {q(0.5):.1f}, p90 {q(0.9):.1f}, "
            f"p99 {q(0.99):.1f}, max {got[-1] * 1000:.1f}")


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


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_out_segs() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def pcapng_run(tmp: str, seconds: int) -> tuple[float, str]:
    """One wrk run under `tls -m pcapng -w FILE port PORT`: (req/s, what was written and lost)."""
    from tests.tls_helpers import secrets_before_packets

    pcap = os.path.join(tmp, "bench.pcapng")
    tracer = start_and_wait(TRACER + ["tls", "-m", "pcapng", "-w", pcap, "port", str(PORT)], "crypto-tracer ready:")
    segs0 = tcp_out_segs()
    cpu0 = cpu_seconds(tracer.pid)
    rate = wrk(seconds)
    cpu = cpu_seconds(tracer.pid) - cpu0
    segs = tcp_out_segs() - segs0
    err = stop(tracer)
    m = re.search(r"(\d+) packets written to .*\(seen (\d+), filtered out (\d+), dropped (\d+), "
                  r"submitted (\d+)", err)
    if not m:
        sys.exit(err)
    written, seen, filtered, dropped, submitted = (int(x) for x in m.groups())
    info = subprocess.run(["capinfos", "-M", "-c", pcap], capture_output=True, text=True).stdout
    in_file = int(re.search(r"Number of packets:\s+(\d+)", info).group(1))
    given, hellos, early = secrets_before_packets(pcap)
    return rate, (f"in the file {in_file} / matching seen by TC {seen - filtered} = "
                  f"{in_file / max(seen - filtered, 1):.4f}, dropped {dropped}, written/OutSegs "
                  f"{written / max(segs, 1):.4f}; ClientHellos {len(hellos)}, secrets before them "
                  f"{len(hellos) - len(early)}; tracer CPU {cpu / seconds * 100:.0f} % of a core")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each mode (default 2)")
    ap.add_argument("--handshakes", type=int, default=200, help="handshakes per latency measurement (default 200)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for tool in ("nginx", "wrk", "capinfos"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install nginx wrk tshark")
    from tests.harness import make_cert, nginx_conf, wait_port

    tmp = tempfile.mkdtemp(prefix="bench-keylog-")
    cert, key = make_cert(tmp)
    nginx = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, PORT, cert, key), "-p", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[float]] = {"untraced": [], "floor": [], "hooks": [], "keylog": [], "pcapng": []}
    pcap_runs: list[str] = []
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
            rate, line = pcapng_run(tmp, args.seconds)
            results["pcapng"].append(rate)
            pcap_runs.append(line)
            print(f"  pcapng run: {rate:.0f} req/s; {line}")
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\nwrk -t1 -c16 -d{args.seconds}s against nginx (TLS 1.3, keep-alive), median of {args.rounds} rounds")
        for k in results:
            print(f"  {k:9s} {med[k]:10.0f} req/s  (runs: {', '.join(f'{x:.0f}' for x in results[k])})"
                  f"  ratio to untraced {med[k] / med['untraced']:.3f}")
        # each round's modes ran back to back: their ratio is less exposed to slow drifts of the host
        per_round = {base: statistics.median(k / b for k, b in zip(results["keylog"], results[base]))
                     for base in ("floor", "hooks", "untraced")}
        pcap_round = statistics.median(p / u for p, u in zip(results["pcapng"], results["untraced"]))
        print(f"  keylog / untraced: {med['keylog'] / med['untraced']:.3f} (medians), {per_round['untraced']:.3f} "
              f"(median of per-round ratios)  (target >= 0.9)")
        print(f"  pcapng / untraced: {med['pcapng'] / med['untraced']:.3f} (medians), {pcap_round:.3f} "
              f"(median of per-round ratios)  (target >= 0.8)")
        print(f"  keylog / empty-probe floor: {med['keylog'] / med['floor']:.3f} (medians), "
              f"{per_round['floor']:.3f} (median of per-round ratios)")
        print(f"  keylog / TLS hooks alone:   {med['keylog'] / med['hooks']:.3f} (medians), "
              f"{per_round['hooks']:.3f} (median of per-round ratios)  (cost of reading keys)")

        for mode in ("explicit", "implicit"):
            print(f"\nkey-line latency after the handshake, {mode} handshakes (target < 100 ms): "
                  f"{describe(latency(tmp, mode, args.handshakes))}")
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
