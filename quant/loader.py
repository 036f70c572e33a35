"""Stream a Flux checkpoint into a module tree built on the meta device, quantizing block by block.

Tensors are read one at a time from memory-mapped safetensors and each transformer block
is quantized as soon as its weights are in, so peak host memory stays near one copy of the
file (less for quantized variants), never two.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import QuantLoRAError
from .backends import check_shapes, quantize_block, require_backend
from .flux_config import FluxArch, infer_arch
from .flux_keys import linear_maps, norm_maps, swap_halves
from .safetensors_io import TensorReader
from .sizes import module_bytes
from .sources import CheckpointSource, open_source

log = logging.getLogger("quantlora")

# Built on "meta": (arch, compute dtype) -> a module tree with BFL parameter names.
ModelBuilder = Callable[[FluxArch, torch.dtype], nn.Module]
_UNIT = re.compile(r"^((?:double|single)_blocks\.\d+)\.")


@dataclass
class LoadReport:
    source: str
    layout: str
    quantization: str
    compute_dtype: str
    file_dtypes: list
    load_s: float = 0.0
    weights_bytes: int = 0
    unexpected: list = field(default_factory=list)


def _bfl_plan(src_keys, prefix: str) -> dict[str, Callable[[TensorReader], torch.Tensor]]:
    plan = {}
    for k in src_keys:
        if not k.startswith(prefix) or k.endswith((".scale_weight", ".scale_input")) or k.endswith("scaled_fp8"):
            continue
        target = k[len(prefix):]
        scale_key = k[: -len("weight")] + "scale_weight" if k.endswith(".weight") else None
        if scale_key in src_keys:  # "scaled fp8" checkpoints: weight * per-tensor scale
            plan[target] = lambda r, k=k, s=scale_key: r.get(k).float() * r.get(s).float()
        else:
            plan[target] = lambda r, k=k: r.get(k)
    return plan


def _diffusers_plan(src_keys, prefix: str, arch: FluxArch) -> dict:
    plan, groups = {}, {}
    for m in linear_maps(arch.depth, arch.depth_single_blocks, arch.hidden_size, arch.mlp_hidden):
        groups.setdefault(m.bfl, []).append(m)
    for bfl, parts in groups.items():
        parts.sort(key=lambda m: m.offset)
        for end in ("weight", "bias"):
            keys = [f"{prefix}{m.diffusers}.{end}" for m in parts]
            if not all(k in src_keys for k in keys):
                continue
            swap = parts[0].swap_halves

            def build(r, keys=keys, swap=swap):
                t = torch.cat([r.get(k) for k in keys], dim=0) if len(keys) > 1 else r.get(keys[0])
                return swap_halves(t) if swap else t
            plan[f"{bfl}.{end}"] = build
    for d, b in norm_maps(arch.depth, arch.depth_single_blocks).items():
        if prefix + d in src_keys:
            plan[b] = lambda r, k=prefix + d: r.get(k)
    return plan


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> bool:
    mod_name, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if leaf not in mod._parameters:
        return False
    old = mod._parameters[leaf]
    if tuple(old.shape) != tuple(value.shape):
        raise QuantLoRAError(f"tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}; the file is inconsistent.")
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return True


def load_flux(path: str, build: ModelBuilder, quantization: str = "none", compute_dtype: torch.dtype = torch.bfloat16,
              device: torch.device | str = "cpu", progress: Callable[[int, int], None] | None = None,
              source: CheckpointSource | None = None):
    """Returns (module tree with weights, FluxArch, LoadReport)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    backend = require_backend(quantization, device)
    src = source or open_source(path)
    arch, layout, prefix = infer_arch(src.shapes(), src.name)
    src_keys = set(src.shapes())
    plan = _bfl_plan(src_keys, prefix) if layout == "bfl" else _diffusers_plan(src_keys, prefix, arch)

    try:
        model = build(arch, compute_dtype)
    except (ValueError, AssertionError, RuntimeError, TypeError, ZeroDivisionError) as e:
        if isinstance(e, (QuantLoRAError, torch.OutOfMemoryError)):
            raise
        raise QuantLoRAError(f"{src.name}: its tensors describe a Flux transformer that cannot be built ({arch.hidden_size} "
                             f"hidden, {arch.num_heads} heads, {arch.depth}+{arch.depth_single_blocks} blocks: "
                             f"{type(e).__name__}: {e}). The file is damaged or not a FLUX.1 model; re-download it.") from None
    units: dict[str, list[str]] = {"": []}
    for key in plan:
        m = _UNIT.match(key)
        units.setdefault(m.group(1) if m else "", []).append(key)
    order = [""] + sorted((u for u in units if u), key=lambda u: (u.startswith("single"), int(u.rsplit(".", 1)[1])))

    reader = TensorReader(src.headers)
    unexpected = []
    try:
        for i, unit in enumerate(order):
            for key in units[unit]:
                value = _read(plan, key, reader, src.name).to(device=device, dtype=compute_dtype)
                if not _assign(model, key, value):
                    unexpected.append(key)
            value = None
            if unit:
                block = model.get_submodule(unit)
                _check_loaded(block, unit, src.name)
                check_shapes(backend, block, unit)
                _quantize(backend, block, unit, compute_dtype, device, src.name)
                block = None
                if device.type == "cpu":
                    _return_freed_memory()
            if progress:
                progress(i + 1, len(order))
    finally:
        reader.close()
    _check_loaded(model, "", src.name)
    model.to(device)
    if unexpected:
        log.warning("QuantLoRA: %s: %d tensors not used by the Flux model, e.g. %s", src.name, len(unexpected), unexpected[:5])
    report = LoadReport(src.path, layout, quantization, str(compute_dtype).replace("torch.", ""),
                        sorted(set(src.dtypes().values())), time.perf_counter() - t0, module_bytes(model), unexpected)
    return model, arch, report


def _read(plan: dict, key: str, reader: TensorReader, name: str) -> torch.Tensor:
    try:
        return plan[key](reader)
    except (QuantLoRAError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, ValueError, TypeError) as e:  # q/k/v that do not concatenate, a scale of the wrong shape
        raise QuantLoRAError(f"{name}: tensor {key} cannot be built from the file's tensors ({e}); "
                             "the file is inconsistent. Re-download it.") from None


def _quantize(backend, block: nn.Module, unit: str, compute_dtype: torch.dtype, device: torch.device, name: str) -> None:
    try:
        quantize_block(backend, block, compute_dtype, device)
    except (QuantLoRAError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # the quantization library's own error types
        raise QuantLoRAError(f"{name}: quantization {backend.name!r} failed on {unit} ({type(e).__name__}: {e}). "
                             f"Pick another quantization (or 'none'); {backend.library} may need an update.") from None


def _return_freed_memory() -> None:
    """glibc keeps the quantizers' freed temporaries (fp32 copies, packing buffers) in its heap, so a
    CPU load grew to 1.1-1.7x the file's size though each block is quantized as soon as it is in.
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


def _check_loaded(module: nn.Module, where: str, name: str) -> None:
    missing = [f"{where}.{n}" if where else n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise QuantLoRAError(
            f"{name}: {len(missing)} tensors of the Flux model are missing from the file (e.g. {', '.join(missing[:4])}). "
            "The file is incomplete or a different model variant; re-download it."
        )
