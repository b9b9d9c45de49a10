"""Where a libssl3 (NSS) build keeps a connection's peer certificate and ALPN: from the cache, by
calibration, or unknown.

Learned by ``calibrate_nss_worker`` in a subprocess on that exact file (NSS client handshakes
against a loopback server, ground truth from NSS's own API) and cached by ELF build-id beside the
key layouts (``nss-<build-id>.json``). tls.bpf.c reads it from its ``nss_layouts`` map
(probes/tls.py) to fill TLS 1.3's encrypted facts (alpn, peer_cert_*) on NSS's tls_handshake events.
"""

from __future__ import annotations

from crypto_tracer.host.elf import build_id_or_digest as build_id
from crypto_tracer.keys.calibrate import _safe_to_load, read_cache, run_worker, write_cache
from crypto_tracer.log import log

FIELDS = ("fd", "peer_cert", "next_proto", "cert_der")
MIN_VERIFIED = 3  # handshakes (certificates, key types and ALPNs of their own) every offset held on
MAX_OFFSET = 1 << 16  # the sslSocket searched is 16 KB; CERTCertificate's derCert is at 0x78


def _valid(lay) -> bool:
    return isinstance(lay, dict) and lay.get("verified", 0) >= MIN_VERIFIED and \
        all(isinstance(lay.get(f), int) and 0 <= lay[f] < MAX_OFFSET for f in FIELDS)


def nss_layout_for(path: str) -> tuple[dict | None, str]:
    """(layout, how): the verified sslSocket offsets of this libssl3, or None and why not."""
    try:
        bid = build_id(path)
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror}"
    lay = read_cache(f"nss-{bid}.json", lambda data: data if _valid(data) else None)
    how = "cache"
    if lay is None:
        unsafe = _safe_to_load(path)
        if unsafe:
            return None, unsafe
        result, failed = run_worker("crypto_tracer.keys.calibrate_nss_worker", path)
        if result is None:
            how = f"calibration failed ({failed})"
        elif not _valid(result.get("nss")):
            how = "calibration failed: " + result.get("error", "not verified")
        else:
            lay, how = dict(result["nss"], source={"build_id": bid, "path": path}), "calibrated"
            write_cache(f"nss-{bid}.json", lay)
    log.debug("NSS layout of %s (build-id %s): %s", path, bid, how)
    return lay, how
