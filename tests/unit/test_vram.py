"""Layer 1: memory/vram.py alone (no ComfyUI): snapshot shape, peak windows per node/prompt, reset."""
import json
import threading

from quantlora.memory import vram

G = 1024 ** 3


class FakeSource:
    """Two GPUs whose allocator the test drives; max marks behave like torch's."""

    def __init__(self, n=2):
        self.alloc = [0] * n
        self.res = [0] * n
        self.max_a = [0] * n
        self.max_r = [0] * n
        self.total = [24 * G] * n
        self.resets = 0

    def set(self, i, a, r=None):
        self.alloc[i], self.res[i] = a, max(r if r is not None else a, self.res[i])
        self.max_a[i], self.max_r[i] = max(self.max_a[i], a), max(self.max_r[i], self.res[i])

    def backend(self):
        return "cuda"

    def no_gpu_reason(self):
        return None

    def device_count(self):
        return len(self.alloc)

    def device(self, i):
        free = self.total[i] - self.res[i] - G // 2
        return {"index": i, "name": f"Fake GPU {i}", "total": self.total[i], "free": free,
                "used": self.total[i] - free, "allocated": self.alloc[i], "reserved": self.res[i]}

    def max_marks(self):
        return {i: (self.max_a[i], self.max_r[i]) for i in range(len(self.alloc))}

    def reset_marks(self):
        self.resets += 1
        self.max_a, self.max_r = list(self.alloc), list(self.res)

    def host(self):
        return {"total": 64 * G, "available": 32 * G, "used": 32 * G, "percent": 50.0, "process_rss": G}


def test_real_torch_snapshot_shape_and_consistency():
    snap = vram.snapshot(vram.PeakTracker())
    json.dumps(snap)  # JSON-serialisable
    assert set(snap) >= {"version", "time", "backend", "gpu", "message", "devices", "host", "peak_reset_at", "prompt"}
    assert snap["host"]["total"] > 0 and 0 < snap["host"]["used"] <= snap["host"]["total"]
    assert snap["host"]["process_rss"] > 0
    assert snap["gpu"] == bool(snap["devices"])
    if not snap["gpu"]:  # this CPU machine: degrades to host-only, says so
        assert snap["backend"] == "none" and snap["message"].startswith("no GPU")
    for d in snap["devices"]:
        assert 0 <= d["allocated"] <= d["reserved"] <= d["total"]
        assert d["allocated"] <= d["peak_allocated"] and d["reserved"] <= d["peak_reserved"]


def test_node_and_prompt_peaks_are_windows():
    src = FakeSource()
    t = vram.PeakTracker(src)
    src.set(0, 1 * G)
    assert t.begin_prompt("p1") == []
    assert t.begin_node("1") is None
    src.set(0, 5 * G)
    src.set(0, 2 * G)                 # node 1 peaks at 5 G, then frees
    rec1 = t.begin_node("2", "2")
    assert rec1["node"] == "1" and rec1["prompt_id"] == "p1" and rec1["gpu"]
    assert rec1["peak_allocated"] == 5 * G and rec1["peak_reserved"] == 5 * G
    src.set(1, 3 * G)                 # node 2 uses GPU 1 only
    src.set(1, 0)
    out = t.end_prompt("success")
    kinds = [k for k, _ in out]
    assert kinds == ["node", "prompt"]
    rec2, prompt = out[0][1], out[1][1]
    assert rec2["node"] == "2"
    assert rec2["peak_allocated"] == 3 * G          # the largest device
    assert {d["index"]: d["peak_allocated"] for d in rec2["devices"]} == {0: 2 * G, 1: 3 * G}
    assert prompt["prompt_id"] == "p1" and prompt["running"] is False and prompt["status"] == "success"
    assert prompt["peak_allocated"] == 5 * G
    assert prompt["nodes"] == {"1": {"peak_allocated": 5 * G, "peak_reserved": 5 * G},
                               "2": {"peak_allocated": 3 * G, "peak_reserved": 5 * G}}
    assert t.end_prompt() == []                     # idempotent
    assert not t.running()


