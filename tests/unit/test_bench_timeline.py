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
