"""QUIC clients that only shake hands, for test_tls_quic_handshake.py (servers: quic_peer.py's).

    python quic_hs_peer.py aioquic PORT connected|unconnected [LOCAL_PORT [HOST]]
    python quic_hs_peer.py ossl LIBSSL PORT connected|unconnected [KEYLOG]   (server: quic_peer.py ossl-server ... 1)

A connected client's UDP socket goes through connect() (the tool attributes its packets to it); an
unconnected one only sends to the server's address. Each prints one JSON line: its socket's address
and what its library negotiated (aioquic: the cipher suite), then waits for stdin to close. KEYLOG: the
OpenSSL client writes its own key log there (SSL_CTX_set_keylog_callback), the ground truth of -m keylog.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from quic_peer import ALPN, _name

SSL_CTRL_GET_NEGOTIATED_GROUP = 134  # SSL_get_negotiated_group(): the key-exchange group's IANA code


def aioquic_client(port: int, connected: bool, local_port: int = 0, host: str = "127.0.0.1") -> None:
    import ssl

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import HandshakeCompleted

    _name(b"ctquic-aioquic")
    server = (host, port, 0, 0) if ":" in host else (host, port)  # as recvfrom gives it (aioquic compares)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, local_port))
    if connected:
        sock.connect(server)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN.decode()], verify_mode=ssl.CERT_NONE,
                            server_name="localhost")
    conn = QuicConnection(configuration=cfg)
    conn.connect(server, now=time.time())
    done, deadline = False, time.monotonic() + 20
    while not done:
        for data, addr in conn.datagrams_to_send(now=time.time()):
            sock.send(data) if connected else sock.sendto(data, addr)
        if time.monotonic() > deadline:
            sys.exit("no handshake")
        timer = conn.get_timer()
        sock.settimeout(max(0.001, min(1.0, (timer - time.time()) if timer else 1.0)))
        try:
            data, addr = sock.recvfrom(65536)
            conn.receive_datagram(data, addr, now=time.time())
        except TimeoutError:
            conn.handle_timer(now=time.time())
        while (event := conn.next_event()) is not None:
            done = done or isinstance(event, HandshakeCompleted)
    for data, addr in conn.datagrams_to_send(now=time.time()):  # the handshake's last flight
        sock.send(data) if connected else sock.sendto(data, addr)
    suite = conn.tls.key_schedule.cipher_suite
    print(json.dumps({"local": sock.getsockname(), "cipher": suite.name, "cipher_code": int(suite)}), flush=True)
    sys.stdin.read()


def ossl_client(lib: str, port: int, connected: bool, keylog: str | None = None) -> None:
    import ctypes

    from crypto_tracer.keys.calibrate_quic_worker import OsslQuic

    _name(b"ctquic-ossl")
    q = OsslQuic(lib)
    lines: list[str] = []
    if keylog:
        callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)
        callback = callback_type(lambda _ssl, line: lines.append(line.decode()))
        q.lib.SSL_CTX_set_keylog_callback.argtypes = [ctypes.c_void_p, callback_type]
        ctx_new = q.lib.SSL_CTX_new

        def ctx_with_keylog(method):  # OsslQuic.connect's context, with the callback
            ctx = ctx_new(method)
            q.lib.SSL_CTX_set_keylog_callback(ctx, callback)
            return ctx

        q.lib.SSL_CTX_new = ctx_with_keylog
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    if connected:
        sock.connect(("127.0.0.1", port))
    conn = q.connect(sock, ("127.0.0.1", port), ALPN)
    # one stream, answered: quic_peer's OpenSSL server drives its connection only while it reads streams
    q.write(conn, b"hello", conclude=True)
    got = q.read_all(conn).decode()
    group = q.lib.SSL_ctrl(conn, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)  # the library's own word
    if keylog:
        with open(os.open(keylog, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write("".join(line + "\n" for line in lines))
    print(json.dumps({"local": sock.getsockname(), "got": got, "group": group}), flush=True)
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "aioquic":
        aioquic_client(int(args[0]), args[1] == "connected", int(args[2]) if len(args) > 2 else 0, *args[3:4])
    elif kind == "ossl":
        ossl_client(args[0], int(args[1]), args[2] == "connected", *args[3:4])
    else:
        sys.exit(f"unknown client {kind}")
