"""RoPE inside the compiled blocks (on by default since it was measured; QUANTLORA_FUSE_ROPE=0 turns it off).

ComfyUI v0.33's Flux attention applies RoPE through comfy_kitchen's custom ops (`apply_rope`,
`apply_rope1`): a CUDA kernel per block that torch.compile cannot look into, 3.8 ms of the 97 ms
fp8 step on an H200 (issue 12), reading and writing q and k once more after inductor's fused norm
kernel. With the switch on, dynamo traces ComfyUI's own pure-torch RoPE in their place (what
ComfyUI runs while training: comfy.ldm.flux.math._apply_rope / _apply_rope1, the same arithmetic in
fp32), so inductor fuses it into the kernels around it. Eager forwards keep the kernel.
Measured (H200, fp8 step with a merged LoRA, BENCHMARKS.md issue 12): the RoPE kernel's 3.8 ms go,
the fused kernels grow by ~2.5 ms, the GPU waits less between kernels (57 launches fewer); the
sampled step 0.579x -> 0.569x of bf16 eager in the same call, the same error.

torch.compiler.substitute_in_graph is process-wide and cannot be undone: every torch.compile that
traces those two functions afterwards sees the pure-torch form, ComfyUI's own compile nodes
included (the same arithmetic ComfyUI itself runs where the kernel is missing). That is why it is
installed only when a model is compiled, and why it has a switch.
"""
from __future__ import annotations

import contextlib
import logging
import os

ENV = "QUANTLORA_FUSE_ROPE"
log = logging.getLogger("quantlora")

_state: dict = {}  # "installed": True, or "why": the reason it could not be


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def install() -> str | None:
    """Registers the substitution once per process. None when it is in place; else why not (an
    older ComfyUI without comfy_kitchen's RoPE, or one that renamed its pure-torch RoPE)."""
    if _state:
        return _state.get("why")
    try:
        import torch
        import comfy.ldm.flux.math as flux_math
        import comfy.quant_ops as quant_ops

        kitchen = quant_ops.ck
        pairs = [(kitchen.apply_rope, flux_math._apply_rope), (kitchen.apply_rope1, flux_math._apply_rope1)]
        for custom, plain in pairs:  # the signature check raises TypeError on a mismatch
            torch.compiler.substitute_in_graph(custom)(plain)
    except (ImportError, AttributeError, TypeError) as e:
        _state["why"] = f"this ComfyUI has no comfy_kitchen RoPE to replace ({type(e).__name__}: {e})"
        log.info("QuantLoRA: fused RoPE (%s) not available: %s", ENV, _state["why"])
        return _state["why"]
    _state["installed"] = True
    log.info("QuantLoRA: RoPE traced as plain torch in compiled graphs (%s=0 keeps ComfyUI's kernel)", ENV)
    return None


def active() -> bool:
    """Whether compiled graphs of this process trace the pure-torch RoPE."""
    return bool(_state.get("installed"))


def install_if_enabled() -> str | None:
    return install() if enabled() else "off"


@contextlib.contextmanager
def plain_rope_for_export():
    """While a block is exported ahead of time (speed/aot_store.py): torch.export does not go through
    dynamo's substitution, so ComfyUI's own switch picks its pure-torch RoPE, as the compiled graphs
    trace it. Only where the substitution is active; the switch is global, and ComfyUI runs one prompt
    at a time, on the thread that exports."""
    import comfy.model_management as mm

    if not active():
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before
