"""Session secrets from a running TlsTracer: learn each hooked OpenSSL's layout, give it to
the BPF side, and turn CT_EV_TLS_KEYS records into key log lines.

One layout is active per library kind (tls_keys.h indexes layouts by lib_kind). A hooked
library whose layout is unknown, or differs from the active one, gets a warning and its
processes' records are dropped: no keys rather than wrong keys.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from crypto_tracer.keys import records
from crypto_tracer.keys.calibrate import layout_for
from crypto_tracer.keys.layout import Layout
from crypto_tracer.log import log

_IGNORED = ("verified", "source", "version")


def _same(a: Layout, b: Layout) -> bool:
    ja, jb = a.to_json(), b.to_json()
    return all(ja[k] == jb[k] for k in ja if k not in _IGNORED)


def _mapped_files(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file the process maps."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0":
                    major, minor = (int(x, 16) for x in parts[3].split(":"))
                    out.add((os.makedev(major, minor), int(parts[4])))
    except (OSError, ValueError):
        pass
    return out


class KeyExtractor:
    """Feeds `on_lines(lines, record)` with each new session's key log lines."""

    def __init__(self, tracer, on_lines: Callable[[list[tuple[str, str, str]], records.KeysRecord], None]):
        self.tracer = tracer
        self.on_lines = on_lines
        self.active: Layout | None = None
        self.refused: set[tuple[int, int]] = set()  # library files we write no keys for
        self.unusable: list[str] = []  # messages, one per such library
        self.unsupported: list[str] = []  # library kinds whose secrets are not read (gnutls, nss)
        self.sessions = 0
        self.records_refused = 0
        self._pid_ok: dict[int, bool] = {}
        tracer.on(records.CT_EV_TLS_KEYS, self._record)
        tracer.on_library(self._library)

    def _library(self, lib) -> None:
        if lib.kind != "openssl":  # its records never come: tls_keys.h has no layout for it
            if lib.kind not in self.unsupported:
                self.unsupported.append(lib.kind)
                log.debug("keys: %s hooked, but reading %s secrets is not supported", lib.display_path, lib.kind)
            return
        result = layout_for(lib.path)
        if result.layout is None:
            self._refuse(lib, f"its SSL object layout could not be learned ({result.how})")
            return
        if self.active is None:
            self.active = result.layout
            slot = struct.pack("<I", records.LIB_OPENSSL)
            self.tracer.obj.map("keys_layouts").update(slot, records.layout_value(result.layout))
            log.debug("keys: OpenSSL %s layout from %s (%s)", result.layout.version, lib.display_path, result.how)
        elif not _same(self.active, result.layout):
            self._refuse(lib, "its layout differs from the OpenSSL already hooked (one layout per run)")
        self._pid_ok.clear()

    def _refuse(self, lib, why: str) -> None:
        if lib.dev_ino in self.refused:
            return
        self.refused.add(lib.dev_ino)
        message = f"no TLS keys for {lib.display_path or lib.path}: {why}"
        self.unusable.append(message)
        log.warning("%s", message)
        self._pid_ok.clear()

    def _pid_allowed(self, pid: int) -> bool:
        if not self.refused:
            return True
        ok = self._pid_ok.get(pid)
        if ok is None:
            ok = self._pid_ok[pid] = not (_mapped_files(pid) & self.refused)
        return ok

    def _record(self, raw: bytes) -> None:
        rec = records.decode(raw, hs_direct=bool(self.active and self.active.hs_direct))
        if rec.lib_kind != records.LIB_OPENSSL or not self._pid_allowed(rec.pid):
            self.records_refused += 1
            return
        lines = rec.material.lines()
        if lines:
            self.sessions += 1
            self.on_lines(lines, rec)
