"""crypto-tracer agent on the real kernel: a real Prometheus scraping it, rotation, a full disk, SIGHUP,
kill -9 and restart, --duration."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import pytest

from tests.harness import Tracer, free_port, make_cert, need_root, need_tool, run_tracer, wait_port, wait_until

pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True)
def _root():
    need_root()


def agent(tmp_path, *extra, config: str | None = None, out="out") -> tuple[Tracer, str]:
    out_dir = str(tmp_path / out)
    args = ["agent", "--output-dir", out_dir, *extra]
    if config is not None:
        path = tmp_path / "agent.toml"
        path.write_text(textwrap.dedent(config))
        args += ["--config", str(path)]
    return Tracer(args), out_dir


def final_accounting(err: str) -> dict:
    m = re.search(r"Final accounting: (\{.*\})$", err, re.M)
    assert m, err
    return json.loads(m.group(1))


def emitted(acc: dict) -> int:
    """Events the agent passed to its outputs: monitor's, and the TLS handshakes seen on the host meanwhile
    (the handshake posture is on by default; other programs on this machine may make TLS connections)."""
    return acc["output"] + acc["handshakes"]["events"]


def workload(tmp_path, n_exec: int = 0) -> None:
    """A process that opens a certificate and a key, loads libssl and starts n_exec children; its pid."""
    cert, key = make_cert(tmp_path, "agent-test", days=2, cert_name="agent.crt", key_name="agent-key.pem")
    code = textwrap.dedent(f"""
        import os, ssl, subprocess
        os.close(os.open({cert!r}, os.O_RDONLY))
        os.close(os.open({key!r}, os.O_RDONLY))
        for _ in range({n_exec}):
            subprocess.run(["/bin/true"])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def read_jsonl(*paths) -> list[dict]:
    events = []
    for p in paths:
        data = gzip.open(p, "rb").read() if p.endswith(".gz") else open(p, "rb").read()
        assert not data or data.endswith(b"\n"), p
        events += [json.loads(line) for line in data.splitlines()]
    return events


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- Prometheus -------------------------------------------------------------------------------------

