"""Layer 3: the VRAM routes and websocket events through a real ComfyUI server.

Without CUDA (this CPU machine) these degrade, and say so where they do: the JSON has no
devices, gpu is false and message says "no GPU"; per-node and prompt peaks are 0 with an
empty device list (host_rss carries the process RAM instead); the allocated <= reserved <=
total and peak >= current checks run over zero devices. Everything else (shape, host RAM,
reset, the events' timing and per-node records) is checked the same with or without a GPU.
"""
import random
import asyncio
import json
import threading
import time
import urllib.request

import pytest

from graphs import loader, txt2img
from harness.server import PromptError, execution_error

pytestmark = pytest.mark.server

TOP_KEYS = {"version", "time", "backend", "gpu", "message", "devices", "host", "peak_reset_at", "prompt"}
DEV_KEYS = {"index", "name", "total", "free", "used", "allocated", "reserved", "peak_allocated", "peak_reserved"}
HOST_KEYS = {"total", "available", "used", "percent", "process_rss"}
RUN_STEPS, RUN_SIZE = 120, 128  # a sampling run of a few seconds with the demo Flux on CPU
PEAK_KEYS = {"prompt_id", "node", "display_node", "gpu", "peak_allocated", "peak_reserved", "devices", "seconds",
             "host_rss"}


def check_snapshot(s):
    assert TOP_KEYS <= set(s), s
    assert s["version"] == 1 and isinstance(s["time"], float)
    assert s["gpu"] == bool(s["devices"])
    if s["gpu"]:
        assert s["backend"] in ("cuda", "rocm") and s["message"] is None
    else:  # degrades without CUDA: host only, and the JSON says there is no GPU
        assert s["backend"] == "none" and s["message"].startswith("no GPU")
    for d in s["devices"]:  # (no devices here without CUDA)
        assert DEV_KEYS <= set(d)
        assert isinstance(d["name"], str) and d["name"]
        assert 0 <= d["allocated"] <= d["reserved"] <= d["total"]
        assert d["allocated"] <= d["peak_allocated"] and d["reserved"] <= d["peak_reserved"] <= d["total"]
        if d["free"] is not None:
            assert 0 <= d["free"] <= d["total"] and d["used"] == d["total"] - d["free"]
            assert d["reserved"] <= d["used"]  # torch's pool is part of what the driver counts as used
    h = s["host"]
    assert HOST_KEYS <= set(h)
    assert h["total"] > 0 and 0 < h["used"] <= h["total"] and 0 <= h["available"] <= h["total"]
    assert 0 < h["process_rss"] < h["total"]  # the ComfyUI process itself
    assert len(json.dumps(s)) < 64 * 1024


@pytest.mark.no_demo_models
def test_route_shape_and_meaning(server):
    s = server.get("/quantlora/vram")
    check_snapshot(s)
    # the frontend calls it through ComfyUI's /api mirror
    check_snapshot(server.get("/api/quantlora/vram"))
    # system_stats (ComfyUI's own) agrees on the host's total RAM
    assert server.get("/system_stats")["system"]["ram_total"] == s["host"]["total"]


@pytest.mark.no_demo_models
def test_route_is_read_only_and_ignores_request_data(server):
    before = server.get("/quantlora/vram")["peak_reset_at"]
    with pytest.raises(PromptError) as e:
        server.post("/quantlora/vram", {"path": "/etc/passwd"})
    assert e.value.status == 405
    s = server.get("/quantlora/vram?path=/etc/passwd&file=x")
    check_snapshot(s)
    assert s["peak_reset_at"] == before  # reading resets nothing


@pytest.mark.no_demo_models
def test_reset(server):
    before = server.get("/quantlora/vram")
    time.sleep(0.01)
    after = server.post("/quantlora/vram/reset", {"ignored": "/etc/passwd"})
    check_snapshot(after)
    assert after["peak_reset_at"] > before["peak_reset_at"]
    assert server.get("/quantlora/vram")["peak_reset_at"] == after["peak_reset_at"]
    for d in after["devices"]:  # with CUDA: the peak restarts from the current usage (no devices here)
        assert d["peak_allocated"] <= max(d["allocated"], 1) * 1.5 + 64 * 2 ** 20
    with pytest.raises(PromptError) as e:  # only POST resets (a GET falls through to the static files)
        server.get("/quantlora/vram/reset")
    assert e.value.status in (404, 405)
    assert server.get("/quantlora/vram")["peak_reset_at"] == after["peak_reset_at"]


class WsRecorder:
    """Records every JSON websocket message for the harness's client id, with arrival times."""

    def __init__(self, server):
        self.url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self.msgs = []
        self.ready = threading.Event()
        self._stop = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        import aiohttp

        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
            self.ready.set()
            while not self._stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.receive(), 0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    self.msgs.append((time.time(), m["type"], m["data"]))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)

    def of(self, prompt_id, kind=None):
        return [(t, k, d) for t, k, d in self.msgs
                if (kind is None or k == kind) and isinstance(d, dict) and d.get("prompt_id") == prompt_id]


