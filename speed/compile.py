"""Regional torch.compile: each transformer block compiled in place.

All blocks of one kind share one compiled graph (parameters are graph inputs), so compiling
57 blocks costs about as much as compiling two, and LoRA slot buffers changed in place keep
every graph valid (nothing recompiles across swaps or strength changes).
"""
from __future__ import annotations

from torch import nn

from ..checkpoint.flux_keys import BFL_BLOCK_LISTS as BLOCK_LISTS


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    n = 0
    for name in BLOCK_LISTS:
        for block in getattr(model, name, ()):
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**compile_kwargs)
                n += 1
    return n


def is_compiled(model: nn.Module) -> bool:
    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, ())]
    return bool(blocks) and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
