"""Per-layer work while ComfyUI's own loader fills a Flux model from a checkpoint.

ComfyUI builds the model (its key conversions, variants and model classes) and hands each layer
its tensors through `_load_from_state_dict`; the pack's operations class (nodes/quant_ops.py)
passes every Linear's tensors to `LayerLoader.load_linear`, which converts them to the compute
dtype and, for transformer-block Linears, quantizes them on the load device as they arrive. So
host memory peaks near one copy of the file (less for quantized variants), never two.
Plain torch: no ComfyUI import.
"""
from __future__ import annotations

import functools
import logging
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..checkpoint.flux_keys import BLOCK_LAYER
from ..errors import QuantLoRAError
from .backends import Backend, quantize_linear

log = logging.getLogger("quantlora")

# Linears inside transformer blocks are quantized; embedders and the final layer stay in the
# compute dtype (they are small and sensitive).
# Per-tensor scales of "scaled fp8" checkpoints; the weight is stored divided by it.
SCALE_KEYS = ("scale_weight", "scale_input")


@dataclass
class LoadReport:
    source: str
    layout: str
    quantization: str
    compute_dtype: str
    file_dtypes: list
    load_s: float = 0.0
    weights_bytes: int = 0
    quantized_layers: int = 0
    unexpected: list = field(default_factory=list)
    # host seconds by phase (LayerLoader.phases): where a load's time goes, for the restart figure
    phases: dict = field(default_factory=dict)
    # the weight cache's part in this load (quant/weight_cache.py): its file, read or written, layers
    weight_cache: dict | None = None


