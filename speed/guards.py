"""Dynamo's guard checks skipped inside a sampling, for forwards that match one already checked.

Why (issue 12, H200 trace of the fp8 step): each call of a compiled block spends ~130 us of host time
in dynamo's cache lookup (its guards over the block's inputs and ~20 parameters) beside ~1.1 ms
launching the block's kernels, while the GPU runs the block in ~1.6 ms. The host barely keeps ahead,
and the GPU idled ~8 ms of each ~100 ms step at block boundaries.

torch's `set_stance(skip_guard_eval_unsafe=True)` runs only the guards that tell a code object's
cached graphs apart (none where there is one). It is unsafe where a call needs a graph not yet
compiled. So it is used only for a forward whose signature (the shapes, dtypes and devices of its
tensors, the plain values and identities of everything else, transformer_options included) equals
one that already ran with full guards in the same sampling: those calls hit the same cache entries.
Anything new in a forward (a resolution, a batch, an option) runs with guards, compiles if it must,
and is remembered; and torch itself refuses to recompile under this stance.
QUANTLORA_SKIP_GUARDS=1 turns it on (experimental, off by default). Measured on an H200 (BENCHMARKS.md,
issue 12, seventh round): the lookup 131-154 -> 85 us per block call, fewer idle gaps in the profiled
step, but no clear gain in the sampled step against this machine's run-to-run spread.
"""
from __future__ import annotations

import contextlib
import os

import torch

ENV = "QUANTLORA_SKIP_GUARDS"
_MAX_ITEMS = 64   # a signature reads at most this many items of one container ...
_MAX_DEPTH = 8    # ... this deep: anything larger makes the forward "new" (guards run)


class _TooLarge(Exception):
    pass


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1" and _stance_supported()


def _stance_supported() -> bool:
    try:
        import inspect

        return "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _sig(v, depth: int):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.dtype, v.device, v.requires_grad)
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return (type(v), v)
    if depth >= _MAX_DEPTH:
        raise _TooLarge
    if isinstance(v, dict):
        if len(v) > _MAX_ITEMS:
            raise _TooLarge
        return ("D", tuple((k if isinstance(k, (str, int)) else id(k), _sig(x, depth + 1)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        if len(v) > _MAX_ITEMS:
            raise _TooLarge
        return (type(v), tuple(_sig(x, depth + 1) for x in v))
    return ("id", id(v))  # functions, modules, patch objects: the same object or a new forward


def signature(args, kwargs):
    """A hashable summary of one forward's inputs, or None when they are too large to summarize."""
    try:
        return (_sig(tuple(args), 0), _sig(dict(kwargs), 0))
    except _TooLarge:
        return None


class SamplingGuards:
    """Per diffusion model: the signatures checked with full guards in the current sampling."""

    def __init__(self):
        self.seen: set = set()
        self.skipped = 0
        self.checked = 0

    def reset(self):
        self.seen.clear()

    @contextlib.contextmanager
    def forward(self, args, kwargs):
        sig = signature(args, kwargs) if enabled() else None
        if sig is not None and sig in self.seen:
            self.skipped += 1
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                yield
            return
        self.checked += 1
        yield
        if sig is not None:  # ran (and compiled what it needed) with full guards
            self.seen.add(sig)


def for_model(dm) -> SamplingGuards:
    g = getattr(dm, "_quantlora_guards", None)
    if g is None:
        g = SamplingGuards()
        dm._quantlora_guards = g
    return g
