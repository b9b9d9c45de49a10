"""The layout of a library's SSL (or GnuTLS session) object: from the cache, by calibration,
or unknown.

* A shared libssl is calibrated in a subprocess (``calibrate_worker``) on that exact file,
  and the verified layout is cached by ELF build-id.
* An executable with OpenSSL linked in cannot be loaded with ctypes. node runs itself as a
  calibration child (``calibrate_node``: handshakes with its own --tls-keylog, its memory read
  and the layout checked against that key log), cached by build-id like a libssl. Others (or a
  node that cannot be run) reuse a verified layout learned on a shared libssl of exactly the
  same OpenSSL version.
* Otherwise the layout is unknown: the caller says so and writes no keys for that library.
"""

from __future__ import annotations

import ctypes.util
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

from crypto_tracer.host.elf import build_id_or_digest as build_id, openssl_build, openssl_version
from crypto_tracer.keys import calibrate_node
from crypto_tracer.keys.layout import Layout
from crypto_tracer.log import log

CACHE_DIRS = ("/var/cache/crypto-tracer/layouts", "~/.cache/crypto-tracer/layouts")
MIN_VERIFIED = 12  # SSL objects (both sides, TLS 1.2 and 1.3) a layout must reproduce

T = TypeVar("T")

@dataclass
class LayoutResult:
    path: str
    build_id: str
    layout: Layout | None
    how: str  # "cache", "calibrated", "same version as <path>", or why it is unknown


def cache_dirs() -> list[str]:
    override = os.environ.get("CRYPTO_TRACER_LAYOUT_CACHE")
    return [override] if override else [os.path.expanduser(d) for d in CACHE_DIRS]


def read_cache(name: str, parse: Callable[[dict], T | None]) -> T | None:
    """The first cache file `name` that parse accepts (SSL layouts, QUIC layouts, BoringSSL hooks)."""
    for d in cache_dirs():
        try:
            with open(os.path.join(d, name)) as f:
                value = parse(json.load(f))
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if value is not None:
            return value
    return None


