"""demo: run monitor on a small built-in workload, so a newcomer sees real events at once.

The workload starts blocked on a pipe; its pid goes into the kernel's pid set (children
follow it there), so only the workload's events are shown, not the rest of the host.
"""

from __future__ import annotations

import os
import subprocess

from crypto_tracer.commands import monitor

WORKLOAD = r"""
d=$(mktemp -d /tmp/crypto-tracer-demo.XXXXXX)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/demo.key" \
    -out "$d/demo.crt" -subj /CN=crypto-tracer-demo -days 1 2>/dev/null
cat "$d/demo.crt" > "$d/bundle.pem"
python3 -c "import ssl; ssl.create_default_context().load_cert_chain('$d/demo.crt', '$d/demo.key')"
cat "$d/missing.pem" 2>/dev/null
sh -c 'exit 3'
rm -rf "$d"
"""


def run(opts) -> int:
    for name in ("pid", "name", "uid", "file", "library", "mapsize"):
        setattr(opts, name, None)
    opts.event_types = None
    opts.duration = opts.duration or 5
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(["bash", "-c", f"read -r _ <&{read_fd}; {WORKLOAD}"], pass_fds=(read_fd,),
                             stdin=subprocess.DEVNULL)
    os.close(read_fd)

    def start_workload() -> None:
        os.write(write_fd, b"go\n")

    try:
        return monitor.run(opts, extra_pids=[child.pid], on_ready=start_workload)
    finally:
        os.close(write_fd)
        child.wait()
