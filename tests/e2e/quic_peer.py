"""QUIC peers for test_tls_quic.py: OpenSSL 3.5 through ctypes and aioquic, client and server.

    python quic_peer.py ossl-server LIBSSL PORT CERT KEY NSTREAMS
    python quic_peer.py ossl-client LIBSSL PORT
    python quic_peer.py aioquic-server PORT CERT KEY [HOST]
    python quic_peer.py aioquic-client PORT

Clients send PAYLOADS (stream kind, bytes) on new streams and end each; a server answers every
bidirectional stream with reply(its bytes) and ends it. Each peer prints one JSON line (its fd, its
socket's address, the stream ids and what it got); servers first print {"ready": ...}. The OpenSSL
peers name their thread "ctquic" (the tracer's --name).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import sys

ALPN = b"ct-test"
# (unidirectional, bytes); the OpenSSL client sends the first on its connection's default stream
PAYLOADS = [(False, b"GET /first stream on the default stream\r\n" * 3),
            (False, b"second bidirectional stream " + bytes(range(256))),
            (True, b"a unidirectional stream, no answer\n" * 40)]


def reply(data: bytes) -> bytes:
    return b"reply(" + str(len(data)).encode() + b"):" + data[::-1]


def _name(comm: bytes) -> None:
    ctypes.CDLL(None).prctl(15, comm, 0, 0, 0)  # PR_SET_NAME


def _emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def ossl_server(lib: str, port: int, cert: str, key: str, nstreams: int) -> None:
    from crypto_tracer.keys.calibrate_quic_worker import OsslQuic

    _name(b"ctquic-server")
    q = OsslQuic(lib)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected: one socket for every client
    sock.bind(("127.0.0.1", port))
    lst = q.listener(sock, cert, key, ALPN)
    _emit({"ready": True})
    conn = q.accept_connection(lst)
    got = {}
    for _ in range(nstreams):
        s = q.accept_stream(conn)
        sid = q.stream_id(s)
        data = q.read_all(s)
        got[sid] = data.hex()
        if not sid & 2:
            q.write(s, reply(data), conclude=True)
    _emit({"fd": sock.fileno(), "local": sock.getsockname(), "got": got,
           "group": q.lib.SSL_ctrl(conn, 134, 0, None)})  # SSL_get_negotiated_group: the IANA code
    sys.stdin.read()  # until the test is done: the replies must reach the client before we go


def ossl_client(lib: str, port: int) -> None:
    from crypto_tracer.keys.calibrate_quic_worker import OsslQuic

    _name(b"ctquic-client")
    q = OsslQuic(lib)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    conn = q.connect(sock, ("127.0.0.1", port), ALPN)
    objs, sent = [], {}
    for i, (uni, data) in enumerate(PAYLOADS):
        # the default stream first: a new stream before it exists would turn default stream mode off
        obj = conn if i == 0 else q.new_stream(conn, uni)
        objs.append(obj)
        half = len(data) // 2
        q.write(obj, data[:half])  # two writes: two events on the same stream
        q.write(obj, data[half:], conclude=True)
        sent[q.stream_id(obj)] = data.hex()
    got = {q.stream_id(obj): q.read_all(obj).hex() for obj, (uni, _) in zip(objs, PAYLOADS) if not uni}
    _emit({"fd": sock.fileno(), "local": sock.getsockname(), "sent": sent, "got": got,
           "group": q.lib.SSL_ctrl(conn, 134, 0, None)})  # SSL_get_negotiated_group
    os._exit(0)


def _aioquic_protocol():
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.quic.events import StreamDataReceived

    class Proto(QuicConnectionProtocol):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.bufs: dict[int, bytes] = {}
            self.ended: dict[int, asyncio.Future] = {}
            self.server = False

        def ended_future(self, sid: int) -> asyncio.Future:
            return self.ended.setdefault(sid, asyncio.get_running_loop().create_future())

        def quic_event_received(self, event):
            if isinstance(event, StreamDataReceived):
                self.bufs[event.stream_id] = self.bufs.get(event.stream_id, b"") + event.data
                if event.end_stream:
                    data = self.bufs[event.stream_id]
                    if self.server and not event.stream_id & 2:
                        self._quic.send_stream_data(event.stream_id, reply(data), end_stream=True)
                        self.transmit()
                    fut = self.ended_future(event.stream_id)
                    if not fut.done():
                        fut.set_result(data)

    return Proto


def aioquic_server(port: int, cert: str, key: str, host: str = "127.0.0.1") -> None:
    from aioquic.asyncio import serve
    from aioquic.quic.configuration import QuicConfiguration

    proto = _aioquic_protocol()

    def make(*a, **kw):
        p = proto(*a, **kw)
        p.server = True
        return p

    async def main():
        cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN.decode()])
        cfg.load_cert_chain(cert, key)
        await serve(host, port, configuration=cfg, create_protocol=make)
        _emit({"ready": True})
        await asyncio.Future()

    asyncio.run(main())


def aioquic_client(port: int) -> None:
    import ssl

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def main():
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN.decode()], verify_mode=ssl.CERT_NONE,
                                server_name="localhost")
        async with connect("127.0.0.1", port, configuration=cfg, create_protocol=_aioquic_protocol()) as client:
            sent, waits = {}, {}
            for uni, data in PAYLOADS:
                sid = client._quic.get_next_available_stream_id(is_unidirectional=uni)
                client._quic.send_stream_data(sid, data, end_stream=True)
                sent[sid] = data.hex()
                if not uni:
                    waits[sid] = client.ended_future(sid)
            client.transmit()
            got = {sid: (await asyncio.wait_for(f, 20)).hex() for sid, f in waits.items()}
            local = client._transport.get_extra_info("sockname")
            _emit({"local_port": local[1], "sent": sent, "got": got})
            # the connection stays open until the test says the server read everything: closing it at
            # once could cut off a unidirectional stream the server had not read yet
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "ossl-server":
        ossl_server(args[0], int(args[1]), args[2], args[3], int(args[4]))
    elif role == "ossl-client":
        ossl_client(args[0], int(args[1]))
    elif role == "aioquic-server":
        aioquic_server(int(args[0]), args[1], args[2], *args[3:4])
    elif role == "aioquic-client":
        aioquic_client(int(args[0]))
    else:
        sys.exit(f"unknown role {role}")
