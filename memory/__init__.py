"""Runtime memory for Flux transformers: CPU offload and block streaming, pinned host buffers, VRAM
readings, out-of-memory handling and module sizes (no ComfyUI import)."""
