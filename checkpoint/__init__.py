"""The checkpoint files users have: safe safetensors reading, a single BFL file or a diffusers folder,
Flux tensor names and the architecture read from them (no ComfyUI import)."""
