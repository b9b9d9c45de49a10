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


# The one line every tracing command prints once its probes are attached; tests and benchmarks wait for it.
READY = "crypto-tracer ready:"


def ready(command: str, started: float, detail: str = "") -> None:
    """Log READY for command; started is the time.monotonic() at which loading the probes began."""
    import time

    log.info("%s %s (probes attached in %.0f ms)%s", READY, command, (time.monotonic() - started) * 1000,
             f"; {detail}" if detail else "")


def is_verbose() -> bool:
    return log.isEnabledFor(logging.DEBUG)
