"""LoRAHotswap: a Flux LoRA (any common format) on any pack or ComfyUI Flux MODEL, swapped in place.

A MODEL under ComfyUI's dynamic VRAM (v0.33+ on NVIDIA) is taken out of it for this node's
output: the slots go on ComfyUI's own non-dynamic delegate of the model (loaded once, kept with
the input MODEL), and the log says so once (nodes/comfy_door.py)."""
from __future__ import annotations

import logging
import math
import os

import folder_paths
from comfy_api.latest import io, ui

from ..errors import QuantLoRAError, check_choice
from ..lora.hotswap import TARGET_SETS, file_identity
from . import runtime
from .search_aliases import search_aliases

log = logging.getLogger("quantlora")


def lora_path(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise QuantLoRAError(f"lora_name {name!r}: give a file name from the LoRA list (models/loras).")
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise QuantLoRAError(f"LoRA {name!r} not found in {', '.join(folder_paths.get_folder_paths('loras'))}. "
                             "Put the file in models/loras and refresh the node.")
    return path


class LoRAHotswap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRAHotswap",
            display_name="LoRA Hot-swap (Flux)",
            category="QuantLoRA",
            description="Adds a Flux LoRA, switched in place with no reload and no torch.compile recompile. Merge mode "
                        "adds it into the model's own (quantized) weights when sampling starts (a step then costs "
                        "what the bare model's does) and restores them bit for bit from a pristine copy; slots mode "
                        "keeps it as a separate term in preallocated slots (exact LoRA, a small cost per step). "
                        "auto merges 8-bit and wider weights and keeps slots for 4-bit ones.",
            **search_aliases("lora", "lora loader", "hotswap", "hot swap", "flux lora"),
            inputs=[
                io.Model.Input("model", tooltip="A Flux MODEL (the Quantized Flux Loader's, or any Flux model)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A Flux LoRA from models/loras (kohya, diffusers/PEFT or BFL format). "
                                       "Changing it rewrites the slots in place: no reload, no recompile."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA modifies the model; can be negative. Changing it "
                                       "rewrites the slots in place: no reload, no recompile."),
                io.Int.Input("max_rank", default=64, min=1, max=1024,
                             tooltip="Slot size, used only if the model has no slots yet (the loader's lora_max_rank sets it "
                                     "before compiling). Chained LoRAs share it: their ranks must add up to at most this."),
                io.Combo.Input("targets", options=list(TARGET_SETS), default="blocks",
                               tooltip="Layers that get slots, if the model has none yet (slots mode only; merge "
                                       "mode takes every layer the LoRA has)."),
                io.Combo.Input("mode", options=list(runtime.MODES), default="auto", optional=True,
                               tooltip="merge: add the LoRA into the weights (no step cost; the first merge keeps a "
                                       "pristine copy of the touched layers in pinned host RAM). merge-gpu: that copy "
                                       "on the GPU instead (fastest swaps, costs VRAM). slots: a separate term (exact, "
                                       "~20% per step on the fp8 path). auto: merge unless the weights are 4-bit, the "
                                       "model already has slots, or the copy does not fit in RAM."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        # A file replaced under the same name must re-run the node (and re-parse the LoRA). ComfyUI
        # passes the widget values only (not the linked MODEL), so everything else is optional.
        path = folder_paths.get_full_path("loras", lora_name) if isinstance(lora_name, str) else None
        if path and os.path.isfile(path):
            return ":".join(map(str, file_identity(path)))
        return str(lora_name)

    @classmethod
    def execute(cls, model, lora_name, strength, max_rank, targets, mode="auto") -> io.NodeOutput:
        runtime.flux_module(model)  # a non-Flux MODEL fails here, before anything is loaded
        check_choice("mode", mode, runtime.MODES)
        if not math.isfinite(strength):
            raise QuantLoRAError(f"LoRA {lora_name!r}: strength {strength} is not a finite number; give a value from -10 to 10.")
        check_choice("targets", targets, TARGET_SETS)
        m, text = runtime.add_lora(model, lora_name, lora_path(lora_name), strength, mode, max_rank, targets)
        return io.NodeOutput(m, ui=ui.PreviewText(text))
