"""FlashAttention-3 as ComfyUI's attention override (the optional `fa3-fwd` wheel on PyPI: FA3's
forward kernels for Hopper, built for CUDA 13 and torch 2.10+).

Flux hands attention q/k/v as (batch, heads, tokens, 128) views of its fused projections; FA3 reads
(batch, tokens, heads, dim) with any token/head strides, so the views go in without a copy, and its
output is already in the (batch, tokens, heads*dim) order ComfyUI wants (SDPA's needs a transpose).
H200, fp8 Flux step: attention 21-22 ms against cuDNN's 24-25 ms (BENCHMARKS.md, issue 12). FA3's
fp8 mode with per-head scales was measured and dropped: its kernel is faster (17.5 ms) but the per-head
amax costs ~4 ms of extra passes. `fa3-fp8` feeds it unscaled instead: a cast that inductor fuses
into the kernels writing q, k and v (H200, compiled fp8 step: kernels -3.1 to -4.6 ms, error against
bf16 0.074 -> 0.083; BENCHMARKS.md issue 12, tenth round). No ComfyUI import.
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


FP8 = torch.float8_e4m3fn


def to_fp8_unscaled(t: torch.Tensor) -> torch.Tensor:
    """q, k or v for FA3's fp8 mode with scale 1: saturated to e4m3's range (a plain cast would make
    NaN of anything beyond 448) and rounded. fp8 is floating point: values from 2^-6 to 448 keep their
    3 mantissa bits whatever their size, so no per-head amax is needed for FLUX's normed q and k and its
    projected v; what lies below 2^-6 loses relative precision but adds < 2^-9 to each product. In a
    compiled block inductor fuses this into the kernel that writes q, k (norm, RoPE) and v."""
    return t.clamp(-448.0, 448.0).to(FP8)


_KERNEL = None  # FA3's forward op, looked up by make_override (not while torch.compile traces a call)


def _attend(fp8, func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs):
    kernel = _KERNEL
    if kernel is None or (not skip_reshape or mask is not None or q.device.type != "cuda" or q.dtype != torch.bfloat16
            or q.shape[-1] > 256 or q.shape[1] != heads):
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    # (b, s, h, d): FA3 takes Flux's (b, h, s, d) views transposed, strides as they are
    q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if fp8:
        q_, k_, v_ = to_fp8_unscaled(q_), to_fp8_unscaled(k_), to_fp8_unscaled(v_)
    out = kernel(q_, k_, v_, softmax_scale=q.shape[-1] ** -0.5)[0]
    if skip_output_reshape:
        return out.transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], heads * out.shape[-1])


# Module-level functions (not closures): a package compiled ahead of time records the override by
# module:name and a restarted server finds the same function (speed/aot_blocks.py).
def fa3_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
    return _attend(False, func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs)


def fa3_fp8_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
    return _attend(True, func, q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, kwargs)


def make_override(fp8: bool = False):
    """A function for transformer_options["optimized_attention_override"] (ComfyUI's calling
    convention). Masked calls, other dtypes and non-CUDA tensors go to ComfyUI's own function.
    fp8: q, k, v go to FA3's fp8 kernel unscaled (`to_fp8_unscaled`); its output is bf16."""
    global _KERNEL
    _KERNEL = _load()[0]
    return fa3_fp8_override if fp8 else fa3_override