class Prometheus:
    def __init__(self, tmp_path, target: str):
        need_tool("prometheus")
        self.port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(textwrap.dedent(f"""
            global:
              scrape_interval: 1s
              scrape_timeout: 900ms
            scrape_configs:
              - job_name: agent
                static_configs:
                  - targets: ["{target}"]
        """))
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path}/tsdb",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=60)
        wait_until(self._ready, 60, "Prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:  # 503 while the database opens
            return False

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def last(self, metric: str) -> dict[tuple, float]:
        """The last scraped value of each series of metric (also after the target went away)."""
        return {tuple(sorted((k, v) for k, v in s["metric"].items() if k not in ("job", "instance", "__name__"))):
                float(s["value"][1]) for s in self.query(f"last_over_time({metric}[10m])")}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def test_prometheus_scrapes_counters_equal_to_the_agents_accounting(tmp_path):
    port = free_port()
    t, out = agent(tmp_path, "--metrics-address", f"127.0.0.1:{port}", config="""
        [snapshot]
        interval = 2
        [metrics]
        final_scrape_wait = 30
    """)
    prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        wait_until(lambda: prom.query('up{job="agent"} == 1'), 60, "Prometheus scraping the agent")
        # the exposition passes Prometheus's own linter
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint
        workload(tmp_path, n_exec=5)
        wait_until(lambda: prom.query("crypto_tracer_snapshots_total >= 2"), 30, "two snapshots scraped")
        out_, err, rc = t.stop(signal.SIGTERM)
        assert rc == 0, err
        assert "no scrape of the final figures" not in err
        acc = final_accounting(err)
        # the scrape after the agent exited failed: the final one before it is in the database
        wait_until(lambda: prom.query('up{job="agent"} == 0'), 30, "Prometheus seeing the agent gone")
        k = acc["kernel"]
        assert k["seen"] == k["kernel_filtered"] + acc["filtered_user"] + acc["output"] + k["dropped"]
        assert acc["received"] == k["submitted"] == acc["output"] + acc["filtered_user"]
        assert sum(acc["events_by_type"].values()) == emitted(acc)
        assert acc["events_by_type"].get("tls_handshake", 0) == acc["handshakes"]["events"]
        assert acc["handshakes"]["active"]
        dropped = {(("reason", "ring_buffer_full"), ("sink", "kernel")): k["dropped"],
                   (("reason", "ring_buffer_full"), ("sink", "kernel_handshakes")): acc["handshakes"]["packets_dropped"]}
        dropped.update({(("reason", r), ("sink", s)): n for s, v in acc["sinks"].items() for r, n in v["dropped"].items()})
        want = {
            "crypto_tracer_events_seen_total": {(): k["seen"]},
            "crypto_tracer_events_received_total": {(): acc["received"]},
            "crypto_tracer_events_total": {(("event_type", et),): n for et, n in acc["events_by_type"].items()},
            "crypto_tracer_events_filtered_total": {(("where", "kernel"),): k["kernel_filtered"],
                                                    (("where", "user"),): acc["filtered_user"]},
            "crypto_tracer_events_dropped_total": dropped,
            "crypto_tracer_sink_written_total": {(("sink", s),): v["written"] for s, v in acc["sinks"].items()},
            "crypto_tracer_snapshots_total": {(): acc["snapshot"]["count"]},
            "crypto_tracer_tls_handshakes_total": {(("post_quantum", h["post_quantum"]), ("tls_version", h["tls_version"])):
                                                   h["count"] for h in acc["handshakes"]["by_kind"]},
            "crypto_tracer_last_snapshot_timestamp_seconds": {(): acc["snapshot"]["last_time"]},
            "crypto_tracer_process_records_dropped_total": {(): acc["handshakes"]["process_records_dropped"]},
        }
        # the agent exited once Prometheus had come back after its final figures: the last samples are those
        # figures (waited for: a query may not see the last samples of a scrape at once)
        def last_values():
            return {m: prom.last(m) for m in want}
        got = wait_until(lambda: (v := last_values()) == want and v, 30, "the final accounting in Prometheus",
                         fail=False) or last_values()
        for metric, values in want.items():
            assert got[metric] == values, metric
        assert acc["snapshot"]["count"] >= 2
        assert prom.last("crypto_tracer_build_info")  # one series, value 1
        # what was counted is what is in the file, including the workload's events
        events = read_jsonl(f"{out}/events.jsonl")
        assert len(events) == acc["sinks"]["events_file"]["written"] == emitted(acc)
        mine = [(e["event_type"], e["file"]) for e in events if (e.get("file") or "").startswith(str(tmp_path))]
        assert ("file_open", f"{tmp_path}/agent.crt") in mine and ("file_open", f"{tmp_path}/agent-key.pem") in mine
        snaps = sorted(glob.glob(f"{out}/snapshots/snapshot-*.json"))
        assert snaps and all(mode(s) == 0o600 for s in snaps)
        assert json.load(open(snaps[-1]))["snapshot_version"]
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
        prom.stop()


def test_rotation_compression_and_backup_limit(tmp_path):
    t, out = agent(tmp_path, config="""
        [events]
        max_size_mb = 0.01
        max_backups = 2
        compress = true
        [snapshot]
        enabled = false
    """)
    try:
        workload(tmp_path, n_exec=150)  # ~300 events of ~300 bytes: ~9 files of 10 KiB
        out_, err, rc = t.stop(signal.SIGTERM)
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    assert rc == 0, err
    acc = final_accounting(err)
    assert mode(out) == 0o700
    names = sorted(n for n in os.listdir(out) if not n.startswith("."))
    assert names == ["events.jsonl", "events.jsonl.1.gz", "events.jsonl.2.gz", "snapshots"] or \
        names == ["events.jsonl", "events.jsonl.1.gz", "events.jsonl.2.gz"], names
    for n in ("events.jsonl", "events.jsonl.1.gz", "events.jsonl.2.gz"):
        assert mode(f"{out}/{n}") == 0o600
    limit = int(0.01 * 1024 * 1024)
    for n in ("events.jsonl.1.gz", "events.jsonl.2.gz"):
        raw = gzip.open(f"{out}/{n}").read()
        assert limit - 1000 < len(raw) <= limit, (n, len(raw))  # full files of whole lines
    events = read_jsonl(f"{out}/events.jsonl.2.gz", f"{out}/events.jsonl.1.gz", f"{out}/events.jsonl")
    written = acc["sinks"]["events_file"]["written"]
    assert written == emitted(acc) and written > len(events) > 0  # older files were removed
    # .2.gz is older than the current file (a whole file, .1.gz, between them; records of different CPUs
    # can be a few microseconds out of order within a file)
    oldest, current = read_jsonl(f"{out}/events.jsonl.2.gz"), read_jsonl(f"{out}/events.jsonl")
    assert max(e["timestamp"] for e in oldest) < min(e["timestamp"] for e in current)
    assert sum(e["event_type"] == "process_exec" and e["exe"] == "/usr/bin/true" for e in events) > 10


def test_disk_full_counts_drops_and_resumes(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], check=True)
    t = None
    try:
        t, out = agent(tmp_path, out="small/out", config="""
            [snapshot]
            enabled = false
        """)
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the file system to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        workload(tmp_path, n_exec=20)
        assert t.wait_stderr("No space left on device", 30), t.stderr
        assert t.proc.poll() is None  # alive
        # space returns, plenty of it: freeing only the filler's blocks let the events written while
        # waiting for "writing again" fill the file system a second time (two episodes, two warnings)
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        assert wait_until(lambda: (workload(tmp_path, n_exec=2), t.wait_stderr("writing again", 2))[1], 60,
                          "the agent writing again")
        out_, err, rc = t.stop(signal.SIGTERM)
        assert rc == 0, err
        acc = final_accounting(err)
        s = acc["sinks"]["events_file"]
        assert s["dropped"]["disk_full"] > 0 and s["dropped"]["queue_full"] == 0
        assert emitted(acc) == s["written"] + s["dropped"]["disk_full"]
        assert len(read_jsonl(f"{out}/events.jsonl")) == s["written"]  # whole lines only
        assert err.count("No space left on device") == 1  # one warning per episode
    finally:
        if t is not None and t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(30)
        subprocess.run(["umount", "-l", str(mnt)])


