"""Quantization backends: which run on this device, and how each quantizes a module's Linears.

Each backend quantizes the Linear layers inside a module it is given (the loader hands it
one transformer block at a time, so peak memory stays near one copy of the weights).
Embedders, norms and the final layer never reach it: they stay in high precision.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import QuantLoRAError


@dataclass(frozen=True)
class Backend:
    name: str
    library: str          # pip distribution name, for messages
    module: str           # import name, to check presence
    describe: str
    apply: Callable[[nn.Module, torch.dtype, torch.device], None] | None
    bits: float = 16      # bits per block-Linear weight, scales included roughly (out-of-memory advice, sizes);
                          # 16: the compute dtype's (no quantization)
    needs: str = ""       # "", "cuda", "fp8-matmul", "cuda-kernel"
    min_in_multiple: int = 1  # input width every quantized Linear must be a multiple of
    # How a LoRA is merged into these weights and moved between devices is decided per weight tensor
    # (quant/weight_codecs.py), so it also covers weights this record did not make (ComfyUI's fp8).


def _linears(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


# --- bitsandbytes: swap Linear for Linear4bit / Linear8bitLt; .to(device) quantizes. ---
def _bnb_nf4(module, compute_dtype, device):
    import bitsandbytes as bnb

    for name, lin in _linears(module):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        _set_child(module, name, _bnb_place(q, device))


def _bnb_place(q: nn.Module, device: torch.device) -> nn.Module:
    """bnb params quantize when moved to a device; quantize explicitly if already there."""
    q = q.to(device)
    w = q.weight
    if not getattr(w, "bnb_quantized", True) or getattr(w, "CB", 0) is None:
        q.weight = w._quantize(device)
    return q


def _bnb_int8(module, compute_dtype, device):
    import bitsandbytes as bnb

    for name, lin in _linears(module):
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(lin.weight.data.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        _set_child(module, name, _bnb_place(q, device))


# --- torchao: tensor-subclass weights in place; never let it rewrite global inductor config. ---
def _torchao(config_factory):
    def apply(module, compute_dtype, device):
        from torchao.quantization import quantize_

        module.to(device)
        quantize_(module, config_factory(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return apply


def _ao_fp8_dynamic():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def _ao_fp8_weight():
    from torchao.quantization import Float8WeightOnlyConfig
    return Float8WeightOnlyConfig(set_inductor_config=False)


def _ao_int8_weight():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _ao_int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


# --- optimum-quanto: quantize + freeze turns Linear into QLinear with packed weights. ---
def _quanto(qtype_name):
    def apply(module, compute_dtype, device):
        from optimum import quanto

        module.to(device)
        quanto.quantize(module, weights=getattr(quanto, qtype_name))
        quanto.freeze(module)
    return apply


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("none", "torch", "torch", "no quantization: weights in the compute dtype", None),
    Backend("bnb-nf4", "bitsandbytes", "bitsandbytes", "bitsandbytes NF4 4-bit weights", _bnb_nf4, bits=4.5, min_in_multiple=64),
    Backend("bnb-int8", "bitsandbytes", "bitsandbytes", "bitsandbytes LLM.int8 weights", _bnb_int8, bits=8),
    Backend("torchao-fp8-dynamic", "torchao", "torchao", "torchao fp8 activations + fp8 weights (per-row scales, fp8 matmul)",
            _torchao(_ao_fp8_dynamic), bits=8, needs="fp8-matmul"),
    Backend("torchao-fp8-weight-only", "torchao", "torchao", "torchao fp8 weights, bf16 matmul", _torchao(_ao_fp8_weight), bits=8),
    Backend("torchao-int8-weight-only", "torchao", "torchao", "torchao int8 weights", _torchao(_ao_int8_weight), bits=8),
    Backend("torchao-int8-dynamic", "torchao", "torchao", "torchao int8 activations + int8 weights", _torchao(_ao_int8_dynamic), bits=8),
    Backend("quanto-int8", "optimum-quanto", "optimum.quanto", "optimum-quanto int8 weights", _quanto("qint8"), bits=8),
    Backend("quanto-fp8", "optimum-quanto", "optimum.quanto", "optimum-quanto float8 weights", _quanto("qfloat8"), bits=8),
    Backend("quanto-int4", "optimum-quanto", "optimum.quanto", "optimum-quanto int4 weights (group-wise)", _quanto("qint4"), bits=4.5),
]}
QUANTIZATION_NAMES = list(BACKENDS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why a backend cannot run on this device, or None if it can."""
    b = BACKENDS[name]
    if not _installed(b.module):
        return f"the library {b.library} is not installed (pip install {b.library} in ComfyUI's Python)"
    if b.needs == "fp8-matmul":
        if device.type != "cuda":
            return "fp8 matrix multiplication needs an NVIDIA GPU (compute capability 8.9+: RTX 40xx, L40, H100); this device is " + device.type
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            return f"fp8 matrix multiplication needs compute capability 8.9+, this GPU ({torch.cuda.get_device_name(device)}) has {cc[0]}.{cc[1]}"
    return None


def available_backends(device: torch.device) -> list[str]:
    return [n for n in BACKENDS if unavailable_reason(n, device) is None]


def require_backend(name: str, device: torch.device) -> Backend:
    if name not in BACKENDS:
        raise QuantLoRAError(f"quantization {name!r} is unknown. Choices: {', '.join(BACKENDS)}.")
    why = unavailable_reason(name, device)
    if why:
        raise QuantLoRAError(
            f"quantization {name!r} ({BACKENDS[name].describe}) cannot run here: {why}. "
            f"Choices that work on this device: {', '.join(available_backends(device))}."
        )
    return BACKENDS[name]


def check_shapes(backend: Backend, module: nn.Module, where: str) -> None:
    if backend.min_in_multiple > 1:
        for n, lin in _linears(module):
            if lin.in_features % backend.min_in_multiple:
                raise QuantLoRAError(
                    f"quantization {backend.name!r} needs every layer's input width to be a multiple of "
                    f"{backend.min_in_multiple}; {where}.{n} has {lin.in_features}. Pick another quantization."
                )


def quantize_block(backend: Backend, module: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    if backend.apply is None:
        module.to(device)
        return
    backend.apply(module, compute_dtype, device)


def quantize_linear(backend: Backend, linear: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Quantizes one Linear in place, as its weights arrive. The module object stays the same (its
    parent, built by ComfyUI, keeps pointing at it): torchao and quanto swap its weight for a
    quantized tensor; for bitsandbytes, whose quantized layers are other classes with their own
    forward, the module becomes the layer the library built (`become`)."""
    holder = nn.Module()
    holder.layer = linear
    backend.apply(holder, compute_dtype, device)
    q = holder.layer
    if q is linear:
        return
    if hasattr(q, "qweight") and getattr(q, "frozen", False):
        # quanto: a frozen QLinear is F.linear on its QTensor weight, which is what this Linear's own
        # forward does with that weight (and its ABC metaclass rules out becoming one).
        linear.weight, linear.bias = q.weight, q.bias
        return
    become(linear, q)


def become(module: nn.Module, other: nn.Module) -> None:
    """Turns `module` into `other` (class and state): a module's whole state lives in its __dict__,
    and torch's own parametrize swaps __class__ the same way."""
    module.__class__ = type(other)
    module.__dict__.clear()
    module.__dict__.update(other.__dict__)
