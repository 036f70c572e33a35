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

LoRA slots (lora/slots.py) attached after this node wrap the fp8 layers and keep their buffers in
bf16 (or the dtype asked for): the LoRA path computes in high precision; only the base weight is fp8.
"""
from __future__ import annotations

import logging

import torch

from comfy_api.latest import io

from ..errors import QuantLoRAError, check_choice
from ..quant.fp8_cast import DEFAULT_SKIP_TEXT, STORAGE_DTYPES, CastSpec, cast_copy, cast_spec, parse_skip, plan
from ..quant.sizes import module_bytes
from .bridge import DTYPES
from .offload_sampler_node import evict_sharing

log = logging.getLogger("quantlora")
COMPUTE_NAMES = ["auto", "bf16", "fp16", "fp32"]


def model_compute_dtype(base) -> torch.dtype:
    """The dtype the model computes in now: what ComfyUI casts its inputs to."""
    dt = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    if isinstance(dt, torch.dtype) and dt.is_floating_point and torch.finfo(dt).bits >= 16:
        return dt
    return torch.bfloat16


def rebind(src, new_base):
    """A clone of patcher `src` around another BaseModel: same patches and options, own bookkeeping."""
    p = src.clone()
    p.model = new_base
    p.parent = None
    p.size = 0
    p.backup, p.object_patches_backup, p.hook_backup, p.cached_hook_patches = {}, {}, {}, {}
    p.pinned = set()
    p.is_injected = False
    new_base.device = src.offload_device
    new_base.model_loaded_weight_memory = 0
    new_base.model_offload_buffer_memory = 0
    new_base.lowvram_patch_counter = 0
    new_base.model_lowvram = False
    new_base.current_weight_patches_uuid = None
    new_base.current_patcher = None
    p.model_size()
    return p


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
    evict_sharing(model, include_self=True)  # weights back on the host and unpatched before they are copied
    share = {id(base.current_patcher): None} if getattr(base, "current_patcher", None) is not None else {}
    before = module_bytes(dm)
    new_base, report = cast_copy(base, storage, compute, skip, device=model.offload_device, under="diffusion_model",
                                 share=share)
    new_base.to(model.offload_device)
    new_dm = new_base.diffusion_model
    if isinstance(getattr(new_dm, "dtype", None), torch.dtype):
        new_dm.dtype = compute  # what BaseModel casts inputs to
    if getattr(new_base, "manual_cast_dtype", None) is not None:
        new_base.manual_cast_dtype = compute
    out = rebind(model, new_base)
    after = module_bytes(new_dm)
    msg = (f"{report.layers} layers stored as {storage_dtype}, compute {str(compute).replace('torch.', '')}, "
           f"{len(report.skipped)} kept in high precision; weights {before / 2**30:.3f} -> {after / 2**30:.3f} GiB")
    return out, msg


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
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("storage_dtype", options=list(STORAGE_DTYPES), default="float8_e4m3fn",
                               tooltip="e4m3fn: more precision (the usual choice). e5m2: more range."),
                io.Combo.Input("compute_dtype", options=COMPUTE_NAMES, default="auto",
                               tooltip="The dtype layers compute in. auto = the model's current dtype."),
                io.String.Input("skip_pattern", default=DEFAULT_SKIP_TEXT, multiline=True,
                                tooltip="Regular expressions (comma- or newline-separated) searched in each layer's name "
                                        "under the diffusion model; matching layers stay in high precision."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, storage_dtype, compute_dtype, skip_pattern) -> io.NodeOutput:
        out, msg = cast_model(model, storage_dtype, compute_dtype, skip_pattern)
        log.info("FP8LayerwiseCast: %s", msg)
        return io.NodeOutput(out)
