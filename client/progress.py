"""Progress reports from a run (Progress) and the command line's text progress bar that shows them."""
from __future__ import annotations

import dataclasses
import shutil
import sys


@dataclasses.dataclass
class Progress:
    """One progress report. kind: queued, start, cached, executing, progress, executed, done, notice."""
    kind: str
    prompt_id: str | None = None
    node: str | None = None
    title: str | None = None
    class_type: str | None = None
    value: float | None = None
    max: float | None = None
    message: str | None = None
    data: dict | None = None


class _Bar:
    """A one-line text progress bar on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.node_label = ""
        self.open_line = False
        self.last_pct = None

    def _line(self, text: str):
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, p: Progress):
        if self.quiet:
            return
        if p.kind == "queued":
            self._line(f"queued prompt {p.prompt_id}")
        elif p.kind == "notice":
            self._line(f"note: {p.message}")
        elif p.kind == "cached" and p.data and p.data.get("nodes"):
            self._line(f"cached: {len(p.data['nodes'])} node(s)")
        elif p.kind == "executing":
            self.node_label = f"{p.title} ({p.class_type})" if p.class_type and p.class_type != p.title else str(p.title)
            self.last_pct = None
            self._line(f"running {self.node_label}")
        elif p.kind == "progress" and p.max:
            value, total = p.value or 0, p.max
            frac = max(0.0, min(1.0, value / total))
            label = f"{p.title}" if p.title else self.node_label
            if self.tty:
                width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - 30 - len(label)))
                fill = int(round(frac * width))
                self.stream.write(f"\r[{'#' * fill}{'-' * (width - fill)}] {value:g}/{total:g} {label}\x1b[K")
                self.stream.flush()
                self.open_line = True
            else:
                pct = int(frac * 4) * 25  # plain lines at 0/25/50/75/100 %
                if pct != self.last_pct:
                    self.last_pct = pct
                    self._line(f"[{'#' * (pct // 10)}{'-' * (10 - pct // 10)}] {value:g}/{total:g} {label}")
        elif p.kind == "done":
            if self.open_line:
                self.stream.write("\n")
                self.open_line = False
            self.stream.flush()
