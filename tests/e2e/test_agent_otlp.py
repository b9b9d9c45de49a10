"""crypto-tracer agent exporting OTLP logs on the real kernel: to a real receiver (rotel), every record
compared with the agent's own JSON Lines; and with the endpoint down, the files are still written, the
export failures and drops are counted and the agent stays alive."""

from __future__ import annotations

import json
import re
import socket
import sys
import textwrap

import pytest

from crypto_tracer.pipeline.redact import redact
from tests.harness import Tracer, make_cert, need_root, wait_until
from tests.otlp_receiver import Rotel

pytestmark = pytest.mark.ebpf
pytest.importorskip("opentelemetry.sdk", reason="needs the agent extra (./setup test installs it)")


@pytest.fixture(autouse=True)
def _root():
    need_root()


def run_workload(tmp_path) -> tuple[int, str, str]:
    """A process that opens a certificate and a key and loads libssl: (pid, cert, key)."""
    import subprocess

    cert, key = make_cert(tmp_path, "otlp-test", days=2, cert_name="otlp.crt", key_name="otlp-key.pem")
    code = f"import os, ssl; os.close(os.open({cert!r}, os.O_RDONLY)); os.close(os.open({key!r}, os.O_RDONLY))"
    p = subprocess.Popen([sys.executable, "-c", code])
    assert p.wait(60) == 0
    return p.pid, cert, key


def read_jsonl(path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def final_accounting(err: str) -> dict:
    m = re.search(r"Final accounting: (\{.*\})$", err, re.M)
    assert m, err
    return json.loads(m.group(1))


def config(tmp_path, endpoint: str, extra: str = "") -> str:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(f"""
        [snapshot]
        enabled = false
        [otlp]
        endpoint = "{endpoint}"
        service_name = "crypto-tracer-test"
        {extra}
    """))
    return str(path)


def test_agent_exports_every_event_to_rotel(tmp_path):
    rotel = Rotel(str(tmp_path))
    try:
        out = tmp_path / "out"
        tracer = Tracer(["agent", "--config", config(tmp_path, rotel.http_url), "--output-dir", str(out)])
        pid, cert, key = run_workload(tmp_path)
        wait_until(lambda: any(r["event_name"] == "file_open" and json.loads(r["body"])["file"] == key
                               for r in list(rotel.collector.records)), 30, "the key's file_open over OTLP")
        result = tracer.stop()
        assert result.rc == 0, result.err
        acc = final_accounting(result.err)
        records = list(rotel.collector.records)
    finally:
        rotel.close()
    events = read_jsonl(out / "events.jsonl")
    otlp = acc["sinks"]["otlp"]
    # every event the agent wrote to its file went to the collector, once, unchanged
    assert otlp["written"] == len(events) == len(records)
    assert otlp["dropped"] == {"queue_full": 0, "export_failed": 0} and otlp["queued"] == 0
    def canonical(ev):
        return json.dumps(ev, sort_keys=True)
    assert sorted(canonical(json.loads(r["body"])) for r in records) == sorted(canonical(e) for e in events)
    host = socket.gethostname()
    for r in records:
        ev = json.loads(r["body"])
        assert r["event_name"] == ev["event_type"]
        assert r["resource"]["service.name"] == "crypto-tracer-test" and r["resource"]["host.name"] == host
        assert r["attributes"]["process.pid"] == ev["pid"]
    # the workload's events, field by field
    mine = [r for r in records if r["attributes"]["process.pid"] == pid]
    opened = {r["attributes"]["file.path"]: r for r in mine if r["event_name"] == "file_open"}
    exe = json.loads(opened[key]["body"])["exe"]
    for path, ftype in ((cert, "certificate"), (key, "private_key")):
        a = opened[path]["attributes"]
        assert a["crypto_tracer.file.type"] == ftype
        assert a["process.executable.path"] == exe and a["process.user.id"] == 0
    libs = [r["attributes"] for r in mine if r["event_name"] == "lib_load"]
    assert any(a["crypto_tracer.library.name"] == "libssl" and a["file.path"].endswith(".so.3") for a in libs)
    execs = [r["attributes"] for r in mine if r["event_name"] == "process_exec"]
    # the agent redacts home directories (a checkout under /root shows as /home/ROOT)
    assert execs and execs[0]["process.command_line"].startswith(f"{redact(sys.executable)} -c ")


def test_endpoint_down_files_still_written_failures_counted(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
    try:
        out = tmp_path / "out"
        cfg = config(tmp_path, f"http://127.0.0.1:{s.getsockname()[1]}")
        tracer = Tracer(["agent", "--config", cfg, "--output-dir", str(out)])
        pid, cert, key = run_workload(tmp_path)
        wait_until(lambda: (out / "events.jsonl").exists() and key in (out / "events.jsonl").read_text(), 30,
                   "the key's file_open in the file")
        assert tracer.proc.poll() is None  # alive
        result = tracer.stop()
    finally:
        s.close()
    assert result.rc == 0, result.err
    events = read_jsonl(out / "events.jsonl")
    otlp = final_accounting(result.err)["sinks"]["otlp"]
    assert otlp["written"] == 0 and otlp["queued"] == 0
    # nothing lost silently: every event is either failed (export gave up) or dropped (queue or shutdown)
    assert otlp["dropped"]["export_failed"] + otlp["dropped"]["queue_full"] == len(events)


def test_agent_under_the_units_restrictions(tmp_path, monkeypatch):
    """The whole agent (monitor, snapshots, metrics, OTLP over gRPC) as the systemd unit would run it: the
    unit's capability bounding set and no_new_privs (setpriv), and every syscall it makes (strace) one the
    unit's SystemCallFilter= allows."""
    import os
    import signal

    from tests import harness
    from tests import systemd_unit as su
    from tests.harness import free_port, need_tool

    need_tool("setpriv", "strace", "systemd-analyze")
    rotel = Rotel(str(tmp_path))
    try:
        summary = str(tmp_path / "strace.txt")
        cfg = config(tmp_path, rotel.grpc_url, 'protocol = "grpc"')
        cfg_text = open(cfg).read().replace("enabled = false", "interval = 1")
        open(cfg, "w").write(cfg_text)
        original = harness.tracer_cmd
        monkeypatch.setattr(harness, "tracer_cmd", lambda: su.setpriv_prefix() + su.strace_prefix(summary) + original())
        tracer = Tracer(["agent", "--config", cfg, "--output-dir", str(tmp_path / "out"),
                         "--metrics-address", f"127.0.0.1:{free_port()}"], timeout=120)
        try:
            pid, cert, key = run_workload(tmp_path)
            wait_until(lambda: any(r["event_name"] == "file_open" and json.loads(r["body"])["file"] == key
                                   for r in list(rotel.collector.records)), 30, "the key's file_open over OTLP")
        finally:
            with open(f"/proc/{tracer.proc.pid}/task/{tracer.proc.pid}/children") as f:
                agent_pid = int(f.read().split()[0])  # strace's child
            os.kill(agent_pid, signal.SIGTERM)
            result = tracer.wait(120)
        assert result.rc == 0, result.err
        acc = final_accounting(result.err)
        assert acc["sinks"]["otlp"]["written"] == acc["sinks"]["events_file"]["written"] > 0
        assert acc["snapshot"]["count"] >= 1
        assert acc["handshakes"]["active"]  # the TC classifier attached with the unit's capabilities
        rotel.collector.wait(acc["sinks"]["otlp"]["written"])
    finally:
        rotel.close()
    used = su.syscalls_used(summary)
    assert {"bpf", "perf_event_open", "bind", "connect"} <= used
    assert used - su.allowed_syscalls() == set()
