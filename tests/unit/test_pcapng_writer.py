"""The pcapng writer, judged by tshark: a TLS session made in memory by Python's ssl, put in
TCP packets, with its key log in a DSB, must decrypt with `tshark -r FILE` and nothing else."""

import os
import ssl
import struct
import subprocess

import pytest

from crypto_tracer.sinks.pcapng import PcapngWriter
from tests.harness import make_cert, need_tool
from tests.tls_helpers import TcpFlow, token


def _tls_session(tmp_path, version, request: bytes, response: bytes):
    """Run a client and a server over memory BIOs; returns (wire chunks, key log text)."""
    cert, key = make_cert(str(tmp_path))
    keylog = tmp_path / "keys.txt"
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.keylog_filename = str(keylog)
    for ctx in (sctx, cctx):
        ctx.minimum_version = ctx.maximum_version = version
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(c_in, c_out, server_side=False)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    wire = []

    def pump():
        for src, dst, from_client in ((c_out, s_in, True), (s_out, c_in, False)):
            data = src.read()
            if data:
                wire.append((from_client, data))
                dst.write(data)

    for _ in range(20):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump()
        if client.version() and server.version():
            break
    pump()
    client.write(request)
    pump()
    assert server.read(65536) == request
    server.write(response)
    pump()
    assert client.read(65536) == response
    pump()
    return wire, keylog.read_bytes()


def _write(path, wire, keylog, dsb=True):
    w = PcapngWriter(str(path))
    lo = w.add_interface("lo")
    flow = TcpFlow(40000, 18543)
    t = 1_700_000_000_000_000_000
    if dsb:
        w.add_secrets(keylog)
    frames = flow.handshake() + [(fc, flow.frame(fc, data)) for fc, data in wire]
    for i, (from_client, frame) in enumerate(frames):
        w.add_packet(lo, t + i * 1000, frame, outbound=from_client, comment=f"pid=42 comm=client{i}")
    w.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_dsb_decrypts_in_tshark(tmp_path, version):
    need_tool("tshark")
    tok1, tok2 = token(), token()
    request = f"GET /{tok1} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    response = f"HTTP/1.1 200 OK\r\nContent-Length: {len(tok2)}\r\n\r\n{tok2}".encode()
    wire, keylog = _tls_session(tmp_path, version, request, response)
    path = tmp_path / "cap.pcapng"
    _write(path, wire, keylog)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "http", "-T", "fields", "-e", "http.request.uri",
                          "-e", "http.file_data"], capture_output=True, text=True, check=True).stdout
    assert f"/{tok1}" in out
    assert tok2 in out or tok2.encode().hex() in out
    # without the DSB the same packets stay encrypted
    _write(tmp_path / "nodsb.pcapng", wire, keylog, dsb=False)
    out = subprocess.run(["tshark", "-r", str(tmp_path / "nodsb.pcapng"), "-Y", "http"],
                         capture_output=True, text=True, check=True).stdout
    assert tok1 not in out


def test_blocks_comments_and_direction(tmp_path):
    need_tool("tshark")
    path = tmp_path / "c.pcapng"
    w = PcapngWriter(str(path))
    lo, eth = w.add_interface("lo"), w.add_interface("eth9")
    flow = TcpFlow(40001, 18544)
    w.add_packet(lo, 1_700_000_000_123_456_789, flow.frame(True, b"x"), outbound=True, comment="pid=7 comm=curl")
    w.add_packet(eth, 1_700_000_001_000_000_000, flow.frame(False, b"y"), outbound=False)
    w.add_secrets(b"CLIENT_RANDOM " + b"00" * 32 + b" " + b"11" * 48 + b"\n")
    w.close()
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                          "-e", "frame.comment", "-e", "frame.p2p_dir", "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split("\t")[:2] == ["lo", "pid=7 comm=curl"]
    assert out[0].split("\t")[3].startswith("1700000000.123456789")
    assert out[1].split("\t")[0] == "eth9"
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True).stdout
    assert "Number of decryption secrets in file: 1" in info or "decryption secrets" not in info
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 0)[0] == 0x0A0D0D0A


def test_client_hello_random_is_found_in_the_first_packet(tmp_path):
    from crypto_tracer.probes.tc_capture import client_hello_random

    wire, keylog = _tls_session(tmp_path, ssl.TLSVersion.TLSv1_3, b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n")
    flow = TcpFlow(40002, 18545)
    hello = flow.frame(True, wire[0][1])
    want = next(line for line in keylog.decode().splitlines() if not line.startswith("#")).split()[1]
    assert client_hello_random(hello, True).hex() == want
    assert client_hello_random(hello[14:], False).hex() == want  # a raw-IP interface
    assert client_hello_random(flow.frame(False, wire[1][1]), True) is None  # ServerHello
    assert client_hello_random(b"\0" * 10, True) is None
