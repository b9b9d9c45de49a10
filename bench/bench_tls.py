#!/usr/bin/env python3
"""Benchmark of `crypto-tracer tls` (text and json to a file) under wrk, eCapture's method.

Run as root from the repository: python3 bench/bench_tls.py [--seconds N] [--rounds R]
Load: nginx (one worker, a 6-byte response, keep-alive) and wrk -t1 -c50 on loopback over TLS.
In one run, alternating, each mode R times (the median is reported):
  untraced     no probes
  floor        empty programs on the very uprobes `tls` uses (SSL_* entries and returns in
               libssl, which nginx and wrk both use): what the kernel's trap alone costs
  tc-hello     the handshake-facts TC classifier (tls_hello.bpf.c) alone on every interface:
               its cost per packet (text and json include it)
  text, json   crypto-tracer tls -m text / -m json, output to a file, whole host
  text-pid, json-pid   the same with --pid <nginx worker> (uprobes attached for it only)
  text-py, json-py     text and json with the pure-Python formatting loop (CRYPTO_TRACER_PURE_PYTHON=1)
               instead of the C one (pipeline/fastfmt.c)
  hooks, count the real programs with data capture off / with capture on but a reader that
               only counts records: where the cost beyond the floor comes from
  bpftrace     the peer a user would pick instead: bpftrace (Debian's) on SSL_write and
               SSL_read's entry and return, printing pid, comm, length and the payload (its
               buf(), at most 64 bytes) to a file, as sslsnoop-style scripts do
  handshake    crypto-tracer tls -m handshake, events to a file, whole host (no library hooks:
               the TC classifier and the connect()/accept() tracepoints)
  untraced-close, handshake-close   the same two with wrk sending "Connection: close": one TCP
               connection and one full TLS handshake per request, where per-handshake cost shows
               (x untraced of handshake-close is to untraced-close)
  decrypt-close   tls -m handshake --decrypt-handshake, "Connection: close": the key hooks in
               libssl (nginx's and wrk's) and each TLS 1.3 flight decrypted for its ALPN and
               certificate (x untraced is to untraced-close)
With --handshake only untraced, floor and the five handshake rows run; with --plaintext only untraced,
floor, count and the text/json rows.
For each: requests/s and p99 latency, and their ratios to untraced (same run) and to the
floor; the tracer's CPU (user+sys seconds per wall second) and peak RSS; events lost.
Targets: capture >= 0.9x the floor, 0 events lost, RSS <= 50 MB.
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
sys.path.insert(0, os.path.join(REPO, "tests"))
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "crypto_tracer", "tls"]
PORT = 18440
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wrk(seconds: int, url: str = f"https://127.0.0.1:{PORT}/small", close: bool = False) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) of wrk -t1 -c50 on url (close: a new connection per request)."""
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", *(["-H", "Connection: close"] if close
                                                                               else []), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()
    return rps, float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class EmptyFloor:
    """tls.bpf.o's empty program on every uprobe and uretprobe `tls` would put on libssl."""

    def __init__(self):
        from crypto_tracer.host import discovery
        from crypto_tracer.engine import BpfObject

        path = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
        lib = discovery.Discovery().examine(path, path)
        self.obj = BpfObject.from_package("tls")
        self.obj.load()
        for func in lib.functions:
            self.obj.attach_uprobe("tls_empty", path, func_name=func)
            if func != "SSL_free":
                self.obj.attach_uprobe("tls_empty", path, func_name=func, retprobe=True)

    def close(self):
        self.obj.close()


class HelloOnly:
    """tls_hello.bpf.c alone on every interface (its records go to a loaded but unattached tls
    object's ring): what the handshake-facts classifier costs each packet."""

    def __init__(self):
        from crypto_tracer.engine import BpfObject
        from crypto_tracer.probes.tls_hello import HelloCapture

        self.ring = BpfObject.from_package("tls")
        self.ring.load()
        self.capture = HelloCapture(self.ring.map("events"))
        self.capture.start()

    def close(self):
        self.capture.close()
        self.ring.close()

    @staticmethod
    def run_stats() -> tuple[int, int]:
        """(runs, run time ns) of the classifier's programs (kernel.bpf_stats_enabled=1, bpftool)."""
        import json

        out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                        check=True).stdout)
        ours = [p for p in out if p.get("name") in ("hello_ingress", "hello_egress")]
        return sum(p.get("run_cnt", 0) for p in ours), sum(p.get("run_time_ns", 0) for p in ours)


def counting_reader(tracer_args: str, ready_file: str = "sys.stdout") -> str:
    """The script of the in-process rows: TlsTracer(tracer_args) with a reader that only counts
    data records (the kernel side without user space's decoding); "ready" on ready_file once
    attached, and at SIGINT the counts as the tool prints them."""
    return f"""
import signal, sys
from crypto_tracer.probes.common import CT_EV_TLS_DATA
from crypto_tracer.probes.tls import TlsTracer
count = [0]
t = TlsTracer({tracer_args})
t.on(CT_EV_TLS_DATA, lambda raw: count.__setitem__(0, count[0] + 1))
t.start()
print("ready", file={ready_file}, flush=True)
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
while not stop:
    t.poll(100)
t.detach(); t.drain()
c = t.counters()
print(f"Events output: {{count[0]}}", file=sys.stderr)
print(f"Events dropped: {{c['dropped']}}", file=sys.stderr)
"""


