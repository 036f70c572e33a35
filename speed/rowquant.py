"""One pass per row: a Linear's input quantized to fp8 with one scale per row, for torchao's per-row
fp8 weights (the pack's `torchao-fp8-dynamic`), optionally with the tanh-GELU applied to the columns
from `gelu_from` on in the same pass.

Why: in compiled FLUX blocks inductor fuses torchao's activation quantization (row amax, divide,
clamp, cast) with the norm or GELU in front of it, but in two loops over each row, each evaluating
that producer again. On an H200 those kernels take ~24 ms of a 87 ms fp8 step, 3-4x what their bytes
need (BENCHMARKS.md, issue 12). Here a row is read once into registers (FLUX's widest, 15360 bf16, is
30 KiB), its maximum taken there, and the fp8 row and its scale written: the bytes once, the
activation once. The GEMM is then torch._scaled_mm with the weight's own fp8 data and row scales,
exactly as torchao calls it.

The arithmetic is torchao's (`_choose_scale_float8`, `_quantize_affine_float8`): scale = amax / 448
rounded to the input's dtype, q = fp8(clamp(x / scale)), except that x / scale is computed as
x * (1 / scale) (one division per row; the two differ in the last bit of fp32 at most, before the
rounding to fp8's 3 mantissa bits), and an all-zero row gets a tiny scale instead of torchao's 0
(whose 0 / 0 makes NaNs).
The GELU is the sigmoid form of speed/gelu.py, rounded to the input's dtype as the eager GELU's
output is.

`quant_rows_fp8` is a torch.library triton_op where Triton is installed (inductor calls the kernel from
its generated code: no Python op wrapper per call), else a plain custom op with the same arithmetic
in torch (CPU machines; the tests compare both). No ComfyUI import.
"""
from __future__ import annotations

import os
import types

import torch
from torch import nn

try:  # on the GPU image; absent on CPU-only machines
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None
KERNEL = triton is not None and torch.cuda.is_available()  # else the op runs reference_quant_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
GELU_2C = 1.5957691216057308  # 2 * sqrt(2 / pi)


def reference_quant_rows(x: torch.Tensor, gelu_from: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch ops (CPU, and the tests' reference). x: (M, K)."""
    x32 = x.float()
    if 0 <= gelu_from < x.shape[1]:
        h = x32[:, gelu_from:]
        g = (h * torch.sigmoid(GELU_2C * (h + 0.044715 * h * h * h))).to(x.dtype).float()
        x32 = torch.cat((x32[:, :gelu_from], g), 1)
    amax = x32.abs().amax(1, keepdim=True).clamp(min=AMAX_FLOOR)
    scale = (amax * (1.0 / FP8_MAX)).to(x.dtype).float()  # torchao's scale is in the input's dtype
    q = (x32 * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests of the kernels) runs no PTX: there the GELU
# takes the exp form; on a GPU the hardware tanh (one MUFU op instead of exp plus an IEEE division: the
# GELU'd rows ran at ~1.6x their bytes' time with it, BENCHMARKS.md issue 12, tenth round).
FAST_MATH = os.environ.get("TRITON_INTERPRET") != "1"

if triton is not None:
    @triton.jit
    def _tanh_approx(x):
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def gelu_rounded(h, out_dtype: tl.constexpr, FAST: tl.constexpr):
        """The tanh-GELU of fp32 `h`, rounded to `out_dtype` as the eager GELU's output is, back in fp32."""
        if FAST:  # 0.5 h (1 + tanh(c (h + 0.044715 h^3))) = h sigmoid(2c (...)): the same function
            t = _tanh_approx(0.7978845608028654 * (h + 0.044715 * h * h * h))
            g = 0.5 * h + 0.5 * h * t
        else:
            u = 1.5957691216057308 * (h + 0.044715 * h * h * h)
            g = h / (1.0 + tl.exp(-u))
        return g.to(out_dtype).to(tl.float32)

    # One row a program, the whole row in registers; how many warps share it is tuned once per row
    # length (H200: a fixed 16 warps ran FLUX's rows at ~1.8x their bytes' time, tuned ~1.25x).
    @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)], key=["K", "BLOCK"])
    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, gelu_from,
                           BLOCK: tl.constexpr, GELU: tl.constexpr, FAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < K
        raw = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
        x = raw.to(tl.float32)
        if GELU:
            x = tl.where(cols >= gelu_from, gelu_rounded(x, raw.dtype, FAST), x)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        scale = (amax * (1.0 / 448.0)).to(raw.dtype).to(tl.float32)
        q = tl.clamp(x * (1.0 / scale), -448.0, 448.0)
        tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + row, scale)

