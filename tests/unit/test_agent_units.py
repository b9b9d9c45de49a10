"""The agent's parts that need no kernel: configuration, rotation, the bounded queue, the metrics."""

from __future__ import annotations

import gzip
import os
import re
import stat
import threading

import pytest

from crypto_tracer import config
from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.sinks.queued import QueuedSink
from crypto_tracer.sinks.rotating import RotatingFile

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "agent.toml")


# --- configuration ----------------------------------------------------------------------------

def test_example_config_is_the_defaults_and_documents_every_key():
    assert config.load(EXAMPLE) == config.defaults()
    text = open(EXAMPLE).read()
    sections = re.findall(r"^\[(\w+)\]$", text, re.M)
    assert sections == list(config.SCHEMA)
    keys = re.findall(r"^(\w+) = ", text, re.M)
    assert keys == [k for sec in config.SCHEMA.values() for k in sec]
    # every key has a comment line right above it (or shares the previous key's)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+ = ", line):
            assert lines[i - 1].startswith("#") or re.match(r"^\w+ = ", lines[i - 1]), line


def write(tmp_path, text):
    p = tmp_path / "a.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, message", [
    ("[agnt]\n", "unknown section [agnt]"),
    ("[events]\nmax_size = 3\n", "unknown key 'max_size' in [events]"),
    ("[events]\nmax_backups = \"5\"\n", "[events] max_backups = '5': expected int"),
    ("[events]\ncompress = 1\n", "[events] compress = 1: expected bool"),
    ("[agent]\nring_buffer_size = 5000\n", "ring_buffer_size = 5000: must be a power of two"),
    ("[events]\nevent_types = [\"tls_data\"]\n", "event_types: ['tls_data']"),
    ("[metrics]\naddress = \"localhost:http\"\n", "metrics address 'localhost:http'"),
    ("[otlp]\nprotocol = \"udp\"\n", "protocol = 'udp'"),
    ("[agent\n", "invalid TOML"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TracerError) as exc:
        config.load(path)
    assert exc.value.status == ExitStatus.BAD_ARGS
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, '[agent]\noutput_dir = "/srv/ct"\nduration = 5\n[metrics]\naddress = "9100"\n')

    class Opts:
        output_dir, duration, otlp_endpoint, metrics_address, no_redact, mapsize = "rel", 0, "http://c:4318", \
            None, True, 1 << 16
    cfg = config.apply_flags(config.load(path), Opts)
    assert cfg["agent"] == {"output_dir": os.path.abspath("rel"), "duration": 0, "redact": False,
                            "ring_buffer_size": 1 << 16, "queue_size": 8192}
    assert cfg["otlp"]["endpoint"] == "http://c:4318"
    assert config.parse_address(cfg["metrics"]["address"]) == ("127.0.0.1", 9100)
    assert config.parse_address("[::1]:9") == ("::1", 9)
    assert config.parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)


def test_restart_needed_names_the_keys_a_reload_cannot_apply():
    old, new = config.defaults(), config.defaults()
    new["events"]["max_backups"] = 1
    new["events"]["event_types"] = ["lib_load"]
    new["metrics"]["address"] = "9"
    assert config.restart_needed(old, new) == ["[events] event_types", "[metrics] address"]


# --- rotation -----------------------------------------------------------------------------------

def lines(n, start=0, width=100):
    return [(f'{{"n":{i:06d},"pad":"' + "x" * (width - 22) + '"}\n').encode() for i in range(start, start + n)]


def test_rotation_size_backups_compression_and_modes(tmp_path):
    path = str(tmp_path / "events.jsonl")
    f = RotatingFile(path, max_bytes=1000, max_backups=3, compress=True)
    for i in range(0, 100, 7):  # batches that do not divide the file size
        f.write_lines(lines(min(7, 100 - i), i))
    f.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["events.jsonl", "events.jsonl.1.gz", "events.jsonl.2.gz", "events.jsonl.3.gz"]
    for name in names:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    # every file is whole lines, at most 1000 bytes (10 lines of 100), newest in the plain file
    current = open(path, "rb").read()
    backups = [gzip.decompress(open(tmp_path / f"events.jsonl.{i}.gz", "rb").read()) for i in (3, 2, 1)]
    assert [len(b) for b in backups] == [1000, 1000, 1000]
    assert b"".join(backups + [current]) == b"".join(lines(100))[-len(b"".join(backups + [current])):]
    assert current == b"".join(lines(100)[90:])
    assert f.written == 100 and f.dropped == {} and f.rotations == 9


