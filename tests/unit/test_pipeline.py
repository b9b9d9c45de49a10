import json
import os

import pytest

from crypto_tracer.pipeline.enrich import decode_exit, decode_open_flags
from crypto_tracer.pipeline.filters.events import EventFilter
from crypto_tracer.probes.common import path_from_parts
from crypto_tracer.pipeline.redact import Redactor, redact, redact_event, redact_text
from crypto_tracer.sinks.json import make_json_sink
from crypto_tracer.sinks.output import Output
from crypto_tracer.sinks.summary import SummarySink


@pytest.mark.parametrize("flags,text", [
    (0, "O_RDONLY"),
    (0o2000000, "O_RDONLY|O_CLOEXEC"),
    (0o1 | 0o100 | 0o1000, "O_WRONLY|O_CREAT|O_TRUNC"),
    (0o2 | 0o2000, "O_RDWR|O_APPEND"),
    (0o4010000, "O_RDONLY|O_SYNC"),
    (0o10000, "O_RDONLY|O_DSYNC"),
    (0o100000 | 0o200000, "O_RDONLY|O_LARGEFILE|O_DIRECTORY"),
])
def test_open_flags(flags, text):
    assert decode_open_flags(flags) == text


@pytest.mark.parametrize("raw,decoded", [
    (0, (0, None)),
    (3 << 8, (3, None)),
    (255 << 8, (255, None)),
    (9, (None, "SIGKILL")),
    (15, (None, "SIGTERM")),
    (11 | 0x80, (None, "SIGSEGV")),  # core dumped
])
def test_exit_status(raw, decoded):
    assert decode_exit(raw) == decoded


def test_path_from_parts_reverses_leaf_first_components():
    assert path_from_parts(b"server.crt\0certs\0ssl\0etc\0") == "/etc/ssl/certs/server.crt"
    assert path_from_parts(b"") == "/"


@pytest.mark.parametrize("path,out", [
    ("/home/alice/documents/cert.pem", "/home/USER/documents/cert.pem"),
    ("/home/alice", "/home/USER"),
    ("/root/.ssh/id_rsa", "/home/ROOT/.ssh/id_rsa"),
    ("/root", "/home/ROOT"),
    ("/etc/ssl/certs/ca.crt", "/etc/ssl/certs/ca.crt"),
    ("/tmp/temp-cert.pem", "/tmp/temp-cert.pem"),
    ("/homestead/user/file.pem", "/homestead/user/file.pem"),
    ("/rooted/file.pem", "/rooted/file.pem"),
    ("./cert.pem", "./cert.pem"),
    ("home/alice/cert.pem", "home/alice/cert.pem"),
    ("", ""),
    (None, None),
])
def test_redact(path, out):
    assert redact(path) == out


def test_redact_cmdline_and_event():
    assert redact_text("openssl s_client -connect example.com:443") == "openssl s_client -connect example.com:443"
    assert redact_text("cat /home/bob/k.pem /root/x") == "cat /home/USER/k.pem /home/ROOT/x"
    ev = {"exe": "/root/bin/x", "file": "/home/a/b.key", "library": "/usr/lib/libssl.so.3", "cmdline": "x /root/a"}
    assert redact_event(ev) == {"exe": "/home/ROOT/bin/x", "file": "/home/USER/b.key",
                                "library": "/usr/lib/libssl.so.3", "cmdline": "x /home/ROOT/a"}


FILE_EV = {"event_type": "file_open", "file": "/etc/ssl/x.pem", "pid": 1}
LIB_EV = {"event_type": "lib_load", "library": "/usr/lib/libssl.so.3", "library_name": "libssl", "pid": 1}
EXEC_EV = {"event_type": "process_exec", "pid": 1}


def test_file_glob_star_crosses_slashes():
    f = EventFilter(file_globs=["*.pem"])
    assert f(FILE_EV) and not f(LIB_EV) and not f(EXEC_EV)
    assert EventFilter(file_globs=["/etc/ssl/*"])(FILE_EV)
    assert not EventFilter(file_globs=["/var/*"])(FILE_EV)
    assert not EventFilter(file_globs=["*.crt"])(FILE_EV)
    assert EventFilter(file_globs=["*.crt", "*.pem"])(FILE_EV)  # repeatable: any matches


def test_file_glob_matches_real_and_redacted_paths():
    ev = {"event_type": "file_open", "file": "/root/k.key"}
    assert EventFilter(file_globs=["/root/*"])(ev)
    assert EventFilter(file_globs=["/home/ROOT/*"])(ev)


def test_library_filter_is_case_insensitive_substring():
    assert EventFilter(libraries=["SsL"])(LIB_EV)
    assert EventFilter(libraries=["libssl"])(LIB_EV)
    assert not EventFilter(libraries=["gnutls"])(LIB_EV)
    assert not EventFilter(libraries=["ssl"])(FILE_EV)  # no library field: filtered out
    assert EventFilter()(FILE_EV) and not EventFilter().active


