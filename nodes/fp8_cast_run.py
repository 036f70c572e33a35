"""What FP8LayerwiseCast runs (nodes/fp8_cast_node.py is its schema and one call: `cast_model`):
a ComfyUI MODEL in, a MODEL whose transformer weights are stored as fp8 out.

Works on any ComfyUI MODEL (the pack's loader, ComfyUI's UNETLoader, any architecture): the cast
only walks the diffusion model's module tree (quant/fp8_cast.py, plain torch: which layers, the
fp8 rounding, the upcast, the idempotence rules). Layers already quantized (bnb, torchao, quanto,
fp8 files loaded as fp8) are left alone; a MODEL with nothing to cast comes back unchanged.

Graph semantics: the input MODEL is never modified. A new model is built whose selected weights
are created directly in fp8 (the rest of the tree is copied: norms, embedders, the final layer,
buffers) and wrapped in a clone of the input ModelPatcher (its patches, model_options, wrappers
and callbacks carried over; its weight backups, pinned-memory set and load state not). Other
branches that use the input MODEL keep its weights. The cost: while ComfyUI's cache holds the
input MODEL, host memory holds both it and the fp8 copy (1.5x a bf16 model). Casting its own
output with the same settings returns that MODEL as is (idempotent); with other settings it raises
instead of rounding fp8 weights twice.

Dynamic VRAM (ComfyUI v0.33+ on NVIDIA, comfy-aimdo): an input MODEL under dynamic VRAM is never
deep-copied (its module tree carries comfy-aimdo's placement state). ComfyUI reloads it once outside
dynamic VRAM (its own ModelPatcher.clone(disable_dynamic=True)), the cast works on that private copy
in place, and the output is a plain ModelPatcher, placed the classic way; the log says so. The
pack's own loader already gives plain MODELs. Every write into ComfyUI's bookkeeping goes through
nodes/comfy_door.py.

LoRA slots (lora/slots.py) attached after the cast wrap the fp8 layers and keep their buffers in
bf16 (or the dtype asked for): the LoRA path computes in high precision; only the base weight is fp8.
"""
from __future__ import annotations

import torch

from ..errors import QuantLoRAError, check_choice
from ..memory.sizes import module_bytes
from ..quant.fp8_cast import (CastSpec, apply_fp8_cast, cast_copy, cast_message, parse_skip, storage_dtype_of,
                               unchanged_reason, usable_compute_dtype)
from . import comfy_door
from .bridge import DTYPES

COMPUTE_NAMES = ["auto", *DTYPES]


def model_compute_dtype(base) -> torch.dtype:
    """The dtype the model computes in now: what ComfyUI casts its inputs to."""
    return usable_compute_dtype(comfy_door.compute_dtype_of(base))


def _cast_in_place(own, storage_name, storage, compute, skip):
    """A dynamic-VRAM input: `own` is a plain patcher on a fresh copy of its model that nothing else
    holds (comfy_door.fresh_non_dynamic_copy); cast that copy in place."""
    base = own.model
    dm = base.diffusion_model
    before = module_bytes(dm)
    report = apply_fp8_cast(dm, storage, compute, skip, convert_rest=not comfy_door.casts_per_layer(base))
    comfy_door.set_compute_dtype(base, compute)
    comfy_door.forget_size(own)
    own.model_size()
    return own, cast_message(report, storage_name, compute, before, module_bytes(dm))


def cast_model(model, storage_dtype: str = "float8_e4m3fn", compute_dtype: str = "auto", skip_pattern: str | None = None):
    """(MODEL, message)."""
    storage = storage_dtype_of(storage_dtype)
    check_choice("compute_dtype", compute_dtype, COMPUTE_NAMES)
    base = model.model
    dm = getattr(base, "diffusion_model", None)
    if dm is None:
        raise QuantLoRAError("FP8LayerwiseCast: this MODEL has no diffusion_model to cast.")
    compute = model_compute_dtype(base) if compute_dtype == "auto" else DTYPES[compute_dtype]
    skip = parse_skip(skip_pattern)
    why = unchanged_reason(dm, CastSpec(storage, compute, skip))
    if why is not None:
        return model, why
    # Dynamic VRAM (v0.33+): the input's weights are placed by comfy-aimdo and its module tree carries
    # that bookkeeping; the cast works on a plain copy ComfyUI reloads for us and casts it in place.
    own = comfy_door.fresh_non_dynamic_copy(model, "FP8LayerwiseCast", "fp8 weights are stored and upcast by "
                                            "QuantLoRA's layers")
    if own is not None:
        return _cast_in_place(own, storage_dtype, storage, compute, skip)
    comfy_door.unload_clones_of(model, include_self=True)  # weights back on the host and unpatched before they are copied
    before = module_bytes(dm)
    new_base, report = cast_copy(base, storage, compute, skip, device=model.offload_device, under="diffusion_model",
                                 share=comfy_door.copy_memo(base), convert_rest=not comfy_door.casts_per_layer(base))
    new_base.to(model.offload_device)
    comfy_door.set_compute_dtype(new_base, compute)
    out = comfy_door.rebind(model, new_base)
    return out, cast_message(report, storage_dtype, compute, before, module_bytes(new_base.diffusion_model))
