"""profile's aggregation and decoding without eBPF: event dicts in the pipeline/events.py schema, real
/proc data of processes started here, real ELF files."""

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone

from crypto_tracer.host import inventory, proc
from crypto_tracer.host import discovery
from crypto_tracer.pipeline.profile import ProcessProfile, tls_summary
from crypto_tracer.sinks.profile_summary import render_summary
from crypto_tracer.probes import api
from crypto_tracer.pipeline.redact import Redactor
from tests.harness import wait_exec

TS1, TS2 = "2026-01-01T00:00:01.000000Z", "2026-01-01T00:00:02.000000Z"


def event(kind, **fields):
    base = {"event_type": kind, "timestamp": TS1, "pid": 42, "ppid": 1, "uid": 0, "process": "srv", "exe": "/x"}
    return {**base, **fields}


def test_files_libraries_and_exit_are_aggregated():
    prof = ProcessProfile(42, None, started_before=True)
    prof.add_mapped_libraries([{"path": "/usr/lib/libcrypto.so.3", "name": "libcrypto", "version": "3.0.19"}],
                              TS1, at_start=True)
    for ts, flags, result in ((TS1, "O_RDONLY", 3), (TS2, "O_RDONLY|O_CLOEXEC", -2), (TS2, "O_RDONLY", 4)):
        prof.add_event(event("file_open", timestamp=ts, file="/root/k.key", file_type="private_key", flags=flags,
                             result=result))
    prof.add_event(event("lib_load", library="/usr/lib/libssl.so.3", library_name="libssl", version="3.0.19"))
    prof.add_event(event("lib_load", library="/usr/lib/libssl.so.3", library_name="libssl", version="3.0.19"))
    prof.add_event(event("process_exit", timestamp=TS2, exit_code=3, signal=None))
    calls = [{"function_name": "SSL_do_handshake", "library": "libssl", "category": "handshake", "algorithm": None,
              "count": 2},
             {"function_name": "SSL_write", "library": "libssl", "category": "tls_write", "algorithm": None,
              "count": 4, "bytes": 100}]
    doc = Redactor().entry(prof.document(calls, ended_early=False), "libraries", "files_accessed")
    assert doc["files_accessed"] == [{"path": "/home/ROOT/k.key", "type": "private_key", "access_count": 3,
                                      "failed_count": 1, "first_access": TS1, "last_access": TS2,
                                      "flags": ["O_RDONLY", "O_RDONLY|O_CLOEXEC"]}]
    assert [(lib["name"], lib["mapped_before_profile"]) for lib in doc["libraries"]] == \
        [("libcrypto", True), ("libssl", False)]
    assert doc["exit"] == {"time": TS2, "exit_code": 3, "signal": None} and doc["partial"] is True
    assert doc["tls"]["handshakes"] == 2 and doc["tls"]["bytes_written"] == 100 and doc["tls"]["write_calls"] == 4
    assert doc["statistics"] == {"total_events": 6, "execs": 0, "libraries_loaded": 2, "files_accessed": 1,
                                 "file_opens": 3, "api_calls_made": 6, "api_functions": 2}
    text = render_summary({"generated_at": TS1, "duration_seconds": 1.0, "partial": True, "processes": [doc]})
    assert "Crypto Profile Summary" in text and "/home/ROOT/k.key x3" in text and "2  SSL_do_handshake" in text


def test_no_activity_gives_empty_lists():
    doc = ProcessProfile(7, None, started_before=True).document([], ended_early=False)
    assert doc["libraries"] == doc["files_accessed"] == doc["api_calls"] == doc["tls"]["peers"] == []
    assert doc["partial"] is False and doc["statistics"]["total_events"] == 0


def test_sockets_become_peers_and_listeners():
    prof = ProcessProfile(1, None, started_before=False)
    est = {"local_addr": "127.0.0.1", "local_port": 5000, "remote_addr": "10.0.0.9", "remote_port": 443,
           "state": "ESTABLISHED"}
    prof.add_sockets([est, {"local_addr": "0.0.0.0", "local_port": 8443, "remote_addr": "0.0.0.0",
                            "remote_port": 0, "state": "LISTEN"}], TS1)
    prof.add_sockets([dict(est, state="CLOSE_WAIT")], TS2)
    assert list(prof.peers.values()) == [{"remote_addr": "10.0.0.9", "remote_port": 443, "local_addr": "127.0.0.1",
                                          "local_port": 5000, "first_seen": TS1, "last_seen": TS2,
                                          "state": "CLOSE_WAIT"}]
    assert list(prof.listening.values()) == [{"local_addr": "0.0.0.0", "local_port": 8443, "first_seen": TS1}]


def test_tls_summary_sums_categories():
    calls = [{"category": "tls_read", "count": 3, "bytes": 30}, {"category": "tls_read", "count": 1, "bytes": 5},
             {"category": "session", "count": 2}, {"category": "digest", "count": 9}]
    assert tls_summary(calls) == {"handshakes": 0, "sessions_created": 2, "contexts_created": 0, "read_calls": 4,
                                  "bytes_read": 35, "write_calls": 0, "bytes_written": 0}