def test_sighup_reopens_files_and_reloads_the_configuration(tmp_path):
    t, out = agent(tmp_path, config="""
        [snapshot]
        enabled = false
    """)
    try:
        cfg = tmp_path / "agent.toml"
        path = f"{out}/events.jsonl"
        workload(tmp_path)
        wait_until(lambda: os.path.getsize(path) > 0, 30, "events written")
        os.rename(path, path + ".moved")
        t.proc.send_signal(signal.SIGHUP)
        assert t.wait_stderr("configuration reloaded", 30), t.stderr
        workload(tmp_path)
        wait_until(lambda: os.path.exists(path) and f"{tmp_path}/agent.crt" in open(path).read(), 30,
                   "a new events.jsonl with new events")
        assert mode(path) == 0o600
        # a changed file name is applied; a restart-only key is named
        cfg.write_text('[snapshot]\nenabled = false\n[events]\nfile = "other.jsonl"\nevent_types = ["lib_load"]\n')
        t.proc.send_signal(signal.SIGHUP)
        assert t.wait_stderr("[events] event_types changed; it takes effect at the next start", 30), t.stderr
        workload(tmp_path)
        wait_until(lambda: os.path.exists(f"{out}/other.jsonl") and os.path.getsize(f"{out}/other.jsonl"), 30,
                   "other.jsonl written")
        # a broken file keeps the running configuration
        cfg.write_text("[events\n")
        t.proc.send_signal(signal.SIGHUP)
        assert t.wait_stderr("invalid TOML", 30), t.stderr
        assert t.proc.poll() is None
        out_, err, rc = t.stop(signal.SIGINT)
        assert rc == 0, err
        acc = final_accounting(err)
        assert acc["reloads"] == 3
        total = sum(len(read_jsonl(p)) for p in (path + ".moved", path, f"{out}/other.jsonl"))
        assert total == acc["sinks"]["events_file"]["written"] == emitted(acc)
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


def bpf_ids(pid: int) -> dict[str, set[int]]:
    """The ids of the BPF programs, links and maps a process holds, from its fdinfo."""
    ids = {"prog": set(), "link": set()}
    for fdinfo in glob.glob(f"/proc/{pid}/fdinfo/*"):
        try:
            text = open(fdinfo).read()
        except OSError:
            continue
        for kind in ids:
            m = re.search(rf"^{kind}_id:\s+(\d+)", text, re.M)
            if m:
                ids[kind].add(int(m.group(1)))
    return ids


def bpf_exists(kind: str, ident: int) -> bool:
    return subprocess.run(["bpftool", kind, "show", "id", str(ident)], capture_output=True).returncode == 0


def prog_type(ident: int) -> str | None:
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(ident)], capture_output=True, text=True)
    return json.loads(r.stdout)["type"] if r.returncode == 0 else None


