"""Prometheus metrics of the agent, read from its own accounting at each scrape (so the exposed
counters are the agent's numbers, never a second count kept beside them).

prometheus-client is imported only when metrics are enabled. The endpoint binds to loopback
unless an address is configured. Names: one prefix, base units, counters end in _total,
ratios 0..1, build facts in crypto_tracer_build_info; no pid or path labels.
"""

from __future__ import annotations

import platform
import threading
import time

from crypto_tracer import __version__
from crypto_tracer.errors import ExitStatus, TracerError

PREFIX = "crypto_tracer"


def families(acc: dict):
    """Metric families of one accounting snapshot (see commands/agent.Agent.accounting)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    p = PREFIX
    yield InfoMetricFamily(f"{p}_build", "crypto-tracer build facts",
                           value={"version": __version__, "python": platform.python_version(),
                                  "kernel": platform.release()})
    k = acc["kernel"]
    yield CounterMetricFamily(f"{p}_events_seen", "events the kernel probes saw (before any filter)",
                              value=k["seen"])
    yield CounterMetricFamily(f"{p}_events_received", "records user space read from the ring buffer",
                              value=acc["received"])
    by_type = CounterMetricFamily(f"{p}_events", "events passed to the sinks, by type", labels=["event_type"])
    for t, n in sorted(acc["events_by_type"].items()):
        by_type.add_metric([t], n)
    yield by_type
    filtered = CounterMetricFamily(f"{p}_events_filtered", "events filtered out, in the kernel or in user space",
                                   labels=["where"])
    filtered.add_metric(["kernel"], k["kernel_filtered"])
    filtered.add_metric(["user"], acc["filtered_user"])
    yield filtered
    dropped = CounterMetricFamily(f"{p}_events_dropped", "events lost, by sink and reason (sink=kernel: ring "
                                  "buffer full)", labels=["sink", "reason"])
    dropped.add_metric(["kernel", "ring_buffer_full"], k["dropped"])
    hs = acc["handshakes"]
    if hs["active"]:  # the handshake classifier's packets (a lost one can cost a handshake its event)
        dropped.add_metric(["kernel_handshakes", "ring_buffer_full"], hs["packets_dropped"])
    written = CounterMetricFamily(f"{p}_sink_written", "events each sink wrote or sent", labels=["sink"])
    depth = GaugeMetricFamily(f"{p}_sink_queue_depth", "events waiting in each sink's queue", labels=["sink"])
    capacity = GaugeMetricFamily(f"{p}_sink_queue_capacity", "size of each sink's queue (events)",
                                 labels=["sink"])
    for name, s in sorted(acc["sinks"].items()):
        for reason, n in sorted(s["dropped"].items()):
            dropped.add_metric([name, reason], n)
        written.add_metric([name], s["written"])
        depth.add_metric([name], s["queued"])
        if s.get("capacity") is not None:
            capacity.add_metric([name], s["capacity"])
    yield from (dropped, written, depth, capacity)
    handshakes = CounterMetricFamily(f"{p}_tls_handshakes", "TLS handshakes seen (tls_handshake events), by "
                                     "version and by whether the key exchange is post-quantum (ML-KEM hybrid)",
                                     labels=["tls_version", "post_quantum"])
    for kind in hs["by_kind"]:
        handshakes.add_metric([kind["tls_version"], kind["post_quantum"]], kind["count"])
    yield handshakes
    if hs["active"]:  # a lost record costs its handshakes the kernel's exe/mnt_ns (then /proc, or null)
        yield CounterMetricFamily(f"{p}_process_records_dropped", "process records (exe, mount namespace at "
                                  "connect) the handshake classifier could not queue", value=hs["process_records_dropped"])
    rb = acc["ring_buffer"]
    yield GaugeMetricFamily(f"{p}_ring_buffer_fill_ratio", "share of the kernel ring buffer waiting to be read",
                            value=rb["fill"])
    yield GaugeMetricFamily(f"{p}_ring_buffer_size_bytes", "size of the kernel ring buffer", value=rb["size"])
    yield GaugeMetricFamily(f"{p}_probes_attached", "kernel probes (links) attached", value=acc["probes_attached"])
    yield GaugeMetricFamily(f"{p}_libraries_hooked", "libraries with uprobes attached (none: handshakes come from packets)",
                            value=acc["libraries_hooked"])
    yield GaugeMetricFamily(f"{p}_libraries_seen", "distinct crypto libraries seen loaded since start",
                            value=acc["libraries_seen"])
    s = acc["snapshot"]
    yield CounterMetricFamily(f"{p}_snapshots", "snapshots written", value=s["count"])
    yield CounterMetricFamily(f"{p}_snapshot_failures", "snapshots that could not be taken or written",
                              value=s["failed"])
    if s["last_time"] is not None:
        yield GaugeMetricFamily(f"{p}_last_snapshot_timestamp_seconds", "when the last snapshot was taken "
                                "(Unix time)", value=s["last_time"])
        yield GaugeMetricFamily(f"{p}_snapshot_duration_seconds", "how long the last snapshot took",
                                value=s["duration"])
        counts = GaugeMetricFamily(f"{p}_snapshot_items", "what the last snapshot found", labels=["kind"])
        for kind in ("processes", "libraries", "files"):
            counts.add_metric([kind], s[kind])
        yield counts
    yield CounterMetricFamily(f"{p}_config_reloads", "configuration reloads (SIGHUP)", value=acc["reloads"])


def _scrape_timeout(environ) -> float | None:
    """The scraper's timeout (Prometheus sends it in X-Prometheus-Scrape-Timeout-Seconds), or None."""
    try:
        return float(environ.get("HTTP_X_PROMETHEUS_SCRAPE_TIMEOUT_SECONDS", ""))
    except ValueError:
        return None


