"""Which scaled-dot-product-attention kernel PyTorch picks, as a context around the model call.

On Linux PyTorch tries FlashAttention-2 first; cuDNN's attention is faster on Hopper for
Flux's shapes (24 heads x 128, 4.6k tokens), measured in bench/. ComfyUI itself puts cuDNN
first only on Windows. The choice is made per call, so it also holds while torch.compile traces.
`auto` on Hopper takes FlashAttention-3 (speed/fa3.py) where the optional fa3-fwd package loads:
faster again than cuDNN there (BENCHMARKS.md, issue 12).
"""
from __future__ import annotations

import contextlib

import torch

# fa3: FlashAttention-3 (speed/fa3.py) through ComfyUI's attention override, Hopper only; fa3-fp8 its
# fp8 kernel on q, k, v cast unscaled (H200: attention -17%, error +0.009).
ATTENTION_CHOICES = ["auto", "default", "cudnn", "flash", "fa3", "fa3-fp8"]


def _order(name: str):
    from torch.nn.attention import SDPBackend

    if name == "cudnn":
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if name == "flash":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return None


def resolve(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        from .fa3 import unavailable as fa3_unavailable

        return "fa3" if fa3_unavailable(device) is None else "cudnn"
    return "default"


def sdpa_context(name: str, device: torch.device):
    order = _order(resolve(name, device)) if device.type == "cuda" else None
    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(order, set_priority=True)


def override_for(name: str, device: torch.device):
    """The function for transformer_options["optimized_attention_override"] that `name` needs, or None."""
    name = resolve(name, device)
    if name == "cudnn":
        return sdpa_override
    if name in ("fa3", "fa3-fp8"):
        from .fa3 import make_override

        return make_override(fp8=name == "fa3-fp8")
    return None


def unavailable(name: str, device: torch.device) -> str | None:
    """Why the attention choice `name` cannot run on `device` (None: it can)."""
    if resolve(name, device) in ("fa3", "fa3-fp8"):
        from .fa3 import unavailable as fa3_unavailable

        return fa3_unavailable(device)
    return None


def sdpa_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                  skip_output_reshape=False, **kwargs):
    """For ComfyUI's transformer_options["optimized_attention_override"] (same calling convention,
    no ComfyUI import): SDPA on contiguous q/k/v. Flux hands attention a strided view of its fused
    qkv output for v, which makes PyTorch pass over cuDNN's kernel (half FlashAttention-2's time
    at Flux's shapes on Hopper) for FlashAttention-2. Anything else goes to ComfyUI's own function."""
    if not skip_reshape or mask is not None or q.device.type != "cuda":
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    b, _, _, dim_head = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out
