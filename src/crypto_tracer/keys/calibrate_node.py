"""Learn the SSL object layout of a node executable (its OpenSSL linked in) from the executable itself.

That exact binary runs as a child with ``--tls-keylog=FILE -e SCRIPT``: the script runs client and
server TLS handshakes in-process over an in-memory duplex pair (no socket at all; TLS 1.3 with
AES-128-GCM, AES-256-GCM and ChaCha20, TLS 1.2 ECDHE-ECDSA with the same), keeps the objects alive,
prints the client random, version and suite of each and waits on stdin. The SSL objects are then found
in the child's memory (/proc/PID/mem) from those client randoms, each checked by its structure:

* OpenSSL 3.2+: a ``struct ssl_connection_st`` starts with the ``ssl_st`` header, type 0 (plain TLS),
  and its ``user_ssl`` (at 0x38 in 3.2-3.4, 0x40 in 3.5+) points back to the object: the check
  bpf/tls.bpf.c ossl_fields makes; the connection fields follow it.
* OpenSSL 1.1.1-3.1: ``struct ssl_st`` starts {int version; method; rbio; wbio; bbio; int rwstate;
  handshake_func; int server}: version equal to the handshake's, method and handshake_func pointing
  into the executable, rbio and wbio set, server 0 or 1.

Each handshake must give exactly two such objects (its client and its server). keys/search.py then
learns the layout from them and checks that it reproduces every line of node's own key log for every
object; the caller caches it by build-id only then.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time

from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.search import Sample, SearchError, learn, verify

# node's standard suite names -> OpenSSL's cipher id (0x03000000 | the IANA number)
SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301, "TLS_AES_256_GCM_SHA384": 0x1302, "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": 0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": 0xC02C,
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA9,
}
VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}
TIMEOUT = 20.0
MAX_BACK = 4096  # how far before a client_random the start of its SSL object may be
REGION_MAX = 1 << 30  # anonymous memory searched in the child, at most

SCRIPT = r'''
"use strict";
const tls = require("tls"), { Duplex } = require("stream");
const key = process.env.CT_CAL_KEY, cert = process.env.CT_CAL_CERT;
const ROUNDS = [["TLSv1.3", "TLS_AES_128_GCM_SHA256"], ["TLSv1.3", "TLS_AES_256_GCM_SHA384"],
  ["TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"], ["TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"],
  ["TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"], ["TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"]];
const keep = [];
function pair() {  // two in-memory streams, each one's writes the other's reads
  let a, b;
  a = new Duplex({ read() {}, write(c, e, cb) { b.push(c); cb(); }, final(cb) { b.push(null); cb(); } });
  b = new Duplex({ read() {}, write(c, e, cb) { a.push(c); cb(); }, final(cb) { a.push(null); cb(); } });
  return [a, b];
}
function round([version, suite]) {
  return new Promise((resolve, reject) => {
    const opts = { minVersion: version, maxVersion: version, ciphers: suite };
    const [a, b] = pair();
    const server = new tls.TLSSocket(b, { isServer: true, secureContext: tls.createSecureContext({ key, cert, ...opts }) });
    const client = tls.connect({ socket: a, rejectUnauthorized: false, ...opts });
    const want = version === "TLSv1.3" ? 5 : 1, seen = { c: [], s: [] };
    let got = "";
    const check = () => {
      if (seen.c.length >= want && seen.s.length >= want && got === "pong") {
        keep.push(client, server, a, b);
        resolve({ client_random: seen.c[0].split(" ")[1], version: client.getProtocol(),
                  cipher: client.getCipher().standardName });
      }
    };
    client.on("keylog", (l) => { seen.c.push(l.toString().trim()); check(); });
    server.on("keylog", (l) => { seen.s.push(l.toString().trim()); check(); });
    server.on("data", () => server.write("pong"));
    client.on("data", (d) => { got += d; check(); });
    client.on("secureConnect", () => client.write("ping"));
    client.on("error", reject); server.on("error", reject);
  });
}
(async () => {
  const out = [];
  for (const r of ROUNDS) for (let i = 0; i < 2; i++) out.push(await round(r));
  process.stdout.write(JSON.stringify({ ready: out }) + "\n");
  process.stdin.on("data", () => {});
  process.stdin.on("end", () => process.exit(0));
})().catch((e) => { process.stdout.write(JSON.stringify({ error: String(e) }) + "\n"); process.exit(1); });
'''

_NODE_MARKS = (b"--tls-keylog", b"NODE_OPTIONS")


def is_node(path: str) -> bool:
    """An executable that takes node's --tls-keylog and -e (both strings are in its option table)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return all(m.find(mark) >= 0 for mark in _NODE_MARKS)
    except (OSError, ValueError):
        return False


class CalibrationError(RuntimeError):
    pass


def _pem() -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from crypto_tracer.keys.calibrate_worker import _cert_der

    cert, key = _cert_der()
    return (serialization.load_der_private_key(key, None).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
            x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM).decode())


def _keylog(path: str) -> dict[str, dict[str, tuple[str, str]]]:
    """node's key log: client_random hex -> {label: (client_random, secret)}."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    out.setdefault(parts[1].lower(), {})[parts[0]] = (parts[1].lower(), parts[2].lower())
    except FileNotFoundError:
        pass
    return out


class _Child:
    """Reads a process's memory (the reader keys/search.py takes)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, addr: int, size: int) -> bytes:
        if not 0x10000 <= addr < 1 << 47:
            return b""
        try:
            return os.pread(self.fd, size, addr)
        except OSError:
            return b""

    def maps(self) -> list[tuple[int, int, str, str]]:
        out = []
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
        return out


