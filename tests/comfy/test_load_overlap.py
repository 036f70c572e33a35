"""Layer 2: QuantizedFluxLoader's load beside the graph's other nodes (nodes/load_overlap.py).

ComfyUI's executor awaits an async node in its own event loop and runs the other ready nodes while the
node's task is pending; these tests play that loop: while the build waits, other work on the loop must
go on, and what the build returns or raises reaches the awaiting node unchanged."""
import asyncio
import logging
import threading

import pytest
import torch

from quantlora.errors import QuantLoRAError


@pytest.fixture(scope="module")
def flux_path(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    sd = dm.flux_bfl_state_dict(dm.TINY, seed=8, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("overlap") / "flux-overlap.safetensors"), sd)


def _play(coro_fn, other):
    """ComfyUI's order: create the node's task, yield once, then run `other` (a sync node) on the loop."""
    async def main():
        task = asyncio.create_task(coro_fn())
        await asyncio.sleep(0)
        ran = other()
        return await task, ran

    return asyncio.run(main())


def test_the_build_runs_in_a_thread_while_the_loop_runs_another_node(flux_path, caplog):
    from quantlora.nodes import load_overlap

    started, release = threading.Event(), threading.Event()
    loop_thread = threading.current_thread()

    def build(beside_other_nodes):
        started.set()
        assert release.wait(30), "the other node never ran: the build blocked the loop"
        return "model", beside_other_nodes, threading.current_thread() is not loop_thread

    def other_node():  # runs on the loop thread while the build is still waiting
        assert started.wait(30)
        release.set()
        return "text encoded"

    with caplog.at_level(logging.INFO, logger="quantlora"):
        (got, ran) = _play(lambda: load_overlap.run(build, flux_path, "none"), other_node)
    assert got == ("model", True, True) and ran == "text encoded"
    assert "while ComfyUI runs the graph's other nodes" in caplog.text


def test_an_error_in_the_thread_reaches_the_node_unchanged(flux_path):
    from quantlora.nodes import load_overlap

    def build(_):
        raise QuantLoRAError("flux-overlap.safetensors: a named error")

    with pytest.raises(QuantLoRAError, match="a named error"):
        _play(lambda: load_overlap.run(build, flux_path, "none"), lambda: None)


@pytest.mark.parametrize("why", ["switch", "memory", "unreadable"])
def test_inline_where_switched_off_short_of_memory_or_the_file_is_bad(flux_path, monkeypatch, caplog, tmp_path, why):
    from quantlora.nodes import load_overlap

    path = flux_path
    if why == "switch":
        monkeypatch.setenv(load_overlap.ENV, "0")
    elif why == "memory":  # free memory below the model's weights + HEADROOM
        monkeypatch.setattr(load_overlap, "_free_bytes", lambda device: load_overlap.HEADROOM // 2)
    else:
        path = str(tmp_path / "damaged.safetensors")
        open(path, "wb").write(b"\xff" * 64)
    order = []

    def build(beside_other_nodes):
        order.append("build")
        return beside_other_nodes, threading.current_thread()

    with caplog.at_level(logging.INFO, logger="quantlora"):
        (got, _), _ = _play(lambda: load_overlap.run(build, path, "none"), lambda: order.append("other"))
    assert got is False and order == ["build", "other"]  # inline: done before the loop went on
    want = {"switch": "QUANTLORA_OVERLAP_LOAD=0", "memory": "wanted beside the other nodes",
            "unreadable": "the file is read inline"}[why]
    assert want in caplog.text, caplog.text


def test_the_decision_counts_the_quantized_weights(flux_path, monkeypatch):
    """An 8-bit load needs about half of a 16-bit one: the threshold follows the quantization."""
    from quantlora.memory import oom
    from quantlora.nodes import load_overlap
    from quantlora.checkpoint.sources import open_source

    shapes = open_source(flux_path).shapes()
    est = oom.weight_estimates(shapes, torch.bfloat16, ["none", "torchao-int8-weight-only"])[0]
    assert est["torchao-int8-weight-only"] < est["none"]
    between = load_overlap.HEADROOM + (est["none"] + est["torchao-int8-weight-only"]) // 2
    monkeypatch.setattr(load_overlap, "_free_bytes", lambda device: between)
    assert load_overlap.decide(flux_path, "torchao-int8-weight-only", "cpu")[0] is True
    assert load_overlap.decide(flux_path, "none", "cpu")[0] is False


@pytest.mark.parametrize("inference", [True, False])
def test_the_thread_builds_in_the_nodes_inference_mode(flux_path, inference):
    """ComfyUI executes a prompt under torch.inference_mode, which is per thread: tensors the worker makes
    must be inference tensors as the inline load's are (torchao's weights made outside it failed at their
    first detach in the sampler)."""
    from quantlora.nodes import load_overlap

    def build(_):
        return torch.ones(2).is_inference(), torch.is_grad_enabled()

    async def node():
        with torch.inference_mode(inference):
            return await load_overlap.run(build, flux_path, "none")

    (made_inference, grad), _ = _play(node, lambda: None)
    assert made_inference is inference and grad is (not inference)



def test_a_cancelled_node_stops_its_worker_at_the_next_check(flux_path):
    """Another node failed, or ComfyUI's own thread took the user's interrupt: the prompt ends, asyncio
    cancels the pending loader and then waits for its worker thread. The worker must stop at its next
    check, not load on (a cold load: a minute)."""
    import time

    from quantlora.nodes import load_overlap

    started = threading.Event()
    seen = {}

    def build(_):
        started.set()
        t0 = time.perf_counter()
        try:
            while time.perf_counter() - t0 < 30:  # a long load: one check per layer
                load_overlap.check_cancelled()
                time.sleep(0.01)
        except load_overlap.LoadCancelled:
            seen["stopped_after_s"] = time.perf_counter() - t0
            raise
        return "loaded on"

    async def prompt():
        task = asyncio.create_task(load_overlap.run(build, flux_path, "none"))
        await asyncio.sleep(0)
        await asyncio.to_thread(started.wait, 10)
        raise RuntimeError("a node failed")  # asyncio.run cancels the task, then joins the worker

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="a node failed"):
        asyncio.run(prompt())
    assert time.perf_counter() - t0 < 10 and seen["stopped_after_s"] < 10, seen
    load_overlap.check_cancelled()  # outside a cancelled worker: nothing


def test_the_loader_node_checks_for_cancellation_at_each_layer(comfy, flux_path, monkeypatch):
    """QuantizedFluxLoader's progress goes through check_cancelled: a cancelled worker stops inside the load."""
    import os

    import folder_paths

    from quantlora.nodes import load_overlap
    from quantlora.nodes.loader_node import QuantizedFluxLoader

    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda kind: [os.path.dirname(flux_path)])
    calls = []
    real = load_overlap.check_cancelled
    monkeypatch.setattr(load_overlap, "check_cancelled", lambda: (calls.append(1), real()))
    model = asyncio.run(QuantizedFluxLoader.execute(os.path.basename(flux_path), "none", "fp32")).args[0]
    assert model is not None and len(calls) >= 4, len(calls)  # per layer and between the phases
