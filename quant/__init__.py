"""Quantization and fp8 casting for Flux transformers: backends, per-layer quantization during load, weight
codecs for the LoRA merge, fp8 storage with a per-layer upcast (no ComfyUI import). Checkpoint files are
checkpoint/, speed knobs speed/, runtime memory memory/."""
