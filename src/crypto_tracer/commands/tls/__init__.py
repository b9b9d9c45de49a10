"""tls: one module per mode, each wiring probes/tls.py to its pipeline and sinks.

  plaintext.py  -m text | json      plaintext events (pipeline/tls_data.py -> sinks/text.py, sinks/json.py)
                -m streams         the same records into per-connection files (sinks/streams.py)
  keylog.py     -m keylog | key     the NSS key log of every session (sinks/keylog.py)
  pcapng.py     -m pcapng | pcap    TC packets + their secrets (probes/capture.py -> sinks/pcapng.py)
  handshake.py  -m handshake       one event per handshake from packets alone, any implementation
                                   (probes/tls_hello.py -> pipeline/tls_handshakes.py)
  secrets.py    what keylog and pcapng share: session keys, the run loop, the end report

The privileges of each mode are declared in cli.py (COMMANDS).
"""

from __future__ import annotations

import importlib

MODES = {"text": "plaintext", "json": "plaintext", "streams": "plaintext", "keylog": "keylog", "key": "keylog",
         "pcapng": "pcapng", "pcap": "pcapng", "handshake": "handshake"}


def _mode(opts):
    return importlib.import_module(f"{__name__}.{MODES[opts.model]}")


def check(opts) -> None:
    """Argument checks of the mode (exit 2), before the privileges are checked."""
    if getattr(opts, "decrypt_handshake", False) and opts.model != "handshake":
        from crypto_tracer.errors import ExitStatus, TracerError

        raise TracerError("--decrypt-handshake is for -m handshake (-m text|json decrypt TLS 1.3's handshake anyway)",
                          ExitStatus.BAD_ARGS)
    _mode(opts).check(opts)


def run(opts) -> int:
    return _mode(opts).run(opts)
