"""QuantizedFluxLoader: a Flux checkpoint as users have it -> a standard ComfyUI MODEL."""
from __future__ import annotations

import logging

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..checkpoint.sources import list_checkpoints, resolve_checkpoint
from ..errors import QuantLoRAError, check_choice
from ..lora.hotswap import SLOT_LAYOUTS, TARGET_SETS
from ..quant import weight_cache as weight_cache_lib
from ..quant.backends import BACKENDS, QUANTIZATION_NAMES
from ..speed.attention import ATTENTION_CHOICES
from ..speed.compile import COMPILE_CHOICES
from . import load_overlap
from .runtime import check_attention, check_compile
from .bridge import COMPUTE_DTYPE_NAMES, build_model
from .search_aliases import search_aliases

log = logging.getLogger("quantlora")
MODEL_FOLDERS = ("diffusion_models", "unet")


def model_roots() -> list[str]:
    roots = []
    for kind in MODEL_FOLDERS:
        try:
            roots += [p for p in folder_paths.get_folder_paths(kind) if p not in roots]
        except KeyError:
            pass
    return roots


class QuantizedFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantizedFluxLoader",
            display_name="Quantized Flux Loader",
            category="QuantLoRA",
            description="Loads a FLUX.1 transformer (BFL single file or diffusers folder) and quantizes it block by block.",
            **search_aliases("flux loader", "nf4", "int8", "quantized loader", "bitsandbytes", "torchao"),
            inputs=[
                io.Combo.Input("model_name", options=list_checkpoints(model_roots()),
                               tooltip="A FLUX.1 dev/schnell transformer from models/diffusion_models (or models/unet)."),
                io.Combo.Input("quantization", options=QUANTIZATION_NAMES, default="none",
                               tooltip="; ".join(f"{n}: {b.describe}" for n, b in BACKENDS.items())),
                io.Combo.Input("compute_dtype", options=COMPUTE_DTYPE_NAMES, default="auto",
                               tooltip="auto = what ComfyUI's own loader picks for this device."),
                io.Int.Input("lora_max_rank", default=0, min=0, max=1024, optional=True,
                             tooltip="Preallocate LoRA hot-swap slots of this rank (0 = none until a LoRAHotswap node "
                                     "adds them). Set it when compiling, so the compiled graphs include the slots."),
                io.Combo.Input("lora_targets", options=list(TARGET_SETS), default="blocks", optional=True,
                               tooltip="Layers that get hot-swap slots when lora_max_rank > 0. blocks: every linear layer of the "
                                       "transformer blocks. all: blocks plus embedders and final layer. attention: "
                                       "attention projections only (lightest slots)."),
                io.Combo.Input("lora_slot_layout", options=SLOT_LAYOUTS, default="per-projection", optional=True,
                               tooltip="per-projection: any LoRA up to max_rank fits in any format. shared: one pool of "
                                       "max_rank per layer, lower step-time cost; diffusers-format q/k/v LoRAs count 3-4x "
                                       "their rank on fused layers (see BENCHMARKS.md)."),
                io.Combo.Input("compile", options=COMPILE_CHOICES, default="off", optional=True,
                               tooltip="regional: torch.compile each transformer block (first image waits for the compile; "
                                       "LoRA swaps and strength changes never recompile; on CUDA the blocks are then also built "
                                       "ahead of time in the background, so a restart skips the compile). regional+cudagraphs: each "
                                       "compiled block also replayed as a CUDA graph, fastest where the CPU cannot keep "
                                       "the GPU busy; NVIDIA GPUs, ComfyUI started with --disable-cuda-malloc."),
                io.Combo.Input("attention", options=ATTENTION_CHOICES, default="auto", optional=True,
                               tooltip="auto: FlashAttention-3 on Hopper where the optional fa3-fwd package is installed, else cuDNN "
                                       "attention on Hopper/Blackwell GPUs, PyTorch's default elsewhere. fa3: FlashAttention-3 "
                                       "(Hopper + fa3-fwd only). fa3-fp8: its fp8 kernel, q/k/v cast to fp8 (fastest; "
                                       "adds ~0.01 to the error against bf16)."),
                io.Combo.Input("weight_cache", options=weight_cache_lib.CHOICES, default="off", optional=True,
                               tooltip="on: the first load also writes the quantized weights to models/quantlora_cache "
                                       "(or $QUANTLORA_WEIGHT_CACHE_DIR; about half the checkpoint's size on disk for fp8); "
                                       "later loads of the same file and quantization read them instead of quantizing "
                                       "again (faster restarts). torchao and optimum-quanto int8/fp8 quantizations."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    async def execute(cls, model_name, quantization, compute_dtype, lora_max_rank=0, lora_targets="blocks",
                      compile="off", attention="auto", lora_slot_layout="per-projection",
                      weight_cache="off") -> io.NodeOutput:
        check_choice("quantization", quantization, QUANTIZATION_NAMES)
        check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPE_NAMES)
        check_choice("lora_targets", lora_targets, TARGET_SETS)
        check_choice("lora_slot_layout", lora_slot_layout, SLOT_LAYOUTS)
        check_choice("compile", compile, COMPILE_CHOICES)
        check_choice("attention", attention, ATTENTION_CHOICES)
        check_choice("weight_cache", weight_cache, weight_cache_lib.CHOICES)
        check_attention(attention)  # before loading anything
        check_compile(compile)
        if not isinstance(model_name, str):
            raise QuantLoRAError(f"model_name {model_name!r}: give a file name from the model list.")
        path = resolve_checkpoint(model_name, model_roots())
        bar = comfy.utils.ProgressBar(1)

        def progress(done, total):
            load_overlap.check_cancelled()  # a load beside other nodes whose prompt has ended stops here
            bar.update_absolute(done, total)

        def build(beside_other_nodes: bool):
            return build_model(path, quantization, compute_dtype, lora_max_rank, lora_targets, lora_slot_layout,
                               compile, attention, progress=progress, weight_cache_mode=weight_cache,
                               warm_compiler=beside_other_nodes, between_phases=load_overlap.check_cancelled)

        # async: ComfyUI starts this node first and runs the text encoders while it loads (load_overlap.py)
        return io.NodeOutput(await load_overlap.run(build, path, quantization))
