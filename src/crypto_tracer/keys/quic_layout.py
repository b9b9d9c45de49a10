"""The layout of a libssl's QUIC objects (OpenSSL 3.5+): from the cache, by calibration, or unknown.

Learned by ``calibrate_quic_worker`` in a subprocess on that exact file (it runs a QUIC client
and server against each other over loopback) and cached by ELF build-id beside the key layouts
(``<build-id>.quic.json``). tls.bpf.c reads it from its ``quic_layouts`` map (probes/tls.py).
"""

from __future__ import annotations

from crypto_tracer.host.elf import build_id_or_digest as build_id
from crypto_tracer.keys.calibrate import _safe_to_load, read_cache, run_worker, write_cache
from crypto_tracer.log import log

FIELDS = ("xso_conn", "xso_stream", "stream_id", "qc_default_xso", "bio_path", "bio", "bio_num", "peer_path", "peer",
          "tls")
MIN_VERIFIED = 8  # QUIC objects (streams and connections of both sides) every offset held on


def _valid(lay) -> bool:
    return isinstance(lay, dict) and all(f in lay for f in FIELDS) and lay.get("verified", 0) >= MIN_VERIFIED \
        and len(lay["bio_path"]) <= 2 and len(lay["peer_path"]) <= 2


def _run_worker(path: str) -> tuple[dict | None, str]:
    result, failed = run_worker("crypto_tracer.keys.calibrate_quic_worker", path)
    if result is None:
        return None, f"QUIC calibration failed ({failed})"
    if _valid(result.get("quic_layout")):
        return result["quic_layout"], "calibrated"
    return None, "QUIC calibration failed: " + result.get("error", "not verified")


def quic_layout_for(path: str) -> tuple[dict | None, str]:
    """(layout, how): the verified QUIC object layout of this libssl, or None and why not."""
    try:
        bid = build_id(path)
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror}"
    lay = read_cache(bid + ".quic.json", lambda data: data if _valid(data) else None)
    if lay is not None:
        return lay, "cache"
    unsafe = _safe_to_load(path)
    if unsafe:
        return None, unsafe
    lay, how = _run_worker(path)
    if lay is not None:
        lay["source"] = {"build_id": bid, "path": path}
        write_cache(bid + ".quic.json", lay)
    log.debug("QUIC layout of %s (build-id %s): %s", path, bid, how)
    return lay, how
