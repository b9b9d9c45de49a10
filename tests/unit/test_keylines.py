"""A key line whose label the kernel could not read (the page of the library's constant string not
touched yet by the process): the label comes from the process's memory at its address, and a line
whose random or secret could not be read is dropped, never written with guessed bytes."""

import ctypes
import os

from crypto_tracer.keys.extractor import _label_from_memory
from crypto_tracer.probes.common import CT_EV_TLS_KEYLINE, HEADER
from crypto_tracer.probes.tls import (GO_KEYLOG_REC, KEYLINE_DATA_UNREAD, KEYLINE_LABEL_UNREAD,
                                      decode_go_keyline)

LABEL = b"CLIENT_HANDSHAKE_TRAFFIC_SECRET"


def record(unread: int, label_addr: int, label: bytes = b"", pid: int = os.getpid()) -> bytes:
    head = HEADER.pack(1, CT_EV_TLS_KEYLINE, pid, pid, 0, b"python")
    rest = GO_KEYLOG_REC.after("h").pack(0, -1, 0, 0, 0, 0, b"", b"", len(LABEL), 32, 32, unread, label_addr,
                                         label, b"r" * 32, b"s" * 32)
    return head + rest


def test_an_unread_label_is_read_from_the_process():
    text = ctypes.create_string_buffer(LABEL + b"\0")
    rec = decode_go_keyline(record(KEYLINE_LABEL_UNREAD, ctypes.addressof(text)))
    assert rec.label is None and rec.label_addr == ctypes.addressof(text)
    assert _label_from_memory(rec.pid, rec.label_addr, rec.label_len) == LABEL.decode()
    assert _label_from_memory(rec.pid, rec.label_addr, 0) == LABEL.decode()  # BoringSSL: up to the NUL
    junk = ctypes.create_string_buffer(b"\0" * 48)
    assert _label_from_memory(rec.pid, ctypes.addressof(junk), 31) == ""  # not a label: no line


def test_a_line_with_unread_key_bytes_is_dropped():
    rec = decode_go_keyline(record(KEYLINE_DATA_UNREAD, 0, LABEL))
    assert rec.line() is None
    assert decode_go_keyline(record(0, 0, LABEL)).line() == (LABEL.decode(), (b"r" * 32).hex(), (b"s" * 32).hex())


def test_a_line_whose_process_is_gone_is_counted_as_lost():
    import subprocess

    from crypto_tracer.keys.extractor import KeyExtractor

    class Tracer:  # what KeyExtractor registers with
        key_cookie = None

        def on(self, rtype, handler):
            pass

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid's memory cannot be read
    lines = []
    keys = KeyExtractor(Tracer(), lambda got, rec: lines.append(got))
    keys._key_line(record(KEYLINE_LABEL_UNREAD, 0x400000, pid=gone.pid))
    assert lines == [] and keys.unreadable_labels == 1
    text = ctypes.create_string_buffer(LABEL + b"\0")
    keys._key_line(record(KEYLINE_LABEL_UNREAD, ctypes.addressof(text)))  # a live process: read, not lost
    assert lines == [[(LABEL.decode(), (b"r" * 32).hex(), (b"s" * 32).hex())]] and keys.unreadable_labels == 1