def test_reset_restarts_global_peak_but_not_the_running_prompt():
    src = FakeSource(1)
    t = vram.PeakTracker(src)
    t.begin_prompt("p")
    t.begin_node("a")
    src.set(0, 8 * G)
    src.set(0, 1 * G)
    assert vram.snapshot(t)["devices"][0]["peak_allocated"] == 8 * G
    t.reset()
    snap = vram.snapshot(t)
    assert snap["devices"][0]["peak_allocated"] == 1 * G    # restarts from current usage
    assert snap["prompt"]["running"] and snap["prompt"]["node"] == "a"
    assert snap["prompt"]["peak_allocated"] == 8 * G        # the running prompt keeps its peak
    rec = t.end_node()
    assert rec["peak_allocated"] == 8 * G


def test_snapshot_is_read_only_and_bounded():
    src = FakeSource(1)
    t = vram.PeakTracker(src)
    t.begin_prompt("p")
    for i in range(vram.MAX_NODES + 50):
        t.begin_node(str(i))
    t.end_prompt()
    before = src.resets
    snap = vram.snapshot(t)
    assert src.resets == before                     # reading never resets torch's marks
    assert len(snap["prompt"]["nodes"]) == vram.MAX_NODES
    assert len(json.dumps(snap)) < 64 * 1024


def test_no_gpu_source_records_zero_peaks_and_host():
    t = vram.PeakTracker()
    if t.source.device_count():
        return  # a GPU machine: covered by the tests above through torch
    t.begin_prompt("p")
    t.begin_node("n")
    rec = t.end_node()
    assert rec["gpu"] is False and rec["peak_allocated"] == 0 and rec["devices"] == []
    assert rec["host_rss"] > 0


def test_thread_safety_of_boundaries_and_reads():
    src = FakeSource(1)
    t = vram.PeakTracker(src)
    errors = []

    def worker():
        try:
            for p in range(50):
                t.begin_prompt(str(p))
                for n in range(5):
                    t.begin_node(str(n))
                    src.set(0, (n + 1) * G)
                t.end_prompt()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    th = threading.Thread(target=worker)
    th.start()
    while th.is_alive():
        vram.snapshot(t)
        t.reset()
    th.join()
    assert not errors


def test_real_gpu_peaks_per_node_and_reset():
    """Skipped without CUDA/ROCm (this CPU machine); the same windows through torch's real counters."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA or ROCm device")
    M = 2 ** 20
    torch.empty(1, device="cuda")  # a context on the current device, as ComfyUI has
    t = vram.PeakTracker()
    t.begin_prompt("p")
    t.begin_node("big")
    a = torch.empty(512 * M, dtype=torch.uint8, device="cuda")
    del a
    big = t.begin_node("small")
    b = torch.empty(16 * M, dtype=torch.uint8, device="cuda")
    snap = vram.snapshot(t)
    del b
    (_, small), (_, prompt) = t.end_prompt()
    assert big["gpu"] and big["peak_allocated"] >= 512 * M
    assert 16 * M <= small["peak_allocated"] < 512 * M
    assert prompt["peak_allocated"] >= 512 * M and prompt["nodes"]["big"]["peak_allocated"] >= 512 * M
    d = snap["devices"][0]
    assert snap["gpu"] and snap["backend"] in ("cuda", "rocm") and d["name"]
    assert 0 <= d["allocated"] <= d["reserved"] <= d["total"] and d["peak_allocated"] >= 512 * M
    assert d["free"] is not None and d["reserved"] <= d["used"] <= d["total"]
    torch.cuda.empty_cache()
    t.reset()
    after = vram.snapshot(t)["devices"][0]
    assert after["allocated"] <= after["peak_allocated"] < 512 * M
