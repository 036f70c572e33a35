"""QuantLoRA: quantized Flux, fp8 storage, hot-swapped LoRA and CPU offload for ComfyUI.

ComfyUI imports this folder as a package from custom_nodes/. Node modules (which import
ComfyUI) load only when ComfyUI asks for the node list, so quant/, checkpoint/, speed/, memory/ and
lora/ stay importable without ComfyUI.

Supported ComfyUI: 0.3.75 to v0.33.0 (nodes/comfy_door.py: MIN_VERSION, TESTED_VERSION). On an
older ComfyUI the pack logs, at import (every ComfyUI version imports the package, even one too
old to call comfy_entrypoint), which version it needs.
"""
import logging

WEB_DIRECTORY = "./web"


def _warn_if_comfyui_too_old() -> str | None:
    try:
        from .nodes.comfy_door import version_problem

        problem = version_problem()
    except Exception:  # noqa: BLE001 - a version check must never keep the pack from loading
        return None
    if problem:
        logging.getLogger("quantlora").warning(problem)
    return problem


_warn_if_comfyui_too_old()


async def comfy_entrypoint():
    from .nodes.extension import QuantLoRAExtension

    return QuantLoRAExtension()
