"""Path redaction: /home/<user>/... -> /home/USER/..., /root/... -> /home/ROOT/... (DESIGN.md)."""

from __future__ import annotations

import re

from crypto_tracer.pipeline.events import PATH_FIELDS

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


def redact_event(ev: dict) -> dict:
    """Redact the path fields and the command line of an event, in place."""
    for key in PATH_FIELDS:
        value = ev.get(key)
        if value and (value.startswith("/home/") or value.startswith("/root")):
            ev[key] = redact(value)
    cmdline = ev.get("cmdline")
    if cmdline:
        ev["cmdline"] = redact_text(cmdline)
    return ev
