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


# Host calls that block until the GPU has drained a stream (the runtime's names, "cuda_runtime" or
# "cuda_driver" events) and the ATen ops that read a GPU value on the host (each one such a wait).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
SCALAR_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")


def marker_end(events: list[dict], name: str) -> float | None:
    """End (us) of the first host annotation (torch.profiler.record_function) with this name."""
    ends = [float(e["ts"]) + float(e.get("dur", 0)) for e in events
            if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") == name]
    return min(ends) if ends else None


def host_waits(events: list[dict], min_gap_us: float = 50.0, top: int = 10, since_us: float | None = None) -> dict | None:
    """Where the GPU sat idle in a sampled step, and whether the host had just waited for it: every
    gap of at least `min_gap_us` between GPU work (kernels, copies, memsets), the kernels on either
    side, and whether a blocking host call (SYNC_CALLS) returned inside it (the host waited for the
    GPU to drain, then took the gap to queue the next work). Milliseconds; None without GPU events.
    `since_us`: only what starts from then on (e.g. after the first sampler step, whose set-up is
    not a step's cost).
    For the sampled step that ran 7-13% above its kernel sum (issue 12): syncs, or a slow host?"""
    gpu, syncs, scalar = [], [], 0
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        t0, t1 = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if since_us is not None and t0 < since_us:
            continue
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            gpu.append((t0, t1, name))
        elif cat in ("cuda_runtime", "cuda_driver") and name in SYNC_CALLS:
            syncs.append((t0, t1, name))
        elif cat == "cpu_op" and name in SCALAR_OPS:
            scalar += 1
    if not gpu:
        return None
    gpu.sort()
    gaps, end, last = [], gpu[0][1], gpu[0][2]
    for t0, t1, name in gpu[1:]:
        if t0 - end >= min_gap_us:
            after_sync = any(s0 < end and end <= s1 <= t0 for s0, s1, _ in syncs)
            gaps.append((t0 - end, last, name, after_sync))
        if t1 >= end:
            end, last = t1, name
    idle = sum(g for g, *_ in gaps)
    waited = sum(g for g, _, _, w in gaps if w)
    biggest = sorted(gaps, reverse=True)[:top]
    return {"gap_idle_ms": idle / 1e3, "gaps": len(gaps), "gap_idle_after_sync_ms": waited / 1e3,
            "sync_calls": len(syncs), "sync_ms": sum(s1 - s0 for s0, s1, _ in syncs) / 1e3,
            "sync_kinds": sorted({n for *_, n in syncs}), "scalar_reads": scalar,
            "top_gaps": [{"ms": round(g / 1e3, 3), "before": b[:80], "after": a[:80], "after_sync": w}
                         for g, b, a, w in biggest]}


def load_events(path: str) -> list[dict]:
    opener = open
    if path.endswith(".xz"):
        import lzma
        opener = lzma.open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace.get("traceEvents", trace) if isinstance(trace, dict) else trace


def summarize(path: str) -> dict | None:
    return summarize_events(load_events(path))


def compiled_regions(events: list[dict], top: int = 8) -> dict | None:
    """The host's time per call of a torch.compile'd region (a regional-compiled block): the region's
    own span, dynamo's cache lookup (guard checks) before it, and the host ops inside it that took
    longest per call. Issue 12: the fp8 step's GPU idled at block boundaries while the host spent
    ~1.2 ms launching each ~1.6 ms block; this says how much of that is guards. Microseconds per call;
    None without "Torch-Compiled Region" events (an eager run)."""
    ops = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    regions = [e for e in ops if str(e.get("name", "")).startswith("Torch-Compiled Region")]
    if not regions:
        return None
    lookups = [e for e in ops if e.get("name") == "TorchDynamo Cache Lookup"]
    by_tid: dict = {}
    for e in ops:
        by_tid.setdefault(e.get("tid"), []).append(e)
    inside: dict[str, float] = {}
    for r in regions:
        t0, t1 = float(r["ts"]), float(r["ts"]) + float(r["dur"])
        for e in by_tid.get(r.get("tid"), ()):
            if e is not r and t0 <= float(e["ts"]) and float(e["ts"]) + float(e["dur"]) <= t1:
                name = str(e["name"])[:70]
                inside[name] = inside.get(name, 0.0) + float(e["dur"])
    n = len(regions)
    return {"calls": n, "region_us": sum(float(r["dur"]) for r in regions) / n,
            "cache_lookup_us": sum(float(e["dur"]) for e in lookups) / len(lookups) if lookups else 0.0,
            "top_inside_us": [(k, round(v / n, 1)) for k, v in sorted(inside.items(), key=lambda kv: -kv[1])[:top]]}


def gap_hosts(events: list[dict], min_gap_us: float = 300.0, top: int = 8) -> dict | None:
    """What the host was doing while the GPU sat idle: for each gap of at least `min_gap_us` between
    two GPU events, the host ops (cpu_op/cuda_runtime, on the thread that ran the most cpu ops) that
    overlap it, summed per op name over all such gaps. Issue 12: with CUDA graphs the blocks cost the
    host little, yet the sampled step kept ~11 ms of gaps; this says which host work they wait on
    (ComfyUI's eager prologue after a sync, concatenations, padding). Milliseconds; None without GPU events."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and "dur" in e and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: float(e["ts"]))
    if not gpu:
        return None
    cpu = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("cat") in ("cpu_op", "cuda_runtime")]
    counts: dict = {}
    for e in cpu:
        if e.get("cat") == "cpu_op":
            counts[e.get("tid")] = counts.get(e.get("tid"), 0) + 1
    main = max(counts, key=counts.get) if counts else None
    cpu = [e for e in cpu if e.get("tid") == main]
    total, n, per_op = 0.0, 0, {}
    end = float(gpu[0]["ts"]) + float(gpu[0]["dur"])
    for e in gpu[1:]:
        start = float(e["ts"])
        if start - end >= min_gap_us:
            n += 1
            total += start - end
            for c in cpu:  # the host's ops overlapping the idle interval, by how much they overlap it
                lap = min(start, float(c["ts"]) + float(c["dur"])) - max(end, float(c["ts"]))
                if lap > 0:
                    name = str(c["name"])[:60]
                    per_op[name] = per_op.get(name, 0.0) + lap
        end = max(end, start + float(e["dur"]))
    return {"gaps": n, "gap_ms": total / 1e3,
            "host_ops_ms": [(k, round(v / 1e3, 2)) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]]}


if __name__ == "__main__":  # python bench/timeline.py TRACE.json[.xz]: the figures above for one trace
    import sys

    evs = load_events(sys.argv[1])
    print(json.dumps({"host_waits": host_waits(evs), "compiled_regions": compiled_regions(evs), "gap_hosts": gap_hosts(evs)},
                     indent=1))
