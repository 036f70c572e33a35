"""CPU offload of a module tree: weights live in host memory and reach the GPU just before use.

Modes (what stays on the onload device while a forward runs):
- none:  everything (nothing is done here).
- model: the whole tree, moved in before sampling and out after (plain .to()).
- block: the tree's top-level parts (embedders, final layer), every transformer block that fits
         the budget (`budget`: device bytes for the weights, in-flight copies included), and the
         streamed blocks' copies in flight. Streamed blocks live in pinned host memory and are
         copied in ahead of use on a side CUDA stream (memory/streaming.py), whatever the weight
         kind: plain / fp8-cast tensors, bitsandbytes NF4/int8 with their quantization state,
         torchao and optimum-quanto tensor subclasses. blocks_per_group = how many streamed blocks
         are copied ahead. Another budget on the same tree re-plans the residency in place.
- leaf:  one layer at a time (on CUDA also prefetched on a side stream): the lowest VRAM.

Leaf mode has three strategies (block mode always streams with memory/streaming.py):
- on CUDA, for trees holding bitsandbytes or optimum-quanto weights: the block streamer with every
  module that owns tensors as a unit (its own tensors and quantization state, pinned, side
  stream, four units ahead);
- diffusers' `apply_group_offloading` (leaf_level, use_stream only on CUDA, pinned host copies
  unless pin=False) for trees whose tensors are plain (bf16, fp16, fp32, fp8-cast) or torchao
  tensor subclasses, which diffusers moves correctly.
- without CUDA (tests: the CPU as both devices), our own hooks (registered through diffusers'
  HookRegistry) that call `module.to(device)` per module for trees holding bitsandbytes or
  optimum-quanto weights: those keep quantization state
  outside the tensor's storage (bnb's quant_state / Linear8bitLt.state.CB, quanto's inner
  tensors), which diffusers' `param.data = ...` swaps leave behind on the wrong device; the
  modules' own .to() moves it. Synchronous, no pinned memory.

With diffusers' streams, the leaves' buffers (LoRA slot buffers) are made to follow their pinned
host copies the way parameters do (diffusers 0.42 restores only parameters at offload, so a LoRA
written into a slot after the hooks were built would never reach the GPU; seen on an H200). The
block streamer keeps every streamed tensor's pinned copy as the tensor itself at rest, so writes
between forwards land where the next copy reads.

`remove_offload` takes every hook off, moves the tree to the offload device, re-homes pinned
tensors into pageable memory (and empties torch's pinned-block cache), so the tree is an
ordinary module again. Applying the same settings twice is a no-op. No ComfyUI import.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QuantLoRAError
from .sizes import module_bytes, tensor_bytes

log = logging.getLogger("quantlora")

MODES = ("none", "model", "block", "leaf")
_MARK = "_quantlora_offload"
_MOVE_HOOK = "quantlora_offload_moves"
_DIFFUSERS_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
_STREAM_HOOKS = ("quantlora_stream", "quantlora_stream_root")


@dataclass(frozen=True)
class OffloadSpec:
    mode: str
    onload: torch.device
    offload: torch.device
    blocks_per_group: int = 1
    use_stream: bool = False
    pin: bool = True
    budget: int | None = None   # block mode: device bytes the weights may use (None: stream every block)
    # block mode: (pinned bytes/s, compute seconds per block) to rank plans by predicted step time
    # (memory/pipeline.py); an estimate, so not part of what makes two specs the same
    timing: tuple | None = field(default=None, compare=False)


@dataclass
class OffloadState:
    spec: OffloadSpec
    mode: str              # the mode in effect ("block" on a tree without block lists runs as "leaf")
    strategy: str          # "model" | "diffusers" | "moves"
    working_set: int       # weight bytes on the onload device while a forward runs
    model_bytes: int
    tensor_ids: frozenset  # the tensors the hooks were built on (streamed groups key pinned copies by them)
    residency: object = None   # block mode: streaming.Residency (which blocks stream)
    streamer: object = None    # block mode: streaming.BlockStreamer
    nonblock: int = 0

    @property
    def n_blocks(self) -> int:
        return self.residency.n_blocks if self.residency is not None else 0

    @property
    def n_resident(self) -> int:
        return self.residency.n_resident if self.residency is not None else 0

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes copied to the device per forward."""
        if self.residency is not None:
            return self.residency.streamed_bytes
        if self.strategy == "model":
            return 0
        return self.model_bytes  # leaf: everything, every forward


