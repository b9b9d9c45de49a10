"""keys/pending.py: secrets read from process memory (this process's, through process_vm_readv)."""

import ctypes
import os
import struct

from crypto_tracer.keys import tls_keys
from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.pending import POLL_S, PendingObjects, reader
from crypto_tracer.probes.common import CT_EV_TLS_OBJECT, HEADER

# a made-up object: client_random at 0, version at 32, master key at 40 (in the object: session -1),
# the cipher pointer at 88, the TLS 1.3 secrets from 96 (unused by TLS 1.2)
LAYOUT = Layout(version="test", client_random=(-1, 0), tls_version=32, session=-1, master_key=40, cipher=88,
                cipher_id=0, hs_a=96, hs_b=160, client_app=224, server_app=288, exporter=352,
                cipher_in_session=False)


def _object():
    obj = ctypes.create_string_buffer(416)
    cipher = ctypes.create_string_buffer(struct.pack("<I", 0x0300C02B))
    obj.raw = bytes(416)
    return obj, cipher


def _record(ssl: int, event: int) -> bytes:
    header = HEADER.pack(0, CT_EV_TLS_OBJECT, os.getpid(), os.getpid(), 0, b"test")
    return header + tls_keys.OBJ_REC.after("h").pack(ssl, 1, event)


def test_reader_reads_this_process_and_says_nothing_for_unmapped_memory():
    buf = ctypes.create_string_buffer(b"abcdefgh")
    read = reader(os.getpid())
    assert read(ctypes.addressof(buf), 8) == b"abcdefgh"
    assert read(8, 8) == b""


def test_complete_secrets_are_given_once_two_reads_agree():
    obj, cipher = _object()
    ssl = ctypes.addressof(obj)
    got = []
    pending = PendingObjects({1: LAYOUT}, lambda pid, s, m: got.append((pid, s, m)))
    pending.record(_record(ssl, tls_keys.CT_OBJ_NEW))
    t = 1000.0
    pending.poll(t)  # nothing yet: no ClientHello
    assert not got and pending.watch
    ctypes.memmove(ssl, b"\x11" * 32, 32)
    ctypes.memmove(ssl + 32, struct.pack("<i", 0x0303), 4)
    ctypes.memmove(ssl + 88, struct.pack("<Q", ctypes.addressof(cipher)), 8)
    pending.poll(t + POLL_S)  # the master key is still zero: incomplete
    ctypes.memmove(ssl + 40, b"\x22" * 48, 48)
    pending.poll(t + 2 * POLL_S)  # complete, but a first read only
    assert not got
    pending.poll(t + 3 * POLL_S)
    assert len(got) == 1 and got[0][:2] == (os.getpid(), ssl)
    assert got[0][2].lines() == [("CLIENT_RANDOM", "11" * 32, "22" * 48)]
    assert not pending.watch
    pending.poll(t + 4 * POLL_S)
    assert len(got) == 1


def test_a_read_that_changes_is_not_written_until_it_is_stable():
    obj, cipher = _object()
    ssl = ctypes.addressof(obj)
    got = []
    pending = PendingObjects({1: LAYOUT}, lambda pid, s, m: got.append(m))
    pending.record(_record(ssl, tls_keys.CT_OBJ_NEW))
    ctypes.memmove(ssl, b"\x11" * 32, 32)
    ctypes.memmove(ssl + 32, struct.pack("<i", 0x0303), 4)
    ctypes.memmove(ssl + 88, struct.pack("<Q", ctypes.addressof(cipher)), 8)
    ctypes.memmove(ssl + 40, b"\x33" * 48, 48)  # e.g. an offered session's master key
    pending.poll(10.0)
    ctypes.memmove(ssl + 40, b"\x44" * 48, 48)  # the real one
    pending.poll(10.0 + POLL_S)
    assert not got
    pending.poll(10.0 + 2 * POLL_S)
    assert [m.master_key for m in got] == [b"\x44" * 48]


def test_free_ends_the_watch_and_counts_unfinished_handshakes():
    pending = PendingObjects({1: LAYOUT}, lambda *a: None)
    pending.record(_record(0x1000, tls_keys.CT_OBJ_NEW))
    pending.record(_record(0x2000, tls_keys.CT_OBJ_NEW))
    pending.record(_record(0x1000, tls_keys.CT_OBJ_FREE))
    pending.record(_record(0x2000, tls_keys.CT_OBJ_FREE_INCOMPLETE))
    assert not pending.watch and pending.freed_incomplete == 1