if KERNEL:
    @triton_op("quantlora::quant_rows_fp8", mutates_args=())
    def quant_rows_fp8(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        if x.stride(1) != 1:
            x = x.contiguous()
        q = torch.empty((m, k), dtype=FP8, device=x.device)
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        if m == 0:  # no rows, no launch (an empty grid is an error)
            return q, s
        wrap_triton(_quant_rows_kernel)[(m,)](x, q, s, k, x.stride(0), gelu_from, BLOCK=triton.next_power_of_2(k),
                                               GELU=0 <= gelu_from < k, FAST=FAST_MATH)
        return q, s

    @quant_rows_fp8.register_kernel("cpu")
    def _(x, gelu_from):
        return reference_quant_rows(x, gelu_from)
else:
    @torch.library.custom_op("quantlora::quant_rows_fp8", mutates_args=())
    def quant_rows_fp8(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_quant_rows(x, gelu_from)

    @quant_rows_fp8.register_fake
    def _(x, gelu_from):
        m, k = x.shape
        return x.new_empty((m, k), dtype=FP8), x.new_empty((m, 1), dtype=torch.float32)


def applies(weight, cpu: bool = False) -> bool:
    """A torchao per-row fp8 weight that quantizes its activations per row (the pack's
    torchao-fp8-dynamic), on CUDA (or any device with `cpu`): what `linear` computes as torchao would."""
    if type(weight).__name__ != "Float8Tensor" or not (weight.is_cuda or cpu):
        return False
    act = getattr(weight, "act_quant_kwargs", None)
    if act is None or type(getattr(act, "granularity", None)).__name__ != "PerRow":
        return False
    return list(getattr(weight, "block_size", [])) == [1, weight.shape[1]] and weight.qdata.dtype == FP8


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None, gelu_from: int = -1) -> torch.Tensor:
    """F.linear(x', weight, bias) for a per-row fp8 `weight` (see `applies`), x' being x with the
    tanh-GELU applied to its last dimension's columns from `gelu_from` on (-1: none)."""
    k = x.shape[-1]
    q, s = torch.ops.quantlora.quant_rows_fp8(x.reshape(-1, k), gelu_from)
    mm = getattr(weight, "mm_config", None)
    out = torch._scaled_mm(q, weight.qdata.t(), scale_a=s, scale_b=weight.scale.t(), bias=bias,
                           out_dtype=x.dtype, use_fast_accum=bool(getattr(mm, "use_fast_accum", False)))
    return out.reshape(*x.shape[:-1], out.shape[-1])


ALLOW_CPU = False  # tests: let CPU Float8Tensor weights take the path (torch._scaled_mm runs on a CPU too)
# The kernel holds a whole row in registers (32 warps, 32 values a thread at this width); wider rows
# keep torchao's quantization. FLUX's widest is 15360.
MAX_ROW = 32768


def _is_tanh_gelu(m) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "tanh"


def _gelu_mlps(block: nn.Module) -> list[nn.Sequential]:
    """Sequential(Linear, tanh-GELU, Linear): a FLUX double block's img_mlp and txt_mlp."""
    return [m for m in block.modules() if isinstance(m, nn.Sequential) and len(m) == 3
            and isinstance(m[0], nn.Linear) and _is_tanh_gelu(m[1]) and isinstance(m[2], nn.Linear)]


def targets(block: nn.Module) -> list[nn.Module]:
    """The Linears of a block whose input comes straight out of a tanh-GELU: a FLUX single block's
    linear2 (ComfyUI: linear2(cat(attn, mlp_act(mlp)))) and the last Linear of an MLP built as
    Sequential(Linear, GELU, Linear). There inductor cannot fold the quantization into a norm kernel,
    and the one-pass kernel measured faster (H200: 500 -> 427 us per single-block call, 334 -> 282 us
    per double-block MLP with the GELU in the kernel; a norm-fed Linear gains little, 485 -> 458 us)."""
    found = []
    if _is_tanh_gelu(getattr(block, "mlp_act", None)) and isinstance(getattr(block, "linear2", None), nn.Linear):
        found.append(block.linear2)
    return found + [mlp[2] for mlp in _gelu_mlps(block)]


def _plain(layer) -> bool:
    """The layer's forward is F.linear on its own weight: no ComfyUI cast or patch functions."""
    return not (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


def _takes_kernel(layer) -> bool:
    w = layer.weight
    return (torch.compiler.is_compiling() and _plain(layer) and w.shape[-1] <= MAX_ROW
            and (applies(w) or ALLOW_CPU and applies(w, cpu=True)))


def _forward(self, x):
    """Set per instance on the targets (one function for all: nothing recompiles). Only compiled
    graphs take the kernel; eager calls stay torchao's."""
    if _takes_kernel(self):
        return linear(x, self.weight, self.bias)
    return type(self).forward(self, x)


def _mlp_forward(self, x):
    """Set per instance on a GELU MLP when speed/gelu.py's sigmoid GELU is on (the kernel's form):
    the GELU is then computed inside the quantizing kernel instead of in a kernel of its own."""
    if _takes_kernel(self[2]):
        return linear(self[0](x), self[2].weight, self[2].bias, gelu_from=0)
    return type(self).forward(self, x)


def use_in(block: nn.Module, fuse_gelu: bool = True) -> int:
    """Routes the block's GELU-fed Linears (see `targets`) through the one-pass kernel when compiled;
    with `fuse_gelu`, an MLP's GELU goes into the kernel too. Returns how many Linears.
    (Every Linear of the blocks this way, the norm-fed ones too, was measured on an H200 and dropped:
    kernels no faster, error 0.0738 -> 0.0745 from the norm's output rounded to bf16 in between.)"""
    layers = targets(block)
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    if fuse_gelu:
        for mlp in _gelu_mlps(block):
            mlp.forward = types.MethodType(_mlp_forward, mlp)
    return len(layers)
