"""Preallocated LoRA slots around any linear layer: bf16, bitsandbytes, quanto, torchao or fp8-cast.

    y = base(x);  y += ((x @ down^T) * scale) @ up^T      (one addmm into y)

Each slot owns a pool of rank rows: `down` (pool, in), `up` (out, pool) and `scale` (pool,),
strength * alpha / rank per row and 0 for unused rows. A LoRA target takes k rows of the
pool and fills its output rows of `up` (a q-only LoRA on a fused qkv layer fills only the q
rows). With the default layout a fused layer gets splits x max_rank rows, so any LoRA of rank <=
max_rank fits whether it was trained on the fused layer (kohya, BFL) or on separate q/k/v
(diffusers); the "shared" layout gives every layer max_rank rows (cheaper, see BENCHMARKS.md).

Swapping a LoRA or a strength only copies into these buffers: the tensors a compiled graph
captured stay the same objects with the same shapes, so nothing recompiles, and the base
layer's weights are never touched (no second copy, nothing to restore). The update is one
addmm that accumulates into y (cuBLAS reads y once and writes it once), not a separate delta
tensor added afterwards: at Flux's sizes that extra pass over every layer's output was most
of the slots' cost.

peft's hot-swap pads ranks only for its plain Linear LoRA layers (not bitsandbytes or
quanto ones), which is why this wrapper exists instead of peft injection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRASlots(nn.Module):
    def __init__(self, base: nn.Module, splits: list[int] | None, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str, layout: str = "per-projection"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.splits = list(splits) if splits else [self.out_features]
        assert sum(self.splits) == self.out_features, (self.splits, self.out_features)
        self.max_rank, self.layout = max_rank, layout
        # per-projection: a fused layer holds max_rank rows for each of its projections, so any LoRA
        # of rank <= max_rank fits in any format; shared: max_rank rows in all (fewer FLOPs; a
        # diffusers q/k/v LoRA of rank r then takes 3r rows of a fused qkv layer).
        self.pool = (len(self.splits) if layout == "per-projection" else 1) * max_rank
        self.register_buffer("down", torch.zeros(self.pool, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("up", torch.zeros(self.out_features, self.pool, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(self.pool, dtype=dtype, device=device), persistent=False)

    # Attributes callers (ComfyUI, bnb) read off a Linear.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.down.dtype), self.down) * self.scale
        y2 = y.reshape(-1, self.out_features)
        out = torch.addmm(y2, h.reshape(-1, self.pool).to(y.dtype), self.up.t().to(y.dtype))
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, splits={self.splits}, max_rank={self.max_rank}, pool={self.pool}"
