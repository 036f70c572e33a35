"""Out of GPU memory while loading or sampling: what the callers do, and the message.

The callers (nodes/bridge.py for loading, nodes/runtime.py and the offload sampler for
sampling) catch torch.OutOfMemoryError, take detail(e) (which also clears the finished frames
of its traceback), leave the `except` block (so the traceback, and with it every frame holding
partial weights or activations, is released), drop their own references, call release(), and
raise one QuantLoRAError built here: what ran out, the GPU's
numbers, and the settings that would fit (a smaller quantization, an offload mode, a lower
resolution). The new error is raised outside the `except` block, so it does not keep the OOM's
traceback alive as its __context__. No ComfyUI import here.
"""
from __future__ import annotations

import gc
import traceback

import torch

from ..checkpoint.flux_keys import ANY_BLOCK
from ..errors import QuantLoRAError
from ..quant.backends import BACKENDS

GIB = 2 ** 30
# Bits per weight of the transformer blocks' Linear layers (scales included, roughly), from each
# backend's record (quant/backends.py); the rest of the model stays in the compute dtype.
WEIGHT_BITS = {b.name: b.bits for b in BACKENDS.values() if b.apply is not None}
LOAD_HEADROOM = GIB  # CUDA context, ComfyUI's minimum inference memory, fragmentation
OFFLOAD_HINT = ("KSampler (CPU offload) with offload_mode block (weights streamed block by block; leaf: the least VRAM)")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError)


def detail(e: BaseException) -> str:
    """torch's own first sentence(s) ('CUDA out of memory. Tried to allocate ... GPU 0 has ...'),
    and the finished frames of e's traceback cleared: their locals (partial weights, activations)
    go now even if something else holds one of those frames (a log record that kept an exception
    raised inside the failed call holds its frames, and through f_back every caller's)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    traceback.clear_frames(e.__traceback__)  # frames still executing (the caller's) are skipped
    return _whole_sentences(text, 240)


def _whole_sentences(text: str, limit: int) -> str:
    """At most `limit` characters, cut after a sentence (CUDA's message runs on for 400+ characters;
    a cut mid-word read as garbage)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."


def release() -> None:
    """Return what the failed attempt held: collect reference cycles, then hand torch's cached
    blocks back to the driver (ComfyUI reads free memory from the driver)."""
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:  # a failed kernel after an OOM must not hide the OOM message
            pass
        torch.cuda.empty_cache()


