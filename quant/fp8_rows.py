"""Fused GPU kernels for the LoRA merge of torchao's per-row fp8 weights (Float8Tensor, PerRow).

The eager merge (quant/weight_codecs.py) dequantizes with torchao, adds the LoRA and requantizes
with torchao's `from_hp`: about fifteen full passes over each layer and a new tensor per step.
Measured on an H200 (full FLUX.1-dev, 228 layers, 8 GiB of fp8): 0.35 s a swap with the pristine
copy on the GPU, where the memory traffic alone would take about 0.04 s. These two Triton kernels
do the same arithmetic in two passes: `dequantize_rows` (fp8 x row scale -> the high-precision
dtype -> fp32) and `requantize_rows_into` (round to the high-precision dtype, row amax, the scale,
divide, clamp, cast), writing straight into the layer's own qdata and scale tensors.

Bit for bit what torchao computes on CUDA (the "torch" kernel choice of Float8Tensor.from_hp, used
where its mslk kernels are absent), step by step:
  amax   = |hp|.amax(row)                   exact in any order
  scale  = bf16(amax / 448.0).float()       CUDA divides a tensor by a Python number as
                                            a * (1/b) in fp32 (ATen's div_true_kernel_cuda), then
                                            rounds to the hp dtype: so do we
  q      = fp8(clamp(hp.float() / scale))   an IEEE division (div_rn), round-to-nearest-even cast
The bench (bench/bench_flux.py, merge section) checks the merged layers bit for bit against the
loader's own quantization of the hand-merged matrix on the GPU; anything that disagrees is a bug
here. QUANTLORA_MERGE_KERNELS=0 turns the kernels off (the eager path then runs).
No ComfyUI import; quant/weight_codecs.py imports this module only for a CUDA Float8Tensor, so
CPU machines (no Triton) never do.
"""
from __future__ import annotations

import os

import torch

try:  # on the GPU image; absent on CPU-only machines (the eager merge runs there)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BF16, FP16, FP32 = 0, 1, 2
_HP = {torch.bfloat16: BF16, torch.float16: FP16, torch.float32: FP32}

if triton is not None:
    @triton.jit
    def _round_hp(x, HP: tl.constexpr):
        if HP == 0:
            x = x.to(tl.bfloat16).to(tl.float32)
        elif HP == 1:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _dequant(q_ptr, s_ptr, out_ptr, n_cols, HP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        s = tl.load(s_ptr + row)
        x = tl.load(q_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, _round_hp(x * s, HP), mask=m)

    @triton.jit
    def _requant(full_ptr, q_ptr, s_ptr, n_cols, inv_max, fp8_max, HP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n_cols
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _round_hp(tl.load(full_ptr + base + cols, mask=cols < n_cols, other=0.0), HP)
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        scale = _round_hp(tl.max(amax, axis=0) * inv_max, HP)
        tl.store(s_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            x = _round_hp(tl.load(full_ptr + base + cols, mask=m, other=0.0), HP)
            y = tl.math.div_rn(x, scale)
            y = tl.minimum(tl.maximum(y, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                           propagate_nan=tl.PropagateNan.ALL)
            tl.store(q_ptr + base + cols, y.to(tl.float8e4nv), mask=m)


def enabled() -> bool:
    return os.environ.get("QUANTLORA_MERGE_KERNELS", "1") != "0"


def applies(w) -> bool:
    """A torchao Float8Tensor with one scale per row, e4m3, on a CUDA device, kernels available, and
    torchao itself quantizing with its plain torch path (where its mslk kernels are installed, from_hp
    uses those instead, with their own rounding: the eager merge then calls them)."""
    if type(w).__name__ != "Float8Tensor" or not enabled() or _torchao_uses_mslk():
        return False
    q, s = getattr(w, "qdata", None), getattr(w, "scale", None)
    return (q is not None and q.is_cuda and q.dtype == torch.float8_e4m3fn and q.dim() == 2
            and q.is_contiguous() and s is not None and s.dtype == torch.float32 and s.numel() == q.shape[0]
            and s.is_contiguous() and w.dtype in _HP and list(getattr(w, "block_size", [])) == [1, q.shape[1]]
            and triton is not None)


def _torchao_uses_mslk() -> bool:
    try:
        from torchao.utils import _is_mslk_available
    except ImportError:  # a torchao without that switch has only the torch path
        return False
    return bool(_is_mslk_available())


_BLOCK = 1024
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
# ATen's CUDA division by a Python number: a * (1/b), the reciprocal taken in fp32
_INV_MAX = (torch.tensor(1.0) / torch.tensor(_FP8_MAX)).item()  # exactly an fp32 value


def dequantize_rows(w) -> torch.Tensor:
    """w.dequantize().float(), in one pass (fp32, (out, in))."""
    q, s = w.qdata, w.scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    rows, cols = q.shape
    with torch.cuda.device(q.device):
        _dequant[(rows, -(-cols // _BLOCK))](q, s, out, cols, HP=_HP[w.dtype], BLOCK=_BLOCK)
    return out


def requantize_rows_into(w, full: torch.Tensor) -> None:
    """Writes Float8Tensor.from_hp(full.to(w.dtype), PerRow) into w's own qdata and scale."""
    q, s = w.qdata, w.scale
    if full.shape != q.shape or full.dtype != torch.float32 or not full.is_contiguous():
        raise ValueError(f"fp8 row requantization: matrix {tuple(full.shape)} {full.dtype} for a {tuple(q.shape)} weight")
    rows, cols = q.shape
    with torch.cuda.device(q.device):
        _requant[(rows,)](full, q, s, cols, _INV_MAX, _FP8_MAX, HP=_HP[w.dtype], BLOCK=_BLOCK)
