"""crypto-tracer agent's TLS handshake posture on the real kernel: curl against a local Python HTTPS server,
each handshake one tls_handshake event (from packets, no library hooks) in the agent's JSON Lines file and,
the same record, at a real OTLP receiver (rotel) with the semantic-convention attributes; counted by the
metrics (by TLS version and post-quantum key exchange) exactly as in the agent's own accounting."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import textwrap
import urllib.request
from collections import Counter

import pytest

from tests.e2e import tlspeers as tp
from tests.harness import (
    Tracer,
    free_port,
    need_root,
    need_tool,
    tracer_cmd,
    tracer_env,
    wait_connections_closed,
    wait_until,
)
from tests.otlp_receiver import Rotel

pytestmark = pytest.mark.ebpf
pytest.importorskip("opentelemetry.sdk", reason="needs the agent extra (./setup test installs it)")

# (curl options, expected fields): one TLS 1.3 and one TLS 1.2 handshake, every choice pinned (Debian 13's
# OpenSSL 3.5 would otherwise offer X25519MLKEM768 first)
HANDSHAKES = {
    "tls13": (["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384", "--curves", "X25519"],
              {"tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "cipher_code": 0x1302, "group": "x25519",
               "peer_cert_subject": None, "not_quantum_safe_key_exchange": True}),
    "tls12": (["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256", "--curves", "P-256"],
              {"tls_version": "TLSv1.2", "cipher": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "cipher_code": 0xC02B,
               "group": "secp256r1", "peer_cert_subject": "CN=localhost", "not_quantum_safe_key_exchange": True}),
}


def _openssl_has_mlkem() -> bool:
    """OpenSSL 3.5 (Debian 13) has the X25519MLKEM768 hybrid group; 3.0 (Debian 12) has not."""
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(x) for x in re.match(r"OpenSSL (\d+)\.(\d+)", out).groups())
    return (major, minor) >= (3, 5)


if _openssl_has_mlkem():  # post_quantum="true" where the library can do it (curl and the server link it)
    HANDSHAKES["mlkem"] = (["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256", "--curves", "X25519MLKEM768"],
                           {"tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "cipher_code": 0x1301,
                            "group": "X25519MLKEM768", "peer_cert_subject": None,
                            "not_quantum_safe_key_exchange": False})


@pytest.fixture(autouse=True)
def _root():
    need_root()
    need_tool("curl", "openssl")


def final_accounting(err: str) -> dict:
    m = re.search(r"Final accounting: (\{.*\})$", err, re.M)
    assert m, err
    return json.loads(m.group(1))


def scrape(port: int) -> dict[tuple, float]:
    """crypto_tracer_tls_handshakes_total from the agent's /metrics: (tls_version, post_quantum) -> value."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(v, pq): float(n) for pq, v, n in re.findall(
        r'^crypto_tracer_tls_handshakes_total\{post_quantum="(\w+)",tls_version="([^"]+)"\} (\S+)$', body, re.M)}


