"""summary format for streams: a readable end-of-run digest instead of one line per event."""

from __future__ import annotations

from collections import Counter

from crypto_tracer.pipeline.clock import now_iso
from crypto_tracer.sinks.output import Output

TOP = 10


class SummarySink:
    def __init__(self, out: Output, title: str = "Crypto Activity Summary"):
        self.out = out
        self.title = title
        self.count = 0
        self.started = now_iso()
        self.by_type: Counter[str] = Counter()
        self.processes: Counter[tuple[str, int]] = Counter()
        self.files: Counter[tuple[str, str]] = Counter()
        self.libraries: Counter[tuple[str, str]] = Counter()
        self.failed_opens = 0

    def write(self, ev: dict) -> None:
        self.count += 1
        etype = ev["event_type"]
        self.by_type[etype] += 1
        self.processes[(ev.get("process") or "?", ev["pid"])] += 1
        if etype == "file_open":
            self.files[(ev["file"], ev["file_type"])] += 1
            if ev["result"] < 0:
                self.failed_opens += 1
        elif etype == "lib_load":
            self.libraries[(ev["library"], ev.get("version") or "")] += 1

    def write_many(self, events) -> None:
        for ev in events:
            self.write(ev)

    def flush(self) -> None:
        pass

    def render(self) -> str:
        lines = [self.title, f"From: {self.started}", f"To:   {now_iso()}", "",
                 f"Total events: {self.count}"]
        for etype, n in sorted(self.by_type.items()):
            lines.append(f"  {etype}: {n}")
        lines += ["", f"Top processes ({len(self.processes)} in all):"]
        lines += [f"  PID {pid}: {name} ({n} events)" for (name, pid), n in self.processes.most_common(TOP)]
        lines += ["", f"Files ({len(self.files)} distinct, {self.failed_opens} failed opens):"]
        lines += [f"  {path} [{ftype}] ({n} opens)" for (path, ftype), n in self.files.most_common(TOP)]
        lines += ["", f"Libraries ({len(self.libraries)} distinct):"]
        lines += [f"  {path}{' ' + v if v else ''} ({n} loads)" for (path, v), n in self.libraries.most_common(TOP)]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.out.write_final(self.render().encode())
        self.out.close()
