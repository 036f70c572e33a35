"""FlashAttention-3 as ComfyUI's attention override (the optional `fa3-fwd` wheel on PyPI: FA3's
forward kernels for Hopper, built for CUDA 13 and torch 2.10+).

Flux hands attention q/k/v as (batch, heads, tokens, 128) views of its fused projections; FA3 reads
(batch, tokens, heads, dim) with any token/head strides, so the views go in without a copy, and its
output is already in the (batch, tokens, heads*dim) order ComfyUI wants (SDPA's needs a transpose).
H200, fp8 Flux step: attention 21-22 ms against cuDNN's 24-25 ms (BENCHMARKS.md, issue 12). FA3's
fp8 mode was measured and dropped: its kernel is faster (17.5 ms) but quantizing q/k/v per head
costs ~4 ms of extra passes, and the error grows. No ComfyUI import.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _load():
    """(FA3's forward op, None) or (None, why it does not load), tried once per process."""
    try:
        from fa3_fwd_interface import _flash_attn_forward  # registers torch.ops.fa3_fwd (a custom op: compiles)
    except Exception as e:  # not installed, or built for another torch/CUDA
        return None, f"the fa3-fwd package does not load here ({type(e).__name__}: {str(e)[:160]}); pip install fa3-fwd"
    return _flash_attn_forward, None


def unavailable(device: torch.device) -> str | None:
    """Why FA3 cannot run on `device` (None: it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "FlashAttention-3 runs on NVIDIA GPUs only"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"FlashAttention-3 needs a Hopper GPU (H100/H200); this one is sm_{cap[0]}{cap[1]}"
    return _load()[1]


def make_override():
    """A function for transformer_options["optimized_attention_override"] (ComfyUI's calling
    convention). Masked calls, other dtypes and non-CUDA tensors go to ComfyUI's own function."""
    kernel = _load()[0]  # looked up here, not while torch.compile traces the override

    def fa3_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
        if kernel is None or (not skip_reshape or mask is not None or q.device.type != "cuda" or q.dtype != torch.bfloat16
                or q.shape[-1] > 256 or q.shape[1] != heads):
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        # (b, s, h, d): FA3 takes Flux's (b, h, s, d) views transposed, strides as they are
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5)[0]
        if skip_output_reshape:
            return out.transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], heads * out.shape[-1])

    return fa3_override