def test_rotation_without_compression_or_backups(tmp_path):
    path = str(tmp_path / "e")
    f = RotatingFile(path, 500, 1, compress=False)
    f.write_lines(lines(12))
    assert sorted(os.listdir(tmp_path)) == ["e", "e.1"]
    assert open(path, "rb").read() == b"".join(lines(12)[10:])
    assert open(path + ".1", "rb").read() == b"".join(lines(12)[5:10])
    f.close()
    g = RotatingFile(str(tmp_path / "g"), 500, 0, compress=True)
    g.write_lines(lines(12))
    assert sorted(os.listdir(tmp_path)) == ["e", "e.1", "g"]
    g.close()


def test_recover_finishes_what_a_killed_rotation_left(tmp_path):
    path = str(tmp_path / "events.jsonl")
    open(path + ".1", "wb").write(b'{"a":1}\n')
    open(path + ".1.gz.tmp", "wb").write(b"partial")
    f = RotatingFile(path, 1000, 2, True)
    f.close()
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "events.jsonl.1.gz"]
    assert gzip.decompress(open(path + ".1.gz", "rb").read()) == b'{"a":1}\n'


def test_reopen_after_the_file_was_moved(tmp_path):
    path = str(tmp_path / "events.jsonl")
    f = RotatingFile(path, 1 << 20, 2, True)
    f.write_lines(lines(2))
    os.rename(path, path + ".moved")
    f.write_lines(lines(1, 2))  # still the moved file
    f.reopen()
    f.write_lines(lines(1, 3))
    f.close()
    assert open(path + ".moved", "rb").read() == b"".join(lines(3))
    assert open(path, "rb").read() == b"".join(lines(1, 3))


# --- the bounded queue -----------------------------------------------------------------------

def test_a_full_queue_drops_and_counts_never_blocks():
    gate = threading.Event()
    got = []

    def slow(events):
        gate.wait(30)
        got.extend(events)
    q = QueuedSink("t", slow, capacity=10)
    q.write_many(list(range(4)))  # the writer takes it and blocks in slow()
    assert q.flush(0.0) is False
    q.write_many(list(range(4, 12)))
    q.write_many(list(range(12, 20)))
    s = q.stats()
    assert s["dropped"]["queue_full"] + s["queued"] == 20 and s["queued"] == 10
    gate.set()
    assert q.flush(30)
    q.close()
    assert got == list(range(10)) and q.stats()["dropped"] == {"queue_full": 10} and q.stats()["queued"] == 0


def test_metrics_families_expose_the_accounting():
    from prometheus_client import CollectorRegistry, generate_latest

    from crypto_tracer.sinks.metrics import families

    acc = {"kernel": {"seen": 10, "kernel_filtered": 3, "dropped": 1, "submitted": 6}, "received": 6,
           "filtered_user": 2, "output": 4, "events_by_type": {"lib_load": 3, "file_open": 1},
           "sinks": {"events_file": {"written": 3, "dropped": {"queue_full": 0, "disk_full": 1}, "queued": 0,
                                     "capacity": 8}},
           "handshakes": {"active": True, "events": 3, "packets_seen": 9, "packets_dropped": 1, "attached": 6,
                          "process_records_dropped": 4,
                          "by_kind": [{"tls_version": "TLSv1.2", "post_quantum": "false", "count": 1},
                                      {"tls_version": "TLSv1.3", "post_quantum": "true", "count": 2}]},
           "ring_buffer": {"fill": 0.25, "size": 4096}, "probes_attached": 9, "libraries_hooked": 0,
           "libraries_seen": 2, "snapshot": {"count": 1, "failed": 0, "last_time": 1700000000.5, "duration": 0.1,
                                             "processes": 5, "libraries": 2, "files": 1}, "reloads": 2}

    class C:
        def collect(self):
            return families(acc)
    reg = CollectorRegistry()
    reg.register(C())
    text = generate_latest(reg).decode()
    for line in ('crypto_tracer_events_total{event_type="lib_load"} 3.0',
                 'crypto_tracer_events_dropped_total{reason="ring_buffer_full",sink="kernel"} 1.0',
                 'crypto_tracer_events_dropped_total{reason="disk_full",sink="events_file"} 1.0',
                 'crypto_tracer_events_filtered_total{where="user"} 2.0',
                 'crypto_tracer_events_dropped_total{reason="ring_buffer_full",sink="kernel_handshakes"} 1.0',
                 'crypto_tracer_tls_handshakes_total{post_quantum="true",tls_version="TLSv1.3"} 2.0',
                 'crypto_tracer_tls_handshakes_total{post_quantum="false",tls_version="TLSv1.2"} 1.0',
                 "crypto_tracer_process_records_dropped_total 4.0",
                 "crypto_tracer_ring_buffer_fill_ratio 0.25", "crypto_tracer_config_reloads_total 2.0",
                 'crypto_tracer_snapshot_items{kind="processes"} 5.0',
                 "crypto_tracer_last_snapshot_timestamp_seconds 1.7000000005e+09"):
        assert line in text.splitlines(), line