class LayerLoader:
    """Receives each Linear's tensors from ComfyUI's load_state_dict call and places them."""

    def __init__(self, backend: Backend, compute_dtype: torch.dtype, device: torch.device, name: str,
                 total_linears: int = 0, progress: Callable[[int, int], None] | None = None, direct=None,
                 cache=None, cache_writer=None):
        self.backend, self.dtype, self.device, self.name = backend, compute_dtype, torch.device(device), name
        self.direct = direct  # checkpoint.direct_read.DirectReader: weights read for the device, not mapped
        # quant/weight_cache.py: the quantized layers of an earlier load (CachedWeights, read through
        # `direct`), or the writer that keeps this load's for the next one
        self.cache, self.cache_writer = cache, cache_writer
        self.file_views: dict[str, list[torch.Tensor]] = {}  # layer -> its cached tensors, mapped (no copy)
        self.total, self.progress = total_linears, progress
        self.seen = self.quantized = 0
        self.missing: list[str] | None = None  # torch's list for the whole load_state_dict call
        self._unit = None
        self.t0 = time.perf_counter()
        # host time placing weights (read, stage, copy launch) and quantizing them; on a GPU the
        # kernels run behind, so a phase that waits on the device shows it here
        self.times = {"to_device_s": 0.0, "quantize_s": 0.0, "cached_s": 0.0}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def quantizes(self, prefix: str) -> bool:
        return self.backend.apply is not None and BLOCK_LAYER.match(prefix) is not None

    def load_linear(self, module: nn.Module, state_dict: dict, prefix: str, missing_keys: list) -> None:
        self.missing = missing_keys
        w = state_dict.get(prefix + "weight")
        if w is None:
            missing_keys.append(prefix + "weight")
            return
        want = (module.out_features, module.in_features)
        if tuple(w.shape) != want:
            raise QuantLoRAError(f"{self.name}: tensor {prefix}weight has shape {tuple(w.shape)}, the model ComfyUI "
                                 f"built from the file's other tensors expects {want}. The file is inconsistent "
                                 "(a partial or mixed download); re-download it.")
        scale = state_dict.get(prefix + "scale_weight")
        if scale is not None:  # scaled fp8: stored weight * per-tensor (or per-row) scale
            w = w.float() * scale.float().reshape(-1, 1) if scale.numel() > 1 else w.float() * scale.float()
        b = state_dict.get(prefix + "bias")
        wants_bias = getattr(module, "bias", None) is not None or getattr(module, "comfy_need_lazy_init_bias", False)
        if b is None and wants_bias:
            missing_keys.append(prefix + "bias")
        quantize = self.quantizes(prefix)
        device = self.device if quantize else None
        t0 = time.perf_counter()
        if quantize and scale is None and self.cache is not None and self.direct is not None and self.cache.holds(prefix):
            self._load_cached(module, prefix)
            bias_key = self.cache.bias_key(prefix) if b is not None else None
            if bias_key is not None:
                module.bias = nn.Parameter(self.direct.read(bias_key, device).to(self.dtype), requires_grad=False)
            elif b is not None:
                module.bias = nn.Parameter(_small_to(b, device, self.dtype), requires_grad=False)
            self.times["cached_s"] += time.perf_counter() - t0
            self.seen += 1
            self._after(prefix)
            return
        if device is not None and self.direct is not None and scale is None:
            w = self.direct.to(w, device, self.dtype)
        else:
            w = w.to(device=device, dtype=self.dtype)
        module.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            module.bias = nn.Parameter(_small_to(b, device, self.dtype), requires_grad=False)
        t1 = time.perf_counter()
        self.times["to_device_s"] += t1 - t0
        if quantize:
            self._check_width(module, prefix)
            self._quantize(module, prefix)
            if self.cache_writer is not None:
                self.cache_writer.add(prefix, module.weight, module.bias if b is not None else None)
            self.times["quantize_s"] += time.perf_counter() - t1
        self.seen += 1
        self._after(prefix)

    def _load_cached(self, module: nn.Module, prefix: str) -> None:
        """The layer's quantized weight from the weight cache: the first layer of each shape is
        quantized from a placeholder by the library itself (the module gets what the library gives
        it), then every layer's weight is rebuilt from that template with its cached tensors."""
        tpl = self.cache.template(module)
        if tpl is None:
            shape = (module.out_features, module.in_features)
            module.weight = nn.Parameter(torch.ones(shape, dtype=self.dtype, device=self.device), requires_grad=False)
            self._check_width(module, prefix)
            self._quantize(module, prefix)
            self.quantized -= 1  # counted below, as every cached layer
            self.cache.remember_template(module)
            self._template_module = module
        else:  # what the library bound to the template module (torchao: its extra_repr), bound to this one
            tpl_module = self._template_module
            for k, v in vars(tpl_module).items():
                if isinstance(v, types.MethodType) and v.__self__ is tpl_module:
                    setattr(module, k, _rebind(v, tpl_module, module))
        w = self.cache.rebuild(module, prefix, lambda key: self.direct.read(key, self.device))
        module.weight = nn.Parameter(w, requires_grad=False)
        self.quantized += 1
        # the cached bytes as host memory, where the cache file is mapped: the layer's pristine copy
        # for a LoRA merge (lora/merge.py), in the order of its storage tensors
        views = [self.direct.host_view(prefix + n) for n in self.cache.template(module)[1]]
        if views and all(v is not None for v in views):
            self.file_views[prefix.rstrip(".")] = views

    def _check_width(self, module: nn.Module, prefix: str) -> None:
        m = self.backend.min_in_multiple
        if m > 1 and module.in_features % m:
            raise QuantLoRAError(f"quantization {self.backend.name!r} needs every layer's input width to be a multiple of "
                                 f"{m}; {prefix.rstrip('.')} has {module.in_features}. Pick another quantization.")

    def _quantize(self, module: nn.Module, prefix: str) -> None:
        try:
            quantize_linear(self.backend, module, self.dtype, self.device)
        except (QuantLoRAError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # the quantization library's own error types
            raise QuantLoRAError(f"{self.name}: quantization {self.backend.name!r} failed on {prefix.rstrip('.')} "
                                 f"({type(e).__name__}: {e}). Pick another quantization (or 'none'); "
                                 f"{self.backend.library} may need an update.") from None
        self.quantized += 1

    def _after(self, prefix: str) -> None:
        m = BLOCK_LAYER.match(prefix)
        unit = m.group(0) if m else None
        if unit != self._unit:
            if self._unit is not None and self.device.type == "cpu" and self.backend.apply is not None:
                return_freed_memory()
            self._unit = unit
        if self.progress:
            self.progress(self.seen, max(self.total, self.seen))

    def phases(self) -> dict:
        """Host seconds by phase so far: placing and quantizing weights, the direct reads' pread and
        staging waits (part of placing), and the rest (ComfyUI building the model, its key
        conversions, the layers that are not Linear)."""
        out = {k: round(v, 3) for k, v in self.times.items()}
        if self.direct is not None:
            st = self.direct.stats
            out.update(read_s=round(st["read_s"], 3), stage_wait_s=round(st["wait_s"], 3), read_threads=self.direct.threads,
                       read_chunk_mib=round(self.direct.chunk / 2**20, 2),
                       direct_gib=round(st["direct_bytes"] / 2**30, 3), direct_fallbacks=st["fallback"],
                       read_ahead_hits=st.get("ahead_hits", 0), read_ahead_misses=st.get("ahead_misses", 0),
                       read_ahead_wait_s=round(st.get("ahead_wait_s", 0.0), 3),
                       mapped_gib=round(st.get("mapped_bytes", 0) / 2**30, 3))
        if self.cache is not None:
            out["cache_hits"] = self.cache.hits
        out["other_s"] = round(self.elapsed() - sum(self.times.values()), 3)
        return out

    def check_complete(self) -> None:
        missing = [k for k in (self.missing or []) if not k.rsplit(".", 1)[-1] in SCALE_KEYS]
        if missing:
            raise QuantLoRAError(
                f"{self.name}: {len(missing)} tensors of the Flux model are missing from the file (e.g. "
                f"{', '.join(missing[:4])}). The file is incomplete or a different model variant; re-download it.")


def _rebind(v, old, new):
    """v with every method bound to `old` (also inside functools.partial, as torchao nests them) bound to `new`."""
    if isinstance(v, types.MethodType) and v.__self__ is old:
        return types.MethodType(_rebind(v.__func__, old, new), new)
    if isinstance(v, functools.partial):
        return functools.partial(_rebind(v.func, old, new), *(_rebind(a, old, new) for a in v.args),
                                 **{k: _rebind(a, old, new) for k, a in v.keywords.items()})
    return v


def _small_to(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor (a bias) to the load device without stalling the load. A copy to the GPU from
    pageable memory makes the CUDA driver wait for everything queued on the stream first (this
    layer's weight copy and its quantization), so each Linear's bias kept the next weight's read from
    overlapping the last one's copy. Staged through torch's cached page-locked blocks instead, the
    copy is queued like the weight's."""
    if device is None or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device=device, dtype=dtype)
    try:
        staged = t.pin_memory()
    except RuntimeError:  # no page-locked memory to be had: the plain (stalling) copy
        return t.to(device=device, dtype=dtype)
    return staged.to(device, non_blocking=True).to(dtype)


def return_freed_memory() -> None:
    """glibc keeps the quantizers' freed temporaries (fp32 copies, packing buffers) in its heap, so a
    CPU load grew to 1.1-1.7x the file's size though each layer is quantized as soon as it is in.
    Returning them to the OS after each block keeps the peak near the quantized size."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
