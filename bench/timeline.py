"""Where an offloaded step's time goes on the GPU, from a torch.profiler Chrome trace: how long the
compute kernels and the host-to-device copies each kept their engine busy in the profiled window, and
how long the compute engine sat idle while a copy ran (it waited for a streamed block) or while nothing
ran at all (it waited for the host). Issue 13's last card (torchao fp8 compiled, 8 GiB) runs 1.11-1.24x
of its resident step with copies that need only ~90% of it: this says which of the two waits it is.

The trace format is the one `torch.profiler.profile(...).export_chrome_trace` writes: GPU events with
"cat" "kernel" or "gpu_memcpy" (name "Memcpy HtoD ..."), "ts" and "dur" in microseconds. Plain JSON,
no torch: the bench calls `summarize(path)` after a profiled forward; tests feed it a made-up trace."""
from __future__ import annotations

import json


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(base, cut) -> list[tuple[float, float]]:
    """base minus cut (both unions, sorted)."""
    out, j = [], 0
    for a, b in base:
        cur = a
        while j < len(cut) and cut[j][1] <= cur:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < b:
            if cut[k][0] > cur:
                out.append((cur, cut[k][0]))
            cur = max(cur, cut[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def summarize_events(events: list[dict]) -> dict | None:
    """Milliseconds: window (first GPU event start to last end), compute_busy, copy_busy (host to
    device), compute_idle, compute_idle_while_copying, all_idle; None without GPU events."""
    kernels, copies = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if cat == "kernel":
            kernels.append(span)
        elif cat == "gpu_memcpy" and "HtoD" in name:
            copies.append(span)
    if not kernels:
        return None
    k, c = _union(kernels), _union(copies)
    every = _union(kernels + copies)
    window = every[-1][1] - every[0][0]
    idle = _minus([(every[0][0], every[-1][1])], k)
    idle_copying = _length(_minus(c, k))
    return {"window_ms": window / 1e3, "compute_busy_ms": _length(k) / 1e3, "copy_busy_ms": _length(c) / 1e3,
            "compute_idle_ms": _length(idle) / 1e3, "compute_idle_while_copying_ms": idle_copying / 1e3,
            "all_idle_ms": (window - _length(every)) / 1e3, "kernels": len(kernels), "copies": len(copies)}


def summarize(path: str) -> dict | None:
    with open(path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    return summarize_events(events)
