"""Real OTLP receivers for the tests: rotel (a collector from PyPI) in front of a small OTLP/HTTP endpoint
that decodes what rotel forwards, so a test reads back every record field by field.

    sender --OTLP http|grpc--> rotel (the real receiver) --OTLP/HTTP--> Collector (decodes, keeps records)

Collector alone also serves as a plain (optionally TLS, optionally client-certificate) OTLP/HTTP endpoint.
"""

from __future__ import annotations

import gzip
import os
import signal
import ssl
import subprocess
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.harness import free_port, wait_port, wait_until


def rotel_binary() -> str:
    try:
        import rotel
    except ImportError:
        pytest.skip("needs rotel (PyPI; installed by ./setup test)")
    path = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    if not os.access(path, os.X_OK):
        pytest.skip(f"rotel's binary {path} is missing")
    return path


def any_value(v):
    """An OTLP AnyValue as Python: kvlist -> dict, array -> list, empty -> None."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def key_values(kvs) -> dict:
    return {kv.key: any_value(kv.value) for kv in kvs}


def flatten(request) -> list[dict]:
    """An ExportLogsServiceRequest as one dict per log record, with its resource and scope."""
    out = []
    for rl in request.resource_logs:
        resource = key_values(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                out.append({"resource": resource, "scope": (sl.scope.name, sl.scope.version),
                            "event_name": r.event_name, "time_unix_nano": r.time_unix_nano,
                            "observed_time_unix_nano": r.observed_time_unix_nano,
                            "severity_number": r.severity_number, "body": any_value(r.body),
                            "attributes": key_values(r.attributes)})
    return out


class Collector:
    """An OTLP/HTTP logs endpoint on 127.0.0.1 that keeps every record it is sent.
    tls=(cert, key) serves HTTPS; client_ca additionally requires a client certificate it signed."""

    def __init__(self, tls: tuple[str, str] | None = None, client_ca: str | None = None, status: int = 200):
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest,
            ExportLogsServiceResponse,
        )

        self.records: list[dict] = []
        self.requests = 0
        self.status = status
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                enc = self.headers.get("Content-Encoding", "")
                if enc == "gzip":
                    data = gzip.decompress(data)
                elif enc == "deflate":
                    data = zlib.decompress(data)
                req = ExportLogsServiceRequest()
                req.ParseFromString(data)
                with lock:
                    outer.requests += 1
                    if outer.status == 200:
                        outer.records.extend(flatten(req))
                reply = ExportLogsServiceResponse().SerializeToString()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        scheme = "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            if client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(client_ca)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n: int, timeout: float = 20.0) -> list[dict]:
        wait_until(lambda: len(self.records) >= n, timeout, f"{n} OTLP records (have {len(self.records)})")
        return self.records

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Rotel:
    """rotel receiving OTLP on 127.0.0.1 (gRPC and HTTP) and forwarding every log record to a Collector."""

    def __init__(self, workdir):
        self.collector = Collector()
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log = os.path.join(workdir, "rotel.out")
        cmd = [rotel_binary(), "start",
               "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
               "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
               "--exporter", "otlp", "--otlp-exporter-protocol", "http",
               "--otlp-exporter-endpoint", self.collector.url, "--otlp-exporter-compression", "none",
               "--batch-timeout", "50ms",
               "--debug-log", "logs", "--debug-log-verbosity", "detailed",
               "--pid-file", os.path.join(workdir, "rotel.pid"), "--log-file", os.path.join(workdir, "rotel.log")]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            wait_port(self.http_port)
            wait_port(self.grpc_port)
        except BaseException:
            self.close()
            raise
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"http://127.0.0.1:{self.grpc_port}"

    def debug_log(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.collector.close()
