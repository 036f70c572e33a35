"""Regional torch.compile: each transformer block compiled in place.

All blocks of one kind share one compiled graph (parameters are graph inputs), so compiling
57 blocks costs about as much as compiling two, and LoRA slot buffers changed in place keep
every graph valid (nothing recompiles across swaps or strength changes).
"""
from __future__ import annotations

import logging
import os
import types

from torch import nn

from ..checkpoint.flux_keys import BFL_BLOCK_LISTS as BLOCK_LISTS
from . import gelu


# regional+cudagraphs: each compiled block replayed as a CUDA graph (needs PyTorch's own CUDA allocator:
# ComfyUI started with --disable-cuda-malloc). The fastest path where the host cannot keep up with the
# GPU (H200, fp8: 0.49x of bf16 eager against 0.53-0.57x without; BENCHMARKS.md issue 12, tenth round).
COMPILE_CHOICES = ["off", "regional", "regional+cudagraphs"]


def inductor_options(cudagraphs: bool | None = None) -> dict:
    """QUANTLORA_INDUCTOR_TUNE=1: inductor tunes the block sizes of its own fused quantize/norm/
    activation kernels (H200, fp8 step: their 10.2 ms -> 7.9 ms), at a much longer first compile
    (~70 s instead of ~15 s; cached for later starts). BENCHMARKS.md, issue 12.
    QUANTLORA_INDUCTOR_CPP_WRAPPER=1 (experimental, not yet measured on a GPU): inductor launches each
    block's kernels from generated C++ instead of Python, for steps whose host time shows between the
    kernels (the sampled fp8 step ran 7-13% above its kernel sum); a longer first compile.
    cudagraphs: the compile choice asked for CUDA graphs (None: QUANTLORA_CUDAGRAPHS=1, where they can run)."""
    import torch

    opts = {}
    if cudagraphs if cudagraphs is not None else cudagraphs_wanted() and cudagraphs_unavailable() is None:
        opts["triton.cudagraphs"] = True
    if rowquant_enabled() and torch.cuda.is_available():
        import torch._inductor.config as inductor_config

        # speed/rowquant.py's kernel is a user-defined Triton kernel, which inductor launches through
        # Triton's own Python launcher unless told otherwise: ~70 us of host time a call against ~20 us
        # for its own kernels (H200 trace), and the blocks' host time is what bounds the sampled step.
        if hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
            opts["static_launch_user_defined_triton_kernels"] = True
        if rowquant_cat_wanted():
            from .rowquant_cat import CatQuantPass

            opts["pre_grad_custom_pass"] = CatQuantPass()
    if os.environ.get("QUANTLORA_INDUCTOR_TUNE") == "1":
        opts["coordinate_descent_tuning"] = True
    if os.environ.get("QUANTLORA_INDUCTOR_CPP_WRAPPER") == "1":
        opts["cpp_wrapper"] = True
    return opts


# torch.nn.attention's helpers that dynamo puts into a graph wherever a block enters
# `sdpa_kernel(..., set_priority=True)` (ComfyUI's own SDPA wrapper on CUDA does, for every attention
# call): AOTAutograd's cache bypasses any graph with a function it does not know, so each restart
# re-ran the joint-graph passes and the forward compiler (1.6-1.9 s on an H200, BENCHMARKS.md issue 12).
# They only map constant backend names to enums and set the priority, so keying them by torch's
# version (how inductor's config says to mark such functions) keeps the cache sound.
SDPA_GRAPH_FUNCTIONS = ("torch.nn.attention._backend_from_string", "torch.nn.attention._sdpa_kernel")


def mark_sdpa_helpers_cacheable() -> None:
    import torch
    import torch._inductor.config as inductor_config

    marked = getattr(inductor_config, "unsafe_marked_cacheable_functions", None)
    if isinstance(marked, dict):
        for name in SDPA_GRAPH_FUNCTIONS:
            marked.setdefault(name, torch.__version__)


CUDAGRAPHS_ENV = "QUANTLORA_CUDAGRAPHS"


def cudagraphs_wanted() -> bool:
    """QUANTLORA_CUDAGRAPHS=1: as the compile choice regional+cudagraphs for every regional compile
    (the benchmarks' switch). Each compiled block is replayed as a CUDA graph (inductor's cudagraph
    trees), so the host no longer launches its kernels one by one: on an H200 its time per block
    1.5-1.8 ms -> 0.3-0.6 ms; the sampled step gains where the host, not the GPU, bounds it
    (BENCHMARKS.md issue 12)."""
    return os.environ.get(CUDAGRAPHS_ENV) == "1"


