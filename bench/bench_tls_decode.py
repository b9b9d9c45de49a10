#!/usr/bin/env python3
"""Micro-benchmark of the user-space hot path of `crypto-tracer tls -m text|json`.

  record: python3 bench/bench_tls_decode.py record FILE [--seconds N]   (root; nginx + wrk on loopback)
          saves the raw data records the ring buffer delivers under the bench_tls.py load
  replay: python3 bench/bench_tls_decode.py replay FILE [--mode json|text|json-array] [--profile]
          feeds them through TlsDataPipeline.process() in batches, output to a temporary file, and
          prints the CPU time per event (process time, best of 5 passes)
  replay ... --save OUT: one pass with a fixed clock, output kept in OUT (to compare versions)

The file is a sequence of (u32 length, record) pairs.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, REPO)
PORT = 18441


def record(path: str, seconds: int) -> None:
    from tests.harness import make_cert, nginx_conf, wait_port
    from crypto_tracer.probes.common import CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE
    from crypto_tracer.probes.tls import TlsTracer

    tmp = tempfile.mkdtemp(prefix="bench-tls-decode-")
    cert, key = make_cert(tmp)
    nginx = subprocess.Popen(["nginx", "-c", nginx_conf(tmp, PORT, cert, key), "-p", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raws: list[bytes] = []
    try:
        wait_port(PORT)
        t = TlsTracer(capture_data=True)
        t.on(CT_EV_TLS_DATA, raws.append)
        t.on(CT_EV_TLS_HANDSHAKE, raws.append)
        t.start()
        try:
            wrk = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{seconds}s", f"https://127.0.0.1:{PORT}/small"],
                                   stdout=subprocess.DEVNULL)
            while wrk.poll() is None:
                t.poll(100)
            t.detach()
            t.drain()
        finally:
            t.close()
    finally:
        nginx.terminate()
        nginx.wait(10)
    with open(path, "wb") as f:
        for raw in raws:
            f.write(struct.pack("<I", len(raw)) + raw)
    print(f"{len(raws)} records saved to {path}")


def load(path: str) -> list[bytes]:
    data = open(path, "rb").read()
    raws, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        raws.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return raws


def replay(path: str, mode: str, profile: bool, save: str | None = None, batch: int = 2048) -> None:
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.commands.tls.plaintext import make_pipeline

    raws = load(path)
    fmt = "json-array" if mode == "json-array" else "json-stream"
    with tempfile.TemporaryDirectory() as tmp:
        out = save or os.path.join(tmp, "out")
        opts = types.SimpleNamespace(model="text" if mode == "text" else "json", format=fmt, filter=[],
                                     no_redact=False, output=out, hex=False, tsize=0, max_payload=1 << 20)

        def one_pass() -> float:
            clock = WallClock()
            if save:
                clock.offset_ns = 1_790_000_000_123_456_789  # the same timestamps in every run
            cap = make_pipeline(opts, clock, types.SimpleNamespace(received=0, user_filtered=0, output=0))
            t0 = time.process_time()
            for i in range(0, len(raws), batch):
                cap.batch += raws[i:i + batch]
                cap.process()
            cap.sink.close()
            return time.process_time() - t0

        if save:
            one_pass()
            print(f"{len(raws)} records written to {save}")
            return
        if profile:
            import cProfile
            import pstats

            cProfile.runctx("one_pass()", globals(), {"one_pass": one_pass}, os.path.join(tmp, "prof"))
            pstats.Stats(os.path.join(tmp, "prof")).sort_stats("tottime").print_stats(15)
            return
        best = min(one_pass() for _ in range(5))
        size = os.path.getsize(out)
    print(f"{mode}: {len(raws)} records, {best / len(raws) * 1e6:.2f} us per event "
          f"(best of 5, CPU time), {size / len(raws):.0f} bytes per event")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("record", "replay"))
    ap.add_argument("file")
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--mode", choices=("json", "text", "json-array"), default="json")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--save", metavar="OUT")
    args = ap.parse_args()
    if args.action == "record":
        record(args.file, args.seconds)
    else:
        replay(args.file, args.mode, args.profile, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
