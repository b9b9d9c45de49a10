"""OpenTelemetry logs over OTLP (HTTP/protobuf by default, gRPC optional): one log record per event.

The caller's ``write()`` never blocks: it only appends to a bounded queue (a full queue drops the
event and counts it). One sender thread takes batches off the queue and hands them to the
OpenTelemetry SDK's own OTLP exporter, which does the protobuf encoding, the transport, TLS and the
bounded retries (exponential backoff within ``export_timeout`` seconds per batch, then the batch
counts as failed).

Why the SDK's exporter but not its ``LoggerProvider``/``BatchLogRecordProcessor``: that processor
drops records silently when its queue is full and reports neither what it sent nor what failed;
the agent's contract is that every event is accounted for (written = sent + failed + dropped +
queued), so the queue, the batching and the counting are ours and only the wire format and the
transport are the SDK's.

Record layout (semantic conventions; docs/OTLP.md has the full table):
- event name = ``event_type``; body = the whole event as JSON text, the same bytes as the JSON Lines file
  (nulls stay explicit; as a map, OTLP's encoding of every field costs twice the CPU, measured);
- timestamp = the event's own wall-clock ``timestamp``; observed timestamp = when it was queued;
- attributes: ``process.*``, ``file.path``, ``tls.*``, ``server.*``/``client.*``, ``network.*``
  and a few ``crypto_tracer.*`` ones, each only when its value is known (an attribute is never null);
- resource: ``service.name`` (crypto-tracer), ``service.version``, ``host.name`` and any extra
  attributes configured.

Nothing is imported from OpenTelemetry until a sink is made, and nothing is sent unless a sink is
made with an endpoint.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from datetime import datetime
from typing import Any

from orjson import dumps as _dumps

from crypto_tracer import __version__
from crypto_tracer.errors import ExitStatus, TracerError

PROTOCOLS = ("http", "grpc")
SCOPE_NAME = "crypto_tracer"
INSTALL_HINT = "install the agent extra: pip install 'crypto-tracer[agent]' (./setup install does)"


# --- event -> attributes ---------------------------------------------------------------------

def _tls_version(text: str | None) -> tuple[str | None, str | None]:
    """'TLSv1.3' -> ('tls', '1.3'); 'SSLv3' -> ('ssl', '3'); 'DTLSv1.2' -> ('dtls', '1.2')."""
    if not text:
        return None, None
    for name in ("DTLS", "TLS", "SSL"):
        if text.upper().startswith(name):
            rest = text[len(name):].lstrip("vV ")
            return name.lower(), rest or None
    return None, None


def _addresses(attrs: dict, ev: dict) -> None:
    local, lport = ev.get("local_addr"), ev.get("local_port")
    remote, rport = ev.get("remote_addr"), ev.get("remote_port")
    pairs = (("network.local.address", local), ("network.local.port", lport),
             ("network.peer.address", remote), ("network.peer.port", rport))
    role = ev.get("role")
    if role == "client":  # we are the client: the peer is the server
        pairs += (("client.address", local), ("client.port", lport),
                  ("server.address", remote), ("server.port", rport))
    elif role == "server":
        pairs += (("server.address", local), ("server.port", lport),
                  ("client.address", remote), ("client.port", rport))
    for key, value in pairs:
        if value is not None:
            attrs[key] = value


# event field -> attribute, for fields that map one to one (the value unchanged)
_SIMPLE = {
    "pid": "process.pid",
    "ppid": "process.parent_pid",
    "uid": "process.user.id",
    "exe": "process.executable.path",
    "cmdline": "process.command_line",
    "exit_code": "process.exit.code",
    "tid": "thread.id",
    "cipher": "tls.cipher",
    "group": "tls.curve",
    "sni": "tls.client.server_name",
    "alpn": "tls.next_protocol",
    "resumed": "tls.resumed",
    "peer_cert_subject": "tls.server.subject",  # only meaningful for a client; fixed below
    "peer_cert_issuer": "tls.server.issuer",
    "file_type": "crypto_tracer.file.type",
    "library_name": "crypto_tracer.library.name",
    "version": "crypto_tracer.library.version",
    "function_name": "code.function.name",
    "function": "code.function.name",
    "direction": "crypto_tracer.tls.direction",
    "length": "crypto_tracer.tls.length",
    "mnt_ns": "crypto_tracer.process.mnt_ns",
    "root": "crypto_tracer.process.root",
    "process": "crypto_tracer.process.comm",
}


def attributes(ev: dict) -> dict[str, Any]:
    """The log record's attributes for one event: semantic-convention names, known values only."""
    attrs: dict[str, Any] = {}
    for field, key in _SIMPLE.items():
        value = ev.get(field)
        if value is not None:
            attrs[key] = value
    exe = ev.get("exe")
    if exe:
        attrs["process.executable.name"] = os.path.basename(exe)
    etype = ev.get("event_type")
    if etype == "file_open" and ev.get("file") is not None:
        attrs["file.path"] = ev["file"]
    if etype == "lib_load" and ev.get("library") is not None:
        attrs["file.path"] = ev["library"]
    if etype in ("api_call", "tls_data", "tls_handshake") and ev.get("library") is not None:
        attrs["crypto_tracer.library"] = ev["library"]
    if etype in ("tls_handshake", "tls_data"):
        _addresses(attrs, ev)
        name, version = _tls_version(ev.get("tls_version"))
        if name:
            attrs["tls.protocol.name"] = name
        if version:
            attrs["tls.protocol.version"] = version
        if ev.get("transport") is not None:  # "tcp" or "quic" (semantic conventions' values)
            attrs["network.transport"] = ev["transport"]
        if ev.get("result") is not None:
            attrs["tls.established"] = ev["result"] == "success"
        if ev.get("role") == "server":  # the peer's certificate is the client's
            for side in ("subject", "issuer"):
                if f"tls.server.{side}" in attrs:
                    attrs[f"tls.client.{side}"] = attrs.pop(f"tls.server.{side}")
    return attrs


