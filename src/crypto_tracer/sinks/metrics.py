"""Prometheus metrics of the agent, read from its own accounting at each scrape (so the exposed
counters are the agent's numbers, never a second count kept beside them).

prometheus-client is imported only when metrics are enabled. The endpoint binds to loopback
unless an address is configured. Names: one prefix, base units, counters end in _total,
ratios 0..1, build facts in crypto_tracer_build_info; no pid or path labels.
"""

from __future__ import annotations

import platform
import threading

from crypto_tracer import __version__
from crypto_tracer.errors import ExitStatus, TracerError

PREFIX = "crypto_tracer"


def families(acc: dict):
    """Metric families of one accounting snapshot (see commands/agent.Agent.accounting)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

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
    rb = acc["ring_buffer"]
    yield GaugeMetricFamily(f"{p}_ring_buffer_fill_ratio", "share of the kernel ring buffer waiting to be read",
                            value=rb["fill"])
    yield GaugeMetricFamily(f"{p}_ring_buffer_size_bytes", "size of the kernel ring buffer", value=rb["size"])
    yield GaugeMetricFamily(f"{p}_probes_attached", "kernel probes (links) attached", value=acc["probes_attached"])
    yield GaugeMetricFamily(f"{p}_libraries_hooked", "libraries with uprobes attached (TLS handshake posture)",
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


class MetricsServer:
    """The /metrics endpoint over source() -> accounting dict. After final(), final_scraped is set once a
    scrape of the final figures has been delivered, so a stopping agent can wait for them to be collected."""

    def __init__(self, host: str, port: int, source):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.process_collector import ProcessCollector
        except ImportError:
            raise TracerError("metrics need the prometheus-client package", ExitStatus.ERROR,
                              "install it (pip install prometheus-client) or leave --metrics-address unset") from None
        self._source = source
        self._final = False
        self._final_requests = 0
        self.final_scraped = threading.Event()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise TracerError(f"metrics endpoint {host}:{port}: {exc.strerror or exc}", ExitStatus.ERROR,
                              "choose another --metrics-address") from None
        self.address = f"{host}:{self._server.server_address[1]}"

    def collect(self):
        if self._final:
            # The scraper asks again only after it received the previous answer: the second request after
            # final() proves the final figures were delivered (the first one's reply could be cut by the exit).
            self._final_requests += 1
            if self._final_requests >= 2:
                self.final_scraped.set()
        yield from families(self._source())

    def describe(self):
        return []

    def final(self) -> None:
        """The figures stop changing from now on."""
        self._final = True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
