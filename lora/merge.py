"""LoRA merge mode: a LoRA set merged into a model's own (quantized) weights, restored exactly.

Activating a set: for every layer the previous set or the new one touches, the layer's storage
tensors (quant/weight_codecs.py) are first overwritten from a pristine copy, then, where the new
set touches the layer, dequantized, given s * up @ down per LoRA target (fp32), requantized by the
weight's own library and copied back into the same tensors. The forward pass is then the bare
model's: no extra kernels, nothing for torch.compile to recompile (same tensor objects, same
shapes). Deactivating copies the pristine tensors back: bit for bit the weights as loaded.

The pristine copy is taken lazily, the first time a layer is touched (it is then pristine: every
layer we ever changed is restored before anything else happens to it), in pinned host memory by
default (on a GPU the restore copies run on a side stream, a layer ahead of the merge arithmetic,
so the transfer hides behind it), or on the weights' own device when asked (fastest swaps, costs
VRAM).

If anything else wrote to a merged layer since (ComfyUI's own weight patching, a reload), the
recorded tensor versions no longer match and the next activation merges again from the pristine
copy instead of trusting the old state.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QuantLoRAError
from ..quant import weight_codecs as codecs
from ..memory import pinned_file
from ..memory.pinned import HostArena

log = logging.getLogger("quantlora")
PRISTINE_PLACES = ("host", "device")


@dataclass
class _Delta:
    offset: int
    up: torch.Tensor     # (rows, k)
    down: torch.Tensor   # (k, in)
    scale: float


@dataclass
class MergeReport:
    layers: int = 0            # layers the active set is merged into
    touched: int = 0           # layers rewritten by the last activation (old set's and new set's)
    seconds: float = 0.0       # the last activation, wall clock (synchronized)
    pristine_bytes: int = 0    # bytes held by the pristine copy
    pristine_place: str = "host"
    pristine_file_bytes: int = 0  # of those, the weight cache file's locked pages (no copy of their own)
    history: list = field(default_factory=list)
    # the last activation's host seconds by phase: the LoRA's matrices page-locked (first use), the
    # pristine copy taken (layers touched for the first time), the restores and merges queued, and
    # the wait for the GPU to finish them
    phases: dict = field(default_factory=dict)


def base_layer(root: nn.Module, name: str) -> nn.Module:
    """The Linear behind `name` (a LoRASlots wrapper's base when the model also has slots)."""
    try:
        m = root.get_submodule(name)
    except AttributeError:
        raise QuantLoRAError(f"LoRA merge: the model has no layer {name}.") from None
    return getattr(m, "base", m) if type(m).__name__ == "LoRASlots" else m


def deltas_of(root: nn.Module, loras: list) -> dict[str, list[_Delta]]:
    """Layer name -> the LoRA pieces to add to it; checks every target against its layer's shape."""
    out: dict[str, list[_Delta]] = {}
    for lora, strength in loras:
        for t in lora.targets:
            layer = base_layer(root, t.module)
            o, i = codecs.shape(layer)
            if t.offset < 0 or t.offset + t.rows > o or t.down.shape[1] != i:
                raise QuantLoRAError(f"LoRA {lora.name}: its {t.module} piece ({t.rows}x{t.down.shape[1]} at row "
                                     f"{t.offset}) does not fit the layer ({o}x{i}); the file is not for this model.")
            out.setdefault(t.module, []).append(_Delta(t.offset, t.up, t.down, float(strength) * float(t.scale)))
    return out


class MergeState:
    """The merged LoRA set of one model and the pristine copy of every layer it ever touched."""

    def __init__(self, root: nn.Module, pristine: str = "host"):
        if pristine not in PRISTINE_PLACES:
            raise QuantLoRAError(f"pristine copy place {pristine!r}: one of {', '.join(PRISTINE_PLACES)}.")
        self.root = root
        self.place = pristine
        self.key: tuple = ()
        self._pristine: dict[str, list[torch.Tensor]] = {}
        self._merged: dict[str, list[tuple]] = {}  # name -> _stamps of its storage after our write
        self.swaps = 0
        self.report = MergeReport(pristine_place=pristine)
        # where host-resident layers (streamed under offload) are merged: None = the GPU the rest of
        # the model is on, if any (tests set a device to force the copy-out path on a CPU)
        self.compute_device: torch.device | None = None
        self._arena = HostArena()

    @property
    def active_key(self) -> tuple:
        return self.key

    def check(self, loras: list) -> None:
        """Raise now (at node execution) for what a merge of `loras` cannot do."""
        for name in deltas_of(self.root, loras):
            codecs.codec_of(base_layer(self.root, name), name)

    def verify(self) -> bool:
        """Once per sampling (not per step: it walks every merged layer): if anything else wrote to a
        merged layer, forget the claim, so the next activation merges again from the pristine copy."""
        for name, seen in self._merged.items():
            now = _stamps(codecs.storage(base_layer(self.root, name)))
            if now != seen:
                log.info("QuantLoRA: merged LoRA weights of %s were changed by something else; merging again", name)
                self.key = ("changed elsewhere",)
                return False
        return True

    def _capture(self, todo: dict[str, list[torch.Tensor]]) -> None:
        """Pristine copies of layers touched for the first time, in one batch: on the host, one
        page-locked buffer of exactly their size (memory/pinned.py); on the device, clones."""
        if not todo:
            return
        if self.place == "host":
            # layers loaded from a mapped weight cache: its locked pages are their pristine copy
            # (memory/pinned_file.py: nothing to allocate, lock or copy back from the GPU)
            mapped = pinned_file.of(self.root)
            for name in list(todo) if mapped is not None else ():
                views = mapped.views_for(name, todo[name])
                if views is not None:
                    self._pristine[name] = views
                    n = sum(t.numel() * t.element_size() for t in todo.pop(name))
                    self.report.pristine_bytes += n
                    self.report.pristine_file_bytes += n
            if not todo:
                return
            flat = [t for ts in todo.values() for t in ts]
            copies = self._arena.copies(flat, lock=any(t.is_cuda for t in flat))
            it = iter(copies)
            for name, ts in todo.items():
                self._pristine[name] = [next(it) for _ in ts]
        else:
            for name, ts in todo.items():
                self._pristine[name] = [t.clone() for t in ts]
        self.report.pristine_bytes += sum(t.numel() * t.element_size() for ts in todo.values() for t in ts)

    @torch.inference_mode()  # ComfyUI's weights are inference tensors: writable only in this mode
    def activate(self, key: tuple, loras: list) -> bool:
        """Make the weights hold base + `loras` ([(ParsedLoRA, strength)]); key names the set. True if
        anything was written."""
        if key == self.key:
            return False
        t0 = time.perf_counter()
        if key and _on_cuda(self.root):
            for lora, _ in loras:
                pin_lora(lora)
        t_pinned = time.perf_counter()
        deltas = deltas_of(self.root, loras) if key else {}
        names = sorted(set(self._merged) | set(deltas), key=_natural)
        layers = [(n, base_layer(self.root, n)) for n in names]
        storages = [codecs.storage(layer) for _, layer in layers]
        # pristine now: never changed, or restored by the last activation
        fresh = {n: st for (n, _), st in zip(layers, storages) if n not in self._pristine}
        self._capture(fresh)
        t_captured = time.perf_counter()
        self._merged = {}
        self.key = ()  # a failure half way leaves no claim about what the weights hold
        device = next((st[0].device for st in storages if st[0].is_cuda), None) or _cuda_device(self.root) \
            or torch.device("cpu")
        compute = self.compute_device or (device if device.type == "cuda" else None)
        # host-resident layers (streamed blocks under offload) whose weights move cleanly are merged on
        # the compute device and written back: the same arithmetic, bit for bit, as a resident layer's
        # (a CPU merge rounds torchao's scales another way) and a GPU's speed
        away = {n for (n, layer), st in zip(layers, storages)
                if compute is not None and n in deltas and st[0].device.type == "cpu" and _movable(layer)}
        # the LoRA's matrices to where each layer is merged, in one go before the loop queues kernels:
        # copies from pageable memory between them stall the queue
        where = {n: (compute if n in away else st[0].device) for (n, _), st in zip(layers, storages)}
        moved = {n: [(d, d.up.to(where[n], non_blocking=True), d.down.to(where[n], non_blocking=True)) for d in ds]
                 for n, ds in deltas.items()}
        with _copy_stream(device) as (side, events):
            for i, ((n, _), st) in enumerate(zip(layers, storages)):  # restores, queued ahead on the side stream
                with _on(side):
                    if n not in fresh:  # a layer captured just now holds its pristine values already
                        for t, p in zip(st, self._pristine[n]):
                            t.copy_(p, non_blocking=True)
                    if side is not None:
                        events.append(torch.cuda.Event())
                        events[-1].record(side)
            for i, ((n, layer), st) in enumerate(zip(layers, storages)):
                if side is not None:
                    torch.cuda.current_stream(device).wait_event(events[i])
                if n in moved:
                    target = _OnDevice(layer, compute) if n in away else layer
                    full = codecs.dequantize(target)
                    for d, up, down in moved[n]:
                        full[d.offset:d.offset + up.shape[0]].addmm_(up.float(), down.float(), alpha=d.scale)
                    codecs.write(target, full)
                    if target is not layer:
                        for host, new in zip(st, codecs.storage(target)):
                            host.copy_(new)
        self._merged = {n: _stamps(codecs.storage(base_layer(self.root, n))) for n in deltas}
        self.key = key if deltas else ()
        t_queued = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.swaps += 1
        r = self.report
        t1 = time.perf_counter()
        r.layers, r.touched, r.seconds = len(deltas), len(layers), t1 - t0
        r.phases = dict(pin_lora_s=round(t_pinned - t0, 4), capture_s=round(t_captured - t_pinned, 4),
                        queue_s=round(t_queued - t_captured, 4), gpu_wait_s=round(t1 - t_queued, 4))
        r.history = (r.history + [round(r.seconds, 4)])[-20:]
        return True

    def deactivate(self) -> bool:
        return self.activate((), [])

    def move_pristine(self, place: str) -> None:
        """Moves the pristine copy (host <-> the weights' device), e.g. when a node asks for GPU swaps."""
        if place == self.place:
            return
        if place == "device":
            for name, copies in self._pristine.items():
                dev = codecs.storage(base_layer(self.root, name))[0].device
                self._pristine[name] = [c.to(dev) for c in copies]
            self._arena = HostArena()  # the host buffers go (and are unlocked)
        else:
            names = list(self._pristine)
            flat = [c for n in names for c in self._pristine[n]]
            copies = iter(self._arena.copies(flat, lock=bool(flat) and flat[0].is_cuda))
            for n in names:
                self._pristine[n] = [next(copies) for _ in self._pristine[n]]
        self.place = self.report.pristine_place = place


class _OnDevice:
    """A host-resident layer's weight (and fp8 scale) copied to the compute device, for the codecs to
    merge there; the caller copies its storage back into the layer's."""

    def __init__(self, layer: nn.Module, device: torch.device):
        w = layer.weight
        self.weight = w.to(device) if w.device != device else w.clone()
        s = getattr(layer, "scale_weight", None)
        self.scale_weight = s.to(device) if isinstance(s, torch.Tensor) else s


def _movable(layer: nn.Module) -> bool:
    """Weights that copy to another device as they are (bitsandbytes and quanto carry states that
    do not: those stay merged where they live)."""
    try:
        return codecs.codec_of(layer).kind in ("float", "fp8", "torchao")
    except QuantLoRAError:
        return False


def _cuda_device(root: nn.Module) -> torch.device | None:
    p = next((p for p in root.parameters(recurse=False) if p.is_cuda), None) or next(
        (p for _, c in zip(range(4), root.children()) for p in c.parameters() if p.is_cuda), None)
    return p.device if p is not None else None


def _on_cuda(root: nn.Module) -> bool:
    return _cuda_device(root) is not None


def pin_lora(lora) -> None:
    """Once per parsed LoRA used on a GPU: its matrices move into one page-locked host buffer (the
    parsed object keeps them, so host memory is not doubled), and every later swap copies them at
    the pinned rate instead of through pageable staging (~450 MB for a rank-64 Flux LoRA)."""
    if getattr(lora, "_pinned", None) is not None or not lora.targets:
        return
    arena = HostArena()
    flat = [t for tg in lora.targets for t in (tg.up, tg.down)]
    it = iter(arena.copies(flat, lock=True))
    for tg in lora.targets:
        tg.up, tg.down = next(it), next(it)
    lora._pinned = arena  # owns the registration: unregistered when the LoRA is dropped


def _stamps(tensors) -> list[tuple]:
    """Identity, address and version of each tensor. Tensors made under torch.inference_mode (ComfyUI
    runs nodes in it) have no version counter: for those only a replaced tensor is noticed."""
    out = []
    for t in tensors:
        try:
            v = t._version
        except RuntimeError:
            v = -1
        out.append((id(t), t.data_ptr(), v))
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


@contextlib.contextmanager
def _copy_stream(device: torch.device):
    """A side stream for the restores on CUDA (waiting for what the compute stream has queued, so no
    copy overwrites a weight a kernel still reads); none elsewhere."""
    if device.type != "cuda":
        yield None, []
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    yield side, []


@contextlib.contextmanager
def _on(stream):
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def pristine_bytes_needed(root: nn.Module, loras: list) -> int:
    """Host bytes a pristine copy of the layers `loras` touch would take (for the auto mode's check):
    none for layers whose copy is the mapped weight cache's own pages (memory/pinned_file.py)."""
    mapped = pinned_file.of(root)

    def new_bytes(name: str) -> int:
        layer = base_layer(root, name)
        if mapped is not None and mapped.views_for(name, codecs.storage(layer)) is not None:
            return 0
        return codecs.nbytes(layer)

    return sum(new_bytes(n) for n in deltas_of(root, loras))


# Measured LoRA-effect error after a merge (tests/test_lora_merge.py, delta ~5% of the weight):
# ~1.1-1.3 for 4-bit weights (NF4, quanto int4): the effect drowns in requantization noise.
FOUR_BIT_EFFECT_ERR = "1.1-1.3"


def choose(requested: str, root: nn.Module, loras: list, has_slots: bool, foreign_patches: int,
           host_free: int | None) -> tuple[str, str]:
    """('merge' | 'slots', why) for one LoRAHotswap node. `requested`: auto, merge, merge-gpu, slots.
    Explicit merge refuses only what it cannot do right; auto also keeps slots where merging would
    lose the LoRA (4-bit weights), where the model already has slots (the loader made them, so their
    cost is paid) and where the pristine copy would not fit in free host memory."""
    if requested == "slots":
        return "slots", "asked for"
    explicit = requested != "auto"
    if foreign_patches:
        why = (f"this MODEL carries {foreign_patches} ComfyUI weight patches (e.g. LoraLoader): merging would "
               "write over them")
        if explicit:
            raise QuantLoRAError(f"LoRA merge: {why}. Use mode 'slots', or put ComfyUI's LoRA loader after this node.")
        return "slots", why
    try:
        bits = min((codecs.codec_of(base_layer(root, n), n).bits for n in deltas_of(root, loras)), default=16)
    except QuantLoRAError as e:
        if explicit:
            raise
        return "slots", str(e)
    if not explicit:
        if has_slots:
            return "slots", "the model already has LoRA slots (the loader's lora_max_rank), so their cost is paid"
        if bits <= 4:
            return "slots", (f"4-bit weights: requantizing base + LoRA would lose the LoRA's effect in rounding "
                             f"noise (measured effect error {FOUR_BIT_EFFECT_ERR})")
        need = pristine_bytes_needed(root, loras)
        if host_free is not None and need > 0.8 * host_free:
            return "slots", (f"the pristine copy ({need / 2**30:.2f} GiB) would not fit in free host memory "
                             f"({host_free / 2**30:.2f} GiB)")
    why = "asked for" if explicit else "weights of 8 bits or more: merged, the step costs what the bare model's does"
    if bits <= 4:
        why += f"; 4-bit weights lose much of the LoRA's effect when merged (effect error {FOUR_BIT_EFFECT_ERR})"
    return "merge", why
