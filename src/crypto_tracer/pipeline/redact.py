"""Path redaction: /home/<user>/... -> /home/USER/..., /root/... -> /home/ROOT/... (README.md, monitor).

One stage, the same in every command: a Redactor applied after the command's filters (which match
real paths) and right before its sink; with --no-redact it passes everything through. Events
have their path and text fields from the schema (pipeline/events.py); the documents of snapshot
and profile describe processes with the same names (exe, root, cmdline) and their libraries
and files by `path`.
"""

from __future__ import annotations

import re

from crypto_tracer.pipeline.events import PATH_FIELDS, TEXT_FIELDS

DOCUMENT_PATH_FIELDS = ("exe", "root", "path")

_CMDLINE_HOME = re.compile(r"(?<![\w/.])/home/[^/\s]+")
_CMDLINE_ROOT = re.compile(r"(?<![\w/.])/root(?=/|\s|$)")


def redact(path: str | None) -> str | None:
    if not path:
        return path
    if path.startswith("/home/"):
        rest = path[6:]
        slash = rest.find("/")
        return "/home/USER" if slash < 0 else "/home/USER" + rest[slash:]
    if path == "/root" or path.startswith("/root/"):
        return "/home/ROOT" + path[5:]
    return path


def redact_text(text: str | None) -> str | None:
    """Redact home paths that appear inside free text such as a command line."""
    if not text or ("/home/" not in text and "/root" not in text):
        return text
    return _CMDLINE_ROOT.sub("/home/ROOT", _CMDLINE_HOME.sub("/home/USER", text))


def redact_event(ev: dict, paths: tuple[str, ...] = PATH_FIELDS) -> dict:
    """Redact the path fields and the text fields (cmdline) of an event, in place."""
    for key in paths:
        value = ev.get(key)
        if value and value.startswith(("/home/", "/root")):
            ev[key] = redact(value)
    for key in TEXT_FIELDS:
        value = ev.get(key)
        if value:
            ev[key] = redact_text(value)
    return ev


def _unchanged(ev: dict) -> dict:
    return ev


class Redactor:
    """The redaction stage (enabled unless --no-redact): after the filters, before the sink."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.event = redact_event if enabled else _unchanged  # event(ev) -> ev, redacted in place


    def entry(self, entry: dict, *lists: str) -> dict:
        """A document's entry (a snapshot process, a profile's process): its exe, root, path and
        cmdline, and those of every item in the lists named (its libraries, its files), in place."""
        if self.enabled:
            redact_event(entry, DOCUMENT_PATH_FIELDS)
            for name in lists:
                for item in entry[name]:
                    redact_event(item, DOCUMENT_PATH_FIELDS)
        return entry
