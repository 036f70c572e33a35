"""ComfyUI-facing node classes (thin: the logic lives in quant/ and lora/)."""
