"""ComfyUI-facing node classes (thin: the logic lives in quant/, checkpoint/, speed/, memory/ and lora/)."""