def timestamp_ns(text: str | None) -> int | None:
    """The event's ISO-8601 UTC timestamp in nanoseconds since the epoch (None when absent or unreadable)."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    # integer arithmetic: a float of the epoch seconds would lose the microseconds
    return (int(dt.timestamp()) * 1_000_000 + dt.microsecond) * 1000


def resource_attributes(extra: dict | None = None) -> dict[str, Any]:
    attrs = {"service.name": "crypto-tracer", "service.version": __version__, "host.name": socket.gethostname()}
    attrs.update(extra or {})
    return attrs


def _http_url(endpoint: str) -> str:
    """A base URL (http://collector:4318) gets the logs path; a full one is kept."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TracerError(f"OTLP endpoint '{endpoint}': expected http://HOST:PORT or https://HOST:PORT",
                          ExitStatus.BAD_ARGS)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/logs"
    return endpoint


def _session_keeping_ca():
    """A requests session whose configured CA file is used even when REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE are set
    (plain requests lets those override a session's verify: requests issues #3829, #4650); proxies from the
    environment still apply."""
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            settings["verify"] = self.verify
            return settings

    return Session()


# --- the sink --------------------------------------------------------------------------------

class OtlpSink:
    """Events -> OpenTelemetry log records -> an OTLP endpoint, without ever blocking the caller."""

    def __init__(self, endpoint: str, protocol: str = "http", headers: dict | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 resource: dict | None = None, queue_size: int = 10000, *, batch_size: int = 512,
                 batch_delay: float = 1.0, export_timeout: float = 10.0, compression: str = "gzip"):
        if protocol not in PROTOCOLS:
            raise TracerError(f"OTLP protocol '{protocol}': expected http or grpc", ExitStatus.BAD_ARGS)
        if queue_size <= 0 or batch_size <= 0:
            raise TracerError("OTLP queue and batch sizes must be greater than 0", ExitStatus.BAD_ARGS)
        if bool(cert_file) != bool(key_file):
            raise TracerError("OTLP client certificate: give both cert_file and key_file", ExitStatus.BAD_ARGS)
        for path in (ca_file, cert_file, key_file):
            if path and not os.access(path, os.R_OK):
                raise TracerError(f"OTLP TLS file {path}: not readable", ExitStatus.ERROR)
        self.endpoint, self.protocol = endpoint, protocol
        self.batch_size, self.batch_delay = batch_size, batch_delay
        try:
            self._exporter = self._make_exporter(endpoint, protocol, headers or {}, ca_file, cert_file, key_file,
                                                 export_timeout, compression)
            from opentelemetry._logs import LogRecord
            from opentelemetry.sdk._logs import ReadableLogRecord
            from opentelemetry.sdk._logs.export import LogRecordExportResult
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError as exc:
            raise TracerError(f"OTLP export needs the OpenTelemetry SDK ({exc.name} is missing)", ExitStatus.ERROR,
                              INSTALL_HINT) from None
        self._LogRecord, self._Readable, self._ok = LogRecord, ReadableLogRecord, LogRecordExportResult.SUCCESS
        self._resource = Resource.create(resource_attributes(resource))
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)

        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is pending
        self._pending = 0  # accepted and neither sent nor failed yet (queued + in flight)
        self._sent = self._failed = self._dropped = 0
        self._flush_now = threading.Event()
        self._closing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-sender", daemon=True)
        self._thread.start()

    @staticmethod
    def _make_exporter(endpoint, protocol, headers, ca_file, cert_file, key_file, timeout, compression):
        if protocol == "http":
            from opentelemetry.exporter.otlp.proto.http import Compression
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

            return OTLPLogExporter(endpoint=_http_url(endpoint), certificate_file=ca_file,
                                   client_certificate_file=cert_file, client_key_file=key_file,
                                   headers=dict(headers), timeout=timeout, compression=Compression(compression),
                                   session=_session_keeping_ca() if ca_file else None)
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        secure = endpoint.startswith("https://") or bool(ca_file)
        credentials = None
        if secure:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(ca_file) if ca_file else None,
                private_key=read(key_file) if key_file else None,
                certificate_chain=read(cert_file) if cert_file else None)
        return OTLPLogExporter(endpoint=endpoint, insecure=not secure, credentials=credentials,
                               headers=dict(headers), timeout=timeout,
                               compression=grpc.Compression.Gzip if compression == "gzip"
                               else grpc.Compression.NoCompression)

    # -- the caller's side: never blocks --------------------------------------------------------

    def write(self, event: dict) -> bool:
        """Queue one event; False (and counted as dropped) when the queue is full or the sink closed."""
        with self._lock:  # counted before the put: the sender may finish it before put returns
            if self._closing:
                self._dropped += 1
                return False
            self._pending += 1
        try:
            self._queue.put_nowait((time.time_ns(), event))
        except queue.Full:
            with self._lock:
                self._pending -= 1
                self._dropped += 1
            return False
        if self._queue.qsize() >= self.batch_size:
            self._flush_now.set()
        return True

    def stats(self) -> dict:
        with self._lock:
            return {"sent": self._sent, "dropped": self._dropped, "queued": self._pending, "failed": self._failed}

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued now; True when nothing is pending within timeout seconds."""
        self._flush_now.set()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._flush_now.set()
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> dict:
        """Stop accepting, send what is queued within timeout, count the rest as dropped; returns stats()."""
        with self._lock:
            closing, self._closing = self._closing, True
        if not closing:
            self.flush(timeout)
            self._stop.set()
            self._flush_now.set()
            self._exporter.shutdown()  # aborts a retry backoff in progress
            self._thread.join(timeout=max(timeout, 1.0))
            with self._lock:  # what never left: dropped at shutdown
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._pending -= 1
                    self._dropped += 1
        return self.stats()

    # -- the sender thread -------------------------------------------------------------------------

    def _take_batch(self) -> list:
        batch = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            # wait for a full batch, a flush or the batch delay, whichever comes first
            self._flush_now.wait(self.batch_delay)
            self._flush_now.clear()
            while not self._stop.is_set():
                batch = self._take_batch()
                if not batch:
                    break
                self._send(batch)

    def _send(self, batch: list) -> None:
        ok = False
        try:
            records = [self._record(observed, ev) for observed, ev in batch]
            ok = self._exporter.export(records) == self._ok
        except Exception:  # an encoding or transport error: the batch failed, the sender goes on
            ok = False
        with self._idle:
            if ok:
                self._sent += len(batch)
            else:
                self._failed += len(batch)
            self._pending -= len(batch)
            if not self._pending:
                self._idle.notify_all()

    def _record(self, observed: int, ev: dict):
        record = self._LogRecord(timestamp=timestamp_ns(ev.get("timestamp")),
                                 observed_timestamp=observed, body=_dumps(ev).decode(), attributes=attributes(ev),
                                 event_name=ev.get("event_type"))
        return self._Readable(log_record=record, resource=self._resource, instrumentation_scope=self._scope)
