"""Logging to stderr. INFO/DEBUG as '[INFO] msg', warnings and errors as 'WARNING: msg'.

--verbose shows DEBUG (and libbpf's log), --quiet only errors.
"""

import logging
import sys

log = logging.getLogger("crypto_tracer")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {msg}"
        return f"[{record.levelname}] {msg}"


def setup(verbose: bool = False, quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


def is_verbose() -> bool:
    return log.isEnabledFor(logging.DEBUG)