def _acc(seen: int) -> dict:
    return {"kernel": {"seen": seen, "kernel_filtered": seen, "dropped": 0, "submitted": 0}, "received": 0,
            "filtered_user": 0, "output": 0, "events_by_type": {}, "sinks": {}, "ring_buffer": {"fill": 0.0, "size": 4096},
            "handshakes": {"active": False, "events": 0, "by_kind": [], "packets_seen": 0, "packets_dropped": 0,
                           "process_records_dropped": 0, "attached": 0},
            "probes_attached": 0, "libraries_hooked": 0, "libraries_seen": 0,
            "snapshot": {"count": 0, "failed": 0, "last_time": None, "duration": 0.0, "processes": 0, "libraries": 0,
                         "files": 0}, "reloads": 0}


def test_metrics_server_serves_the_final_accounting_and_knows_when_it_was_collected():
    """Live figures at each scrape; after final(acc) exactly acc (the source, i.e. the probes being closed, is
    not read again); final_scraped only once a complete reply of acc was followed by another scrape; after
    close() nothing reads the source."""
    import re
    import urllib.request

    from crypto_tracer.sinks.metrics import MetricsServer

    reads = []

    def source():
        reads.append(1)
        return _acc(len(reads))

    server = MetricsServer("127.0.0.1", 0, source)

    def scrape() -> int:
        req = urllib.request.Request(f"http://{server.address}/metrics",
                                     headers={"X-Prometheus-Scrape-Timeout-Seconds": "10"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        return int(float(re.search(r'^crypto_tracer_events_filtered_total\{where="kernel"\} (\S+)$', body, re.M)[1]))

    try:
        assert [scrape(), scrape()] == [1, 2]  # read at each scrape
        server.final(_acc(756))
        assert scrape() == 756 and not server.final_scraped.is_set()  # written; not yet known to be read
        assert scrape() == 756 and server.final_scraped.is_set()  # the scraper came back: the reply was read
        assert len(reads) == 2
    finally:
        server.close()
    assert list(server.collect()) == [] and len(reads) == 2


def test_metrics_server_close_waits_for_a_scrape_reading_the_accounting():
    """The agent closes its BPF objects right after close(): a scrape still reading them would read closed
    maps (the flaky CI run scraped 0 for a counter that was 756). close() waits for it."""
    import urllib.request

    from crypto_tracer.sinks.metrics import MetricsServer

    inside, release, done = threading.Event(), threading.Event(), []

    def source():
        inside.set()
        release.wait(10)
        done.append(1)
        return _acc(1)

    server = MetricsServer("127.0.0.1", 0, source)
    scraper = threading.Thread(target=lambda: urllib.request.urlopen(f"http://{server.address}/metrics",
                                                                     timeout=10).read(), daemon=True)
    scraper.start()
    assert inside.wait(10)
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and not done  # still waiting for the scrape
    release.set()
    closer.join(10)
    assert not closer.is_alive() and done == [1]
    scraper.join(10)


def test_otlp_endpoint_without_the_otlp_module_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    from crypto_tracer.cli import main

    monkeypatch.setitem(sys.modules, "crypto_tracer.sinks.otlp", None)  # a build without it

    rc = main(["agent", "--output-dir", str(tmp_path), "--otlp-endpoint", "http://127.0.0.1:4318"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("crypto-tracer: error: OTLP export is not part of this build"), err
    assert os.listdir(tmp_path) == []  # refused before anything started


def test_bad_config_file_exits_2_before_privileges(tmp_path, capsys):
    from crypto_tracer.cli import main

    path = write(tmp_path, "[events]\nmax_backups = -1\n")
    assert main(["agent", "--config", path]) == 2
    assert capsys.readouterr().err == (f"crypto-tracer: error: {path}: [events] max_backups must not be negative\n"
                                       f"  -> see the commented example /etc/crypto-tracer/agent.toml "
                                       f"(packaging/agent.toml)\n")
