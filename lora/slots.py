"""Preallocated LoRA slots around any linear layer: bf16, bitsandbytes, quanto, torchao or fp8-cast.

    y = base(x) + cat_s( ((x @ down_s^T) * scale_s) @ up_s^T )

`down` holds max_rank rows per output split (a fused qkv layer has 3 splits, Flux's
single-block linear1 has 4: q, k, v, mlp), `up` holds max_rank columns per output row and
`scale` one factor per rank row (strength * alpha / rank; 0 for unused rows). Swapping a
LoRA or a strength only copies into these buffers: the tensors a compiled graph captured
stay the same objects with the same shapes, so nothing recompiles, and the base layer's
weights are never touched (no second copy, nothing to restore).

peft's hot-swap pads ranks only for its plain Linear LoRA layers (not bitsandbytes or
quanto ones), which is why this wrapper exists instead of peft injection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRASlots(nn.Module):
    def __init__(self, base: nn.Module, splits: list[int] | None, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.splits = list(splits) if splits else [self.out_features]
        assert sum(self.splits) == self.out_features, (self.splits, self.out_features)
        self.offsets = [sum(self.splits[:i]) for i in range(len(self.splits))]
        self.max_rank = max_rank
        n = len(self.splits) * max_rank
        self.register_buffer("down", torch.zeros(n, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("up", torch.zeros(self.out_features, max_rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(n, dtype=dtype, device=device), persistent=False)

    # Properties some callers (ComfyUI, bnb) read off a Linear.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.down.dtype), self.down) * self.scale
        r = self.max_rank
        if len(self.splits) == 1:
            delta = F.linear(h, self.up)
        else:
            delta = torch.cat([F.linear(h[..., s * r:(s + 1) * r], self.up[o:o + n])
                               for s, (o, n) in enumerate(zip(self.offsets, self.splits))], dim=-1)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, splits={self.splits}, max_rank={self.max_rank}"
