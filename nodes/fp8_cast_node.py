"""FP8LayerwiseCast: MODEL in, MODEL out, transformer weights stored as fp8 and upcast per layer.

Works on any ComfyUI MODEL (the pack's loader, ComfyUI's UNETLoader, any architecture): it only
walks the diffusion model's module tree (quant/fp8_cast.py). Layers already quantized (bnb,
torchao, quanto, fp8 files loaded as fp8) are left alone; a MODEL with nothing to cast comes back
unchanged.

Graph semantics: the input MODEL is never modified. The node builds a new model whose selected
weights are created directly in fp8 (the rest of the tree is copied: norms, embedders, the final
layer, buffers) and wraps it in a clone of the input ModelPatcher (its patches, model_options,
wrappers and callbacks carried over; its weight backups, pinned-memory set and load state not).
Other branches that use the input MODEL keep its weights. The cost: while ComfyUI's cache holds the
input MODEL, host memory holds both it and the fp8 copy (1.5x a bf16 model). Applying the node to
its own output with the same settings returns that MODEL as is (idempotent); with other settings
it raises instead of rounding fp8 weights twice.

Dynamic VRAM (ComfyUI v0.33+ on NVIDIA, comfy-aimdo): an input MODEL under dynamic VRAM is never
deep-copied (its module tree carries comfy-aimdo's placement state). ComfyUI reloads it once outside
dynamic VRAM (its own ModelPatcher.clone(disable_dynamic=True)), the node casts that private copy in
place, and the output is a plain ModelPatcher, placed the classic way; the log says so. The
pack's own loader already gives plain MODELs. Every write into ComfyUI's bookkeeping goes through
nodes/comfy_door.py.

LoRA slots (lora/slots.py) attached after this node wrap the fp8 layers and keep their buffers in
bf16 (or the dtype asked for): the LoRA path computes in high precision; only the base weight is fp8.
"""
from __future__ import annotations

import logging

import torch

from comfy_api.latest import io

from ..errors import QuantLoRAError, check_choice
from ..quant.fp8_cast import (DEFAULT_SKIP_TEXT, STORAGE_DTYPES, CastSpec, apply_fp8_cast, cast_copy, cast_spec,
                               check_again, parse_skip, plan)
from ..memory.sizes import module_bytes
from . import comfy_door
from .bridge import DTYPES
from .search_aliases import search_aliases

log = logging.getLogger("quantlora")
COMPUTE_NAMES = ["auto", "bf16", "fp16", "fp32"]


def model_compute_dtype(base) -> torch.dtype:
    """The dtype the model computes in now: what ComfyUI casts its inputs to."""
    dt = comfy_door.compute_dtype_of(base)
    if isinstance(dt, torch.dtype) and dt.is_floating_point and torch.finfo(dt).bits >= 16:
        return dt
    return torch.bfloat16


def _message(report, storage_dtype, compute, before, after) -> str:
    return (f"{report.layers} layers stored as {storage_dtype}, compute {str(compute).replace('torch.', '')}, "
            f"{len(report.skipped)} kept in high precision; weights {before / 2**30:.3f} -> {after / 2**30:.3f} GiB")


def _cast_in_place(model, own, storage_dtype, storage, compute, skip):
    """A dynamic-VRAM input: `own` is a plain patcher on a fresh copy of its model that nothing else
    holds (comfy_door.fresh_non_dynamic_copy); cast that copy in place."""
    base = own.model
    dm = base.diffusion_model
    before = module_bytes(dm)
    report = apply_fp8_cast(dm, storage, compute, skip, convert_rest=not comfy_door.casts_per_layer(base))
    comfy_door.set_compute_dtype(base, compute)
    comfy_door.forget_size(own)
    own.model_size()
    return own, _message(report, storage_dtype, compute, before, module_bytes(dm))


def cast_model(model, storage_dtype: str = "float8_e4m3fn", compute_dtype: str = "auto", skip_pattern: str | None = None):
    """(MODEL, message)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise QuantLoRAError(f"storage_dtype {storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}.")
    check_choice("compute_dtype", compute_dtype, COMPUTE_NAMES)
    base = model.model
    dm = getattr(base, "diffusion_model", None)
    if dm is None:
        raise QuantLoRAError("FP8LayerwiseCast: this MODEL has no diffusion_model to cast.")
    storage = STORAGE_DTYPES[storage_dtype]
    compute = model_compute_dtype(base) if compute_dtype == "auto" else DTYPES[compute_dtype]
    skip = parse_skip(skip_pattern)
    spec = CastSpec(storage, compute, skip)
    if cast_spec(dm) == spec:
        return model, "already cast with these settings: unchanged"
    names, kept = plan(dm, skip)
    if not names and cast_spec(dm) is None:
        return model, "nothing to cast (no high-precision Linear/Conv layer outside the skip pattern): unchanged"
    if cast_spec(dm) is not None:
        check_again(dm, spec)  # raises: other settings than the ones it was cast with
    # Dynamic VRAM (v0.33+): the input's weights are placed by comfy-aimdo and its module tree carries
    # that bookkeeping; the cast works on a plain copy ComfyUI reloads for us and casts it in place.
    own = comfy_door.fresh_non_dynamic_copy(model, "FP8LayerwiseCast", "fp8 weights are stored and upcast by "
                                            "QuantLoRA's layers")
    if own is not None:
        return _cast_in_place(model, own, storage_dtype, storage, compute, skip)
    comfy_door.unload_clones_of(model, include_self=True)  # weights back on the host and unpatched before they are copied
    before = module_bytes(dm)
    new_base, report = cast_copy(base, storage, compute, skip, device=model.offload_device, under="diffusion_model",
                                 share=comfy_door.copy_memo(base), convert_rest=not comfy_door.casts_per_layer(base))
    new_base.to(model.offload_device)
    comfy_door.set_compute_dtype(new_base, compute)
    out = comfy_door.rebind(model, new_base)
    return out, _message(report, storage_dtype, compute, before, module_bytes(new_base.diffusion_model))


class FP8LayerwiseCast(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FP8LayerwiseCast",
            display_name="FP8 Layerwise Cast",
            category="QuantLoRA",
            description="Stores the transformer's weights as fp8 (half of bf16) and upcasts each layer to the compute "
                        "dtype just before use. Embedders, norms and the final layer stay in high precision by default. "
                        "Works on any MODEL; the input MODEL is not modified.",
            **search_aliases("fp8", "float8", "layerwise cast", "low vram"),
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion MODEL; the cast applies to a copy, the input stays as it is."),
                io.Combo.Input("storage_dtype", options=list(STORAGE_DTYPES), default="float8_e4m3fn",
                               tooltip="e4m3fn: more precision (the usual choice). e5m2: more range."),
                io.Combo.Input("compute_dtype", options=COMPUTE_NAMES, default="auto",
                               tooltip="The dtype layers compute in. auto = the model's current dtype."),
                io.String.Input("skip_pattern", default=DEFAULT_SKIP_TEXT, multiline=True,
                                tooltip="Layers kept in high precision: globs, one per line (or comma-separated); * is any "
                                        "run of characters, ? one character. A glob matches a layer's dotted name under the "
                                        "diffusion model or any run of its parts (final_layer, *norm*, double_blocks.0.*)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, storage_dtype, compute_dtype, skip_pattern) -> io.NodeOutput:
        out, msg = cast_model(model, storage_dtype, compute_dtype, skip_pattern)
        log.info("FP8LayerwiseCast: %s", msg)
        return io.NodeOutput(out)
