"""crypto-tracer tls -m pcapng: TC capture on lo with the secrets in the file.

tshark is the judge: `tshark -r FILE` with no key file must show every request and
response, with the random tokens they carried, for sessions started after the capture,
for 20 concurrent ones, over TLS 1.2 and 1.3; packets carry their process in a comment;
nothing stays attached after the run, not even after kill -9.
"""

import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from tests.harness import (
    Tracer,
    free_port,
    https_server_cmd,
    need_root,
    need_tool,
    nginx_conf,
    wait_port,
)
from tests.tls_helpers import (
    PYCLIENT,
    by_client_random,
    epb_fields,
    pcapng_blocks,
    read_keylog,
    secrets_before_packets,
    token,
)

NGINX_PORT, PY_PORT = free_port(), free_port()
CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"


def _tc_state() -> str:
    return subprocess.run("tc qdisc show dev lo; tc filter show dev lo ingress; tc filter show dev lo egress",
                          shell=True, capture_output=True, text=True).stdout


def _http(path) -> list[tuple[str, str, str]]:
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "http", "-T", "fields", "-e", "frame.comment",
                          "-e", "http.request.uri", "-e", "http.file_data"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [tuple((line.split("\t") + ["", "", ""])[:3]) for line in out.stdout.splitlines()]


def _body(text: str) -> str:
    try:  # tshark prints a body as text or as hex, depending on its content type
        return bytes.fromhex(text.replace(":", "")).decode(errors="replace")
    except ValueError:
        return text


