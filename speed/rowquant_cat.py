"""A FLUX single block's `linear2(cat(attn, gelu(mlp)))` quantized by one kernel that reads `attn` and
`mlp` where they lie, instead of after ComfyUI's concatenation has written both into a new buffer
(on with speed/rowquant.py; QUANTLORA_ROWQUANT_CAT=0: off).

Why: with speed/rowquant.py the single block's tail is inductor's cat kernel (reads attn and mlp,
applies the GELU, writes 4608 x 15360 bf16: ~74 us) then the quantizing kernel (reads that again:
~50 us); 2.9 ms a step on an H200 go to writing and re-reading the concatenation (BENCHMARKS.md,
issue 12, ninth round). Predicted -2 to -3 ms of kernels a step; measured -1.5 ms with the first
kernel (88 us a call), -2.2 to -3 ms once its load and GELU were cheapened (tenth round).

How, without copying ComfyUI's block: the block's `mlp_act` becomes `PairGELU`, whose compiled form is
the marker op `quantlora::pair_gelu` (CompositeImplicitAutograd: where nothing rewrites it, AOTAutograd
decomposes it into speed/gelu.py's sigmoid form, and inductor fuses it as before). An inductor
pre-grad pass (`CatQuantPass`, a CustomGraphPass with a uuid so the FX and AOTAutograd caches keep
working) finds `quant_rows_fp8(reshape(cat([a, pair_gelu(m)], -1)), -1)` and calls
`quant_rows_fp8_pair(a, m)` instead. Anything else in the graph is left alone. No ComfyUI import.
"""
from __future__ import annotations

import torch
from torch import nn

from . import rowquant
from .gelu import SigmoidGELU, sigmoid_gelu

ENV = "QUANTLORA_ROWQUANT_CAT"

_lib = torch.library.Library("quantlora", "FRAGMENT")
_lib.define("pair_gelu(Tensor x) -> Tensor")
_lib.impl("pair_gelu", sigmoid_gelu, "CompositeImplicitAutograd")


