"""Loading, quantization and casting for Flux transformers (no ComfyUI import); runtime memory is memory/."""
