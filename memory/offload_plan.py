"""The CPUOffloadSampler's plan from numbers: which mode, which blocks stay resident, what it
predicts.

Inputs are plain: the diffusion model (a module tree: its block lists and sizes), the node's
settings, the device bytes sampling needs beside the weights (the caller's reserve) and a "card"
(free_bytes, bandwidth: pinned host-to-device bytes/s, flops: bf16 matmul rate, fp8_flops: the
row-scaled fp8 GEMM rate, used for torchao fp8 dynamic linears), measured on CUDA or
injected (tests, the benchmark's emulated cards). ComfyUI is read by the caller
(nodes/offload_run.py); nothing here imports it, so every choice is unit-testable on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QuantLoRAError
from . import offload as off
from . import streaming

OFFLOAD_MODES = ["auto", "none", "model", "block", "leaf"]
GIB = 2 ** 30
BUDGET_STEP = 256 << 20  # budgets from free memory are rounded down to this (at most 1/64 of the weights): small changes keep the plan


@dataclass(frozen=True)
class Plan:
    mode: str            # resolved: none | model | block | leaf
    blocks_per_group: int  # block mode: streamed blocks copied ahead of use
    active: bool         # False: no CUDA device, sampling runs as plain KSampler
    auto: bool
    reason: str = ""
    budget: int | None = None       # block mode: device bytes for the weights (None: stream every block)
    residency: object = None        # block mode: streaming.Residency for that budget
    nonblock: int = 0
    model_bytes: int = 0
    predicted_ratio: float | None = None  # step time / fully resident step time (transfer floor)
    bandwidth: float | None = None  # pinned host-to-device bytes/s the prediction used
    resident_s: float | None = None  # estimated fully resident step
    timing: tuple | None = None     # block mode: (bandwidth, compute s per block) the residency was ranked by

    def describe(self) -> str:
        """What the plan keeps resident and what it predicts (the node's UI text and log)."""
        r = self.residency
        if r is None:
            return self.reason
        share = (self.nonblock + r.resident_bytes) / max(self.model_bytes, 1)
        parts = [f"{r.n_resident}/{r.n_blocks} blocks resident ({share:.0%} of the weights), "
                 f"{r.streamed_bytes / GIB:.2f} GiB streamed per step"]
        if self.predicted_ratio is not None:
            parts.append(f"predicted {self.predicted_ratio:.2f}x the resident step "
                         f"(pinned {self.bandwidth / 1e9:.0f} GB/s, resident step ~{self.resident_s:.3f} s)")
        else:
            parts.append("predicted step ratio n/a")
        if self.reason:
            parts.append(self.reason)
        return "; ".join(parts)


def check_mode(mode: str) -> None:
    if mode not in OFFLOAD_MODES:
        raise QuantLoRAError(f"offload_mode {mode!r}: choose one of {', '.join(OFFLOAD_MODES)}.")


def fixed_plan(mode: str, blocks_per_group: int, active: bool, device) -> Plan | None:
    """The plan when no budget is needed (no CUDA device, or none / model / leaf); None: auto and
    block, which plan from the budget (budget_plan)."""
    check_mode(mode)
    if not active:
        return Plan(mode, blocks_per_group, False, mode == "auto", f"no CUDA device ({device}): offload is a no-op")
    if mode in ("none", "model", "leaf"):
        return Plan(mode, blocks_per_group, True, False)
    return None


def sampling_shape(latent_shape, cfg: float | None) -> list:
    """The batch the model runs on: cond + uncond unless cfg is 1."""
    shape = list(latent_shape)
    if cfg is None or cfg != 1.0:
        shape[0] *= 2
    return shape


# How the device bytes beside the weights are counted. "comfy": ComfyUI's own headroom for a
# partially loaded model (load_models_gpu: the larger of its minimum inference memory and the
# activations plus its extra reserve, --reserve-vram); "sum": the minimum inference memory plus the
# activations (the pack's rule until 2026-12: ~0.6 GiB more than ComfyUI keeps at 1024x1024, which
# at an 8 GiB card was weights streamed that need not be; the node re-plans with that margin
# added if sampling runs out of memory).
RESERVE_RULES = ("comfy", "sum")


def reserve_bytes(min_inference: int, extra_reserved: int, activations: int, rule: str = "comfy") -> int:
    """Device bytes sampling needs beside the weights, by `rule` (RESERVE_RULES)."""
    if rule == "sum":
        return int(min_inference + activations)
    if rule != "comfy":
        raise ValueError(f"reserve rule {rule!r} is not one of {RESERVE_RULES}")
    return int(max(min_inference, activations + extra_reserved))


def activation_estimate(dm, shape, fallback: int = 0) -> int:
    """Activation bytes of one forward at `shape` (the sampling batch): the pack's Flux estimate
    (streaming.flux_activation_bytes, checked against measured peaks by bench/bench_offload.py)
    for a Flux model, `fallback` (ComfyUI's own estimate) otherwise."""
    hidden = getattr(dm, "hidden_size", None)
    if isinstance(hidden, int) and len(shape) == 4 and hasattr(dm, "double_blocks"):
        img, txt = streaming.flux_tokens(shape)
        return streaming.flux_activation_bytes(img + txt, hidden, shape[0], 2)
    return fallback


def device_bytes_at_rest(st: off.OffloadState | None) -> int:
    """What offload hooks in state `st` keep on the device between runs (freed if re-planned)."""
    if st is None:
        return 0
    if st.strategy == "stream":
        return st.nonblock + st.residency.resident_bytes if st.residency is not None else 0
    if st.strategy == "model":
        return st.model_bytes
    return 0


def resident_step(dm, latent_shape, card: dict) -> float | None:
    """Estimated seconds of a fully resident step (None without a measured card, a Flux hidden size
    or a latent shape)."""
    flops = card.get("flops")
    hidden = getattr(dm, "hidden_size", None)
    if not card.get("bandwidth") or not flops or not isinstance(hidden, int) or not latent_shape:
        return None
    img, txt = streaming.flux_tokens(latent_shape)
    fp8_flops = card.get("fp8_flops")
    fp8 = streaming.fp8_compute_params(dm) if fp8_flops else 0
    return streaming.resident_step_seconds(streaming.linear_params(dm), img + txt, hidden,
                                           len(off.flat_blocks(dm)), latent_shape[0], flops, fp8, fp8_flops)


def block_timing(dm, latent_shape, card: dict) -> tuple | None:
    """(pinned bytes/s, compute seconds per block) for ranking residency plans: Flux's double and
    single blocks cost about the same compute (the single block's fused MLP and projections equal
    the double block's two streams at 4096 + 512 tokens), so the resident step splits evenly."""
    t = resident_step(dm, latent_shape, card)
    n = len(off.flat_blocks(dm))
    return (card["bandwidth"], t / n) if t and n else None


def predict(dm, residency, latent_shape, card: dict) -> tuple:
    """(predicted step ratio, bandwidth, resident step seconds); the ratio and the step are None
    without a residency, a measured card, a Flux hidden size or a latent shape. With a residency
    ranked by timing, the ratio is its schedule's (memory/pipeline.py), else the transfer floor."""
    bw = card.get("bandwidth")
    t = resident_step(dm, latent_shape, card)
    if residency is None or t is None:
        return None, bw, None
    if residency.predicted_s is not None:  # ranked with block_timing: t split evenly over the blocks
        return residency.predicted_s / t, bw, t
    return streaming.predicted_ratio(residency.streamed_bytes, bw, t), bw, t


def budget_plan(dm, mode: str, blocks_per_group: int, vram_budget_gb: float, reserve: int, card: dict | None,
                latent_shape) -> Plan:
    """auto / block: the budget is vram_budget_gb, or when 0 the card's free bytes (rounded down to
    BUDGET_STEP), less `reserve` (what sampling needs beside the weights); block keeps resident
    what fits; auto picks none if the weights fit, else block if its resident parts and in-flight
    copies fit, else leaf."""
    card = card or {}
    if vram_budget_gb > 0:
        total = int(vram_budget_gb * GIB)
        why = f"budget {total / GIB:.2f} GiB (vram_budget_gb) - {reserve / GIB:.2f} GiB for sampling"
    elif card.get("free_bytes") is not None:
        total = int(card["free_bytes"])
        why = f"budget: {total / GIB:.2f} GiB free - {reserve / GIB:.2f} GiB for sampling"
    else:
        total = None
        why = "no budget (no CUDA device): every block streamed"
    weights = None if total is None else max(0, total - reserve)
    model_bytes = off.tree_sizes(dm).model
    if weights is not None and vram_budget_gb <= 0:
        step = max(1, min(BUDGET_STEP, model_bytes // 64))
        weights = weights // step * step
    lookahead = max(1, int(blocks_per_group))
    timing = block_timing(dm, latent_shape, card)
    res, nonblock = off.plan_blocks(dm, weights, lookahead, timing)
    if mode == "auto":
        if weights is None:
            return Plan("none", 1, True, True, "auto without a budget on the CPU")
        if model_bytes <= weights:
            return Plan("none", 1, True, True, f"the weights ({model_bytes / GIB:.2f} GiB) fit: {why}",
                        model_bytes=model_bytes)
        if not off.block_lists(dm) or nonblock + res.working_set > weights:
            return Plan("leaf", 1, True, True, f"not even the streamed blocks fit: {why}", model_bytes=model_bytes)
    ratio, bw, t = predict(dm, res, latent_shape, card)
    return Plan("block", lookahead, True, mode == "auto", why, weights, res, nonblock, model_bytes, ratio, bw, t, timing)
