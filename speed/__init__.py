"""How fast a loaded Flux transformer runs: SDPA backend choice and regional torch.compile (no ComfyUI import)."""
