"""Test helpers shared by the key log and pcapng tests: random tokens, key log parsing, TLS client
scripts, bundled libssl copies, and synthetic TCP packets for TLS bytes made in memory."""

from __future__ import annotations

import os
import secrets
import struct


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
# library's own key log: for libraries no installed program uses (bundled copies). Run with tracer_env().
CTYPES_CLIENT = r'''
import ctypes, socket, sys
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


def epb_fields(body: bytes) -> tuple[int, int, bytes, int, list[tuple[int, bytes]]]:
    """An Enhanced Packet Block's body: (interface id, timestamp, data, original length,
    [(option code, value)] in order, opt_endofopt included)."""
    import struct

    if_id, ts_hi, ts_lo, caplen, orig = struct.unpack_from("<IIIII", body)
    pos = 20 + caplen + (-caplen % 4)
    opts = []
    while pos + 4 <= len(body):
        code, length = struct.unpack_from("<HH", body, pos)
        opts.append((code, body[pos + 4:pos + 4 + length]))
        pos += 4 + length + (-length % 4)
    return if_id, ts_hi << 32 | ts_lo, body[20:20 + caplen], orig, opts


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


# node's HTTPS server (argv: port, key, cert; answers "resp-<path>") and client (argv: port, path, TLS
# version; TLS 1.2 pinned to ECDHE-ECDSA-AES256-GCM-SHA384), as the key-log tests run them
NODE_SERVER = r'''
const fs = require("fs"), https = require("https");
process.title = "ctsrv-node";
https.createServer({key: fs.readFileSync(process.argv[2]), cert: fs.readFileSync(process.argv[3])},
  (q, s) => s.end("resp-" + q.url + "\n")).listen(+process.argv[1], "127.0.0.1");
'''
NODE_CLIENT = r'''
const https = require("https");
const [port, path, version] = process.argv.slice(1);
const opts = {host: "127.0.0.1", port: +port, path, rejectUnauthorized: false, agent: false,
              minVersion: "TLSv" + version, maxVersion: "TLSv" + version};
if (version === "1.2") opts.ciphers = "ECDHE-ECDSA-AES256-GCM-SHA384";
https.get(opts, r => { let d = ""; r.on("data", c => d += c); r.on("end", () => { process.stdout.write(d); }); });
'''


def pump_handshake(c, s, bios, deliver, rounds: int = 20) -> bool:
    """Run the handshake of client c (reading bios[0], writing bios[1]) and server s (reading bios[2],
    writing bios[3]) in memory: each side's output, in the order written, goes to deliver(side, data)
    (0: the client, 1: the server) and then to the other side. Whether both finished."""
    import ssl

    finished = [False, False]
    for _ in range(rounds):
        for side, (obj, out, peer_in) in enumerate(((c, bios[1], bios[2]), (s, bios[3], bios[0]))):
            if not finished[side]:
                try:
                    obj.do_handshake()
                    finished[side] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                deliver(side, data)
                peer_in.write(data)
        if all(finished):
            break
    return all(finished)


def add_segments(facts, seq: dict, src, dst, data: bytes, mss: int = 0) -> None:
    """data sent from src to dst, given to a HelloFacts as TCP segments of at most mss bytes (0: one
    segment), numbered from seq[src] on."""
    from crypto_tracer.probes.tls_hello import Segment

    step = mss or len(data)
    for i in range(0, len(data), step):
        part = data[i:i + step]
        facts.add(Segment(0, True, src, dst, seq[src], len(part), part, repr((src, dst)).encode()))
        seq[src] = (seq[src] + len(part)) & 0xFFFFFFFF
