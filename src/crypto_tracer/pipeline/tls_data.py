"""tls -m text|json: raw tls.bpf.c records -> filtered, enriched, redacted events, per connection.

~50,000 data records/s whole-host: everything but ts/length/offset/truncated/data is the
same for every call on a connection, so it is decoded (probes/tls.py), filtered, enriched
and redacted once per connection (entry) and looked up by the raw bytes that hold it
(DATA_KEY_SPANS). The sink prepares its per-connection format once too (prepare_tls) and
formats only the changing fields per record (write_tls); anything unusual goes the
general way (data_event, handshake).
"""

from __future__ import annotations

from crypto_tracer.pipeline import hello_facts as hf
from crypto_tracer.pipeline.events import TLS_DATA, TLS_HANDSHAKE
from crypto_tracer.host.proc import read_stat, read_view
from crypto_tracer.probes.common import CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, TYPE_SPAN, decode_process
from crypto_tracer.probes.tls import (DATA_CHANGING, DATA_KEY_SPANS, DATA_OFFSET, DATA_TRUNCATED, TLS_DATA_REC,
                                      decode_data, decode_handshake, decode_peer)
from crypto_tracer.pipeline.redact import Redactor

WRITE_SLICE = 512  # records per write (~250 KB of json-stream)
CONN_CACHE_SIZE = 4096  # connections (per thread) remembered; cleared when full
MISSING = object()  # not in the cache yet: call entry()
NOT_DATA = object()  # a handshake record (never cached): call handshake()
_TS0, _TS1 = TLS_DATA_REC.span("h.ts_ns", "h.ts_ns")
_T0, _T1 = TYPE_SPAN


def _keep() -> None:
    pass


def raw_ts(raw: bytes) -> int:
    return int.from_bytes(raw[_TS0:_TS1], "little")