def cudagraphs_unavailable() -> str | None:
    """Why CUDA graphs cannot be used in this process (None: they can). Capturing fails under the
    cudaMallocAsync allocator, which ComfyUI picks unless started with --disable-cuda-malloc."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    backend = torch.cuda.get_allocator_backend()
    if backend != "native":
        return (f"the CUDA allocator is {backend}: CUDA graphs need PyTorch's own (start ComfyUI with "
                "--disable-cuda-malloc)")
    return None


def _forward_on_copies(self, *args, **kwargs):
    """A block's forward on copies of its tensor inputs (set per instance when CUDA graphs are on, and
    traced into the block's one compiled graph). CUDA graph trees replay no graph that adds into an
    input they do not manage, and FLUX's blocks add into theirs (`img +=`, `x +=`, returned as the
    outputs); ComfyUI takes each block's outputs as the next inputs, so nothing reads the originals
    afterwards. A copy costs ~15 us of a ~1.6 ms block. (A forward pre-hook did the same but split
    each block's graph in two on an H200: BENCHMARKS.md issue 12.)"""
    import torch

    def own(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    return type(self).forward(self, *(own(a) for a in args), **{k: own(v) for k, v in kwargs.items()})


def rowquant_enabled() -> bool:
    """speed/rowquant.py's one-pass quantization for GELU-fed fp8 Linears (QUANTLORA_ROWQUANT=0: off)."""
    return os.environ.get("QUANTLORA_ROWQUANT", "1") != "0"


def rowquant_cat_wanted() -> bool:
    """speed/rowquant_cat.py quantizes a single block's linear2 input without ComfyUI's concatenation
    being written first (H200: -1.5 to -3 ms of kernels a step, same error; QUANTLORA_ROWQUANT_CAT=0: off)."""
    return rowquant_enabled() and os.environ.get("QUANTLORA_ROWQUANT_CAT", "1") != "0"


def compile_backend() -> str | None:
    """QUANTLORA_COMPILE_BACKEND names another torch.compile backend (default: torch's, inductor).
    For checks on a CPU, e.g. the test suite's dry runs of the GPU scripts: `aot_eager` traces the
    same graphs with the same guards (graph breaks, recompiles) without generating code."""
    return os.environ.get("QUANTLORA_COMPILE_BACKEND") or None


def compile_blocks(model: nn.Module, cudagraphs: bool = False, aot=None, **compile_kwargs) -> int:
    """Compiles each block in place (see the module's docstring); cudagraphs: replay each as a CUDA
    graph (the compile choice regional+cudagraphs; QUANTLORA_CUDAGRAPHS=1 asks for it everywhere).
    aot: a speed/aot_store.AOTStore: a block whose kind has packages ahead of time takes its calls from
    them (torch.compile made only for a call they do not take); the others are compiled and build a
    package at their first call (not with CUDA graphs).
    Raises ValueError where CUDA graphs were asked for and cannot run (`cudagraphs_unavailable`)."""
    if compile_backend() and "backend" not in compile_kwargs:
        compile_kwargs["backend"] = compile_backend()
    inductor = compile_kwargs.get("backend", "inductor") == "inductor"
    if cudagraphs and cudagraphs_unavailable():
        raise ValueError(cudagraphs_unavailable())
    if inductor and cudagraphs_wanted() and not cudagraphs and cudagraphs_unavailable():
        logging.getLogger("quantlora").warning("QuantLoRA: %s=1 ignored: %s", CUDAGRAPHS_ENV, cudagraphs_unavailable())
    if inductor:
        mark_sdpa_helpers_cacheable()
    options = inductor_options(True if cudagraphs else None) if inductor else {}
    if options and "options" not in compile_kwargs:
        compile_kwargs["options"] = options
    model._quantlora_cudagraphs = "triton.cudagraphs" in compile_kwargs.get("options", {})
    n = 0
    for name in BLOCK_LISTS:
        for block in getattr(model, name, ()):
            if getattr(block, "_compiled_call_impl", None) is None:
                graphs = "triton.cudagraphs" in compile_kwargs.get("options", {})
                prepare_block(block, inputs_copied=graphs)
                if aot is not None and not graphs and aot.has_packages(block):
                    aot.attach(block, compile_kwargs=compile_kwargs)  # no torch.compile set-up until needed
                else:
                    block.compile(**compile_kwargs)
                    if aot is not None and not graphs:
                        aot.attach(block, fallback=block._compiled_call_impl)
                n += 1
    return n


def prepare_block(block: nn.Module, inputs_copied: bool = False) -> None:
    """What a block's forward becomes before it is traced (torch.compile, or an export ahead of time):
    the sigmoid GELU, the one-pass fp8 quantization, and (inputs_copied, CUDA graphs) its inputs copied."""
    if gelu.enabled():
        gelu.swap_tanh_gelus(block)  # before the trace: the graph holds the sigmoid form
    if rowquant_enabled():
        from . import rowquant  # registers its op (and imports Triton) only when compiling

        rowquant.use_in(block, fuse_gelu=gelu.enabled())
        if rowquant_cat_wanted() and gelu.enabled():
            from . import rowquant_cat

            rowquant_cat.use_in(block)
    if inputs_copied:
        block.forward = types.MethodType(_forward_on_copies, block)  # one function for every block: no recompiles


def uses_cudagraphs(model: nn.Module) -> bool:
    """Whether compile_blocks gave this model's blocks CUDA graphs (the sampler marks each step's start)."""
    return bool(getattr(model, "_quantlora_cudagraphs", False))


def is_compiled(model: nn.Module) -> bool:
    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, ())]
    return bool(blocks) and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
