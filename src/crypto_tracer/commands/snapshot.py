"""``crypto-tracer snapshot``: the crypto inventory of this host, from /proc only (no eBPF).

Unprivileged it sees the caller's own processes and counts the ones it could not read.
``-f cyclonedx`` writes it as a CycloneDX 1.6 CBOM (sinks/cyclonedx.py), with the TLS handshakes of
``--handshakes FILE`` and of ``--observe SECONDS`` (a ``tls -m json`` run in a child process: the
only part that needs eBPF and its privileges).
"""

from __future__ import annotations

import os
import time

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.host import certinfo, inventory
from crypto_tracer.host.proc import list_pids, read_cmdline, read_status_ids
from crypto_tracer.pipeline.clock import now_iso
from crypto_tracer.log import log

SNAPSHOT_VERSION = "1.1"


def check(opts) -> None:
    cbom_only = [flag for flag, attr in (("--observe", "observe"), ("--handshakes", "handshakes"))
                 if getattr(opts, attr, None)]
    if cbom_only and opts.format != "cyclonedx":
        raise TracerError(f"{' and '.join(cbom_only)}: only with -f cyclonedx", ExitStatus.BAD_ARGS,
                          "add -f cyclonedx")
    if getattr(opts, "handshakes", None) is not None and not os.path.isfile(opts.handshakes):
        raise TracerError(f"--handshakes {opts.handshakes}: no such file", ExitStatus.BAD_ARGS,
                          "give a file written by 'crypto-tracer tls -m json -o FILE'")


def run(opts) -> int:
    from crypto_tracer.sinks.output import Output

    handshakes = None
    if opts.format == "cyclonedx":
        from crypto_tracer.sinks import cyclonedx

        cyclonedx.check_available()  # before anything runs
        handshakes = read_handshakes(opts.handshakes) if getattr(opts, "handshakes", None) else []
        if getattr(opts, "observe", None):
            handshakes += observe_handshakes(opts)
    log.debug("Scanning /proc")
    doc = take_snapshot(redact_paths=not opts.no_redact, cbom=opts.format == "cyclonedx")
    scan = doc["scan"]
    if scan["processes_unreadable"]:
        log.warning("%d processes of other users could not be read (run as root to include them)",
                    scan["processes_unreadable"])
    log.info("Snapshot: %d of %d processes use crypto (%.0f ms)", doc["summary"]["total_processes"],
             scan["processes_scanned"], scan["duration_ms"])
    if opts.format == "cyclonedx":
        text = cyclonedx.build(doc, handshakes)  # validated: nothing is written if it does not
        out = Output(opts.output)
        out.write(text.encode() + b"\n")
        out.flush()  # a failed write raises (exit 1)
        out.close()
        return 0
    out = Output(opts.output)
    if opts.format == "summary":
        from crypto_tracer.sinks.snapshot_summary import render

        out.write(render(doc).encode())
        out.flush()
        out.close()
    else:
        from crypto_tracer.sinks.json import dump_document

        dump_document(doc, opts.format, out)
    return 0


