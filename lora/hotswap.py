"""Attach LoRA slots to a Flux module tree and switch LoRA sets in place.

A set is a list of (ParsedLoRA, strength). Several LoRAs share one slot by stacking along
the rank axis, so the sum of their ranks on a layer must fit max_rank. Switching writes
the buffers of every slot (and zeroes the scale of slots no LoRA in the set touches), so
the bare base is exactly base(x) + 0 once no LoRA is active.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint.flux_keys import BLOCK_LAYER, fused_splits
from ..errors import QuantLoRAError
from .slots import LoRASlots

log = logging.getLogger("quantlora")

TARGET_SETS = {
    # Every linear layer inside the transformer blocks (attention, MLP, modulation).
    "blocks": lambda name: bool(BLOCK_LAYER.match(name)),
    # Blocks plus embedders and final layer: for LoRAs trained on those too.
    "all": lambda name: True,
    # Attention projections only (plus single blocks' fused linear1/linear2): the lightest slots.
    "attention": lambda name: bool(BLOCK_LAYER.match(name)) and name.endswith((".qkv", ".proj", ".linear1", ".linear2")),
}


@dataclass
class _Write:
    row: int             # first pool row
    offset: int          # first output row
    down: torch.Tensor   # (k, in)
    up: torch.Tensor     # (rows, k)
    scale: float


SLOT_LAYOUTS = ["per-projection", "shared"]


def attach_slots(model: nn.Module, max_rank: int, targets: str = "blocks", dtype: torch.dtype | None = None,
                 hidden: int | None = None, mlp_hidden: int | None = None, layout: str = "per-projection") -> dict[str, LoRASlots]:
    """Wrap the selected Linear layers in LoRASlots (idempotent). Returns name -> slots."""
    if max_rank < 1:
        raise QuantLoRAError(f"max_rank {max_rank}: must be at least 1.")
    if targets not in TARGET_SETS:
        raise QuantLoRAError(f"lora targets {targets!r} unknown; choices: {', '.join(TARGET_SETS)}.")
    if layout not in SLOT_LAYOUTS:
        raise QuantLoRAError(f"lora slot layout {layout!r} unknown; choices: {', '.join(SLOT_LAYOUTS)}.")
    chosen = TARGET_SETS[targets]
    existing = {n: m for n, m in model.named_modules() if isinstance(m, LoRASlots)}
    todo = [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and chosen(n) and not n.endswith(".base") and n not in existing]
    added = []
    try:
        for name, lin in todo:
            w = lin.weight
            slot_dtype = dtype or (w.dtype if w.dtype.is_floating_point and w.element_size() >= 2 else torch.bfloat16)
            splits = fused_splits(name, hidden, mlp_hidden) if hidden else None
            parent, _, leaf = name.rpartition(".")
            slots = LoRASlots(lin, splits, max_rank, slot_dtype, w.device, layout)
            setattr(model.get_submodule(parent) if parent else model, leaf, slots)
            existing[name] = slots
            added.append((name, lin))
    except BaseException:  # e.g. out of GPU memory half way: put the plain layers back, keep nothing
        for name, lin in added:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
        raise
    return existing


def plan(slots: dict[str, LoRASlots], loras: list) -> dict[str, list[_Write]]:
    """Which pool rows each LoRA target takes; raises with the value to set when something does not fit."""
    writes: dict[str, list[_Write]] = {}
    used: dict[str, int] = {}
    for lora, strength in loras:
        missing = sorted({t.module for t in lora.targets if t.module not in slots})
        if missing:
            raise QuantLoRAError(
                f"LoRA {lora.name}: {len(missing)} of its layers have no hot-swap slots (e.g. {', '.join(missing[:3])}). "
                "The slots are made once, by whichever sets them first: with the loader's lora_max_rank above 0, set "
                "the loader's lora_targets to 'all'; with lora_max_rank 0, set targets to 'all' on the first "
                "LoRAHotswap node of the chain ('blocks' is enough if these are block layers)."
            )
        for t in lora.targets:
            s = slots[t.module]
            k = t.down.shape[0]
            if t.offset < 0 or t.offset + t.rows > s.out_features:
                raise QuantLoRAError(f"LoRA {lora.name}: rows {t.offset}..{t.offset + t.rows} exceed {t.module}'s "
                                     f"{s.out_features} outputs; the file is malformed.")
            start = used.get(t.module, 0)
            if start + k > s.pool:
                names = " + ".join(lo.name for lo, _ in loras)
                per_rank = s.pool // s.max_rank
                need = -(-(start + k) // per_rank)
                raise QuantLoRAError(
                    f"LoRA rank too large for the hot-swap slots: {names} need {start + k} rank rows on {t.module}, "
                    f"which holds {s.pool} (max_rank={s.max_rank}, layout {s.layout}). "
                    f"Set max_rank to {_next_pow2(need)} or more (on the loader / the first LoRAHotswap node)."
                )
            used[t.module] = start + k
            writes.setdefault(t.module, []).append(_Write(start, t.offset, t.down, t.up, float(strength) * float(t.scale)))
    return writes


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@torch.no_grad()
def write(slots: dict[str, LoRASlots], writes: dict[str, list[_Write]]) -> None:
    for name, s in slots.items():
        s.scale.zero_()
        ws = writes.get(name, ())
        if ws:
            s.up.zero_()  # a pool row may have served other output rows before
        for w in ws:
            k = w.down.shape[0]
            s.down[w.row:w.row + k].copy_(w.down, non_blocking=True)
            s.up[w.offset:w.offset + w.up.shape[0], w.row:w.row + k].copy_(w.up, non_blocking=True)
            s.scale[w.row:w.row + k] = w.scale


class HotswapState:
    """The slots of one model and which LoRA set they hold now.

    `loaded_key` names what down/up hold; `active` says whether the scales are on. Turning a set
    off only zeroes the scales (the bare base is then exactly base(x) + 0) and turning the same set
    back on restores them, so a repeated prompt with the same LoRAs costs no copy at all.
    """

    def __init__(self, slots: dict[str, LoRASlots]):
        self.slots = slots
        self.loaded_key: tuple = ()
        self.active = False
        self._scales: dict[str, torch.Tensor] = {}
        self.swaps = 0
        # While offload hooks own the slots' placement (CPUOffloadSampler), ensure_device leaves them be.
        self.buffers_placed_by_offload = False

    @property
    def max_rank(self) -> int:
        return next(iter(self.slots.values())).max_rank if self.slots else 0

    @property
    def active_key(self) -> tuple:
        return self.loaded_key if self.active else ()

    def check(self, loras: list) -> None:
        """Raise now (at node execution) if this set would not fit the slots."""
        plan(self.slots, loras)

    @torch.no_grad()
    def activate(self, key: tuple, loras: list) -> bool:
        """Make the slots hold `loras` ([(ParsedLoRA, strength)]); key identifies the set. True if it changed."""
        if not key:
            return self.deactivate()
        if key == self.loaded_key:
            if self.active:
                return False
            for name, s in self.slots.items():
                s.scale.copy_(self._scales[name])
            self.active = True
            return True
        write(self.slots, plan(self.slots, loras))
        self._scales = {name: s.scale.clone() for name, s in self.slots.items()}
        self.loaded_key, self.active = key, True
        self.swaps += 1
        return True

    @torch.no_grad()
    def deactivate(self) -> bool:
        if not self.active:
            return False
        for s in self.slots.values():
            s.scale.zero_()
        self.active = False
        return True

    def ensure_device(self, device: torch.device) -> None:
        """ComfyUI moves parameterised modules between devices; the slots' buffers follow the input."""
        if self.buffers_placed_by_offload:
            return
        for name, s in self.slots.items():
            if s.down.device != device:
                for k in ("down", "up", "scale"):  # buffers only: the base stays where ComfyUI put it
                    s._buffers[k] = s._buffers[k].to(device)
                if name in self._scales:
                    self._scales[name] = self._scales[name].to(device)


