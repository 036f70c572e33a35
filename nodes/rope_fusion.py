"""RoPE inside the compiled blocks (QUANTLORA_FUSE_ROPE=1; experimental: off until measured on a GPU).

ComfyUI v0.33's Flux attention applies RoPE through comfy_kitchen's custom ops (`apply_rope`,
`apply_rope1`): a CUDA kernel per block that torch.compile cannot look into, 3.8 ms of the 97 ms
fp8 step on an H200 (issue 12), reading and writing q and k once more after inductor's fused norm
kernel. With the switch on, dynamo traces ComfyUI's own pure-torch RoPE in their place (what
ComfyUI runs while training: comfy.ldm.flux.math._apply_rope / _apply_rope1, the same arithmetic in
fp32), so inductor fuses it into the kernels around it. Eager forwards keep the kernel.

torch.compiler.substitute_in_graph is process-wide and cannot be undone: every torch.compile that
traces those two functions afterwards sees the pure-torch form, ComfyUI's own compile nodes
included. That is why it is a switch, and why it is installed only when a model is compiled.
"""
from __future__ import annotations

import logging
import os

ENV = "QUANTLORA_FUSE_ROPE"
log = logging.getLogger("quantlora")

_state: dict = {}  # "installed": True, or "why": the reason it could not be


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


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
        log.info("QuantLoRA: %s=1 ignored: %s", ENV, _state["why"])
        return _state["why"]
    _state["installed"] = True
    log.info("QuantLoRA: RoPE traced as plain torch in compiled graphs (%s=1)", ENV)
    return None


def install_if_enabled() -> str | None:
    return install() if enabled() else "off"
