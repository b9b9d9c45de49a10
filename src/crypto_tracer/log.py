"""Logging to stderr: '[LEVEL] message'. --verbose shows DEBUG, --quiet only ERROR."""

import logging
import sys

log = logging.getLogger("crypto_tracer")


def setup(verbose: bool = False, quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


def is_verbose() -> bool:
    return log.isEnabledFor(logging.DEBUG)