def file_identity(path: str) -> tuple:
    """What tells one file from another under the same name: device, inode, size, mtime and ctime.
    Size and mtime alone missed a different LoRA of the same size copied with its mtime kept (cp -p,
    rsync -t, tar x); those give a new inode or ctime, which no user tool can set back."""
    import os

    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LoRACache:
    """Parsed LoRA files by path and file identity: a replaced file is parsed again, never served stale."""

    def __init__(self, capacity: int = 8):
        self.capacity, self._items = capacity, {}
        self.parses = 0  # files parsed (cache misses), for /quantlora/stats

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(path: str) -> tuple:
        import os

        try:
            ident = file_identity(path)
        except OSError as e:  # removed or renamed between the node's run and sampling
            raise QuantLoRAError(f"LoRA {os.path.basename(path)!r}: cannot read {path} ({e.strerror or e}). It was "
                                 "removed or renamed after the LoRAHotswap node ran; put it back or pick it again "
                                 "and queue the prompt again.") from None
        return (os.path.abspath(path), *ident)

    def get(self, path: str, dims):
        from .formats import load_lora

        k = self.key(path) + (dims,)
        if k in self._items:
            self._items[k] = self._items.pop(k)  # most recent last
            return self._items[k]
        lora = load_lora(path, dims)
        self.parses += 1
        self._items[k] = lora
        while len(self._items) > self.capacity:
            self._items.pop(next(iter(self._items)))
        return lora
