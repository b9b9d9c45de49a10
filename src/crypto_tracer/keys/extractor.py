"""Session secrets from a running TlsTracer: learn each hooked OpenSSL's layout, give it to
the BPF side, and turn CT_EV_TLS_KEYS records into key log lines.

Each hooked library file gets a layout slot, carried in the cookie of its uprobes
(TlsTracer.key_cookie); libraries with the same layout share a slot. A library whose
layout is unknown gets slot 0, where nothing is read: no keys rather than wrong keys,
and a message saying so.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Callable

from crypto_tracer.keys import tls_keys
from crypto_tracer.keys.calibrate import bssl_hook_for, layout_for
from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.pending import PendingObjects, reader
from crypto_tracer.log import log
from crypto_tracer.probes.common import CT_EV_TLS_KEYLINE, CT_EV_TLS_OBJECT

_IGNORED = ("verified", "source", "version")
FIRST_SLOT = 1


def _same(a: Layout, b: Layout) -> bool:
    ja, jb = a.to_json(), b.to_json()
    return all(ja[k] == jb[k] for k in ja if k not in _IGNORED)


class KeyExtractor:
    """Feeds `on_lines(lines, record)` with each new session's key log lines."""

    def __init__(self, tracer, on_lines: Callable[[list[tuple[str, str, str]], tls_keys.KeysRecord], None],
                 quiet: bool = False):
        self.tracer = tracer
        self.quiet = quiet  # libraries without keys said at debug level (keys are not what the run is for)
        self.on_lines = on_lines
        self.slots: dict[int, Layout] = {}
        self.unusable: list[str] = []  # one message per library we write no keys for
        self.unsupported: list[str] = []  # library kinds whose secrets are not read (gnutls, nss)
        self.sessions = 0
        self.records = 0  # key records and key lines handled (a plaintext run counts them as received)
        self.unreadable_labels = 0  # key lines lost: their label was in a page the process had gone with
        tracer.on(tls_keys.CT_EV_TLS_KEYS, self._record)
        tracer.on(CT_EV_TLS_KEYLINE, self._key_line)
        tracer.key_cookie = self._cookie
        self._line_randoms: set[bytes] = set()
        # (pid, client_random) of the sessions written: BPF (handshake return, SSL_free) and the
        # memory reads of keys/pending.py may both find one session
        self._written: set[tuple[int, bytes]] = set()
        self.pending = PendingObjects(self.slots, self._from_memory)
        tracer.on(CT_EV_TLS_OBJECT, self.pending.record)

    def poll(self) -> None:
        """Read the secrets of announced objects whose keys are not out yet (keys/pending.py)."""
        self.pending.poll()

    def _from_memory(self, pid: int, ssl: int, material) -> None:
        self._emit(tls_keys.KeysRecord(time.monotonic_ns(), pid, pid, 0, "", ssl, 1, 0, material))

    def _emit(self, rec) -> None:
        lines = rec.material.lines()
        if not lines:
            return
        key = (rec.pid, rec.material.client_random)
        if key in self._written:
            return
        if len(self._written) > 262144:
            self._written.clear()
        self._written.add(key)
        self.sessions += 1
        self.on_lines(lines, rec)

    def _cookie(self, lib) -> int:
        """Cookie bits for a library about to be hooked: its layout slot (0: no keys)."""
        if lib.kind == "boringssl":
            return self._bssl_cookie(lib)
        if lib.kind not in ("openssl", "gnutls"):
            if lib.kind not in self.unsupported:
                self.unsupported.append(lib.kind)
            log.debug("keys: reading %s secrets is not supported (%s)", lib.kind, lib.display_path)
            return 0
        result = layout_for(lib.path, lib.kind)
        if result.layout is None:
            message = f"no TLS keys for {lib.display_path or lib.path}: its SSL object layout could not be " \
                      f"learned ({result.how})"
            if message not in self.unusable:
                self.unusable.append(message)
                (log.debug if self.quiet else log.warning)("%s", message)
            return 0
        slot = self._slot(result.layout)
        if slot is None:
            (log.debug if self.quiet else log.warning)("no TLS keys for %s: too many different layouts in one run",
                                                       lib.display_path)
            return 0
        what = result.layout.version if result.layout.version.startswith(lib.kind) else \
            f"{lib.kind} {result.layout.version}"
        log.debug("keys: %s: %s, layout slot %d (%s)", lib.display_path, what, slot, result.how)
        return slot << tls_keys.SLOT_SHIFT

    def _bssl_cookie(self, lib) -> int:
        """BoringSSL: no layout slot; bssl_keylog goes on the verified ssl_log_secret, with the
        client_random offsets in its cookie (probes/tls.py applies it to that probe alone)."""
        from crypto_tracer.probes.tls import BSSL_LOG_SECRET, bssl_cookie

        hook, how = bssl_hook_for(lib.path)
        if hook is None:
            message = f"no TLS keys for {lib.display_path or lib.path}: BoringSSL's ssl_log_secret could not be " \
                      f"verified ({how})"
            if message not in self.unusable:
                self.unusable.append(message)
                (log.debug if self.quiet else log.warning)("%s", message)
            return 0
        lib.offsets = dict(lib.offsets, **{BSSL_LOG_SECRET: hook.log_secret})
        if BSSL_LOG_SECRET not in lib.functions:
            lib.functions = lib.functions + (BSSL_LOG_SECRET,)
        log.debug("keys: %s: BoringSSL, ssl_log_secret at %#x (%s)", lib.display_path, hook.log_secret, how)
        return bssl_cookie(hook.s3, hook.client_random)

    def _slot(self, lay: Layout) -> int | None:
        for slot, known in self.slots.items():
            if _same(known, lay):
                return slot
        slot = FIRST_SLOT + len(self.slots)
        if slot >= tls_keys.SLOTS:
            return None
        self.tracer.map("keys_layouts").update(struct.pack("<I", slot), tls_keys.layout_value(lay))
        self.slots[slot] = lay
        return slot

    def _key_line(self, raw: bytes) -> None:
        """Go and BoringSSL: each secret arrives as the line their key log would have (Go: no
        layout involved; BoringSSL: client_random at the verified offsets)."""
        from crypto_tracer.probes.tls import decode_go_keyline

        self.records += 1
        rec = decode_go_keyline(raw)
        if rec.label is None:  # a page of its constant the process had not touched: read it from there
            rec.label = _label_from_memory(rec.pid, rec.label_addr, rec.label_len)
        line = rec.line()
        if line is None:
            if rec.label == "":
                self.unreadable_labels += 1
            return
        if rec.client_random not in self._line_randoms:
            if len(self._line_randoms) > 65536:
                self._line_randoms.clear()
            self._line_randoms.add(rec.client_random)
            self.sessions += 1
        self.on_lines([line], rec)

    def _record(self, raw: bytes) -> None:
        self.records += 1
        rec = tls_keys.decode(raw)
        lay = self.slots.get(rec.slot)
        if lay is None:
            return
        rec.material.hs_direct = lay.hs_direct
        self.pending.done(rec.pid, rec.ssl)
        self._emit(rec)


_LABEL = re.compile(rb"[A-Z][A-Z0-9_]{2,46}")


def _label_from_memory(pid: int, addr: int, length: int) -> str:
    """A key log label (a constant string of the library) from the process's memory; "" (the line
    is dropped) when it cannot be read or is not a label."""
    raw = reader(pid)(addr, length or 48)
    if not length:
        raw = raw.split(b"\0", 1)[0]
    return raw.decode("ascii") if _LABEL.fullmatch(raw) else ""