def test_kill_9_then_restart_leaves_nothing_attached(tmp_path):
    need_tool("bpftool")
    t, out = agent(tmp_path, config="""
        [snapshot]
        enabled = false
    """)
    ids = bpf_ids(t.proc.pid)
    assert len(ids["prog"]) >= 5 and len(ids["link"]) >= 5, ids
    # the handshake classifier's TC programs are held by their filters, not by the process
    tc = {i for i in ids["prog"] if prog_type(i) == "sched_cls"}
    assert tc, ids
    second = run_tracer(["agent", "--output-dir", out, "-d", "1"])
    assert second.returncode == 1 and f"another agent (pid {t.proc.pid}) writes to {out}" in second.stderr
    t.proc.kill()
    t.wait()
    wait_until(lambda: not any(bpf_exists(k, i) for k, s in ids.items() for i in s if i not in tc), 30,
               "the killed agent's programs and links gone")
    assert any(bpf_exists("prog", i) for i in tc)  # left on the interfaces: the next start removes them
    # what a kill in the middle of a rotation or a snapshot leaves
    open(f"{out}/events.jsonl.1", "w").write('{"a":1}\n')
    open(f"{out}/events.jsonl.1.gz.tmp", "w").write("partial")
    os.makedirs(f"{out}/snapshots", exist_ok=True)
    open(f"{out}/snapshots/snapshot-x.json.tmp", "w").write("partial")
    r = run_tracer(["agent", "--output-dir", out, "-d", "1", "--config", str(tmp_path / "agent.toml")])
    assert r.returncode == 0, r.stderr
    assert sorted(n for n in os.listdir(out)) == [".agent.lock", "events.jsonl", "events.jsonl.1.gz", "snapshots"]
    assert os.listdir(f"{out}/snapshots") == []
    assert gzip.open(f"{out}/events.jsonl.1.gz").read() == b'{"a":1}\n'
    assert f"removed what a previous run left behind: {out}/snapshots/snapshot-x.json.tmp" in r.stderr
    assert f"removed the TC handshake classifier left behind by crypto-tracer pid {t.proc.pid}" in r.stderr
    assert not any(bpf_exists("prog", i) for i in tc)


def test_duration_ends_with_exit_0_and_every_probe_detached(tmp_path):
    (tmp_path / "agent.toml").write_text('[snapshot]\nformats = ["json", "cyclonedx"]\n')
    started = time.monotonic()
    r = run_tracer(["agent", "--output-dir", str(tmp_path / "o"), "-d", "2", "-c", str(tmp_path / "agent.toml")])
    assert r.returncode == 0, r.stderr
    assert 2 <= time.monotonic() - started < 20
    acc = final_accounting(r.stderr)
    assert acc["probes_attached"] == 0 and acc["snapshot"]["count"] == 1 and acc["snapshot"]["failed"] == 0
    assert acc["sinks"]["events_file"]["written"] == emitted(acc)
    # one snapshot in both formats, from one scan
    (cdx,) = glob.glob(f"{tmp_path}/o/snapshots/snapshot-*.cdx.json")
    (js,) = [p for p in glob.glob(f"{tmp_path}/o/snapshots/snapshot-*.json") if p != cdx]
    assert cdx.removesuffix(".cdx.json") == js.removesuffix(".json")
    assert mode(cdx) == mode(js) == 0o600
    bom, doc = json.load(open(cdx)), json.load(open(js))
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert doc["summary"]["total_processes"] == len(doc["processes"])
    assert not any(k in f for p in doc["processes"] for f in p["open_crypto_files"]
                   for k in ("certificates", "public_key_sha256"))  # as `snapshot` writes it


def test_a_burst_that_overflows_the_ring_is_counted_and_survived(tmp_path):
    cert, _ = make_cert(tmp_path, "burst", days=2, cert_name="burst.crt", key_name="burst-key.pem")
    port = free_port()
    t, out = agent(tmp_path, "--mapsize", "16K", "--metrics-address", str(port), config="""
        [snapshot]
        enabled = false
    """)
    n = 20000
    try:
        os.kill(t.proc.pid, signal.SIGSTOP)  # the reader stopped while the burst runs: the ring overflows
        p = subprocess.run([sys.executable, "-c", f"import os\nfor _ in range({n}): os.close(os.open({cert!r}, 0))"],
                           timeout=120)
        assert p.returncode == 0
        os.kill(t.proc.pid, signal.SIGCONT)
        assert t.wait_stderr("Ring buffer backpressure detected", 30), t.stderr
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        scraped = float(re.search(r'^crypto_tracer_events_dropped_total\{reason="ring_buffer_full",sink="kernel"\} '
                                  r'(\S+)$', body, re.M).group(1))
        out_, err, rc = t.stop(signal.SIGTERM)
    finally:
        if t.proc.poll() is None:
            os.kill(t.proc.pid, signal.SIGCONT)
            t.proc.kill()
    assert rc == 0, err
    acc = final_accounting(err)
    k = acc["kernel"]
    assert 0 < scraped <= k["dropped"]
    assert k["seen"] == k["kernel_filtered"] + acc["filtered_user"] + acc["output"] + k["dropped"]
    events = read_jsonl(f"{out}/events.jsonl")
    assert len(events) == emitted(acc)
    mine = sum(e["event_type"] == "file_open" and e["file"] == cert for e in events)
    assert 0 < mine < n and mine + k["dropped"] >= n  # what is missing of the burst was counted as dropped