def test_events_during_a_run_and_per_node_peaks(server):
    seed = random.randrange(10 ** 12)  # a seed no other test uses: the sampler really runs (not served from cache)
    with WsRecorder(server) as ws:
        # long enough on CPU for periodic events (the tiny demo Flux takes milliseconds a step at 64 px)
        pid = server.queue(txt2img(loader(), seed=seed, steps=RUN_STEPS, size=RUN_SIZE, prefix="vram-e2e"))
        entry = server.wait(pid, timeout=300)
        assert execution_error(entry) is None, execution_error(entry)
        deadline = time.time() + 10
        while time.time() < deadline and not any(k == "executing" and d.get("node") is None
                                                 for _, k, d in ws.of(pid)):
            time.sleep(0.1)
        time.sleep(3)  # idle: at most the one closing snapshot may follow
        msgs = list(ws.msgs)

    kinds = [k for _, k, d in msgs if isinstance(d, dict) and d.get("prompt_id") == pid]
    start_t = next(t for t, k, d in msgs if k == "execution_start" and d["prompt_id"] == pid)
    end_t = next(t for t, k, d in msgs if k == "executing" and d.get("node") is None and d.get("prompt_id") == pid)

    # periodic snapshots while the prompt runs (the first at once, then about every second)
    vram_events = [(t, d) for t, k, d in msgs if k == "quantlora.vram"]
    during = [d for t, d in vram_events if start_t <= t <= end_t]
    print(f"run {end_t - start_t:.2f}s, {len(during)} quantlora.vram events during it")
    assert during, f"no quantlora.vram event during the run; kinds: {kinds}"
    for d in during:
        check_snapshot(d)
    assert any(d["prompt"] and d["prompt"]["prompt_id"] == pid and d["prompt"]["running"] for d in during)
    # about once a second, no storm. The closing (idle) snapshot is sent as soon as the queue goes
    # idle, which can be a moment after the last periodic one and before "executing" {node: null}
    # reaches the client: it is left out of the gaps and counted with what follows the run.
    def running(d):
        return bool(d["prompt"] and d["prompt"]["running"])
    busy = [(t, d) for t, d in vram_events if start_t <= t <= end_t and running(d)]
    gaps = [b - a for (a, _), (b, _) in zip(busy, busy[1:])]
    assert all(g > 0.5 for g in gaps), (gaps, end_t - start_t)
    # idle: no periodic events after the run, only the one closing snapshot. The first snapshot of
    # the busy spell (the queue got the prompt) can be read just before execution starts and reach
    # the client after "execution_start": it still shows the previous prompt (the tracker names this
    # one from its start on, and no other prompt runs here), so it is not a closing one.
    def ours(d):
        return bool(d["prompt"] and d["prompt"]["prompt_id"] == pid)
    # Likewise the last periodic one can be read while the prompt still runs and arrive after the end:
    # a snapshot taken after the end (its own server-side time, same clock as the client's) that still
    # says running is the fault, and any not-running snapshot of this prompt past the closing one.
    after_start = [(t, d) for t, d in vram_events if t >= start_t]
    queued = [d for t, d in after_start if not ours(d)]
    closing = [d for t, d in after_start if ours(d) and not running(d)]
    assert len(queued) <= 1 and not any(running(d) for d in queued), queued
    assert len(closing) <= 1, closing
    assert not [d for t, d in vram_events if running(d) and d["time"] > end_t + 0.002]

    # one per-node record for each node that executed (sent "executing"), before the prompt record
    executed = [d["node"] for _, k, d in msgs if k == "executing" and d.get("prompt_id") == pid and d.get("node")]
    nodes = [d for _, k, d in msgs if k == "quantlora.vram.node" and d["prompt_id"] == pid]
    assert "sample" in executed
    assert [n["node"] for n in nodes] == executed
    for n in nodes:
        assert PEAK_KEYS <= set(n)
        assert n["seconds"] >= 0 and n["peak_allocated"] <= n["peak_reserved"]
        if n["gpu"]:
            assert n["devices"] and n["peak_allocated"] == max(d["peak_allocated"] for d in n["devices"])
        else:  # degrades without CUDA: no device peaks, the process RSS instead
            assert n["peak_allocated"] == 0 and n["devices"] == [] and n["host_rss"] > 0
    [prompt] = [d for _, k, d in msgs if k == "quantlora.vram.prompt" and d["prompt_id"] == pid]
    assert prompt["running"] is False and prompt["status"] == "success"
    assert set(prompt["nodes"]) == set(executed)
    assert prompt["peak_allocated"] >= max(n["peak_allocated"] for n in nodes)
    if prompt["gpu"]:  # with CUDA the sampler really allocates
        assert prompt["nodes"]["sample"]["peak_allocated"] > 0
    order = [k for k in kinds if k in ("quantlora.vram.prompt", "execution_success")]
    assert order == ["quantlora.vram.prompt", "execution_success"]

    # the route keeps the last prompt's record
    last = server.get("/quantlora/vram")["prompt"]
    assert last["prompt_id"] == pid and last["running"] is False and set(last["nodes"]) == set(executed)
