"""Test helpers shared by the key log and pcapng tests: a throwaway certificate, random
tokens, and synthetic TCP packets for TLS bytes made in memory."""

from __future__ import annotations

import datetime
import os
import secrets
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.tlspeers import wait_port  # noqa: F401  (one implementation for every TLS test)


def make_cert(directory: str, name: str = "localhost") -> tuple[str, str]:
    """A self-signed EC certificate for localhost/127.0.0.1; returns (cert path, key path)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def token() -> str:
    return "tok" + secrets.token_hex(8)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class TcpFlow:
    """Builds Ethernet/IPv4/TCP frames of one connection (127.0.0.1 cport <-> sport)."""

    def __init__(self, cport: int, sport: int):
        self.ports = {True: (cport, sport), False: (sport, cport)}
        self.seq = {True: 1000, False: 5000}

    def frame(self, from_client: bool, payload: bytes, flags: int = 0x18) -> bytes:
        src, dst = self.ports[from_client]
        seq, ack = self.seq[from_client], self.seq[not from_client]
        tcp = struct.pack("!HHIIBBHHH", src, dst, seq, ack, 5 << 4, flags, 65535, 0, 0)
        pseudo = struct.pack("!4s4sBBH", bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]), 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp + payload)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        self.seq[from_client] += len(payload) + (1 if flags & 0x02 else 0)
        return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload

    def handshake(self) -> list[tuple[bool, bytes]]:
        syn = self.frame(True, b"", 0x02)
        synack = self.frame(False, b"", 0x12)
        ack = self.frame(True, b"", 0x10)
        return [(True, syn), (False, synack), (True, ack)]


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log error;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305;
        ssl_session_tickets off;
        location / {{ return 200 "resp-$uri\\n"; }}
    }}
}}
"""


def nginx_conf(directory: str, port: int, cert: str, key: str) -> str:
    """Write an nginx.conf serving 'resp-<uri>' over TLS on 127.0.0.1:port; returns its path."""
    path = os.path.join(directory, "nginx.conf")
    with open(path, "w") as f:
        f.write(NGINX_CONF.format(prefix=directory, port=port, cert=cert, key=key))
    return path


def read_keylog(path: str) -> set[tuple[str, str, str]]:
    """(label, client_random, secret) lines of an NSS key log (comments skipped)."""
    try:
        with open(path) as f:
            return {tuple(line.split()) for line in f if line.strip() and not line.startswith("#")}
    except FileNotFoundError:
        return set()


def by_client_random(lines) -> dict[str, set]:
    out: dict[str, set] = {}
    for line in lines:
        out.setdefault(line[1], set()).add(line)
    return out


class Tracer:
    """crypto-tracer running in the background; ready once it says what it writes."""

    def __init__(self, args: list[str], timeout: float = 60.0):
        import threading
        import time

        from tests.conftest import start_tracer

        self.proc = start_tracer(args)
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        end = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                self._reader.join(5)
                raise AssertionError("crypto-tracer did not start:\n" + "".join(self.stderr_lines))

    def _read(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "Ctrl-C to stop" in line:
                self._ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig=None) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGINT)
        rc = self.proc.wait(60)
        self._reader.join(10)
        return rc


PYSERVER = r'''
import ctypes, http.server, ssl, sys
ctypes.CDLL(None).prctl(15, b"ctsrv-py")  # comm, so that a tracer can watch only the servers
port, cert, key, klog = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("resp-" + self.path + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key); ctx.keylog_filename = klog
s = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
s.daemon_threads = True
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
'''

PYCLIENT = r'''
import ssl, sys, socket
port, path, version, klog = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.keylog_filename = klog
v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
ctx.minimum_version = ctx.maximum_version = v
if version == "1.2":
    ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as s:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
sys.stdout.write(data.decode(errors="replace"))
'''


# A TLS client driving a given libssl file through ctypes (OpenSSL 1.1.1-3.x), writing the
# library's own key log: for libraries no installed program uses (bundled copies).
CTYPES_CLIENT = r'''
import ctypes, socket, sys
sys.path.insert(0, sys.argv[5])
from crypto_tracer.keys.calibrate_worker import OpenSSL
ctypes.CDLL(None).prctl(15, b"ctclient")  # comm, for --name
lib_path, port, keylog, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4], 16)
o = OpenSSL(lib_path)
lib = o.lib
lib.SSL_set_fd.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib.SSL_connect.argtypes = [ctypes.c_void_p]
ssl = lib.SSL_new(o._ctx(version, None, None, False))
s = socket.create_connection(("127.0.0.1", port))
lib.SSL_set_fd(ssl, s.fileno())
assert lib.SSL_connect(ssl) == 1
req = b"GET /ctypes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
lib.SSL_write(ssl, req, len(req))
buf = ctypes.create_string_buffer(4096)
data = b""
while b"resp-" not in data:
    n = lib.SSL_read(ssl, buf, 4096)
    if n <= 0:
        break
    data += buf.raw[:n]
with open(keylog, "w") as f:
    f.write("".join(line + "\n" for _, line in o.keylog))
print(data.decode(errors="replace"))
'''


def bundled_libssl(package: str, version: str) -> str | None:
    """The libssl bundled in a PyPI wheel (e.g. psycopg2-binary 2.9.5: OpenSSL 1.1.1r), downloaded
    once into ~/.cache/crypto-tracer-tests; None when it cannot be had."""
    import glob
    import subprocess
    import sys
    import zipfile

    where = os.path.expanduser(f"~/.cache/crypto-tracer-tests/{package}-{version}")
    found = glob.glob(os.path.join(where, "*.libs", "libssl*.so*"))
    if not found:
        os.makedirs(where, exist_ok=True)
        # only its .so files are used: a fixed Python tag and platform, so it does not depend on the running
        # Python (old releases have no wheel for a newer one, e.g. psycopg2-binary 2.9.5 for 3.13)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", "3.11", "--implementation", "cp", "--platform",
                               "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                               "-d", where, f"{package}=={version}"], capture_output=True, timeout=300)
        wheels = glob.glob(os.path.join(where, "*.whl"))
        if proc.returncode != 0 or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(where, [n for n in z.namelist() if ".libs/" in n])
        found = glob.glob(os.path.join(where, "*.libs", "libssl*.so*"))
    return found[0] if found else None


def pcapng_blocks(path: str):
    """(block type, body) of every block of a pcapng file (little-endian sections only)."""
    import struct

    data = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
        btype, length = struct.unpack_from("<II", data, pos)
        yield btype, data[pos + 8:pos + length - 4]
        pos += length


def secrets_before_packets(path: str) -> tuple[set, set, list]:
    """Walk a pcapng in order: (client randoms given by DSBs, client randoms of the
    ClientHellos captured, ClientHellos whose secrets had not come before them)."""
    import struct

    from crypto_tracer.probes.tc_capture import client_hello_random

    given, hellos, early = set(), set(), []
    for btype, body in pcapng_blocks(path):
        if btype == 0x0000000A:
            _, length = struct.unpack_from("<II", body)
            for line in body[8:8 + length].decode().splitlines():
                given.add(line.split()[1])
        elif btype == 0x00000006:
            caplen = struct.unpack_from("<I", body, 12)[0]
            cr = client_hello_random(body[20:20 + caplen], True)
            if cr is not None:
                hellos.add(cr.hex())
                if cr.hex() not in given:
                    early.append(cr.hex())
    return given, hellos, early
