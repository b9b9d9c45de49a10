"""The layout of a libssl's QUIC objects (OpenSSL 3.5+): from the cache, by calibration, or unknown.

Learned by ``calibrate_quic_worker`` in a subprocess on that exact file (it runs a QUIC client
and server against each other over loopback) and cached by ELF build-id beside the key layouts
(``<build-id>.quic.json``). tls.bpf.c reads it from its ``quic_layouts`` map (probes/tls.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from crypto_tracer.host.elf import build_id_or_digest as build_id
from crypto_tracer.keys.calibrate import _safe_to_load, cache_dirs
from crypto_tracer.log import log

FIELDS = ("xso_conn", "xso_stream", "stream_id", "qc_default_xso", "bio_path", "bio", "bio_num", "peer_path", "peer")
MIN_VERIFIED = 8  # QUIC objects (streams and connections of both sides) every offset held on


def _valid(lay) -> bool:
    return isinstance(lay, dict) and all(f in lay for f in FIELDS) and lay.get("verified", 0) >= MIN_VERIFIED \
        and len(lay["bio_path"]) <= 2 and len(lay["peer_path"]) <= 2


def _cached(bid: str) -> dict | None:
    for d in cache_dirs():
        try:
            with open(os.path.join(d, bid + ".quic.json")) as f:
                lay = json.load(f)
        except (OSError, ValueError):
            continue
        if _valid(lay):
            return lay
    return None


def _store(bid: str, lay: dict) -> None:
    for d in cache_dirs():
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            tmp = os.path.join(d, f".{bid}.quic.{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(lay, f, indent=1)
            os.replace(tmp, os.path.join(d, bid + ".quic.json"))
            return
        except OSError:
            continue


def _run_worker(path: str) -> tuple[dict | None, str]:
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src_root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "crypto_tracer.keys.calibrate_quic_worker", path],
                              check=False, capture_output=True, text=True, timeout=60, env=env)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        return None, f"QUIC calibration failed ({type(exc).__name__})"
    if _valid(result.get("quic_layout")):
        return result["quic_layout"], "calibrated"
    return None, "QUIC calibration failed: " + result.get("error", "not verified")


def quic_layout_for(path: str) -> tuple[dict | None, str]:
    """(layout, how): the verified QUIC object layout of this libssl, or None and why not."""
    try:
        bid = build_id(path)
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror}"
    lay = _cached(bid)
    if lay is not None:
        return lay, "cache"
    unsafe = _safe_to_load(path)
    if unsafe:
        return None, unsafe
    lay, how = _run_worker(path)
    if lay is not None:
        lay["source"] = {"build_id": bid, "path": path}
        _store(bid, lay)
    log.debug("QUIC layout of %s (build-id %s): %s", path, bid, how)
    return lay, how
