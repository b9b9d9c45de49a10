"""Real TLS peers on loopback for the tls tests: certificates, servers, clients, and the
helpers that run crypto-tracer tls and reassemble what it captured.

The servers listen on free ports chosen at run time (free_port()). Run as a script, this module is the Python
HTTPS server (python tlspeers.py pyserver PORT CERT KEY RESPONSE_FILE [HOST]).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = (1, 10 * 1024, 1 << 20)
# Our peers run under names starting with PEER_PREFIX (symlinks: the kernel takes comm from
# the name executed), so `--name ctpeer` keeps other people's TLS traffic on this machine out
# of the tests, filtered in the kernel.
PEER_PREFIX = "ctpeer"
PEER_DIR = f"/tmp/{PEER_PREFIX}-bin"


def peer(tool: str) -> str:
    """Path of a symlink named ctpeer-<tool> to the real tool."""
    if tool == "node":  # the test extra's node (static OpenSSL), the same on every distribution
        from tests.conftest import static_node
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


def make_certs(d: str) -> tuple[str, str]:
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
                   check=True, capture_output=True)
    return cert, key


_GIVEN_PORTS = set()


def free_port() -> int:
    """A port nothing listens on (the kernel's choice), so concurrent runs never share one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < end:
        with socket.socket(family) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


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
    return process([peer("python"), __file__, "pyserver", str(port), cert, key, response_file, host],
                   port=port, host=host)


def nginx_conf(d: str, port: int, cert: str, key: str) -> str:
    root = os.path.join(d, "www")
    os.makedirs(root, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
user root;
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        listen [::1]:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22 (Debian 12) leaves TLS 1.3 out by default, 1.26 not
        client_max_body_size 4m;
        root {root};
        location /upload/ {{ dav_methods PUT; create_full_put_path on; client_body_buffer_size 4m; }}
        location /small {{ return 200 "hello\\n"; }}
    }}
}}
""")
    return conf


def nginx(d, port, cert, key):
    conf = nginx_conf(d, port, cert, key)
    return process([peer("nginx"), "-c", conf, "-p", d], port=port)


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

_RUNNING = []


def stop_all() -> None:
    """Kill tracers a failed test left running (each would keep tracing the whole host)."""
    while _RUNNING:
        p = _RUNNING.pop().proc
        if p.poll() is None:
            p.kill()
            p.wait(60)


class Tracer:
    """crypto-tracer tls in the background; stop() sends SIGINT and returns (stdout, stderr)."""

    def __init__(self, args, only_peers=True):
        from tests.conftest import start_tracer  # not at the top: `pyserver` runs with no pytest

        self.proc = start_tracer(["tls"] + list(args) + (["--name", PEER_PREFIX] if only_peers else []))
        _RUNNING.append(self)
        self.stderr_lines = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            if "ready" in line:
                return
        self.proc.kill()
        raise RuntimeError("tracer did not start: " + "".join(self.stderr_lines) + self.proc.stderr.read())

    def stop(self, sig=signal.SIGINT):
        time.sleep(0.3)  # let the last records reach the ring buffer
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return out, "".join(self.stderr_lines) + err


def read_events(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def data_events(events, **match):
    return [e for e in events if e["event_type"] == "tls_data" and all(e.get(k) == v for k, v in match.items())]


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


def pyserver_main(argv):
    import http.server
    import ssl

    port, cert, key, response_file, host = int(argv[0]), argv[1], argv[2], argv[3], argv[4]
    with open(response_file, "rb") as f:
        response = f.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(response)))
            self.end_headers()
            self.wfile.write(response)

        def log_message(self, *a):
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family

    server = Server((host, port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


def have(*tools) -> bool:
    return all(shutil.which(t) for t in tools)


if __name__ == "__main__":
    if sys.argv[1] == "pyserver":
        pyserver_main(sys.argv[2:])
