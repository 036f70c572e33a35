"""The pack's transformer inside a standard ComfyUI MODEL: ComfyUI's own Flux model class and
ModelPatcher, so stock samplers, conditioning, guidance and model patches drive it unchanged."""
from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models

from ..errors import check_choice
from ..quant import oom
from ..quant.backends import available_backends
from ..quant.flux_config import FluxArch
from ..quant.loader import load_flux

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPE_NAMES = ["auto", *DTYPES]


def resolve_compute_dtype(name: str, parameters: int) -> torch.dtype:
    check_choice("compute_dtype", name, COMPUTE_DTYPE_NAMES)
    if name != "auto":
        return DTYPES[name]
    # The same choice ComfyUI's own UNETLoader makes for this device.
    return mm.unet_dtype(model_params=parameters, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])


def model_config_for(arch: FluxArch, dtype: torch.dtype):
    cls = comfy.supported_models.Flux if arch.guidance_embed else comfy.supported_models.FluxSchnell
    config = cls(arch.comfy_unet_config())
    config.set_inference_dtype(dtype, None)
    config.custom_operations = comfy.ops.disable_weight_init  # weights arrive in the compute dtype
    return config


def load_flux_model_patcher(path: str, quantization: str, compute_dtype: str, progress=None):
    """Returns (ModelPatcher, LoadReport)."""
    from ..quant.sources import open_source

    src = open_source(path)
    n_params = sum(int(torch.Size(s).numel()) for s in src.shapes().values())
    dtype = resolve_compute_dtype(compute_dtype, n_params)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    # Unquantized weights live where ComfyUI keeps them (it moves them per run, lowvram-aware);
    # quantized ones are made on the GPU block by block and stay there.
    target = offload_device if quantization == "none" else load_device
    holder = {}

    def build(arch, dt):
        holder["base"] = comfy.model_base.Flux(model_config_for(arch, dt), device="meta")
        return holder["base"].diffusion_model

    failed = None
    try:
        diffusion_model, arch, report = load_flux(path, build, quantization, dtype, target, progress, source=src)
    except torch.OutOfMemoryError as e:
        failed = oom.detail(e)
    if failed is not None:
        # Out of the except block: the OOM's traceback (and the loader's frames holding the partly
        # loaded blocks) is gone; drop the model under construction too, then hand the memory back.
        holder.clear()
        oom.release()
        raise oom.load_error(src.name, quantization, dtype, target, src.shapes(), available_backends(target), failed)
    base = holder["base"]
    base.diffusion_model = diffusion_model
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    patcher.model_options.setdefault("quantlora", {})["report"] = report
    return patcher, report
