"""tls -m keylog|key: every TLS session's secrets as an NSS key log (-k FILE, else -o FILE,
else stdout), file mode 0600."""

from __future__ import annotations

from crypto_tracer.commands.tls import secrets


def check(opts) -> None:
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter

    compile_connection_filter(opts.filter)  # a bad filter is an argument error


def run(opts) -> int:
    return secrets.run(opts, keylog_path=opts.keylogfile or opts.output or "-")