def key(tgid, name, kind=api.NONE, arg=b""):
    fid = next(f.id for f in api.FUNCTIONS if f.name == name)
    return api.KEY.pack(tgid, fid, kind, arg.ljust(32, b"\0"))


def test_aggregate_decodes_merges_and_unnests():
    nid_sha256 = struct.pack("<i", 672)
    nid_aes = struct.pack("<i", 423)  # aes-192-cbc
    items = [
        (key(5, "EVP_DigestInit_ex", api.NID, nid_sha256), api.VAL.pack(10, 0)),
        (key(5, "EVP_MD_fetch", api.STR, b"sha256"), api.VAL.pack(1, 0)),
        (key(5, "EVP_MD_fetch", api.STR, b"SHA2-256"), api.VAL.pack(2, 0)),
        (key(5, "EVP_EncryptInit_ex", api.NID, nid_aes), api.VAL.pack(4, 0)),
        (key(5, "EVP_CipherInit_ex", api.NID, nid_aes), api.VAL.pack(4, 0)),  # the nested call
        (key(5, "EVP_CipherInit_ex", api.NID, struct.pack("<i", 0)), api.VAL.pack(6, 0)),
        (key(6, "RAND_bytes_ex", api.NONE), api.VAL.pack(3, 96)),
    ]
    out = api.aggregate(items)
    five = {(c["function_name"], c["algorithm"]): c["count"] for c in out[5]}
    assert five == {("EVP_DigestInit_ex", "SHA256"): 10, ("EVP_MD_fetch", "SHA256"): 3,
                    ("EVP_EncryptInit_ex", "AES-192-CBC"): 4, ("EVP_CipherInit_ex", None): 6}
    assert out[5][0]["function_name"] == "EVP_DigestInit_ex"  # most frequent first
    assert out[6] == [{"function_name": "RAND_bytes_ex", "library": "libcrypto", "category": "random",
                       "algorithm": None, "count": 3, "bytes": 96}]


def test_function_table_and_cookies():
    ids = [f.id for f in api.FUNCTIONS]
    assert len(ids) == len(set(ids)) and max(ids) < 1 << 16
    f = next(f for f in api.FUNCTIONS if f.name == "EVP_DigestSignInit_ex")
    c = api.cookie(f)
    assert c & 0xFFFF == f.id and (c >> 16) & 0xFF == api.STR and c >> 24 == 3
    assert api.nid_name(672) == "SHA256" and api.nid_name(901).lower() == "aes-256-gcm"


def test_symbol_offsets_match_nm():
    lib = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    offsets = discovery.function_offsets(lib, ["SSL_write", "SSL_read", "SSL_do_handshake", "no_such_fn"])
    assert set(offsets) == {"SSL_write", "SSL_read", "SSL_do_handshake"}
    if shutil.which("nm"):
        nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True).stdout
        for name, off in offsets.items():
            m = re.search(rf"^([0-9a-f]+) T {name}@@", nm, re.M)
            assert int(m.group(1), 16) == off  # .text of libssl: vaddr == file offset


def test_process_info_from_proc():
    child = subprocess.Popen(["sleep", "5"])
    try:
        wait_exec(child.pid, "sleep")  # its /proc entries are sleep's, not still the fork's
        info = inventory.process_info(child.pid)
        assert info["pid"] == child.pid and info["ppid"] == os.getpid() and info["name"] == "sleep"
        assert info["cmdline"] == "sleep 5" and info["uid"] == os.getuid() and info["gid"] == os.getgid()
        started = datetime.strptime(info["start_time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert abs(started.timestamp() - time.time()) < 2
    finally:
        child.kill()
        child.wait()
    assert inventory.process_info(child.pid) is None


def test_read_bytes_reads_proc_files_past_one_page():
    # A sleeping child's maps hold still (this process's change as the test allocates);
    # importing ssl makes them longer than a page.
    child = subprocess.Popen([sys.executable, "-c", "import ssl, sys; print(flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        data = proc.read_bytes(f"/proc/{child.pid}/maps")
        assert len(data) > 4096 and data == open(f"/proc/{child.pid}/maps", "rb").read()
    finally:
        child.kill()
        child.wait()


def test_pids_named_is_case_insensitive():
    comm = open("/proc/self/comm").read().strip()
    assert os.getpid() in inventory.pids_named(comm.upper())
    assert os.getpid() not in inventory.pids_named(comm.upper(), exclude=os.getpid())


def test_decode_peer():
    v4 = bytes([10, 0, 0, 9]) + bytes(12)
    assert api.decode_peer(1, 2, 443, v4) == {"role": "client", "remote_addr": "10.0.0.9", "remote_port": 443}
    mapped = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    assert api.decode_peer(2, 10, 8443, mapped) == {"role": "server", "remote_addr": "127.0.0.1", "local_port": 8443}
    assert api.decode_peer(1, 1, 0, bytes(16)) is None