def _find(child: _Child, needles: list[bytes], heap_only: bool) -> dict[bytes, list[int]]:
    """Addresses of each needle in the child's malloc heap, or in all its anonymous writable memory."""
    hits: dict[bytes, list[int]] = {n: [] for n in needles}
    total = 0
    chunk = 16 << 20
    for lo, hi, perms, name in child.maps():
        if not perms.startswith("rw") or (name and name != "[heap]") or (heap_only and name != "[heap]"):
            continue
        total += hi - lo
        if total > REGION_MAX:
            break
        for start in range(lo, hi, chunk):
            data = child.read(start, min(chunk + 32, hi - start))
            for n in needles:
                pos = data.find(n)
                while 0 <= pos < chunk:
                    hits[n].append(start + pos)
                    pos = data.find(n, pos + 1)
    return hits


def _in(addr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= addr < hi for lo, hi in ranges)


def _objects(child: _Child, hit: int, version: int, split: bool, image: list[tuple[int, int]],
             text: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """(address, server flag) of the SSL objects that may hold the client_random found at hit."""
    lo = max(hit - MAX_BACK, 0x10000) & ~0xF
    window = child.read(lo, hit - lo + 8)
    found = set()
    for base in range(lo, hit, 16):  # malloc returns 16-byte aligned objects
        off = base - lo
        if split:  # 3.2+: type 0, user_ssl pointing back to the object; the connection fields follow
            if len(window) < off + 0x48 or struct.unpack_from("<i", window, off)[0] != 0:
                continue
            user = {struct.unpack_from("<Q", window, off + o)[0] for o in (0x38, 0x40)}
            if base not in user:
                continue
            conn = base + (0x48 if struct.unpack_from("<Q", window, off + 0x40)[0] == base else 0x40)
        else:
            conn = base
        head = child.read(conn, 64)
        if len(head) < 64:
            continue
        if split:  # the connection: {int version; rbio; wbio; bbio; int rwstate; handshake_func; int server}
            (v,), (rbio, wbio) = struct.unpack_from("<i", head), struct.unpack_from("<QQ", head, 8)
            (handshake_func,), (server,) = struct.unpack_from("<Q", head, 40), struct.unpack_from("<i", head, 48)
            method = None
        else:  # {int version; method; rbio; wbio; bbio; int rwstate; handshake_func; int server}
            (v,), (method, rbio, wbio) = struct.unpack_from("<i", head), struct.unpack_from("<QQQ", head, 8)
            (handshake_func,), (server,) = struct.unpack_from("<Q", head, 48), struct.unpack_from("<i", head, 56)
        if v != version or not rbio or not wbio or server not in (0, 1) or not _in(handshake_func, text):
            continue
        if method is not None and not _in(method, image):
            continue
        found.add((base, server))
    return found


def _split(version: str) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (3, 2)


def calibrate(path: str, version: str) -> Layout:
    """The verified layout of node `path` (OpenSSL `version`); raises CalibrationError saying why not."""
    tmp = tempfile.mkdtemp(prefix="ct-node-cal-")
    keylog = os.path.join(tmp, "keys")
    key, cert = _pem()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "CT_CAL_KEY": key, "CT_CAL_CERT": cert}
    try:
        proc = subprocess.Popen([path, f"--tls-keylog={keylog}", "-e", SCRIPT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp, env=env)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CalibrationError(f"cannot run it: {exc.strerror}") from None
    child = None
    try:
        deadline = time.monotonic() + TIMEOUT
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        try:
            rounds = json.loads(line)["ready"]
        except (ValueError, KeyError, TypeError):
            raise CalibrationError("its calibration handshakes did not finish" +
                                   (f": {line.decode(errors='replace').strip()[:200]}" if line else "")) from None
        want = {r["client_random"].lower(): 5 if r["version"] == "TLSv1.3" else 1 for r in rounds}
        # node appends its key log from a JS callback: wait until every handshake's lines are in
        while True:
            lines = _keylog(keylog)
            if all(len(lines.get(cr, {})) == n for cr, n in want.items()):
                break
            if time.monotonic() > deadline:
                raise CalibrationError("its key log misses lines of the calibration handshakes")
            time.sleep(0.02)
        child = _Child(proc.pid)
        maps = child.maps()
        real = os.path.realpath(path)
        image = [(lo, hi) for lo, hi, _, name in maps if name == real]
        text = [(lo, hi) for lo, hi, perms, name in maps if name == real and "x" in perms]
        randoms = {bytes.fromhex(cr): r for cr, r in zip(want, rounds)}
        split = _split(version)
        found: dict[bytes, set] = {}
        for heap_only in (True, False):  # OpenSSL's objects are in the main thread's heap; else look everywhere
            hits = _find(child, list(randoms), heap_only)
            found = {cr: {o for hit in hits[cr] for o in _objects(child, hit, VERSIONS[r["version"]], split, image,
                                                                  text)} for cr, r in randoms.items()}
            if all(sorted(server for _, server in objs) == [0, 1] for objs in found.values()):
                break
        samples = []
        for cr, r in randoms.items():
            objs = found[cr]
            if sorted(server for _, server in objs) != [0, 1]:
                raise CalibrationError(f"{len(objs)} SSL objects found for a handshake (wants its client and server)")
            suite = SUITES.get(r["cipher"])
            if suite is None:
                raise CalibrationError(f"unexpected suite {r['cipher']}")
            for ssl, server in sorted(objs, key=lambda o: o[1]):  # the client first
                samples.append(Sample(ssl, lines[cr.hex()], VERSIONS[r["version"]], 0x03000000 | suite))
        try:
            lay = learn(child.read, samples)
            lay.verified = verify(child.read, lay, [(s.ssl, s.lines) for s in samples])
        except SearchError as exc:
            raise CalibrationError(str(exc)) from None
        lay.version = version
        return lay
    finally:
        if child:
            child.close()
        try:
            proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