def write_cache(name: str, data: dict) -> None:
    """Into the first writable cache directory, atomically."""
    for d in cache_dirs():
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            tmp = os.path.join(d, f".{name}.{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, os.path.join(d, name))
            return
        except OSError:
            continue


def run_worker(module: str, path: str) -> tuple[dict | None, str]:
    """A calibration worker run on path in a subprocess: (its JSON result, "") or (None, what failed)."""
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src_root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", module, path], capture_output=True, text=True, timeout=60,
                              env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        return None, type(exc).__name__


def _verified_layout(data: dict) -> Layout | None:
    lay = Layout.from_json(data)
    return lay if lay.verified >= MIN_VERIFIED else None


def _cached(bid: str) -> Layout | None:
    return read_cache(bid + ".json", _verified_layout)


def _store(bid: str, lay: Layout) -> None:
    write_cache(bid + ".json", lay.to_json())


WORKERS = {"openssl": "crypto_tracer.keys.calibrate_worker", "gnutls": "crypto_tracer.keys.calibrate_gnutls_worker"}


def _run_worker(path: str, kind: str = "openssl") -> tuple[Layout | None, str]:
    result, failed = run_worker(WORKERS[kind], path)
    if result is None:
        return None, f"calibration failed ({failed})"
    if "layout" in result:
        return Layout.from_json(result["layout"]), "calibrated"
    return None, "calibration failed: " + result.get("error", "no result")


def _safe_to_load(path: str) -> str | None:
    """Calibration runs the library's code with our privileges: only for files that only
    root could have written (like the system's own libraries). Returns why not, or None."""
    if os.geteuid() != 0:
        return None
    try:
        for p in (os.path.realpath(path), os.path.dirname(os.path.realpath(path))):
            st = os.stat(p)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return f"{p} is writable by others than root: its code is not run to learn its layout"
    except OSError as exc:
        return f"cannot check it: {exc.strerror}"
    return None


def _calibrated(path: str, bid: str, kind: str = "openssl") -> tuple[Layout | None, str]:
    lay = _cached(bid)
    if lay is not None:
        return lay, "cache"
    unsafe = _safe_to_load(path)
    if unsafe:
        return None, unsafe
    lay, how = _run_worker(path, kind)
    if lay is None:
        return None, how
    if lay.verified < MIN_VERIFIED:
        return None, "calibration could not verify the layout"
    lay.source = {"build_id": bid, "path": path}
    _store(bid, lay)
    return lay, how


_NODE_FAILED: dict[str, str] = {}  # build-id -> why its calibration failed (not retried in this run)


def _node_calibrated(path: str, bid: str, version: str) -> tuple[Layout | None, str]:
    """The layout a node executable shows when run as a calibration child (keys/calibrate_node.py)."""
    if bid in _NODE_FAILED:
        return None, _NODE_FAILED[bid]
    why = _safe_to_load(path)
    if why is None:
        try:
            lay = calibrate_node.calibrate(path, version)
        except (calibrate_node.CalibrationError, OSError, ValueError) as exc:
            why = f"calibration failed: {exc}"
        else:
            if lay.verified >= MIN_VERIFIED:
                lay.source = {"build_id": bid, "path": path}
                _store(bid, lay)
                return lay, "calibrated"
            why = "calibration could not verify the layout"
    _NODE_FAILED[bid] = why
    return None, why


def _same_version_layout(version: str, build: str | None = None) -> tuple[Layout | None, str]:
    """A verified layout learned on a shared libssl of this exact OpenSSL version."""
    if build and "+" in build:  # node 20's 3.0.13+quic: fields added, the layout of 3.0.13 is not its own
        return None, f"its OpenSSL {build} is a patched build: no other build's layout is used for it"
    for d in cache_dirs():
        for name in sorted(glob.glob(os.path.join(d, "*.json"))):
            lay = _cached(os.path.basename(name)[:-5])
            if lay is not None and lay.version == version:
                return lay, f"same version as {lay.source.get('path', '?')}"
    system = ctypes.util.find_library("ssl")
    if system:
        path = next((p for p in (f"/usr/lib/x86_64-linux-gnu/{system}", f"/lib64/{system}", system)
                     if os.path.exists(p)), None)
        if path:
            lay, _ = _calibrated(path, build_id(path))
            if lay is not None and lay.version == version:
                return lay, f"same version as {path}"
    return None, f"no shared libssl of OpenSSL {version} to learn its layout from"


def layout_for(path: str, kind: str = "openssl") -> LayoutResult:
    """The verified layout of the OpenSSL (or GnuTLS) in this file, or None with the reason."""
    try:
        bid = build_id(path)
    except OSError as exc:
        return LayoutResult(path, "", None, f"cannot read it: {exc.strerror}")
    if kind not in WORKERS:
        return LayoutResult(path, bid, None, f"reading {kind} session secrets is not supported")
    if ".so" in os.path.basename(path) or kind != "openssl":
        lay, how = _calibrated(path, bid, kind)
    else:
        version = openssl_version(path)
        if version is None:
            return LayoutResult(path, bid, None, "no OpenSSL version string in it")
        lay = _cached(bid)
        how = "cache"
        if lay is None and calibrate_node.is_node(path):
            lay, how = _node_calibrated(path, bid, version)
            if lay is None:
                lay, other = _same_version_layout(version, openssl_build(path))
                how = other if lay is not None else f"{how}; {other}"
        elif lay is None:
            lay, how = _same_version_layout(version, openssl_build(path))
    log.debug("layout of %s (build-id %s): %s", path, bid, how)
    return LayoutResult(path, bid, lay, how)


# --- BoringSSL: where bssl::ssl_log_secret is and where it finds client_random -----------------

BSSL_WORKER = "crypto_tracer.keys.calibrate_bssl_worker"
BSSL_MIN_VERIFIED = 8


@dataclass
class BsslHook:
    log_secret: int  # file offset of bssl::ssl_log_secret (what the uprobe takes)
    s3: int  # offset of ssl->s3
    client_random: int  # offset of client_random in s3
    verified: int


def _bssl_from_json(data: dict) -> BsslHook | None:
    try:
        hook = BsslHook(int(data["log_secret"]), int(data["s3"]), int(data["client_random"]), int(data["verified"]))
    except (KeyError, TypeError, ValueError):
        return None
    return hook if hook.verified >= BSSL_MIN_VERIFIED and 0 <= hook.s3 < 1 << 16 and \
        0 <= hook.client_random < 1 << 16 else None


def bssl_hook_for(path: str) -> tuple[BsslHook | None, str]:
    """What bssl_keylog needs for the BoringSSL in this file, verified on this exact file by
    calibrate_bssl_worker (cached by build-id as bssl-<build-id>.json), or None with the reason."""
    try:
        bid = build_id(path)
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror}"
    hook = read_cache(f"bssl-{bid}.json", _bssl_from_json)
    if hook is not None:
        return hook, "cache"
    unsafe = _safe_to_load(path)
    if unsafe:
        return None, unsafe
    result, failed = run_worker(BSSL_WORKER, path)
    if result is None:
        return None, f"calibration failed ({failed})"
    if "bssl" not in result:
        return None, "calibration failed: " + result.get("error", "no result")
    hook = _bssl_from_json(result["bssl"])
    if hook is None:
        return None, "calibration could not verify ssl_log_secret and client_random"
    write_cache(f"bssl-{bid}.json", dict(result["bssl"], path=path))
    log.debug("BoringSSL %s: ssl_log_secret at %#x, client_random at s3(%#x)+%#x (calibrated)", path,
              hook.log_secret, hook.s3, hook.client_random)
    return hook, "calibrated"
