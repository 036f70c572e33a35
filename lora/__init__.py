"""LoRA parsing (formats), preallocated slots and hot-swap for Flux (no ComfyUI import)."""
