"""Real TLS peers on loopback for the tls tests (servers and clients running under ctpeer-* names), and the
helpers that run crypto-tracer tls and reassemble what it captured.

The servers listen on free ports chosen at run time (harness.free_port()).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys

from tests.harness import (
    Tracer,
    data_events,
    https_server_cmd,
    nginx_conf,
    static_node,
    wait_port,
)

SIZES = (1, 10 * 1024, 1 << 20)
# Our peers run under names starting with PEER_PREFIX (symlinks: the kernel takes comm from
# the name executed), so `--name ctpeer` keeps other people's TLS traffic on this machine out
# of the tests, filtered in the kernel.
PEER_PREFIX = "ctpeer"
PEER_DIR = f"/tmp/{PEER_PREFIX}-bin"


def peer(tool: str) -> str:
    """Path of a symlink named ctpeer-<tool> to the real tool."""
    if tool == "node":  # the test extra's node (static OpenSSL), the same on every distribution
        target = static_node()
    else:
        target = sys.executable if tool == "python" else shutil.which(tool)
    os.makedirs(PEER_DIR, exist_ok=True)
    link = os.path.join(PEER_DIR, f"{PEER_PREFIX}-{tool}"[:15])
    if os.path.islink(link) and os.readlink(link) == target:
        return link
    tmp = f"{link}.{os.getpid()}"  # replaced atomically: a link left by an older run may point elsewhere
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def body(size: int, tag: bytes = b"") -> bytes:
    """Random printable bytes (unique, so a match cannot be a coincidence)."""
    raw = base64.b64encode(os.urandom(size))
    return (tag + raw)[:size]


@contextlib.contextmanager
def process(args, port=None, host="127.0.0.1", **kw):
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    p = subprocess.Popen(args, **kw)
    try:
        if port:
            wait_port(port, host)
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- servers --------------------------------------------------------------------------------

def python_server(port, cert, key, response_file, host="127.0.0.1"):
    return process(https_server_cmd(port, cert, key, response=response_file, host=host, python=peer("python")),
                   port=port, host=host)


def nginx(d, port, cert, key):
    conf = nginx_conf(d, port, cert, key, http2=True, ipv6=True, master=True)
    return process([peer("nginx"), "-c", conf, "-p", str(d)], port=port)


# node 24 names its main thread (the process's comm) "MainThread"; the title puts the peer's name back
NODE_SERVER = r"""
process.title = 'ctpeer-node';
const https = require('https'), fs = require('fs');
const [port, cert, key, resp] = process.argv.slice(1);
const body = fs.readFileSync(resp);
https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (req, res) => {
  req.on('data', () => {}); req.on('end', () => { res.writeHead(200, {'Content-Length': body.length}); res.end(body); });
}).listen(+port, '127.0.0.1');
"""

NODE_CLIENT = r"""
process.title = 'ctpeer-node';
const https = require('https'), fs = require('fs');
const [port, reqfile, outfile] = process.argv.slice(1);
const data = fs.readFileSync(reqfile);
const r = https.request({host: '127.0.0.1', port: +port, method: 'POST', path: '/upload', rejectUnauthorized: false,
                         headers: {'Content-Length': data.length}}, res => {
  const parts = []; res.on('data', c => parts.push(c)); res.on('end', () => fs.writeFileSync(outfile, Buffer.concat(parts)));
});
r.end(data);
"""


def node_server(port, cert, key, response_file):
    return process([peer("node"), "-e", NODE_SERVER, str(port), cert, key, response_file], port=port)


def node_client(port, request_file, out_file):
    subprocess.run([peer("node"), "-e", NODE_CLIENT, str(port), request_file, out_file], check=True, timeout=30)


def curl(url, data_file=None, out=None, extra=(), put=False) -> int:
    args = [peer("curl"), "-sSk", "--fail", "-o", out or os.devnull] + list(extra)
    if put:
        args += ["-T", data_file]
    elif data_file:
        args += ["--data-binary", "@" + data_file, "-H", "Content-Type: application/octet-stream"]
    p = subprocess.Popen(args + [url])
    if p.wait(30) != 0:
        raise RuntimeError(f"curl {url} failed with status {p.returncode}")
    return p.pid  # our own curl: other tests on this machine run curl too


# --- running the tracer ---------------------------------------------------------------------

def tls_tracer(args, only_peers=True) -> Tracer:
    """crypto-tracer tls with args, watching only our peers (--name ctpeer) unless only_peers is False."""
    return Tracer(["tls"] + list(args) + (["--name", PEER_PREFIX] if only_peers else []))


def read_events(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stream(events, **match) -> bytes:
    """The bytes of every matching tls_data event, in capture order."""
    return b"".join(base64.b64decode(e["data_b64"]) for e in data_events(events, **match))


def h2_data(raw: bytes) -> bytes:
    """The payload of the DATA frames of one direction of an HTTP/2 connection."""
    if raw.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
        raw = raw[24:]
    out, pos = bytearray(), 0
    while pos + 9 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        payload = raw[pos + 9:pos + 9 + length]
        if ftype == 0:
            if flags & 0x8:
                payload = payload[1:len(payload) - payload[0]]
            out += payload
        pos += 9 + length
    return bytes(out)


def have(*tools) -> bool:
    return all(shutil.which(t) for t in tools)
