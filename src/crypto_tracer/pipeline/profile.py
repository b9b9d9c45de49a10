"""profile's model: what one process did with cryptography, aggregated from events and samples.

commands/profile.py feeds it (monitor.bpf.c events, api.bpf.c counts, /proc samples); the
document it gives is written by sinks/json.py or sinks/profile_summary.py.
"""

from __future__ import annotations

from crypto_tracer.host import proc

PROFILE_VERSION = "1.1"
TLS_LIBRARY_CATEGORIES = {"handshake", "tls_read", "tls_write", "session", "context"}


class ProcessProfile:
    """The aggregation for one pid: fed with event dicts (pipeline/events.py schema) and samples."""

    def __init__(self, pid: int, info: dict | None, started_before: bool):
        self.pid = pid
        self.process = info or {"pid": pid, "ppid": None, "name": None, "exe": None, "root": None, "mnt_ns": None,
                                "cmdline": None, "uid": None, "gid": None, "start_time": None}
        self.started_before_profile = started_before
        self.libraries: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.peers: dict[tuple, dict] = {}
        self.listening: dict[tuple, dict] = {}
        self.events = 0
        self.execs = 0
        self.exit: dict | None = None

    # -- inputs --
    def add_mapped_libraries(self, libs: list[dict], when: str, at_start: bool) -> None:
        for lib in libs:
            if lib["path"] not in self.libraries:
                self.libraries[lib["path"]] = {"name": lib["name"], "path": lib["path"], "version": lib["version"],
                                               "first_seen": when, "mapped_before_profile": at_start}

    def add_event(self, ev: dict) -> None:
        self.events += 1
        kind = ev["event_type"]
        if self.process["name"] is None:  # gone before /proc could be read: what the event knows
            self.process.update(name=ev["process"], ppid=ev["ppid"], uid=ev["uid"], exe=ev.get("exe"),
                                root=ev.get("root"), mnt_ns=ev.get("mnt_ns"))
        if kind == "file_open":
            f = self.files.get(ev["file"])
            if f is None:
                f = self.files[ev["file"]] = {"path": ev["file"], "type": ev["file_type"], "access_count": 0,
                                              "failed_count": 0, "first_access": ev["timestamp"],
                                              "last_access": None, "flags": []}
            f["access_count"] += 1
            f["last_access"] = ev["timestamp"]
            if ev["result"] is not None and ev["result"] < 0:
                f["failed_count"] += 1
            if ev["flags"] and ev["flags"] not in f["flags"]:
                f["flags"].append(ev["flags"])
        elif kind == "lib_load":
            if ev["library"] not in self.libraries:
                self.libraries[ev["library"]] = {"name": ev["library_name"], "path": ev["library"],
                                                 "version": ev["version"], "first_seen": ev["timestamp"],
                                                 "mapped_before_profile": False}
        elif kind == "process_exec":
            self.execs += 1
            self.process.update({k: ev[k] for k in ("ppid", "uid", "exe", "root", "mnt_ns", "cmdline")
                                 if ev.get(k) is not None})
            self.process["name"] = ev["process"]
        elif kind == "process_exit":
            self.exit = {"time": ev["timestamp"], "exit_code": ev["exit_code"], "signal": ev["signal"]}

    def add_sockets(self, sockets: list[dict], when: str) -> None:
        for s in sockets:
            if s["state"] == "LISTEN":
                key = (s["local_addr"], s["local_port"])
                self.listening.setdefault(key, {"local_addr": s["local_addr"], "local_port": s["local_port"],
                                                "first_seen": when})
                continue
            key = (s["remote_addr"], s["remote_port"], s["local_addr"], s["local_port"])
            peer = self.peers.get(key)
            if peer is None:
                peer = self.peers[key] = {**{k: s[k] for k in ("remote_addr", "remote_port", "local_addr",
                                                              "local_port")}, "first_seen": when}
            peer["last_seen"] = when
            peer["state"] = s["state"]

    # -- output --
    def document(self, api_calls: list[dict], ended_early: bool, connections: list[dict] | None = None) -> dict:
        """This process's section, with real paths (copies: the redaction stage edits them)."""
        process = dict(self.process)
        libraries = [dict(lib) for lib in self.libraries.values()]
        files = [self._file_entry(f) for f in self.files.values()]
        calls = list(api_calls)
        tls = tls_summary(calls)
        tls["connections"] = connections or []
        tls["peers"] = sorted(self.peers.values(), key=lambda p: p["first_seen"])
        tls["listening"] = sorted(self.listening.values(), key=lambda p: (p["local_addr"], p["local_port"]))
        return {
            "process": process,
            "started_before_profile": self.started_before_profile,
            "partial": self.exit is not None or ended_early,
            "exit": self.exit,
            "libraries": libraries,
            "files_accessed": files,
            "api_calls": calls,
            "tls": tls,
            "statistics": {
                "total_events": self.events,
                "execs": self.execs,
                "libraries_loaded": len(libraries),
                "files_accessed": len(files),
                "file_opens": sum(f["access_count"] for f in files),
                "api_calls_made": sum(c["count"] for c in calls),
                "api_functions": len({c["function_name"] for c in calls}),
            },
        }


    def _file_entry(self, f: dict) -> dict:
        """The file with snapshot's certificate/key insight (read through the process's root
        while it runs, else from here)."""
        from crypto_tracer.host import certinfo

        entry = dict(f)
        read_path = proc.root_path(self.pid, f["path"]) if self.exit is None else f["path"]
        insight = certinfo.describe(read_path, f["type"]) or certinfo.describe(f["path"], f["type"])
        if insight is not None:
            entry["certificate" if f["type"] == "certificate" else "key"] = insight
        return entry


def tls_summary(calls: list[dict]) -> dict:
    """Handshakes (SSL_do_handshake returning 1, which SSL_connect/SSL_accept go through), SSL
    objects created, and the plaintext bytes SSL_read*/SSL_write* returned, all from the kernel."""
    def total(category, field="count"):
        return sum(c.get(field, 0) for c in calls if c["category"] == category)

    return {"handshakes": total("handshake"), "sessions_created": total("session"),
            "contexts_created": total("context"), "read_calls": total("tls_read"),
            "bytes_read": total("tls_read", "bytes"), "write_calls": total("tls_write"),
            "bytes_written": total("tls_write", "bytes")}