def gpu_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device as the driver counts them, else None."""
    try:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    except Exception:
        return None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.0f} MiB"


def weight_estimates(shapes: dict, compute_dtype: torch.dtype, names) -> tuple[dict, int]:
    """({quantization: bytes of weights once loaded}, largest block in the compute dtype): what
    the loader holds on the device, for the quantizations in `names`."""
    item = torch.empty((), dtype=compute_dtype).element_size()
    quantizable, other, blocks = 0, 0, {}
    for key, shape in shapes.items():
        n = 1
        for s in shape:
            n *= int(s)
        m = ANY_BLOCK.search(key)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + n * item
        if m and len(shape) == 2 and key.endswith(".weight"):
            quantizable += n
        else:
            other += n
    out = {}
    for name in names:
        bits = WEIGHT_BITS.get(name, 8 * item)
        out[name] = int(quantizable * bits / 8 + other * item)
    return out, max(blocks.values(), default=0)


def load_error(model_name: str, quantization: str, compute_dtype: torch.dtype, device, shapes: dict,
               available: list[str], why: str) -> QuantLoRAError:
    dt = str(compute_dtype).replace("torch.", "")
    est, block = weight_estimates(shapes, compute_dtype, available)
    mem = gpu_memory(device)
    msg = [f"{model_name}: out of GPU memory while loading it as quantization {quantization!r} (compute {dt}): {why}"]
    if quantization in est:
        msg.append(f"Its weights need about {_gib(est[quantization])} on the GPU (plus one block of "
                   f"{_gib(block)} while it is quantized).")
    others = sorted((n for n in est if n != "none"), key=lambda n: est[n])
    if mem is not None:
        free, total = mem
        msg.append(f"The partly loaded weights were released: {_gib(free)} of {_gib(total)} are free now.")
        fits = [n for n in others if n != quantization and est[n] + block + LOAD_HEADROOM <= free]
        if fits:
            msg.append("Settings that would fit: quantization " + ", ".join(f"{n} (~{_gib(est[n])})" for n in fits) + ".")
        else:
            msg.append("No quantization fits in the free memory.")
    else:
        msg.append("The partly loaded weights were released.")
        if others:
            msg.append("Smaller settings: quantization " + ", ".join(f"{n} (~{_gib(est[n])})" for n in others[:4]) + ".")
    msg.append("Or quantization 'none': the weights stay in host memory and are moved to the GPU when sampling "
               f"(ComfyUI loads only what fits), or sample it with {OFFLOAD_HINT}. "
               "Closing other programs that use the GPU also helps.")
    return QuantLoRAError(" ".join(msg))


def _resolution_hint(shape, weights: int, free: int | None, memory_required) -> str:
    b, h, w = int(shape[0]), int(shape[-2]) * 8, int(shape[-1]) * 8
    pick = None
    if free is not None and memory_required is not None:
        for s in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
            hh, ww = max(64, int(h * s) // 64 * 64), max(64, int(w * s) // 64 * 64)
            try:
                need = weights + int(memory_required([shape[0], *shape[1:-2], hh // 8, ww // 8]))
            except Exception:
                break
            if need <= free:
                pick = (ww, hh)
                break
    if pick is None:
        pick = (max(64, w // 2 // 64 * 64), max(64, h // 2 // 64 * 64))
        text = f"a lower resolution (e.g. {pick[0]}x{pick[1]}, a quarter of the pixels)"
    else:
        text = f"a lower resolution ({pick[0]}x{pick[1]} should fit)"
    if b > 1:
        text += ", batch_size 1"
    return text


class SamplingOutOfMemory(QuantLoRAError):
    """Out of GPU memory while sampling (the models were unloaded): the offload sampler re-plans
    with a larger reserve and tries once more on this one."""


def sampling_error(shape, device, why: str, weights: int = 0, quantization: str | None = None,
                   memory_required=None, offload_mode: str | None = None) -> QuantLoRAError:
    """shape: the latent's (batch, channels, height, width) or None; weights: the model's bytes on the GPU when loaded."""
    known = shape is not None and len(shape) >= 4
    what = f"{int(shape[-1]) * 8}x{int(shape[-2]) * 8} (batch {int(shape[0])})" if known else "this latent"
    mem = gpu_memory(device)
    msg = [f"out of GPU memory while sampling {what}: {why}",
           "The models were unloaded and their GPU memory returned"
           + (f" ({_gib(mem[0])} of {_gib(mem[1])} free now)." if mem else ".")]
    fixes = [_resolution_hint(shape, weights, mem[0] if mem else None, memory_required) if known
             else "a lower resolution or batch size"]
    if quantization is not None and WEIGHT_BITS.get(quantization, 16) > 4.5:
        fixes.append("a smaller quantization on the loader (bnb-nf4: about a quarter of bf16 weights)")
    if offload_mode in (None, "none", "auto"):
        fixes.append(OFFLOAD_HINT)
    elif offload_mode in ("model", "block"):
        fixes.append("offload_mode leaf (the least VRAM) or a lower vram_budget_gb")
    msg.append("Settings that would fit: " + "; or ".join(fixes) + ".")
    return SamplingOutOfMemory(" ".join(msg))


def slots_error(max_rank: int, targets: str, why: str) -> QuantLoRAError:
    return QuantLoRAError(
        f"out of GPU memory while adding LoRA hot-swap slots (max_rank {max_rank}, targets {targets!r}): {why} "
        "The slots allocated so far were released. Lower max_rank (the loader's lora_max_rank or the first "
        "LoRAHotswap node's), use targets 'attention', or a smaller quantization on the loader.")