def read_handshakes(path: str) -> list[dict]:
    """tls_handshake events from a file of 'tls -m json' (JSON Lines, or one JSON array); other
    events are skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TracerError(f"--handshakes {path}: {exc.strerror}", ExitStatus.ERROR) from None
    import json

    if data.lstrip().startswith(b"["):
        try:
            events = json.loads(data)
        except ValueError as exc:
            raise TracerError(f"--handshakes {path}: not valid JSON ({exc})", ExitStatus.ERROR) from None
    else:
        events = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                raise TracerError(f"--handshakes {path}: line {number} is not a JSON event", ExitStatus.ERROR,
                                  "give a file written by 'crypto-tracer tls -m json -o FILE'") from None
    found = [ev for ev in events if isinstance(ev, dict) and ev.get("event_type") == "tls_handshake"]
    log.info("%d TLS handshakes read from %s", len(found), path)
    return found


def observe_handshakes(opts) -> list[dict]:
    """tls_handshake events of a 'tls -m json' run of --observe seconds in a child process (its
    plaintext events, cut to one byte each, are read and dropped; its log lines, READY included,
    are ours). SIGINT/SIGTERM end the observation early and the CBOM is still written."""
    import json
    import signal
    import subprocess
    import sys

    from crypto_tracer.engine.preflight import preflight

    preflight()  # the tracer's privileges, with its errors and exit codes, before a child starts
    cmd = [sys.executable, "-m", "crypto_tracer", "tls", "-m", "json", "-f", "json-stream", "-d", str(opts.observe),
           "--max-payload", "1"]
    cmd += [flag for flag, on in (("-q", opts.quiet), ("-v", opts.verbose), ("--no-redact", opts.no_redact)) if on]
    log.info("Observing TLS handshakes for %d s", opts.observe)
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE)  # its stderr is ours

    def forward(signum, _frame):  # the child stops as tls does; we go on with what it saw
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    events = []
    try:
        for line in child.stdout:
            if b'"tls_handshake"' in line:
                ev = json.loads(line)
                if ev.get("event_type") == "tls_handshake":
                    events.append(ev)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
    if status != 0:
        raise TracerError(f"observing TLS handshakes failed (tls exited with {status})",
                          ExitStatus(status) if status in ExitStatus._value2member_map_ else ExitStatus.ERROR)
    log.info("%d TLS handshakes observed", len(events))
    return events


def take_snapshot(redact_paths: bool = True, cbom: bool = False) -> dict:
    """The inventory document; cbom: with what only the CBOM uses (file_entry)."""
    started = time.perf_counter()
    generated_at = now_iso()
    from crypto_tracer.pipeline.redact import Redactor

    redactor = Redactor(redact_paths)
    own_pid = os.getpid()
    host_mnt = inventory.host_mount_ns()
    tcp = inventory.TcpTables()
    processes, scanned, unreadable = [], 0, 0
    for pid in list_pids():
        if pid == own_pid:
            continue
        scanned += 1
        try:
            proc = inventory.scan_process(pid)
        except inventory.Unreadable:
            unreadable += 1
            continue
        if proc is None or not proc.uses_crypto:
            continue
        # scan -> redact -> summary and sink (the summary counts the paths as shown)
        processes.append(redactor.entry(process_entry(proc, host_mnt, tcp, cbom), "libraries",
                                        "open_crypto_files"))
    uname = os.uname()
    return {
        "snapshot_version": SNAPSHOT_VERSION,
        "generated_at": generated_at,
        "hostname": uname.nodename,
        "kernel": uname.release,
        "scan": {
            "privileged": os.geteuid() == 0,
            "processes_scanned": scanned,
            "processes_unreadable": unreadable,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        },
        "processes": processes,
        "summary": summarize(processes),
    }


def process_entry(proc: inventory.ProcessCrypto, host_mnt: str | None, tcp: inventory.TcpTables,
                  cbom: bool = False) -> dict:
    uid, _gid = read_status_ids(proc.pid)
    uses_tls = proc.static_tls is not None or any(lib["name"] in ("libssl", "libgnutls", "libnss3", "libssl3",
                                                                    "libmbedtls", "libwolfssl")
                                                   for lib in proc.libraries)
    return {
        "pid": proc.pid,
        "ppid": proc.ppid,
        "name": proc.name,
        "exe": proc.exe,
        "root": proc.root,
        "cmdline": read_cmdline(proc.pid),
        "running_as": inventory.user_name(uid),
        "uid": uid,
        "libraries": [{"path": lib["path"], "name": lib["name"], "version": lib["version"]}
                      for lib in proc.libraries],
        "open_crypto_files": [file_entry(f, cbom) for f in proc.files],
        "static_tls": proc.static_tls,
        "tls_sockets": tcp.sockets(proc.pid, proc.socket_inodes) if uses_tls else [],
        "container": inventory.container_info(proc.pid, host_mnt),
    }


def file_entry(f: dict, cbom: bool = False) -> dict:
    """cbom: also every certificate of the file in full ("certificates") and the public key's
    SHA-256 of a key file ("public_key_sha256"), which only the CBOM uses."""
    entry = {"path": f["path"], "type": f["type"]}
    insight = certinfo.describe(f["read_path"], f["type"])
    if insight is not None:
        entry["certificate" if f["type"] == "certificate" else "key"] = insight
        if cbom and f["type"] == "certificate" and "error" not in insight:
            entry["certificates"] = certinfo.certificates(f["read_path"])
        elif cbom and "error" not in insight:
            entry["public_key_sha256"] = certinfo.public_key_sha256(f["read_path"], f["type"])
    return entry


def summarize(processes: list[dict]) -> dict:
    """Unique counts across processes (a library mapped by ten processes counts once)."""
    # a library is its path and version: the same path in a container or chroot can be another build
    libraries: dict[tuple, dict] = {}
    files: dict[str, dict] = {}
    flags: dict[str, set] = {}
    static = 0
    for p in processes:
        for lib in p["libraries"]:
            entry = libraries.setdefault((lib["path"], lib["version"] or ""),
                                         {"name": lib["name"], "version": lib["version"], "pids": set()})
            entry["pids"].add(p["pid"])
        for f in p["open_crypto_files"]:
            entry = files.setdefault(f["path"], {"type": f["type"], "pids": set()})
            entry["pids"].add(p["pid"])
            for flag in (f.get("certificate") or f.get("key") or {}).get("flags", ()):
                flags.setdefault(flag, set()).add(f["path"])
        static += p["static_tls"] is not None
    by_version: dict[tuple, tuple[int, set]] = {}
    for lib in libraries.values():
        files_count, pids = by_version.get((lib["name"], lib["version"]), (0, set()))
        by_version[(lib["name"], lib["version"])] = (files_count + 1, pids | lib["pids"])
    by_type: dict[str, int] = {}
    for f in files.values():
        by_type[f["type"]] = by_type.get(f["type"], 0) + 1
    return {
        "total_processes": len(processes),
        "total_libraries": len(libraries),
        "total_files": len(files),
        "static_tls_processes": static,
        "libraries_by_name": [{"name": n, "version": v, "files": c, "processes": len(pids)} for (n, v), (c, pids)
                              in sorted(by_version.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))],
        "files_by_type": dict(sorted(by_type.items())),
        "file_flags": {flag: len(paths) for flag, paths in sorted(flags.items())},
        "libraries": [{"path": path, "name": lib["name"], "version": lib["version"], "processes": len(lib["pids"])}
                      for (path, _), lib in sorted(libraries.items())],
        "files": [{"path": path, "type": f["type"], "processes": len(f["pids"])} for path, f in sorted(files.items())],
    }
