"""The ``--format summary`` digest of a snapshot: readable text, in the layout the docs show."""

from __future__ import annotations


def render(doc: dict) -> str:
    s, scan = doc["summary"], doc["scan"]
    generated = doc["generated_at"][:19].replace("T", " ")
    lines = ["Crypto Snapshot Summary", f"Generated: {generated} UTC", "",
             f"Total Processes: {s['total_processes']}",
             f"Total Libraries: {s['total_libraries']}",
             f"Total Files: {s['total_files']}"]
    if scan["processes_unreadable"]:
        lines.append(f"Not readable: {scan['processes_unreadable']} processes of other users (run as root to see them)")
    lines += ["", "Processes Using Crypto:"]
    for p in doc["processes"]:
        extra = []
        if p["static_tls"]:
            extra.append(f"static {p['static_tls']['library']}")
        if p["container"]:
            extra.append("container")
        note = f", {', '.join(extra)}" if extra else ""
        lines.append(f"  PID {p['pid']}: {p['name']} ({_n(len(p['libraries']), 'library', 'libraries')}, "
                     f"{_n(len(p['open_crypto_files']), 'file', 'files')}{note})")
    lines.append("Libraries:")
    for lib in s["libraries"]:
        version = f" {lib['version']}" if lib["version"] else ""
        lines.append(f"  {lib['path']}{version} ({_n(lib['processes'], 'process', 'processes')})")
    lines.append("Files:")
    for f in s["files"]:
        lines.append(f"  {f['path']} [{f['type']}] ({_n(f['processes'], 'process', 'processes')})")
    warnings = _file_warnings(doc)
    if warnings:
        lines.append("Certificate and key warnings:")
        lines += [f"  {path}: {', '.join(flags)}" for path, flags in warnings]
    return "\n".join(lines) + "\n"


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _file_warnings(doc: dict) -> list[tuple[str, list[str]]]:
    """Flags of each file, once per path; 'not_quantum_safe' alone is not a warning worth a line."""
    out, seen = [], set()
    for p in doc["processes"]:
        for f in p["open_crypto_files"]:
            info = f.get("certificate") or f.get("key") or {}
            flags = [x for x in info.get("flags", ()) if x != "not_quantum_safe"]
            if flags and f["path"] not in seen:
                seen.add(f["path"])
                out.append((f["path"], flags))
    return out