IN_PROCESS = counting_reader('capture_data=sys.argv[1] == "count"')


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_handshake(seconds: int, out: str, close: bool, extra: tuple = ()) -> dict:
    """tls -m handshake to a file under the load: events are its lines, lost the handshake packets
    it says it lost (its warning at exit)."""
    p = subprocess.Popen(TRACER + ["-m", "handshake", "-o", out, *extra], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        sys.exit("tracer did not start")
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    rps, p99 = wrk(seconds, close=close)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode != 0:
        sys.exit(f"tls -m handshake failed: {err.strip()[-300:]}")
    m = re.search(r"(\d+) handshake packets were lost", err)
    with open(out, "rb") as f:
        events = sum(1 for _ in f)
    return {"rps": rps, "p99": p99, "cpu": cpu, "rss": rss, "lost": int(m.group(1)) if m else 0, "events": events}


PURE_ENV = dict(ENV, CRYPTO_TRACER_PURE_PYTHON="1")  # the -py rows: the pure-Python formatting loop


def run_traced(args: list[str], seconds: int, command=None, env=ENV) -> dict:
    p = subprocess.Popen(command or TRACER + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in (p.stdout if command else p.stderr):
        if "ready" in line:
            break
    else:
        sys.exit("tracer did not start")
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    rps, p99 = wrk(seconds)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lost = int(re.search(r"Events dropped: (\d+)", err).group(1))
    output = int(re.search(r"Events output: (\d+)", err).group(1))
    return {"rps": rps, "p99": p99, "cpu": cpu, "rss": rss, "lost": lost, "events": output}


BPFTRACE_SCRIPT = """
uprobe:LIB:SSL_write { printf("W %d %s %d %r\\n", pid, comm, arg2, buf(arg1, arg2)); }
uprobe:LIB:SSL_read { @rbuf[tid] = arg1; }
uretprobe:LIB:SSL_read /@rbuf[tid]/ {
  if ((int32)retval > 0) { printf("R %d %s %d %r\\n", pid, comm, (int32)retval, buf(@rbuf[tid], (int32)retval)); }
  delete(@rbuf[tid]);
}
"""


def run_bpftrace(seconds: int, out: str) -> dict:
    """The bpftrace peer under the same load: events are the lines it wrote, lost what it says it lost."""
    script = BPFTRACE_SCRIPT.replace("LIB", "/usr/lib/x86_64-linux-gnu/libssl.so.3")
    p = subprocess.Popen(["bpftrace", "-o", out, "-e", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while not (os.path.exists(out) and "Attaching" in open(out).read(4096)):
        if p.poll() is not None or time.monotonic() > deadline:
            sys.exit("bpftrace did not start: " + (p.stderr.read() if p.poll() is not None else "timeout"))
        time.sleep(0.05)
    cpu0, t0 = proc_cpu(p.pid), time.monotonic()
    rps, p99 = wrk(seconds)
    cpu = (proc_cpu(p.pid) - cpu0) / (time.monotonic() - t0)
    rss = proc_hwm_mb(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    with open(out, "rb") as f:
        text = f.read()
    events = text.count(b"\nW ") + text.count(b"\nR ")
    # bpftrace reports perf-buffer losses in its output ("Lost N events")
    lost = sum(int(n) for n in re.findall(rb"Lost (\d+) events", text + err.encode()))
    return {"rps": rps, "p99": p99, "cpu": cpu, "rss": rss, "lost": lost, "events": events}


def print_table(results: dict, modes, title: str) -> tuple[dict, dict]:
    """Print each mode's medians and ratios (to untraced and to the floor); (medians, floor medians)."""
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    floor = med["floor"]
    print(title)
    print(f"{'mode':15s} {'req/s':>9s} {'x untraced':>10s} {'x floor':>8s} {'p99 ms':>8s} {'p99 x':>6s} "
          f"{'CPU':>5s} {'RSS MB':>7s} {'events':>8s} {'lost':>5s}")
    for m in modes:
        r = med[m]
        base = med["untraced-close" if m.endswith("-close") else "untraced"]  # the same load untraced
        extra = (f"{r['cpu']:5.2f} {r['rss']:7.1f} {r['events']:8.0f} {r['lost']:5.0f}" if "cpu" in r
                 else f"{'-':>5s} {'-':>7s} {'-':>8s} {'-':>5s}")
        to_floor = "-" if m.endswith("-close") else f"{r['rps'] / floor['rps']:.3f}"  # the floor is keep-alive
        print(f"{m:15s} {r['rps']:9.0f} {r['rps'] / base['rps']:10.3f} {to_floor:>8s} "
              f"{r['p99']:8.2f} {r['p99'] / base['p99']:6.2f} {extra}")
    return med, floor


def run_text_json(tmp: str, worker: int, seconds: int, results: dict) -> None:
    for mode in ("text", "json"):
        out = os.path.join(tmp, f"out.{mode}")
        base = ["-m", mode, "-o", out]
        results[mode].append(run_traced(base, seconds))
        results[f"{mode}-pid"].append(run_traced(base + ["--pid", str(worker)], seconds))
        results[f"{mode}-py"].append(run_traced(base, seconds, env=PURE_ENV))
        os.unlink(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each mode (default 2)")
    ap.add_argument("--handshake", action="store_true", help="only untraced, floor and the tls -m handshake rows")
    ap.add_argument("--plaintext", action="store_true",
                    help="only untraced, floor, count and the text/json rows (both formatting loops)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for tool in ("nginx", "wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install nginx wrk openssl")
    from harness import make_cert, nginx_conf, wait_port

    tmp = tempfile.mkdtemp(prefix="bench-tls-")
    cert, key = make_cert(tmp)
    nginx = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, PORT, cert, key, master=True), "-p", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # hooks: the real programs with data capture off (what the kernel side costs alone);
    # count: capture on, but user space only counts records (no decoding, no output).
    handshake = ("handshake", "untraced-close", "handshake-close", "decrypt-close")
    plaintext = ("text", "json", "text-pid", "json-pid", "text-py", "json-py")
    if args.handshake:
        modes = ("untraced", "floor") + handshake
    elif args.plaintext:
        modes = ("untraced", "floor", "count") + plaintext
    else:
        modes = ("untraced", "floor", "tc-hello", "hooks", "count") + plaintext + handshake + \
            (("bpftrace",) if shutil.which("bpftrace") else ())
    results: dict[str, list[dict]] = {m: [] for m in modes}
    hello_ns: list[tuple[int, int]] = []  # tc-hello rounds: (classifier runs, their run time ns)
    try:
        wait_port(PORT)
        time.sleep(0.3)
        worker = int(subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()[0])
        wrk(1)  # warm-up
        for _ in range(args.rounds):
            rps, p99 = wrk(args.seconds)
            results["untraced"].append({"rps": rps, "p99": p99})
            floor = EmptyFloor()
            rps, p99 = wrk(args.seconds)
            floor.close()
            results["floor"].append({"rps": rps, "p99": p99})
            if args.plaintext:
                results["count"].append(run_traced([], args.seconds, [sys.executable, "-c", IN_PROCESS, "count"]))
                run_text_json(tmp, worker, args.seconds, results)
                continue
            out = os.path.join(tmp, "out.handshake")
            results["handshake"].append(run_handshake(args.seconds, out, close=False))
            rps, p99 = wrk(args.seconds, close=True)
            results["untraced-close"].append({"rps": rps, "p99": p99})
            results["handshake-close"].append(run_handshake(args.seconds, out, close=True))
            results["decrypt-close"].append(run_handshake(args.seconds, out, close=True,
                                                          extra=("--decrypt-handshake",)))
            os.unlink(out)
            if args.handshake:
                continue
            hello = HelloOnly()
            stats = shutil.which("bpftool") is not None
            if stats:  # the classifier's own run time per packet, beside the req/s ratio
                subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
            rps, p99 = wrk(args.seconds)
            if stats:
                runs, ns = HelloOnly.run_stats()
                subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=False)
                hello_ns.append((runs, ns))
            hello.close()
            results["tc-hello"].append({"rps": rps, "p99": p99})
            for mode in ("hooks", "count"):
                results[mode].append(run_traced([], args.seconds, [sys.executable, "-c", IN_PROCESS, mode]))
            run_text_json(tmp, worker, args.seconds, results)
            if "bpftrace" in modes:
                out = os.path.join(tmp, "out.bpftrace")
                results["bpftrace"].append(run_bpftrace(args.seconds, out))
                os.unlink(out)
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    med, floor = print_table(results, modes, f"wrk -t1 -c50 -d{args.seconds}s --latency, nginx 1 worker, 6-byte "
                             f"response, keep-alive (-close rows: a connection and a handshake per request); median of "
                             f"{args.rounds} rounds")
    if hello_ns:
        runs, ns = sum(r for r, _ in hello_ns), sum(n for _, n in hello_ns)
        print(f"tc-hello: {runs} packets classified, {ns / max(runs, 1):.0f} ns each (kernel run time with "
              f"bpf_stats on; one run per packet: lo has the egress program only)")
    if args.handshake:
        return 0
    ours = ("text", "json", "text-pid", "json-pid")  # the targets; the -py and bpftrace rows compare
    worst = min(med[m]["rps"] / floor["rps"] for m in ours)
    lost = sum(r["lost"] for m in ours for r in results[m])
    rss = max(r["rss"] for m in ours for r in results[m])
    print(f"targets: capture/floor >= 0.9: {worst:.3f} ({'ok' if worst >= 0.9 else 'MISSED'}); "
          f"events lost 0: {lost:.0f} ({'ok' if lost == 0 else 'MISSED'}); "
          f"RSS <= 50 MB: {rss:.1f} ({'ok' if rss <= 50 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