class ProcessInfo:
    """ppid and exe by pid: from the kernel's CT_EV_TLS_PROCESS records (sent before a process
    image's first TLS event, so they hold for processes gone before we look), else read once
    from /proc (None when gone). exe is in the process's own view, as on monitor's events."""

    MAX = 4096

    def __init__(self):
        self._cache: dict[int, tuple[int | None, str | None]] = {}

    def learn(self, raw: bytes) -> None:
        pid, ppid, exe = decode_process(raw)
        self._remember(pid, (ppid, exe))

    def get(self, pid: int) -> tuple[int | None, str | None]:
        info = self._cache.get(pid)
        if info is None:
            stat = read_stat(pid)
            info = (stat[1], read_view(pid)[0]) if stat else (None, None)
            self._remember(pid, info)
        return info

    def _remember(self, pid: int, info: tuple[int | None, str | None]) -> None:
        if len(self._cache) >= self.MAX:  # bounded: the oldest half goes (dicts keep insertion order)
            for old in list(self._cache)[:self.MAX // 2]:
                del self._cache[old]
        self._cache.pop(pid, None)
        self._cache[pid] = info


class TlsDataPipeline:
    """Batches of raw tls_data/tls_handshake records -> the sink, counting every step.

    The sink's write_tls(raws, self) runs the per-record loop (see sinks/json.py, sinks/text.py)
    with the cache's get() and this object's entry/handshake/data_event bound once per batch.
    """

    MISSING, NOT_DATA = MISSING, NOT_DATA
    # the layout the sinks' loops slice with (struct tls_data_rec, probes/tls.py)
    KEY_SPANS = DATA_KEY_SPANS
    CHANGING = DATA_CHANGING
    TRUNCATED = DATA_TRUNCATED
    DATA = DATA_OFFSET
    raw_ts = staticmethod(raw_ts)

    def __init__(self, sink, stats, clock, conn_filter=None, redact_paths: bool = True,
                 max_payload: int = 1 << 20, hello_facts=None):
        self.sink, self.stats, self.clock = sink, stats, clock
        self.conn_filter = conn_filter
        self.max_payload = max_payload
        self.redactor = Redactor(redact_paths)  # after the connection filter, before the sink
        self.procs = ProcessInfo()
        self.batch: list[bytes] = []
        self.conns: dict[bytes, tuple | None] = {}  # see entry()
        self.hello_facts = hello_facts  # pipeline/hello_facts.HelloFacts: what the handshake messages said
        self.peers: dict[tuple[int, int], tuple] = {}  # (pid, ssl) -> (ALPN, certificate DER), see learn_peer
        self.fast = None  # pipeline/fastfmt.FastLoop: the connections it formats in C are learned here

    def learn_peer(self, raw: bytes) -> None:
        """A CT_EV_TLS_PEER record (NSS: what its sslSocket holds), handled as it is read: it precedes
        its connection's handshake record, which handshake() completes with it."""
        pid, ssl, alpn, der = decode_peer(raw)
        if len(self.peers) >= CONN_CACHE_SIZE:
            self.peers.clear()
        self.peers[(pid, ssl)] = (alpn, der)

    def process(self, flush: bool = True) -> None:
        """flush=False: the sink keeps what it wrote in its buffer (the C loop's caller flushes once a poll)."""
        raws = self.batch
        if not raws:
            return
        write = self.sink.write_tls
        flush = self.sink.flush if flush else _keep
        written = 0
        # a poll can bring 16k records: formatted and written a slice at a time, the text of
        # the whole batch is never in memory at once
        for i in range(0, len(raws), WRITE_SLICE):
            written += write(raws[i:i + WRITE_SLICE], self)
            flush()
        self.stats.received += len(raws)
        self.stats.user_filtered += len(raws) - written
        self.stats.output += written
        raws.clear()

    def entry(self, raw: bytes, key: bytes):
        """What a record's connection needs, cached under key: (event, the sink's prepared
        format); None when the connection filter drops it (or not a data/handshake record);
        NOT_DATA for handshakes (not cached)."""
        rtype = int.from_bytes(raw[_T0:_T1], "little")
        if rtype != CT_EV_TLS_DATA:
            return NOT_DATA if rtype == CT_EV_TLS_HANDSHAKE else None
        rec = decode_data(raw)
        entry = None
        if self.conn_filter is None or self.conn_filter((rec.local_addr, rec.local_port, rec.remote_addr,
                                                         rec.remote_port)):
            base = self._base(rec)
            entry = (base, self.sink.prepare_tls(base))
        if len(self.conns) >= CONN_CACHE_SIZE:
            self.conns.clear()
        if self.fast is not None and self.fast.learn(key, entry and entry[1]):
            self.conns.clear()  # the C loop's table was emptied: every connection is learned again
        self.conns[key] = entry
        return entry

    def _base(self, rec) -> dict:
        """The event with the connection's fields in schema order (redacted), the changing ones None."""
        ppid, exe = self.procs.get(rec.pid)
        return self.redactor.event(TLS_DATA.build(
            pid=rec.pid, ppid=ppid, uid=rec.uid, process=rec.comm, exe=exe, tid=rec.tid, library=rec.library,
            function=rec.function, direction=rec.direction, fd=rec.fd, local_addr=rec.local_addr,
            local_port=rec.local_port, remote_addr=rec.remote_addr, remote_port=rec.remote_port,
            stream_id=rec.stream_id))

    def data_event(self, entry, raw: bytes, timestamp: str) -> tuple[dict, bytes, bool]:
        """(event, payload chunk, whether it is the last captured chunk of the call)."""
        ts, length, offset, chunk = DATA_CHANGING.unpack_from(raw)
        ev = entry[0].copy()  # keeps the schema order of the prepared event
        ev["timestamp"], ev["length"], ev["offset"], ev["truncated"] = timestamp, length, offset, bool(raw[DATA_TRUNCATED])
        data = raw[DATA_OFFSET:DATA_OFFSET + chunk]
        return ev, data, offset + chunk >= min(length, self.max_payload)

    def handshake(self, raw: bytes) -> dict | None:
        rec = decode_handshake(raw)
        peer = self.peers.pop((rec.pid, rec.ssl), None)  # taken also when filtered out: used once or never
        if self.conn_filter is not None and not self.conn_filter((rec.local_addr, rec.local_port, rec.remote_addr,
                                                                  rec.remote_port)):
            return None
        ppid, exe = self.procs.get(rec.pid)
        facts, local = None, (rec.local_addr, rec.local_port)
        if self.hello_facts is not None and rec.local_addr is not None:
            facts = self.hello_facts.lookup(local, (rec.remote_addr, rec.remote_port))
        role = rec.role or (facts.role_of(local) if facts else None)
        # the peer's certificate: the server's on the client's event, the client's (TLS 1.3 mTLS) on the server's
        f = facts.fields(with_cert=role is not None, cert="server" if role == "client" else "client") if facts else {}
        if peer is not None:  # the library's own word (NSS), also where TLS 1.3 encrypted it
            alpn, der = peer
            if alpn is not None:
                f["alpn"] = alpn.decode("ascii", "replace")  # as hello_facts decodes ALPNs
            cert = hf.certificate_facts(der) if der else {}
            if cert:
                f.update(peer_cert_subject=cert["subject"], peer_cert_issuer=cert["issuer"],
                         peer_key_type=cert["key_type"], peer_key_bits=cert["key_bits"])
        return self.redactor.event(TLS_HANDSHAKE.build(
            timestamp=self.clock.iso(rec.ts_ns), pid=rec.pid, ppid=ppid, uid=rec.uid, process=rec.comm, exe=exe,
            tid=rec.tid, library=rec.library, role=role, fd=rec.fd, local_addr=rec.local_addr,
            local_port=rec.local_port, remote_addr=rec.remote_addr, remote_port=rec.remote_port, result=rec.result,
            transport=facts.transport if facts else None, tls_version=rec.tls_version or f.get("tls_version"), cipher=f.get("cipher"), group=f.get("group"),
            sni=f.get("sni"), alpn=f.get("alpn"), resumed=f.get("resumed"),
            peer_cert_subject=f.get("peer_cert_subject"), peer_cert_issuer=f.get("peer_cert_issuer"),
            peer_key_type=f.get("peer_key_type"), peer_key_bits=f.get("peer_key_bits")))