@pytest.fixture(scope="module")
def servers(tmp_path_factory, static_node_keys, certs):
    need_root()
    need_tool("nginx", "curl", "tshark", "tc", "gnutls-cli")
    d = tmp_path_factory.mktemp("pcapng")
    cert, key = certs
    procs = [subprocess.Popen(["nginx", "-c", nginx_conf(d, NGINX_PORT, cert, key, ciphers=CIPHERS), "-p", str(d)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen(https_server_cmd(PY_PORT, cert, key, keylog=d / "pyserver.keys", comm="ctsrv-py"))]
    try:
        for port in (NGINX_PORT, PY_PORT):
            wait_port(port)
        yield types.SimpleNamespace(dir=d, nginx_pid=procs[0].pid, node=static_node_keys)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_capture_decrypts_in_tshark_alone(servers):
    d = servers.dir
    before = _tc_state()
    pcap, keys, peer_keys = d / "cap.pcapng", d / "tracer.keys", d / "peers.keys"
    t_start = time.time_ns()
    tracer = Tracer(["tls", "-m", "pcapng", "-w", str(pcap), "-k", str(keys), "-i", "lo",
                     "port", str(NGINX_PORT), "or", "port", str(PY_PORT)])
    assert "clsact" in _tc_state()
    env = dict(os.environ, SSLKEYLOGFILE=str(peer_keys))
    tokens = {}
    for name, args in {"curl-tls13-chacha": ["--tlsv1.3", "--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"],
                       "curl-tls13-aes256": ["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384"],
                       "curl-tls12-aesgcm": ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"],
                       "curl-tls12-chacha": ["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305"]}.items():
        tokens[name] = tok = token()
        subprocess.run(["curl", "-sk", *args, f"https://127.0.0.1:{NGINX_PORT}/{tok}"], env=env, check=True,
                       capture_output=True, timeout=20)
    for version in ("1.3", "1.2"):
        tokens[f"python-{version}"] = tok = token()
        subprocess.run([sys.executable, "-c", PYCLIENT, str(PY_PORT), f"/{tok}", version, str(peer_keys)],
                       check=True, capture_output=True, timeout=20)
    tokens["gnutls-cli"] = tok = token()
    chacha13 = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305"
    subprocess.run(["gnutls-cli", "--insecure", "--priority", chacha13, "-p", str(PY_PORT), "127.0.0.1"],
                   input=f"GET /{tok} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                   env=env, check=True, capture_output=True, text=True, timeout=20)
    tokens["node"] = tok = token()
    subprocess.run([servers.node, f"--tls-keylog={peer_keys}", "-e",
                    f"require('https').get({{host:'127.0.0.1',port:{NGINX_PORT},path:'/{tok}',"
                    "rejectUnauthorized:false}, r => r.resume())"], check=True, capture_output=True, timeout=20)
    # 20 concurrent sessions
    concurrent = [token() for _ in range(20)]
    procs = [subprocess.Popen(["curl", "-sk", f"https://127.0.0.1:{NGINX_PORT if i % 2 else PY_PORT}/{tok}"],
                              env=env, stdout=subprocess.DEVNULL) for i, tok in enumerate(concurrent)]
    for p in procs:
        assert p.wait(30) == 0
    rc = tracer.stop(signal.SIGTERM).rc
    assert rc == 0, tracer.stderr
    assert "dropped 0" in tracer.stderr
    _assert_kernel_blocks(pcap, t_start, time.time_ns())

    assert oct(os.stat(pcap).st_mode & 0o777) == "0o600"
    rows = _http(pcap)
    # requests (GETs: no body) and responses; tshark 4.2+ also prints the request's URI on a response
    uris = {uri for _, uri, b in rows if uri and not b}
    bodies = " ".join(_body(b) for _, _, b in rows if b)
    for tok in list(tokens.values()) + concurrent:
        assert f"/{tok}" in uris, f"request /{tok} not decrypted"
        assert f"resp-/{tok}" in bodies, f"response to /{tok} not decrypted"
    comments = {c for c, uri, _ in rows if uri}
    assert any(c.startswith("pid=") and "comm=curl" in c for c in comments), comments
    # each session's secrets come before its ClientHello, and no others are in the file
    given, hellos, early = secrets_before_packets(str(pcap))
    peer_randoms = {line[1] for line in read_keylog(peer_keys)}
    assert peer_randoms <= hellos
    assert not [cr for cr in early if cr in peer_randoms]
    assert given <= hellos
    # the key log written at the same time matches the peers' own
    want = read_keylog(peer_keys) | read_keylog(d / "pyserver.keys")
    got = read_keylog(keys)
    mine = by_client_random(got)
    for cr, lines in by_client_random(want).items():
        if cr in mine:
            assert mine[cr] == lines
    assert {line[1] for line in read_keylog(peer_keys)} <= set(mine)
    # everything attached is gone again
    assert _tc_state() == before


def _assert_kernel_blocks(pcap, t_start: int, t_end: int) -> None:
    """The kernel builds each packet's Enhanced Packet Block (bpf/tc_capture.bpf.c): byte for byte
    what the Python writer makes of the same packet, stamped with the wall clock, direction set."""
    from crypto_tracer.sinks.pcapng import EPB_TYPE, epb

    n = 0
    for btype, body in pcapng_blocks(str(pcap)):
        if btype != EPB_TYPE:
            continue
        n += 1
        if_id, ts, data, orig, opts = epb_fields(body)
        assert if_id == 0 and t_start <= ts <= t_end and len(data) == orig
        codes = [code for code, _ in opts]
        assert codes in ([2, 1, 0], [2, 0]), opts
        comment = opts[1][1].decode() if codes[1] == 1 else None
        assert comment is None or re.fullmatch(r"pid=[1-9]\d* comm=[ -~]{1,15}", comment), comment
        flags = int.from_bytes(opts[0][1], "little")
        assert flags in (1, 2)
        block = epb(if_id, ts, data, orig, outbound=flags == 2, comment=comment)
        assert block[8:-4] == body
    assert n > 100


def test_leftovers_of_a_killed_run_are_removed(servers, tmp_path):
    before = _tc_state()
    only = ["--pid", str(servers.nginx_pid)]  # fewer uprobes: quicker to start and stop
    tracer = Tracer(["tls", "-m", "pcapng", "-w", str(tmp_path / "a.pcapng"), *only, "port", str(NGINX_PORT)])
    assert "handle 0xc7" in _tc_state()
    tracer.stop(signal.SIGKILL)
    assert "handle 0xc7" in _tc_state()  # a crash leaves the filters behind...
    tracer = Tracer(["tls", "-m", "pcapng", "-w", str(tmp_path / "b.pcapng"), *only, "port", str(NGINX_PORT)])
    tracer.stop()
    assert "removed the TC capture left behind" in tracer.stderr
    assert _tc_state() == before  # ...and the next start removes them
    out = subprocess.run(["capinfos", str(tmp_path / "b.pcapng")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


LATE_CLIENT = r'''
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
data = b""
while b"resp-" not in data:
    data += s.recv(4096)
print(repr(data), flush=True)
'''


def test_connection_opened_before_the_capture_has_its_process(servers, tmp_path):
    client = subprocess.Popen([sys.executable, "-c", LATE_CLIENT, str(PY_PORT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        assert client.stdout.readline().strip() == "connected"
        comm = open(f"/proc/{client.pid}/comm").read().strip()  # "python3", or "python" in a venv
        pcap = tmp_path / "late.pcapng"
        tracer = Tracer(["tls", "-m", "pcapng", "-w", str(pcap), "--pid", str(servers.nginx_pid),
                         "port", str(PY_PORT)])
        client.stdin.write("go\n")
        client.stdin.flush()
        assert "resp-/late" in client.stdout.readline()  # its packets passed TC before it got them
    finally:
        if tracer:
            tracer.stop()
        client.kill()
        client.wait(10)
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.comment", "-e", "tcp.len"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    with_data = [line.split("\t")[0] for line in out if line.split("\t")[-1] not in ("", "0")]
    assert f"pid={client.pid} comm={comm}" in with_data, out


@pytest.mark.parametrize("mode, caps, message", [
    (["-m", "keylog"], "-all", "eBPF tracing needs root or CAP_BPF + CAP_PERFMON"),
    (["-m", "pcapng", "-w", "CAP"], "-all", "eBPF tracing needs root or CAP_BPF + CAP_PERFMON"),
    (["-m", "pcapng", "-w", "CAP"], "-all,+bpf,+perfmon", "packet capture (-m pcapng) needs CAP_NET_ADMIN"),
])
def test_secret_modes_exit_3_without_their_privileges(tmp_path, mode, caps, message):
    """cli.py declares what each mode needs; keylog and pcapng check it before anything is loaded."""
    need_root()
    need_tool("setpriv")
    from tests.conftest import REPO, tracer_cmd

    argv = [str(tmp_path / "x.pcapng") if a == "CAP" else a for a in mode]
    r = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
                        *tracer_cmd(), "tls", *argv, "-d", "1"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    assert r.returncode == 3, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x.pcapng")  # refused before any file is created