@dataclass
class TreeSizes:
    model: int       # all weights and buffers
    nonblock: int    # outside the top-level block lists (embedders, final layer, ...)
    block_max: int   # the largest block
    n_blocks: int
    leaf_max: int    # the largest tensor set one module owns directly


def block_lists(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level ModuleList/Sequential children: the transformer blocks diffusers groups."""
    return [(n, c) for n, c in root.named_children() if isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c)]


def _own_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def tree_sizes(root: nn.Module) -> TreeSizes:
    blocks = [b for _, lst in block_lists(root) for b in lst]
    sizes = [module_bytes(b) for b in blocks]
    model = module_bytes(root)
    leaf = max((sum(tensor_bytes(t) for t in _own_tensors(m)) for m in root.modules()), default=0)
    return TreeSizes(model, model - sum(sizes), max(sizes, default=0), len(blocks), leaf)


def pick_mode(budget_bytes: int, model_bytes: int, block_bytes: int, *, nonblock_bytes: int = 0,
              reserve_bytes: int = 0, stream: bool = True, n_blocks: int | None = None) -> tuple[str, int]:
    """The least offloading whose weights fit budget_bytes beside reserve_bytes (activations):
    (mode, blocks_per_group). "model" is never picked: it needs the whole model at once, like none."""
    avail = budget_bytes - reserve_bytes
    if model_bytes <= avail:
        return "none", 1
    room = avail - nonblock_bytes
    if block_bytes > 0:
        if stream and room >= 3 * block_bytes:  # running + prefetching + one awaiting release
            return "block", 1
        if not stream and room >= block_bytes:
            g = int(room // block_bytes)
            return "block", max(1, min(g, n_blocks or g))
    return "leaf", 1


def _diffusers_movable(t: torch.Tensor) -> bool:
    if type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor:
        return True
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(t, TorchAOBaseTensor)


def needs_module_moves(root: nn.Module) -> bool:
    """True when some weight keeps state diffusers' tensor swaps would leave behind (bnb, quanto)."""
    return any(not _diffusers_movable(t) for t in (*root.parameters(), *root.buffers()))


def tensor_ids(root: nn.Module) -> frozenset:
    return frozenset(id(t) for t in (*root.parameters(), *root.buffers()))


def offload_state(root: nn.Module) -> OffloadState | None:
    return getattr(root, _MARK, None)


@functools.cache
def _move_hook_class():
    """A diffusers ModelHook that moves modules in before its module's forward and out after. Made
    on first use, not at module import (diffusers is heavy), and once. Also reachable as `_MoveHook`."""
    from diffusers.hooks import ModelHook

    class _MoveHook(ModelHook):
        _is_stateful = False

        def __init__(self, onload, offload):
            super().__init__()
            self.onload, self.offload = onload, offload
            self.before: list[tuple[nn.Module, bool]] = []
            self.after: list[tuple[nn.Module, bool]] = []

        @staticmethod
        def _move(m: nn.Module, device, own_only: bool):
            if own_only:
                m._apply(lambda t: t.to(device), recurse=False)
            else:
                m.to(device)

        @torch.compiler.disable()
        def pre_forward(self, module, *args, **kwargs):
            for m, own in self.before:
                self._move(m, self.onload, own)
            return args, kwargs

        @torch.compiler.disable()
        def post_forward(self, module, output):
            for m, own in self.after:
                self._move(m, self.offload, own)
            return output

    return _MoveHook


def __getattr__(name: str):
    if name == "_MoveHook":  # the hook class, made on first use (diffusers is imported then)
        return _move_hook_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _apply_moves(root: nn.Module, mode: str, spec: OffloadSpec) -> None:
    from diffusers.hooks import HookRegistry

    move_hook = _move_hook_class()
    hooks: dict[int, tuple[nn.Module, object]] = {}

    def hook(m):
        return hooks.setdefault(id(m), (m, move_hook(spec.onload, spec.offload)))[1]

    if mode == "block":
        lists = block_lists(root)
        in_lists = {id(c) for _, c in lists}
        for _, lst in lists:
            for i in range(0, len(lst), spec.blocks_per_group):
                grp = list(lst[i:i + spec.blocks_per_group])
                hook(grp[0]).before += [(b, False) for b in grp]
                hook(grp[-1]).after += [(b, False) for b in grp]
        top = [(c, False) for _, c in root.named_children() if id(c) not in in_lists] + [(root, True)]
        hook(root).before += top
        hook(root).after += top
    else:  # leaf: every module that owns tensors moves them itself
        for m in root.modules():
            if _own_tensors(m):
                entry = (m, len(m._modules) > 0)
                hook(m).before.append(entry)
                hook(m).after.append(entry)
    for m, h in hooks.values():
        HookRegistry.check_if_exists_or_initialize(m).register_hook(h, _MOVE_HOOK)


def make_spec(mode: str, onload, offload="cpu", blocks_per_group: int = 1, use_stream: bool | None = None,
              pin: bool = True, budget: int | None = None, timing: tuple | None = None) -> OffloadSpec:
    if mode not in MODES:
        raise QuantLoRAError(f"offload mode {mode!r}: choose one of {', '.join(MODES)}.")
    onload, offload = torch.device(onload), torch.device(offload)
    bpg = max(1, int(blocks_per_group))
    stream = onload.type == "cuda" if use_stream is None else (bool(use_stream) and onload.type == "cuda")
    budget = None if budget is None or mode != "block" else max(0, int(budget))
    return OffloadSpec(mode, onload, offload, bpg if mode == "block" else 1, stream, pin, budget,
                       timing if mode == "block" else None)


def is_current(root: nn.Module, spec: OffloadSpec) -> bool:
    """The tree is offloaded with `spec`, on the very tensors the hooks were built on."""
    st = offload_state(root)
    return st is not None and st.spec == spec and st.tensor_ids == tensor_ids(root)


def flat_blocks(root: nn.Module) -> list[nn.Module]:
    """Every block of the top-level block lists, in forward order (Flux: double, then single)."""
    return [b for _, lst in block_lists(root) for b in lst]


def plan_blocks(root: nn.Module, budget: int | None, lookahead: int = 1, timing: tuple | None = None):
    """(Residency, non-block bytes) for `root` under a device budget for its weights (timing: see
    OffloadSpec.timing)."""
    from .streaming import plan_residency

    blocks = flat_blocks(root)
    sizes = [module_bytes(b) for b in blocks]
    nonblock = module_bytes(root) - sum(sizes)
    room = None if budget is None else max(0, budget - nonblock)
    return plan_residency(sizes, room, lookahead, timing), nonblock


def apply_offload(root: nn.Module, mode: str, onload, offload="cpu", blocks_per_group: int = 1,
                  use_stream: bool | None = None, pin: bool = True, budget: int | None = None,
                  timing: tuple | None = None) -> OffloadState | None:
    """Put `root` under offload `mode`; returns its state (None for "none"). Same settings twice:
    no-op. Block mode with only another budget: the residency changes in place (blocks move
    between the device and pinned memory; nothing is rebuilt). Other settings: the old offload
    is removed first.

    block: the blocks that fit `budget` (device bytes for the weights, in-flight copies
    included; None streams every block) stay on the device, the rest are streamed
    (memory/streaming.py); blocks_per_group is how many streamed blocks are copied ahead."""
    spec = make_spec(mode, onload, offload, blocks_per_group, use_stream, pin, budget, timing)
    old = offload_state(root)
    if old is not None:
        if is_current(root, spec):
            return old
        if (old.strategy == "stream" and mode == "block" and old.tensor_ids == tensor_ids(root)
                and old.spec.__class__(**{**old.spec.__dict__, "budget": spec.budget}) == spec):
            return _replan(root, old, spec)
        remove_offload(root)
    if mode == "none":
        return None
    sizes = tree_sizes(root)
    if mode == "model":
        root.to(onload)
        state = OffloadState(spec, "model", "model", sizes.model, sizes.model, tensor_ids(root))
        setattr(root, _MARK, state)
        return state
    eff = mode if (mode == "leaf" or block_lists(root)) else "leaf"
    root.to(offload)
    if eff == "block":
        return _apply_stream(root, spec, sizes)
    if needs_module_moves(root) and spec.use_stream:
        # bitsandbytes / quanto on CUDA: every module owning tensors is a unit of the block
        # streamer (pinned, side stream, quantization state included), several copied ahead
        return _apply_leaf_stream(root, spec, sizes)
    if needs_module_moves(root):
        strategy = "moves"
        _apply_moves(root, eff, spec)
        work = sizes.leaf_max
    else:
        from diffusers.hooks import apply_group_offloading

        strategy = "diffusers"
        apply_group_offloading(
            root, onload_device=onload, offload_device=offload, offload_type="leaf_level",
            non_blocking=spec.use_stream, use_stream=spec.use_stream, low_cpu_mem_usage=not spec.pin,
            # record_stream: a finished group's GPU copy is freed once the compute stream is past it,
            # instead of a host sync after every group (which would stall kernel launches)
            record_stream=spec.use_stream,
            exclude_kwargs=["transformer_options"])  # ComfyUI's per-call dict: pass it through, never copy it
        if spec.use_stream:
            _stream_buffers_follow(root)
        work = (3 if spec.use_stream else 1) * sizes.leaf_max
    state = OffloadState(spec, eff, strategy, min(work, sizes.model), sizes.model, tensor_ids(root))
    setattr(root, _MARK, state)
    return state


def _top_parts(root: nn.Module) -> list[nn.Module]:
    in_lists = {id(c) for _, c in block_lists(root)}
    return [c for _, c in root.named_children() if id(c) not in in_lists]


def _apply_stream(root: nn.Module, spec: OffloadSpec, sizes: TreeSizes) -> OffloadState:
    from . import streaming

    res, nonblock = plan_blocks(root, spec.budget, spec.blocks_per_group, spec.timing)
    for part in _top_parts(root):
        part.to(spec.onload)
    root._apply(lambda t: t.to(spec.onload), recurse=False)
    blocks = flat_blocks(root)
    streamer = streaming.BlockStreamer(blocks, res.streamed, spec.onload, res.lookahead, spec.pin)
    streamer.window = res.inflight_bytes  # the plan's room, counted in bytes (memory/pipeline.py models the same)
    streaming.install_hooks(root, blocks, streamer)
    work = min(nonblock + res.working_set, sizes.model)
    state = OffloadState(spec, "block", "stream", work, sizes.model, tensor_ids(root), res, streamer, nonblock)
    setattr(root, _MARK, state)
    log.debug("QuantLoRA offload: %d of %d blocks resident, %.2f GiB streamed per forward",
              res.n_resident, res.n_blocks, res.streamed_bytes / 2 ** 30)
    return state


LEAF_LOOKAHEAD = 4


def _apply_leaf_stream(root: nn.Module, spec: OffloadSpec, sizes: TreeSizes) -> OffloadState:
    from . import streaming

    units = [m for m in root.modules() if _own_tensors(m)]
    streamer = streaming.BlockStreamer(units, tuple(range(len(units))), spec.onload, LEAF_LOOKAHEAD, spec.pin,
                                       own_only=True)
    streaming.install_hooks(root, units, streamer)
    work = min((LEAF_LOOKAHEAD + 1) * sizes.leaf_max, sizes.model)
    state = OffloadState(spec, "leaf", "stream", work, sizes.model, tensor_ids(root), None, streamer, 0)
    setattr(root, _MARK, state)
    return state


def _replan(root: nn.Module, old: OffloadState, spec: OffloadSpec) -> OffloadState:
    res, nonblock = plan_blocks(root, spec.budget, spec.blocks_per_group, spec.timing)
    if res.streamed != old.residency.streamed:
        old.streamer.set_streamed(res.streamed)
    old.streamer.lookahead = res.lookahead
    old.streamer.window = res.inflight_bytes
    state = OffloadState(spec, "block", "stream", min(nonblock + res.working_set, old.model_bytes), old.model_bytes,
                         tensor_ids(root), res, old.streamer, nonblock)
    setattr(root, _MARK, state)
    return state


def _stream_buffers_follow(root: nn.Module) -> None:
    """diffusers 0.42's streamed groups onload the buffers of their modules from pinned copies taken
    when the hooks were applied, but offload (and the initial offload) restore only parameters:
    a block's buffers stay wherever they were, and anything written into them later (LoRA slot
    buffers swapped in place) is overwritten by the stale pinned copy at the next onload. Listing
    those buffers as the group's own makes offload point them back at their pinned copies, so
    they live in pinned host memory between uses and writes land where the next onload reads."""
    seen = set()
    for m in root.modules():
        reg = m.__dict__.get("_diffusers_hook")
        hook = reg.get_hook("group_offloading") if reg is not None else None
        group = getattr(hook, "group", None)
        if group is None or id(group) in seen or group.stream is None:
            continue
        seen.add(id(group))
        own = {id(b) for b in group.buffers}
        extra = [b for mod in group.modules for b in mod.buffers() if id(b) not in own and b in group.cpu_param_dict]
        if extra:
            group.buffers = list(group.buffers) + extra
            group.offload_()


def _strip_empty_registries(root: nn.Module) -> None:
    for m in root.modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None and not reg.hooks:
            del m.__dict__["_diffusers_hook"]
            m.__dict__.pop("forward", None)  # the bound method HookRegistry left as an instance attribute


def _unpin(root: nn.Module) -> int:
    n = 0
    for t in (*root.parameters(), *root.buffers()):
        if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu":
            continue
        try:
            pinned = t.is_pinned()
        except RuntimeError:
            return n
        if pinned:
            t.data = torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.data)
            n += 1
    empty = getattr(torch._C, "_host_emptyCache", None)
    if n and empty is not None:
        empty()  # torch caches freed pinned blocks; give them back to the OS
    return n


def remove_offload(root: nn.Module, release_pinned: bool = True) -> bool:
    """Take the offload off `root` (hooks, pinned memory) and leave it on the offload device.
    release_pinned=False keeps torch's cache of freed pinned blocks for the next offload (the
    benchmark, going from one model to the next)."""
    state = offload_state(root)
    if state is None:
        return False
    if state.strategy != "model":
        from diffusers.hooks import HookRegistry

        reg = HookRegistry.check_if_exists_or_initialize(root)
        for name in (*_DIFFUSERS_HOOKS, _MOVE_HOOK, *_STREAM_HOOKS):
            reg.remove_hook(name, recurse=True)
        _strip_empty_registries(root)
        from . import streaming

        streaming.remove_compiled_wrappers(root)
        if state.streamer is not None:
            state.streamer.to_pageable(release_pinned)
        elif state.spec.use_stream:
            _unpin(root)
    root.to(state.spec.offload)
    delattr(root, _MARK)
    return True


@contextlib.contextmanager
def offloaded(root: nn.Module, mode: str, onload, offload="cpu", **kw):
    """apply_offload for the duration of a with-block."""
    state = apply_offload(root, mode, onload, offload, **kw)
    try:
        yield state
    finally:
        remove_offload(root)
