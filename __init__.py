"""QuantLoRA: quantized Flux, fp8 storage, hot-swapped LoRA and CPU offload for ComfyUI.

ComfyUI imports this folder as a package from custom_nodes/. Node modules (which import
ComfyUI) load only when ComfyUI asks for the node list, so quant/ and lora/ stay importable
without ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import QuantLoRAExtension

    return QuantLoRAExtension()