def _write(tmp_path, fmt, events):
    path = tmp_path / "out"
    sink = make_json_sink(fmt, Output(str(path)))
    sink.write_many(events[:1])
    for e in events[1:]:
        sink.write(e)
    sink.close()
    return path


EVENTS = [{"event_type": "file_open", "pid": i, "file": f"/x/{i}.pem"} for i in range(3)]


def test_json_stream_is_json_lines(tmp_path):
    lines = _write(tmp_path, "json-stream", EVENTS).read_text().splitlines()
    assert [json.loads(line) for line in lines] == EVENTS


@pytest.mark.parametrize("fmt", ["json-array", "json-pretty"])
def test_arrays_are_one_document(tmp_path, fmt):
    path = _write(tmp_path, fmt, EVENTS)
    assert json.loads(path.read_text()) == EVENTS
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("fmt", ["json-array", "json-pretty"])
def test_empty_arrays_are_valid(tmp_path, fmt):
    assert json.loads(_write(tmp_path, fmt, []).read_text()) == []


def test_summary_digest(tmp_path):
    path = tmp_path / "s"
    s = SummarySink(Output(str(path)))
    s.write({"event_type": "file_open", "pid": 7, "process": "nginx", "file": "/etc/ssl/a.crt",
             "file_type": "certificate", "result": 3})
    s.write({"event_type": "file_open", "pid": 7, "process": "nginx", "file": "/etc/ssl/a.crt",
             "file_type": "certificate", "result": -2})
    s.write({"event_type": "lib_load", "pid": 7, "process": "nginx", "library": "/usr/lib/libssl.so.3",
             "version": "3.0.19"})
    s.close()
    text = path.read_text()
    assert "Total events: 3" in text and "file_open: 2" in text and "lib_load: 1" in text
    assert "PID 7: nginx (3 events)" in text
    assert "/etc/ssl/a.crt [certificate] (2 opens)" in text and "1 failed opens" in text
    assert "/usr/lib/libssl.so.3 3.0.19 (1 loads)" in text


def test_output_failure_keeps_file_valid(tmp_path, monkeypatch):
    """A write error truncates to the last whole record; the array still closes."""
    import os as os_mod

    from crypto_tracer.errors import TracerError
    from crypto_tracer.sinks import output as output_mod

    path = tmp_path / "out"
    out = Output(str(path))
    sink = make_json_sink("json-array", out)
    sink.write(EVENTS[0])
    sink.flush()
    real_write = os_mod.write

    def half_then_full(fd, data):
        if fd == out._fd and len(data) > 2:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(output_mod.os, "write", half_then_full)
    with pytest.raises(TracerError, match="No space left"):
        sink.write(EVENTS[1])
        sink.flush()
    monkeypatch.setattr(output_mod.os, "write", real_write)
    sink.close()
    assert json.loads(path.read_text()) == EVENTS[:1]


def test_output_to_a_device_keeps_its_mode():
    before = os.stat("/dev/null").st_mode
    out = Output("/dev/null")
    out.write(b"x\n")
    out.close()
    assert os.stat("/dev/null").st_mode == before


def test_output_tightens_an_existing_regular_file(tmp_path):
    path = tmp_path / "old.json"
    path.write_text("old")
    path.chmod(0o644)
    Output(str(path)).close()
    assert (path.stat().st_mode & 0o777) == 0o600 and path.read_text() == ""


def test_event_types_build_by_name_in_schema_order():
    from crypto_tracer.pipeline import events

    ev = events.FILE_OPEN.build(file="/etc/ssl/x.pem", pid=7, result=3)
    assert list(ev) == list(events.FILE_OPEN.fields) == list(events.COMMON_FIELDS) + [
        "root", "mnt_ns", "file", "file_type", "flags", "result"]
    assert (ev["event_type"], ev["pid"], ev["file"], ev["result"], ev["exe"]) == ("file_open", 7, "/etc/ssl/x.pem",
                                                                                  3, None)
    with pytest.raises(TypeError):
        events.LIB_LOAD.build(file="/etc/ssl/x.pem")  # not a field of lib_load
    assert set(events.EVENT_TYPES) == {"process_exec", "process_exit", "file_open", "lib_load", "api_call",
                                       "tls_handshake", "tls_data"}


def test_redactor_is_one_stage_for_events_and_documents():
    ev = {"exe": "/root/x", "cmdline": "x /home/bob/k.pem"}
    assert Redactor(False).event(dict(ev)) == ev
    assert Redactor().event(dict(ev)) == {"exe": "/home/ROOT/x", "cmdline": "x /home/USER/k.pem"}
    proc = {"exe": "/root/x", "root": "/", "cmdline": None, "libraries": [{"path": "/home/a/lib.so", "name": "x"}],
            "files": [{"path": "/root/k.pem", "type": "private_key"}]}
    assert Redactor().entry(proc, "libraries", "files") == {
        "exe": "/home/ROOT/x", "root": "/", "cmdline": None, "libraries": [{"path": "/home/USER/lib.so", "name": "x"}],
        "files": [{"path": "/home/ROOT/k.pem", "type": "private_key"}]}
