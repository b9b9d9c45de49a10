"""Path redaction (DESIGN.md): /home/<user>/... -> /home/USER/..., /root/... -> /home/ROOT/...

Only whole path components match: /homestead/x and /rooted/x are left alone, and so are
relative paths. ``--no-redact`` skips this entirely (callers decide).
"""

from __future__ import annotations


def redact(path: str | None) -> str | None:
    if not path or path[0] != "/":
        return path
    if path.startswith("/home/"):
        rest = path[6:]
        slash = rest.find("/")
        if slash < 0:
            return "/home/USER" if rest else path
        return "/home/USER" + rest[slash:] if slash > 0 else path
    if path == "/root" or path.startswith("/root/"):
        return "/home/ROOT" + path[5:]
    return path