def test_agent_reports_each_handshake_to_the_file_otlp_and_metrics(tmp_path, certs):
    cert, key = certs
    port, metrics_port = free_port(), free_port()
    rotel = Rotel(str(tmp_path))
    out = tmp_path / "out"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(textwrap.dedent(f"""
        [agent]
        redact = false
        [snapshot]
        enabled = false
        [otlp]
        endpoint = "{rotel.http_url}"
        [handshake]
        enabled = true
        [metrics]
        final_scrape_wait = 30
    """))
    try:
        with tp.python_server(port, cert, key, None):
            tracer = Tracer(["agent", "--config", str(cfg), "--output-dir", str(out),
                             "--metrics-address", f"127.0.0.1:{metrics_port}"])
            try:
                pids = {}
                for name, (extra, _want) in HANDSHAKES.items():
                    # SNI "localhost" over 127.0.0.1 (Debian 13 resolves localhost to ::1 first)
                    pids[name] = tp.curl(f"https://localhost:{port}/hs",
                                         extra=extra + ["--resolve", f"localhost:{port}:127.0.0.1"])
                # the metrics count them while the agent runs
                wait_until(lambda: scrape(metrics_port).get(("TLSv1.3", "false"), 0) >= 1
                           and scrape(metrics_port).get(("TLSv1.2", "false"), 0) >= 1, 30, "both handshakes counted")
                wait_connections_closed(port)
                tracer.proc.send_signal(signal.SIGTERM)
                # final_scrape_wait: the agent serves its final figures until a scrape of them was read
                assert tracer.wait_stderr("Final accounting", 30), tracer.stderr
                scraped = scrape(metrics_port)
                try:
                    scrape(metrics_port)  # came back: the first reply was read, the agent exits
                except OSError:
                    pass  # this reply may be cut by the exit
                result = tracer.wait(60)
            finally:
                if tracer.proc.poll() is None:
                    tracer.proc.kill()
        assert result.rc == 0, result.err
        acc = final_accounting(result.err)
        rotel.collector.wait(acc["sinks"]["otlp"]["written"])
        records = list(rotel.collector.records)
    finally:
        rotel.close()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    handshakes = [e for e in events if e["event_type"] == "tls_handshake"]
    hs = acc["handshakes"]
    assert hs["active"] and hs["events"] == len(handshakes) == acc["events_by_type"]["tls_handshake"]
    assert acc["sinks"]["otlp"]["written"] == len(events) == acc["output"] + hs["events"]
    # the counters are the agent's accounting: one per handshake written
    counted = {(h["tls_version"], h["post_quantum"]): h["count"] for h in hs["by_kind"]}
    pq = {True: "false", False: "true", None: "unknown"}  # not_quantum_safe_key_exchange -> post_quantum
    assert counted == Counter((e["tls_version"] or "unknown", pq[e["not_quantum_safe_key_exchange"]])
                              for e in handshakes)
    assert scraped == {k: float(n) for k, n in counted.items()}  # the last scrape: the final accounting
    assert counted[("TLSv1.3", "false")] >= 1 and counted[("TLSv1.2", "false")] >= 1
    assert counted.get(("TLSv1.3", "true"), 0) >= ("mlkem" in HANDSHAKES)
    by_body = {}
    for r in records:
        if r["event_name"] == "tls_handshake":
            by_body.setdefault(json.dumps(json.loads(r["body"]), sort_keys=True), []).append(r)
    for name, (_extra, want) in HANDSHAKES.items():
        mine = [e for e in handshakes if e["pid"] == pids[name]]
        assert len(mine) == 1, (name, handshakes)  # one per handshake, not one per side
        ev = mine[0]
        assert {k: ev[k] for k in want} == want, name
        assert (ev["process"], ev["role"], ev["sni"]) == ("ctpeer-curl", "client", "localhost")
        assert (ev["local_addr"], ev["remote_addr"], ev["remote_port"]) == ("127.0.0.1", "127.0.0.1", port)
        assert ev["alpn"] is None and ev["alpn_offered"] == ["h2", "http/1.1"] and ev["resumed"] is False
        assert ev["ja4"].startswith("t13d" if want["tls_version"] == "TLSv1.3" else "t12d")
        # the same record at the collector, with the semantic-convention attributes
        (rec,) = by_body[json.dumps(ev, sort_keys=True)]
        a = rec["attributes"]
        assert {k: a.get(k) for k in ("tls.protocol.name", "tls.protocol.version", "tls.cipher", "tls.curve",
                                      "tls.client.server_name", "server.address", "server.port", "client.address",
                                      "client.port", "process.pid", "crypto_tracer.process.comm")} == {
            "tls.protocol.name": "tls", "tls.protocol.version": want["tls_version"].removeprefix("TLSv"),
            "tls.cipher": want["cipher"], "tls.curve": want["group"], "tls.client.server_name": "localhost",
            "server.address": "127.0.0.1", "server.port": port, "client.address": "127.0.0.1",
            "client.port": ev["local_port"], "process.pid": pids[name], "crypto_tracer.process.comm": "ctpeer-curl"}
        assert a.get("tls.server.subject") == want["peer_cert_subject"]


def test_without_cap_net_admin_the_agent_runs_without_handshakes(tmp_path):
    """The classifier needs CAP_NET_ADMIN: without it one warning, the rest of the agent runs (exit 0)."""
    need_tool("setpriv")
    r = subprocess.run(["setpriv", "--bounding-set=-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search", "--inh-caps=-all",
                        "--no-new-privs", *tracer_cmd(), "agent", "--output-dir", str(tmp_path / "out"), "-d", "1"],
                       capture_output=True, text=True, timeout=60, env=tracer_env(), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TLS handshake posture is off: its TC classifier needs CAP_NET_ADMIN") == 1, r.stderr
    acc = final_accounting(r.stderr)
    assert acc["handshakes"] == {"active": False, "events": 0, "by_kind": [], "packets_seen": 0, "packets_dropped": 0,
                                 "process_records_dropped": 0, "attached": 0}
    assert acc["snapshot"]["count"] == 1 and acc["sinks"]["events_file"]["written"] == acc["output"]