def reference_quant_rows_pair(a: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pair kernel computes: rowquant's one-pass quantization of cat(a, gelu(m)) by rows."""
    ka = a.shape[-1]
    return rowquant.reference_quant_rows(torch.cat((a.reshape(-1, ka), m.reshape(-1, m.shape[-1])), 1), ka)


if rowquant.triton is not None:
    import triton
    import triton.language as tl

    from .rowquant import gelu_rounded

    @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)], key=["KA", "KM", "BLOCK"])
    @triton.jit
    def _quant_rows_pair_kernel(a_ptr, m_ptr, q_ptr, s_ptr, KA, KM, stride_a, stride_m, BLOCK: tl.constexpr,
                                FAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_a = cols < KA
        inside = cols < KA + KM
        # one load: each column's address in a's row or m's (two masked loads over the whole width
        # issued twice the instructions: the first version ran at ~1.6x its bytes' time)
        ptrs = tl.where(in_a, a_ptr + row * stride_a + cols, m_ptr + row * stride_m + (cols - KA))
        raw = tl.load(ptrs, mask=inside, other=0.0)
        h = raw.to(tl.float32)
        x = tl.where(in_a, h, gelu_rounded(h, raw.dtype, FAST))
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        scale = (amax * (1.0 / 448.0)).to(raw.dtype).to(tl.float32)
        q = tl.clamp(x * (1.0 / scale), -448.0, 448.0)
        tl.store(q_ptr + row * (KA + KM) + cols, q.to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + row, scale)

if rowquant.KERNEL:
    @torch.library.triton_op("quantlora::quant_rows_fp8_pair", mutates_args=())
    def quant_rows_fp8_pair(a: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ka, km = a.shape[-1], m.shape[-1]
        a2, m2 = a.reshape(-1, ka), m.reshape(-1, km)
        if a2.stride(1) != 1:
            a2 = a2.contiguous()
        if m2.stride(1) != 1:
            m2 = m2.contiguous()
        rows = a2.shape[0]
        q = torch.empty((rows, ka + km), dtype=rowquant.FP8, device=a.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=a.device)
        if rows == 0:
            return q, s
        torch.library.wrap_triton(_quant_rows_pair_kernel)[(rows,)](
            a2, m2, q, s, ka, km, a2.stride(0), m2.stride(0), BLOCK=triton.next_power_of_2(ka + km),
            FAST=rowquant.FAST_MATH)
        return q, s

    @quant_rows_fp8_pair.register_kernel("cpu")
    def _(a, m):
        return reference_quant_rows_pair(a, m)
else:
    @torch.library.custom_op("quantlora::quant_rows_fp8_pair", mutates_args=())
    def quant_rows_fp8_pair(a: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_quant_rows_pair(a, m)

    @quant_rows_fp8_pair.register_fake
    def _(a, m):
        rows = a.numel() // a.shape[-1]
        return (a.new_empty((rows, a.shape[-1] + m.shape[-1]), dtype=rowquant.FP8),
                a.new_empty((rows, 1), dtype=torch.float32))


class PairGELU(SigmoidGELU):
    """A single block's mlp_act: the sigmoid GELU, marked in compiled graphs for CatQuantPass where the
    block's linear2 takes rowquant's kernel in that trace (elsewhere, e.g. a bf16 model, it stays the
    plain sigmoid form, as before)."""

    def __init__(self, linear2: nn.Module):
        super().__init__()
        self._linear2 = [linear2]  # in a list: not a submodule (no second copy in the state dict)

    def forward(self, x):
        if torch.compiler.is_compiling() and rowquant._takes_kernel(self._linear2[0]):
            return torch.ops.quantlora.pair_gelu(x)
        return super().forward(x)


def use_in(block: nn.Module) -> bool:
    """Marks a single block's GELU (after rowquant.use_in routed its linear2). True if it did."""
    if any(t is getattr(block, "linear2", None) for t in rowquant.targets(block)):
        block.mlp_act = PairGELU(block.linear2)
        return True
    return False


def _is(node, name: str) -> bool:
    return node.op == "call_function" and f"quantlora.{name}" in str(node.target).replace("::", ".")


def _last_dim(node, dim) -> bool:
    val = node.meta.get("example_value")
    return dim == -1 or val is not None and dim == val.dim() - 1


def _cat_input(node):
    """(a, m) when node is reshape(cat([a, pair_gelu(m)], last dim)) and each step feeds only the next."""
    if not (node.op == "call_method" and node.target in ("reshape", "view")
            or node.op == "call_function" and node.target in (torch.reshape, torch.Tensor.reshape, torch.Tensor.view)):
        return None
    cat = node.args[0]
    if not (isinstance(cat, torch.fx.Node) and cat.op == "call_function" and cat.target in (torch.cat, torch.concat)):
        return None
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and _last_dim(cat, dim)):
        return None
    a, g = parts
    if not (isinstance(g, torch.fx.Node) and _is(g, "pair_gelu")):
        return None
    if len(node.users) != 1 or len(cat.users) != 1 or len(g.users) != 1:
        return None
    return a, g.args[0], (node, cat, g)


from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402  (imported when compiling only)


class CatQuantPass(CustomGraphPass):
    """Inductor pre-grad pass (see the module's docstring). Counts its rewrites in `rewrites`."""

    rewrites = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        for q in list(graph.nodes):
            if not (_is(q, "quant_rows_fp8") and len(q.args) == 2 and q.args[1] == -1):
                continue
            found = _cat_input(q.args[0])
            if found is None:
                continue
            a, m, dead = found
            with graph.inserting_before(q):
                pair = graph.call_function(torch.ops.quantlora.quant_rows_fp8_pair.default, (a, m))
            pair.meta.update(q.meta)
            q.replace_all_uses_with(pair)
            for n in (q, *dead):
                graph.erase_node(n)
            CatQuantPass.rewrites += 1

    def uuid(self) -> str:
        # this module's source (the pass and its kernel): a changed pass is a new cache key
        import hashlib

        with open(__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

