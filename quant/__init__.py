"""Loading, quantization, casting and offload for Flux transformers (no ComfyUI import)."""
