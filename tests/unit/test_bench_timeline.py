"""Layer 1: bench/timeline.py, the summary of an offloaded step's GPU trace (issue 13: does the
compute engine wait for copies or for the host?), on a made-up Chrome trace with known answers."""
import importlib.util
import json
import os

import pytest


@pytest.fixture(scope="module")
def timeline():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "timeline.py")
    spec = importlib.util.spec_from_file_location("timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ev(cat, ts, dur, name="k"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_waits_split_into_copy_and_host(timeline, tmp_path):
    # compute:  [0,10) [10,20)          [40,50)         [70,80)
    # copies:        [5,35)                   [45,60)
    # 20-35: compute idle while a copy runs (15 us); 35-40 and 60-70: nothing runs (15 us)
    events = [ev("kernel", 0, 10), ev("kernel", 10, 10), ev("kernel", 40, 10), ev("kernel", 70, 10),
              ev("gpu_memcpy", 5, 30, "Memcpy HtoD (Pinned -> Device)"),
              ev("gpu_memcpy", 45, 15, "Memcpy HtoD (Pinned -> Device)"),
              ev("gpu_memcpy", 50, 5, "Memcpy DtoH (Device -> Pinned)"),  # not a weight copy
              ev("cpu_op", 0, 500, "aten::mm"),                               # host side: ignored
              {"ph": "i", "cat": "kernel", "name": "marker", "ts": 3}]          # not a span
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = timeline.summarize(str(path))
    ms = 1e-3
    assert got["window_ms"] == pytest.approx(80 * ms)
    assert got["compute_busy_ms"] == pytest.approx(40 * ms)
    assert got["copy_busy_ms"] == pytest.approx(45 * ms)
    assert got["compute_idle_ms"] == pytest.approx(40 * ms)
    assert got["compute_idle_while_copying_ms"] == pytest.approx(25 * ms)  # 20-35 and 50-60
    assert got["all_idle_ms"] == pytest.approx(15 * ms)                   # 35-40 and 60-70
    assert got["compute_idle_ms"] == pytest.approx(got["compute_idle_while_copying_ms"] + got["all_idle_ms"])
    assert got["kernels"] == 4 and got["copies"] == 2


def test_no_gpu_events(timeline):
    assert timeline.summarize_events([ev("cpu_op", 0, 5)]) is None


def test_host_waits_find_the_gaps_a_sync_left(timeline, tmp_path):
    """GPU work [0,100) [100,200), a 300 us gap, [500,600), a 40 us gap, [640,700), a 150 us gap,
    [850,900). The host blocked in cudaStreamSynchronize from 150 until 210 (the GPU drained at 200),
    then took until 500 to queue work: that gap follows a sync; the 150 us one does not (a slow host)."""
    events = [ev("kernel", 0, 100, "a"), ev("kernel", 100, 100, "b"), ev("gpu_memcpy", 500, 100, "Memcpy HtoD"),
              ev("kernel", 640, 60, "c"), ev("kernel", 850, 50, "d"),
              ev("cuda_runtime", 150, 60, "cudaStreamSynchronize"), ev("cuda_runtime", 700, 5, "cudaLaunchKernel"),
              ev("cpu_op", 140, 75, "aten::_local_scalar_dense"), ev("cpu_op", 140, 80, "aten::item")]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = timeline.host_waits(timeline.load_events(str(path)))
    assert got["gaps"] == 2 and got["gap_idle_ms"] == pytest.approx(0.45)  # the 40 us gap is under the bar
    assert got["gap_idle_after_sync_ms"] == pytest.approx(0.3)
    assert got["sync_calls"] == 1 and got["sync_ms"] == pytest.approx(0.06) and got["sync_kinds"] == ["cudaStreamSynchronize"]
    assert got["scalar_reads"] == 2
    first, second = got["top_gaps"]
    assert first == {"ms": 0.3, "before": "b", "after": "Memcpy HtoD", "after_sync": True}
    assert second == {"ms": 0.15, "before": "c", "after": "d", "after_sync": False}
    assert timeline.host_waits([ev("cpu_op", 0, 5)]) is None
    # from a marker on (the sampler's first step set up before it): the first gap and sync left out
    events.append(ev("user_annotation", 300, 10, "step 0"))
    since = timeline.marker_end(events, "step 0")
    assert since == 310 and timeline.marker_end(events, "step 9") is None
    later = timeline.host_waits(events, since_us=since)
    assert later["gaps"] == 1 and later["gap_idle_ms"] == pytest.approx(0.15) and later["sync_calls"] == 0
    assert later["scalar_reads"] == 0


def test_compressed_traces_read_the_same(timeline, tmp_path):
    import lzma

    events = [ev("kernel", 0, 10), ev("kernel", 100, 10)]
    path = tmp_path / "trace.json.xz"
    with lzma.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert timeline.summarize(str(path))["compute_idle_ms"] == pytest.approx(0.09)
    assert timeline.host_waits(timeline.load_events(str(path)))["gaps"] == 1


def test_compiled_regions_split_host_time_per_call(timeline):
    def op(name, ts, dur, tid=1, cat="cpu_op"):
        return dict(ev(cat, ts, dur, name), tid=tid)

    events = [
        # two calls of a compiled block: a guard lookup, then the region with a graph call and launches inside
        op("TorchDynamo Cache Lookup", 0, 100), op("Torch-Compiled Region: 0/0", 100, 1000),
        op("## Call CompiledFxGraph abc", 150, 800), op("cuLaunchKernel", 200, 10, cat="cuda_driver"),
        op("TorchDynamo Cache Lookup", 2000, 60), op("Torch-Compiled Region: 0/0", 2060, 600),
        op("## Call CompiledFxGraph abc", 2100, 400), op("cuLaunchKernel", 2200, 30, cat="cuda_driver"),
        op("aten::mm", 300, 10, tid=2),   # another thread's op inside the span: not the region's
        op("aten::mm", 1500, 10),         # between the calls: not inside either
        ev("kernel", 150, 50)]            # GPU: ignored
    got = timeline.compiled_regions(events)
    assert got["calls"] == 2
    assert got["region_us"] == pytest.approx(800) and got["cache_lookup_us"] == pytest.approx(80)
    assert got["top_inside_us"] == [("## Call CompiledFxGraph abc", 600.0), ("cuLaunchKernel", 20.0)]
    assert timeline.compiled_regions([op("aten::mm", 0, 5)]) is None  # eager: no regions


def test_gap_hosts_names_the_host_work_behind_gpu_idle(timeline):
    # GPU: [0,100) then idle until 600, [600,700), idle 700-750 (under the threshold), [750,800)
    # host (main thread): a cat over 150-450 and a pad over 400-650 overlap the long gap (by 300 and 200 us);
    # an op on another thread and one after the gap do not count
    events = [ev("kernel", 0, 100), ev("kernel", 600, 100), ev("kernel", 750, 50),
              ev("cpu_op", 150, 300, "aten::cat"), ev("cpu_op", 400, 250, "aten::pad"), ev("cpu_op", 700, 40, "aten::add")]
    other = dict(ev("cpu_op", 100, 500, "aten::copy_"), tid=2)
    for e in events:
        e["tid"] = 1
    got = timeline.gap_hosts(events + [other], min_gap_us=300)
    assert got["gaps"] == 1 and abs(got["gap_ms"] - 0.5) < 1e-9
    assert got["host_ops_ms"] == [("aten::cat", 0.3), ("aten::pad", 0.2)]
    assert timeline.gap_hosts([ev("cpu_op", 0, 10)]) is None  # no GPU events