class MetricsServer:
    """The /metrics endpoint over source() -> accounting dict, read at each scrape.

    At stop the agent hands its final accounting to final(): from then on every scrape serves exactly
    those figures (the ones it logs), without touching the probes being closed. final_scraped is set
    when a reply of the final figures was written out in full within the scraper's timeout AND the
    scraper came back for more (it asks again only after it received the previous answer), so a
    stopping agent can wait until its last figures are in the scraper's database.
    close() waits for a scrape that is reading the accounting, and later scrapes read nothing: the
    agent closes its BPF objects after it, and a late scrape must not read a closed map (it read 0)."""

    def __init__(self, host: str, port: int, source):
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.process_collector import ProcessCollector
        except ImportError:
            raise TracerError("metrics need the prometheus-client package", ExitStatus.ERROR,
                              "install it (pip install prometheus-client) or leave --metrics-address unset") from None
        import socket
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        self._source = source
        self._lock = threading.Lock()
        self._closed = False
        self._final_acc: dict | None = None
        self._final_delivered = False
        self.final_scraped = threading.Event()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._app = make_wsgi_app(registry)

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Quiet(WSGIRequestHandler):
            def log_message(self, *_args):
                pass

        try:
            self._server = make_server(host, port, self._serve, Server, handler_class=Quiet)
        except OSError as exc:
            raise TracerError(f"metrics endpoint {host}:{port}: {exc.strerror or exc}", ExitStatus.ERROR,
                              "choose another --metrics-address") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.address = f"{host}:{self._server.server_address[1]}"

    def _serve(self, environ, start_response):
        final = self._final_acc is not None
        if final and self._final_delivered:
            self.final_scraped.set()  # it came back after a complete reply of the final figures
        started, timeout = time.monotonic(), _scrape_timeout(environ)
        body = self._app(environ, start_response)

        def chunks():
            yield from body
            # here every chunk has been written to the socket (wsgiref writes each before asking for the next)
            if final and (timeout is None or time.monotonic() - started < timeout):
                self._final_delivered = True
        return chunks()

    def collect(self):
        with self._lock:
            if self._closed:
                return
            acc = self._final_acc if self._final_acc is not None else self._source()
        yield from families(acc)

    def describe(self):
        return []

    def final(self, acc: dict) -> None:
        """The figures stop changing: serve acc (the agent's final accounting) from now on."""
        self._final_acc = acc

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
