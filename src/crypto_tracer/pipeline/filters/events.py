"""The event filter of monitor: --file globs and --library substrings (pid/uid/name are in the kernel).

Filters AND together. A filter on a field drops events without that field, so
`--file X` keeps only file events. '*' in --file globs crosses '/': '*.pem' matches
/etc/ssl/x.pem. Globs are matched against the real path and the redacted one.
"""

from __future__ import annotations

import fnmatch
import re

from crypto_tracer.pipeline.redact import redact


class EventFilter:
    def __init__(self, file_globs: list[str] | None = None, libraries: list[str] | None = None,
                 event_types: tuple[str, ...] | None = None):
        self.file_res = [re.compile(fnmatch.translate(g)) for g in file_globs or []]
        self.libraries = [s.lower() for s in libraries or []]
        self.event_types = set(event_types) if event_types else None

    @property
    def active(self) -> bool:
        return bool(self.file_res or self.libraries or self.event_types)

    def __call__(self, ev: dict) -> bool:
        if self.event_types is not None and ev["event_type"] not in self.event_types:
            return False
        if self.file_res:
            path = ev.get("file")
            if path is None or not self._file_matches(path):
                return False
        if self.libraries:
            lib = ev.get("library")
            if lib is None:
                return False
            text = f"{lib} {ev.get('library_name') or ''}".lower()
            if not any(s in text for s in self.libraries):
                return False
        return True

    def _file_matches(self, path: str) -> bool:
        alt = redact(path)
        return any(r.match(path) or r.match(alt) for r in self.file_res)
