"""``crypto-tracer snapshot``: the crypto inventory of this host, from /proc only (no eBPF).

Unprivileged it sees the caller's own processes and counts the ones it could not read.
"""

from __future__ import annotations

import os
import time

from crypto_tracer.host import certinfo, inventory
from crypto_tracer.host.proc import list_pids, read_cmdline, read_status_ids
from crypto_tracer.pipeline.clock import now_iso
from crypto_tracer.log import log

SNAPSHOT_VERSION = "1.1"


def run(opts) -> int:
    from crypto_tracer.sinks.output import Output

    log.debug("Scanning /proc")
    doc = take_snapshot(redact_paths=not opts.no_redact)
    scan = doc["scan"]
    if scan["processes_unreadable"]:
        log.warning("%d processes of other users could not be read (run as root to include them)",
                    scan["processes_unreadable"])
    log.info("Snapshot: %d of %d processes use crypto (%.0f ms)", doc["summary"]["total_processes"],
             scan["processes_scanned"], scan["duration_ms"])
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


def take_snapshot(redact_paths: bool = True) -> dict:
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
        processes.append(redactor.entry(process_entry(proc, host_mnt, tcp), "libraries", "open_crypto_files"))
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


def process_entry(proc: inventory.ProcessCrypto, host_mnt: str | None, tcp: inventory.TcpTables) -> dict:
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
        "open_crypto_files": [file_entry(f) for f in proc.files],
        "static_tls": proc.static_tls,
        "tls_sockets": tcp.sockets(proc.pid, proc.socket_inodes) if uses_tls else [],
        "container": inventory.container_info(proc.pid, host_mnt),
    }


def file_entry(f: dict) -> dict:
    entry = {"path": f["path"], "type": f["type"]}
    insight = certinfo.describe(f["read_path"], f["type"])
    if insight is not None:
        entry["certificate" if f["type"] == "certificate" else "key"] = insight
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
