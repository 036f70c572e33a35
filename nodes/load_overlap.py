"""QuantizedFluxLoader's load beside the graph's other nodes.

ComfyUI (0.3.75 and later) runs a node whose execute is a coroutine before the other ready nodes and,
while it waits, goes on with every node that does not need its output (comfy_execution/graph.py,
ux_friendly_pick_node: "If an available node is async, do that first"). So the loader's work in a worker
thread runs while ComfyUI loads and runs the text encoders, instead of after them: on a restart the
two are each ~2 s (H200, BENCHMARKS.md issue 12). The model and the error a user sees are the same;
only when the work happens changes.

Both threads hold the interpreter lock for most of their work, so the overlap is partial: beside the
load the text encoder took 2.7-3.5 s instead of 1.4-1.6 s (H200); what is gained is the other's waits
on the GPU and the disk. A shorter thread switch interval (0.5 ms) while the worker ran did not change
that and was dropped (BENCHMARKS.md issue 12, sixteenth round).

Run inline (the old order) where the device's free memory cannot hold the model beside a text encoder
(`HEADROOM`), and with QUANTLORA_OVERLAP_LOAD=0. One of the pack's loads at a time: two loader nodes
of one graph take turns.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading

import torch

import comfy.model_management as mm

from ..checkpoint.sources import open_source
from ..memory import oom
from . import comfy_door

log = logging.getLogger("quantlora")
ENV = "QUANTLORA_OVERLAP_LOAD"
# Room left for what ComfyUI loads meanwhile: a T5-XXL in fp16 is 9.5 GB; most graphs load less.
HEADROOM = 10 * 2 ** 30
_LOADS = threading.Lock()
# Set when the awaiting node is cancelled (another node failed, or the user interrupted and ComfyUI's
# own thread took the interrupt): the worker stops at its next check instead of loading on, and the end
# of the prompt, which waits for the worker thread, comes at once.
_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("quantlora_load_stop", default=None)


class LoadCancelled(Exception):
    """The node that asked for this load is gone; nothing will use the model."""


def check_cancelled() -> None:
    """Raises LoadCancelled in a worker whose node was cancelled; nothing elsewhere. Called at each layer
    (the loader's progress) and between the load's phases."""
    stop = _STOP.get()
    if stop is not None and stop.is_set():
        raise LoadCancelled("the prompt ended before the load finished")


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _free_bytes(device: torch.device) -> int | None:
    got = oom.gpu_memory(device)
    if got is not None:
        return got[0]
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return None


def decide(path: str, quantization: str, device) -> tuple[bool, str]:
    """(load in a worker thread?, why): the expected weights plus HEADROOM must fit in the device's
    free memory now. A file that cannot be read is loaded inline, where its error is raised."""
    if not enabled():
        return False, f"{ENV}=0"
    device = torch.device(device)
    try:
        shapes = open_source(path).shapes()
    except Exception:  # noqa: BLE001 - the inline load raises the file's own, named error
        return False, "the file is read inline"
    need = oom.weight_estimates(shapes, torch.bfloat16, [quantization])[0][quantization] + HEADROOM
    free = _free_bytes(device)
    if free is None:
        return False, f"free memory on {device} unknown"
    gib = 2 ** 30
    if free < need:
        return False, (f"{free / gib:.1f} GiB free on {device}, {need / gib:.1f} GiB wanted beside the other nodes")
    return True, f"{free / gib:.1f} GiB free on {device}"


def _locked(build, beside_other_nodes: bool, inference: bool = False, grad: bool = True):
    # inference and grad mode are per thread: the worker takes the node's (ComfyUI executes a prompt under
    # torch.inference_mode), else the weights would not be inference tensors and torchao's tensors
    # fail at their first detach in the sampler ("Cannot set version_counter for inference tensor")
    with _LOADS, torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return build(beside_other_nodes)


async def run(build, path: str, quantization: str):
    """build(True) in a worker thread while ComfyUI runs the graph's other nodes, or inline (`decide`).
    The thread gets the node's context (asyncio.to_thread copies it), so ComfyUI's progress bar and
    interrupt reach this node as before. Inline: build(False)."""
    device = mm.get_torch_device()
    overlap, why = decide(path, quantization, device)
    name = os.path.basename(path.rstrip("/\\"))
    if not overlap:
        comfy_door.say_once(("overlap", why), "QuantLoRA: loading %s before the graph's other nodes go on (%s)",
                            name, why)
        return _locked(build, False, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    log.info("QuantLoRA: loading %s while ComfyUI runs the graph's other nodes (%s; %s=0 loads first)",
             name, why, ENV)
    stop = threading.Event()
    token = _STOP.set(stop)  # copied into the worker's context by to_thread
    try:
        return await asyncio.to_thread(_locked, build, True, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    except asyncio.CancelledError:
        stop.set()
        log.info("QuantLoRA: the load of %s stops: the prompt ended first", name)
        raise
    finally:
        _STOP.reset(token)
