"""The `profile -f summary` digest: the profile document as a few readable lines per process."""

from __future__ import annotations


def render_summary(doc: dict) -> str:
    """The -f summary digest of a profile."""
    lines = ["Crypto Profile Summary", f"Generated: {doc['generated_at'][:19].replace('T', ' ')} UTC",
             f"Duration: {doc['duration_seconds']:.1f} s{' (partial)' if doc['partial'] else ''}",
             f"Processes: {len(doc['processes'])}", ""]
    for s in doc["processes"]:
        p = s["process"]
        lines.append(f"PID {p['pid']}: {p['name']} ({p['exe']})")
        libs = ", ".join(f"{lib['name']} {lib['version'] or ''}".strip() for lib in s["libraries"])
        files = ", ".join(f"{f['path']} x{f['access_count']}" for f in s["files_accessed"])
        lines.append(f"  Libraries: {libs or '-'}")
        lines.append(f"  Files: {files or '-'}")
        t = s["tls"]
        lines.append(f"  TLS: {t['handshakes']} handshakes, {t['bytes_read']} bytes read, "
                     f"{t['bytes_written']} bytes written, {len(t['peers'])} peers")
        lines.append("  API calls:")
        for c in s["api_calls"][:20]:
            alg = f" [{c['algorithm']}]" if c["algorithm"] else ""
            lines.append(f"    {c['count']:>10}  {c['function_name']}{alg}")
        if s["exit"]:
            lines.append(f"  Exited: code {s['exit']['exit_code']} signal {s['exit']['signal']}")
        lines.append("")
    return "\n".join(lines)
