"""What a Linear's weight is made of, and how to read it as a float matrix and write one back.

The LoRA merge mode (lora/merge.py) adds a LoRA's delta to weights in place: dequantize, add,
requantize with the weight's own library and scaling, and copy the result into the very tensors
the layer holds (a compiled graph captured those objects, so nothing recompiles). Restoring is a
copy of the same tensors back from a pristine copy. So each kind of weight answers three things:

  storage(layer)        the tensors that hold the weight (the same objects at every call) (a bnb 4-bit weight: the packed
                        bytes plus its quantization state; a torchao or quanto tensor subclass:
                        its inner tensors, recursively; a plain weight: itself)
  dequantize(layer)     the weight as an fp32 (out, in) matrix
  requantize(layer, w)  tensors for `w`, parallel to storage(layer), same shapes and dtypes

Kinds: plain floating point (bf16/fp16/fp32), fp8 storage (FP8LayerwiseCast or ComfyUI's fp8
weight_dtype, with ComfyUI's per-tensor `scale_weight` when the checkpoint has one), torchao
Float8Tensor / Int8Tensor (per-row; requantized by the tensor class's own `from_hp` with the
weight's settings), optimum-quanto (requantized by quanto itself on a scratch layer), bitsandbytes
NF4/FP4 and LLM.int8 (dequantized through peft's helper; requantized by bitsandbytes with the
layer's block size and nesting). Anything else is refused with the layer's name and type.
No ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantLoRAError

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Codec:
    kind: str   # float | fp8 | torchao | quanto | bnb-4bit | bnb-int8
    bits: int   # bits per weight element, about (4-bit kinds lose small LoRA deltas when merged)


def codec_of(layer: nn.Module, name: str = "") -> Codec:
    w = getattr(layer, "weight", None)
    if w is None or not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(layer, nn.modules.conv._ConvNd):
        raise QuantLoRAError(f"layer {name or type(layer).__name__}: no 2-D weight to merge a LoRA into "
                             f"({type(layer).__name__}); use LoRAHotswap's mode 'slots'.")
    cls = type(w).__name__
    if cls == "Params4bit":
        if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
            # bitsandbytes' CPU kernels repacked this weight on its first forward (a CPU with
            # AVX512-bf16): another layout and state that its quantize_4bit does not produce
            raise QuantLoRAError(f"layer {name}: this NF4 weight was repacked by bitsandbytes' CPU kernels after "
                                 "its first run; LoRA merge cannot requantize it there. Use LoRAHotswap's mode "
                                 "'slots' (auto does) for NF4 on a CPU.")
        return Codec("bnb-4bit", 4)
    if cls == "Int8Params":
        return Codec("bnb-int8", 8)
    if _is_torchao(w):
        if cls not in ("Float8Tensor", "Int8Tensor"):
            raise _unknown(name, w)
        return Codec("torchao", 8)
    if _is_quanto(w):
        bits = getattr(getattr(w, "qtype", None), "bits", 8)
        return Codec("quanto", int(bits))
    if type(w) in (torch.Tensor, nn.Parameter) and type(w.data) is torch.Tensor:
        if w.dtype in FP8:
            return Codec("fp8", 8)
        if w.dtype.is_floating_point:
            return Codec("float", 8 * w.element_size())
    raise _unknown(name, w)


def _unknown(name, w) -> QuantLoRAError:
    return QuantLoRAError(f"layer {name}: LoRA merge does not know weights of type {type(w).__name__} "
                          f"({w.dtype}); use LoRAHotswap's mode 'slots' for this model.")


def _is_torchao(w) -> bool:
    return any(c.__name__ == "TorchAOBaseTensor" for c in type(w).__mro__)


def _is_quanto(w) -> bool:
    return type(w).__module__.startswith("optimum.quanto")


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors inside a tensor subclass, recursively (torch's __tensor_flatten__ protocol)."""
    if type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    out = []
    for n in names:
        v = getattr(t, n)
        if v is not None:
            out.extend(_inner(v))
    return out


def storage(layer: nn.Module) -> list[torch.Tensor]:
    w = layer.weight
    kind = codec_of(layer).kind
    if kind == "bnb-4bit":
        qs = w.quant_state
        out = [w, qs.absmax]
        if qs.nested:
            out += [qs.offset, qs.state2.absmax]
        return out
    if kind == "bnb-int8":
        # after its first forward, Linear8bitLt moves CB/SCB from the weight to layer.state
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return [w, scb]
    if kind in ("torchao", "quanto"):
        return _inner(w)
    # the Parameter itself, not .data (a new tensor with its own version counter at each access):
    # lora/merge.py tells its own writes from others' by these tensors' identity and version
    return [w]


def _scale_weight(layer):
    s = getattr(layer, "scale_weight", None)
    return s if isinstance(s, torch.Tensor) else None


@torch.no_grad()
def dequantize(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    kind = codec_of(layer).kind
    if kind in ("bnb-4bit", "bnb-int8"):
        from peft.utils.integrations import dequantize_bnb_weight

        state = w.quant_state if kind == "bnb-4bit" else getattr(layer, "state", None)
        return dequantize_bnb_weight(w, state=state).float()
    if kind in ("torchao", "quanto"):
        if _fp8_rows(w):
            from . import fp8_rows

            return fp8_rows.dequantize_rows(w)
        return w.dequantize().float()
    out = w.data.float()
    s = _scale_weight(layer)
    return out * s.float() if (kind == "fp8" and s is not None) else out


@torch.no_grad()
def requantize(layer: nn.Module, full: torch.Tensor) -> list[torch.Tensor]:
    """Tensors for the fp32 matrix `full`, parallel to storage(layer), made the way the weight's
    own library makes them (same scaling granularity, block size, nesting)."""
    w = layer.weight
    kind = codec_of(layer).kind
    if kind == "float":
        return [full.to(w.dtype)]
    if kind == "fp8":
        s = _scale_weight(layer)
        big = torch.finfo(w.dtype).max
        scaled = full / s.float() if s is not None else full
        return [scaled.clamp(-big, big).to(w.dtype)]
    if kind == "bnb-4bit":
        import bitsandbytes.functional as bf

        qs = w.quant_state
        packed, st = bf.quantize_4bit(full.to(qs.dtype), blocksize=qs.blocksize, compress_statistics=qs.nested,
                                      quant_type=qs.quant_type, quant_storage=w.data.dtype)
        out = [packed, st.absmax]
        if qs.nested:
            out += [st.offset, st.state2.absmax]
        return out
    if kind == "bnb-int8":
        import bitsandbytes.functional as bf

        # as the load path: the loader hands bnb the weight in the compute dtype (the bias keeps it),
        # and Int8Params quantizes it from fp16
        hp = layer.bias.dtype if getattr(layer, "bias", None) is not None else torch.bfloat16
        cb, scb, _ = bf.int8_vectorwise_quant(full.to(hp).to(torch.float16))
        return [cb, scb]
    if kind == "torchao":
        return _inner(_torchao_from_hp(w, full))
    return _inner(_quanto_requantize(w, full))


@torch.no_grad()
def write(layer: nn.Module, full: torch.Tensor, tensors: list[torch.Tensor] | None = None) -> None:
    """Requantizes the fp32 matrix `full` into the layer's own storage tensors (`tensors`, default
    storage(layer)), in place: a compiled graph that captured them sees the new values."""
    w = layer.weight
    if _fp8_rows(w):
        from . import fp8_rows

        fp8_rows.requantize_rows_into(w, full)  # one fused pass, same bits as from_hp (quant/fp8_rows.py)
        return
    for t, new in zip(tensors if tensors is not None else storage(layer), requantize(layer, full)):
        t.copy_(new)


def _fp8_rows(w) -> bool:
    """torchao per-row fp8 on a GPU: the fused kernels of quant/fp8_rows.py do its merge."""
    if type(w).__name__ != "Float8Tensor" or not w.is_cuda:
        return False
    from . import fp8_rows

    return fp8_rows.applies(w)


def _torchao_from_hp(w, full):
    from torchao.quantization import PerRow

    hp = full.to(w.dtype)
    rows = list(getattr(w, "block_size", [])) == [1, w.shape[1]]
    if type(w).__name__ == "Float8Tensor":
        if not rows:
            raise QuantLoRAError(f"torchao fp8 weight with block size {w.block_size}: LoRA merge handles per-row "
                                 "scales (the pack's torchao backends); use LoRAHotswap's mode 'slots'.")
        return type(w).from_hp(hp, float8_dtype=w.qdata.dtype, granularity=PerRow(), mm_config=w.mm_config,
                               kernel_preference=w.kernel_preference, act_quant_kwargs=w.act_quant_kwargs)
    if not rows or getattr(w, "zero_point", None) is not None and bool(w.zero_point.any()):
        raise QuantLoRAError("torchao int8 weight that is not symmetric per-row: LoRA merge cannot requantize it; "
                             "use LoRAHotswap's mode 'slots'.")
    return type(w).from_hp(hp, granularity=PerRow(), act_quant_kwargs=w.act_quant_kwargs)


def _quanto_requantize(w, full):
    """quanto quantizes a scratch Linear holding `full` exactly as the loader's quantize + freeze did."""
    from optimum import quanto

    scratch = nn.Module()
    scratch.layer = nn.Linear(full.shape[1], full.shape[0], bias=False, device=full.device, dtype=w.dtype)
    scratch.layer.weight.data.copy_(full.to(w.dtype))
    quanto.quantize(scratch, weights=w.qtype)
    quanto.freeze(scratch)
    return scratch.layer.weight


def shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of the layer (a bnb 4-bit weight is stored packed, so not its weight's shape)."""
    qs = getattr(layer.weight, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(qs.shape[0]), int(qs.shape[1])
    return int(layer.weight.shape[0]), int(layer.weight.shape[1])


def nbytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in storage(layer))
