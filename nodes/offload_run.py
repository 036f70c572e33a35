"""What CPUOffloadSampler runs (nodes/offload_sampler_node.py is its schema, checks and one call:
`sample`): the stock KSampler (same inputs, same sampling code: nodes.common_ksampler) with the
transformer's weights offloaded to host memory while it samples.

Modes: none (stock behaviour), model (whole transformer on the GPU only while sampling, then
unloaded), block (as many transformer blocks as the budget allows stay on the GPU; the rest are
copied in ahead of use on a side CUDA stream from pinned host memory, every weight kind:
memory/streaming.py), leaf (each layer: lowest VRAM), auto (none if the weights fit, else block
if its resident parts and in-flight copies fit, else leaf). The budget is vram_budget_gb, or when
0 the GPU's free memory (plus what loaded models ComfyUI would unload for this one hold, plus what
our offload of this model keeps resident), less what sampling needs at this latent's size and
batch (sampling_reserve: the headroom ComfyUI keeps beside a partially loaded model, the larger of
its minimum inference memory and the activations plus its --reserve-vram; if sampling still runs
out of memory, the node re-plans once with twice that reserve). The node's text and log say what
was chosen, the resident share, the bytes streamed per step and the predicted step ratio
(streamed bytes over the pinned bandwidth measured once, against a resident step estimated from
the model's FLOPs at a measured matmul rate). Without a CUDA device every mode is a no-op and the node samples exactly like
KSampler. The plan from those numbers is memory/offload_plan.py, the moving itself
memory/offload.py; this module reads ComfyUI (free memory, loaded models, the latent) and holds
the ComfyUI glue below.

How ComfyUI's model management is kept truthful (and kept from loading the model itself):
- The node samples a private clone of the input ModelPatcher carrying two extension points from
  comfy/patcher_extension.py: a WrappersMP.PREPARE_SAMPLING wrapper and a CallbacksMP.ON_DETACH
  callback, both keyed "quantlora.offload". Nothing else of ComfyUI is patched or replaced.
- The wrapper runs before ComfyUI's own _prepare_sampling (which it then calls unchanged). For
  block/leaf it first has ComfyUI unload any other patcher of the same weights (LoadedModel
  .model_unload, what free_memory does), restores the weights on the host
  (ModelPatcher.unpatch_model), bakes the patcher's own weight patches (e.g. LoraLoader) into the
  host weights with ComfyUI's patch_weight_to_device (backups kept, so unpatch restores them),
  installs the offload hooks, and records the truth on the model the way ModelPatcher.load does:
  device = load device, model_loaded_weight_memory = the weights resident on the GPU while it
  runs (top-level parts + in-flight groups), model_lowvram = False, current_weight_patches_uuid =
  the patcher's. The clone's size is that same working set (it is private: no node output, so no
  RAM-cache accounting reads it). load_models_gpu then finds the model "fully loaded": it moves
  nothing (no double load), frees only what the working set and the activations need, and keeps
  the model in current_loaded_models with its real footprint, so it neither over-commits VRAM
  nor evicts under us.
- When ComfyUI unloads that model (memory pressure, another patcher of the same weights loading,
  the clone being freed) the ON_DETACH callback removes the hooks, releases the pinned host copies,
  restores the host weights and resets the bookkeeping: the module is ordinary again, and the other
  patcher's load_models_gpu finds nothing loaded and loads it the stock way. (load_models_gpu also
  detaches, without unpatching, the very patcher it is about to load; the wrapper flags its own
  load so that detach keeps the hooks.)
- The clone is kept (weakly keyed on the input patcher, so it lives exactly as long as it) and
  reused while the settings stay the same: hooks and pinned memory persist across runs, and
  hot-swapping LoRA slots between runs writes into the same (pinned) buffers the hooks move.
- Every write into ComfyUI's bookkeeping (the "loaded" record above, the clone's size and parent,
  unloading through current_loaded_models) is a named function of nodes/comfy_door.py; the
  wrapper and callback take *args/**kwargs and pass them through unchanged (v0.33 added
  force_full_load / force_offload to _prepare_sampling). The pack's own state about a patcher
  (its offload state, "our load in progress") lives in weak maps here, not on ComfyUI's objects.
- Dynamic VRAM (ComfyUI v0.33+ on NVIDIA: comfy-aimdo places a ModelPatcherDynamic's weights):
  auto leaves placement to it (it already streams what does not fit); model/block/leaf own
  placement, so they run on ComfyUI's non-dynamic delegate of that one model
  (ModelPatcherDynamic.get_non_dynamic_delegate: a plain copy ComfyUI loads once and keeps with
  the input MODEL), and the log says so once. The pack's loader gives plain MODELs already.
- model mode: the same wrapper lets ComfyUI load the model as usual and, if it loaded only part
  (lowvram), loads the rest (load_models_gpu force_full_load=True); after sampling the node
  unloads that clone through ComfyUI (LoadedModel.model_unload). No pinning: one transfer per
  run costs about what pinning it would.
"""
from __future__ import annotations

import logging
import weakref

import torch

import comfy.model_management as mm
import comfy.patcher_extension as pe
import comfy.sample

from ..errors import QuantLoRAError
from ..memory import oom
from ..memory import offload as off
from ..memory import offload_plan, streaming
from ..memory.offload_plan import GIB, Plan
from . import comfy_door

log = logging.getLogger("quantlora")
KEY = "quantlora.offload"
# Tests set this to run the whole offload machinery (hooks, ComfyUI bookkeeping) on a CPU-only
# machine, with the CPU as both the onload and the offload device.
FORCE_ON_CPU = False
_CLONES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # input patcher -> (settings, our clone)
RESERVE_RULE = "comfy"  # offload_plan.RESERVE_RULES; the benchmark compares both in one process


def _diffusion_model(patcher):
    dm = getattr(patcher.model, "diffusion_model", None)
    if dm is None:
        raise QuantLoRAError("CPUOffloadSampler: this MODEL has no diffusion_model to offload; connect a diffusion "
                             "MODEL (a loader's output).")
    return dm


def _latent_shape(patcher, latent) -> list | None:
    if latent is None:
        return None
    try:
        return list(comfy.sample.fix_empty_latent_channels(patcher, latent["samples"]).shape)
    except Exception:
        return list(latent["samples"].shape)


def sampling_reserve(patcher, latent: dict | None, cfg: float | None = None, rule: str | None = None) -> int:
    """Device bytes sampling needs beside the weights, the headroom ComfyUI itself keeps beside a
    partially loaded model (offload_plan.reserve_bytes, RESERVE_RULE): the larger of its minimum
    inference memory and the activations at this latent's size and batch (cond + uncond unless cfg
    is 1) plus its extra reserve (--reserve-vram). Activations: the pack's Flux estimate
    (streaming.flux_activation_bytes, checked against measured peaks by bench/bench_offload.py)
    for a Flux model, ComfyUI's own estimate otherwise."""
    floor = int(mm.minimum_inference_memory())
    shape = _latent_shape(patcher, latent)
    if shape is None:
        return floor
    shape = offload_plan.sampling_shape(shape, cfg)
    est = 0
    try:
        est = int(patcher.model.memory_required(shape))
    except Exception:  # an architecture without an estimate: the pack's Flux one, or the minimum
        pass
    act = offload_plan.activation_estimate(getattr(patcher.model, "diffusion_model", None), shape, est)
    return offload_plan.reserve_bytes(floor, int(mm.extra_reserved_memory()), act, rule or RESERVE_RULE)


def _device_bytes_at_rest(patcher) -> int:
    """What the offload hooks on this model keep on the device between runs (freed if re-planned)."""
    return offload_plan.device_bytes_at_rest(off.offload_state(_diffusion_model(patcher)))


def _card(dev, patcher) -> dict:
    """Free device memory this run may use: what ComfyUI reports free, plus what loaded models
    hold there (ComfyUI unloads them to make room when it loads this one, as it does for a full
    load: text encoders, another copy of these weights), plus what our offload of this model
    keeps resident between runs; the pinned copy rate and the matmul rate (measured once)."""
    free = int(mm.get_free_memory(dev))
    for m in comfy_door.loaded_patchers():
        if m in _STATE or torch.device(getattr(m, "load_device", "cpu")) != dev:
            continue
        try:
            free += int(m.loaded_size())
        except Exception:
            pass
    if off.offload_state(_diffusion_model(patcher)) is not None:
        free += _device_bytes_at_rest(patcher)
    return dict(free_bytes=free, bandwidth=streaming.pinned_bandwidth(dev), flops=streaming.matmul_rate(dev),
                fp8_flops=streaming.fp8_matmul_rate(dev) if streaming.fp8_compute_params(_diffusion_model(patcher)) else None)


def plan_offload(patcher, mode: str, blocks_per_group: int, vram_budget_gb: float, latent: dict | None = None,
                 cfg: float | None = None, card: dict | None = None, extra_reserve: int = 0) -> Plan:
    """Resolve the node's inputs into a Plan (memory/offload_plan.py chooses from the numbers read
    here). `card` (free_bytes, bandwidth, flops) is measured on CUDA and can be injected (tests,
    the benchmark's emulated cards)."""
    dev = torch.device(patcher.load_device)
    cuda = dev.type == "cuda"
    plan = offload_plan.fixed_plan(mode, blocks_per_group, cuda or FORCE_ON_CPU, dev)
    if plan is not None:
        return plan
    if mode == "auto" and comfy_door.is_dynamic(patcher):
        # ComfyUI's dynamic VRAM already streams what does not fit: auto leaves placement to it.
        return Plan("none", 1, True, True, "ComfyUI's dynamic VRAM places the weights")
    dm = _diffusion_model(patcher)
    if card is None and cuda:
        card = _card(dev, patcher)
    reserve = sampling_reserve(patcher, latent, cfg) + int(extra_reserve)
    return offload_plan.budget_plan(dm, mode, blocks_per_group, vram_budget_gb, reserve, card,
                                    _latent_shape(patcher, latent))


# ---------- ComfyUI model management (every write goes through comfy_door) ----------
def evict_sharing(patcher, include_self: bool = False) -> int:
    """Have ComfyUI unload every other loaded patcher of the same weights (what free_memory does).
    Returns how many."""
    return comfy_door.unload_clones_of(patcher, include_self=include_self)


def unload(patcher) -> None:
    comfy_door.unload(patcher)


_OWNER = "_quantlora_offload_owner"  # on the diffusion model: weakref to the patcher whose hooks are on it
# Pack state about ComfyUI's patchers lives here, not on them: patcher -> its offload state, and
# the patchers whose own load is in progress (load_models_gpu detaches them first).
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOADING: "weakref.WeakSet" = weakref.WeakSet()


def offload_state_of(patcher) -> off.OffloadState | None:
    return _STATE.get(patcher)


def _install(patcher, plan: Plan) -> off.OffloadState:
    dm = _diffusion_model(patcher)
    spec = off.make_spec(plan.mode, patcher.load_device, patcher.offload_device, plan.blocks_per_group,
                         budget=plan.budget, timing=plan.timing)
    st = off.offload_state(dm)
    mine = _STATE.get(patcher)
    if st is not None and st is mine and comfy_door.weights_patched_for(patcher):
        if off.is_current(dm, spec):
            comfy_door.mark_resident(patcher, st.working_set)
            return st
        if st.strategy == "stream" and st.mode == "block" and plan.mode == "block" and st.tensor_ids == off.tensor_ids(dm):
            # only the budget changed: blocks move between the device and pinned memory in place
            st = off.apply_offload(dm, "block", patcher.load_device, patcher.offload_device, plan.blocks_per_group,
                                   budget=plan.budget, timing=plan.timing)
            if st.strategy == "stream":
                _STATE[patcher] = st
                comfy_door.mark_resident(patcher, st.working_set)
                _log_state(st)
                return st
    if st is not None and not patcher.patches and off.is_current(dm, spec):
        # Another clone of these weights (e.g. the same model with another LoRA set) left the same
        # offload on them and neither has ComfyUI weight patches: take the hooks (and pinned memory)
        # over instead of rebuilding them. The previous owner is disowned first, so ComfyUI
        # unloading it below only clears bookkeeping (nothing of it is on the GPU).
        prev = getattr(dm, _OWNER, lambda: None)()
        if prev is not None and prev is not patcher:
            _STATE.pop(prev, None)
        evict_sharing(patcher)
    else:
        evict_sharing(patcher)
        if off.offload_state(dm) is not None:  # another clone's hooks, or hooks built on tensors since replaced
            off.remove_offload(dm)
            _release_lora(dm)
        patcher.unpatch_model(patcher.offload_device, unpatch_weights=True)
        with torch.no_grad():
            for key in list(patcher.patches):
                patcher.patch_weight_to_device(key, device_to=None)  # ComfyUI's own patching, on the host copy
        st = off.apply_offload(dm, plan.mode, patcher.load_device, patcher.offload_device, plan.blocks_per_group,
                               budget=plan.budget, timing=plan.timing)
        _log_state(st)
    _STATE[patcher] = st
    setattr(dm, _OWNER, weakref.ref(patcher))
    comfy_door.mark_resident(patcher, st.working_set)
    return st


def _log_state(st: off.OffloadState) -> None:
    if st.strategy == "stream" and st.residency is not None:
        log.info("QuantLoRA offload: block (streamed), %d/%d blocks resident, %.2f GiB streamed per step, "
                 "%.3f of %.2f GiB of weights on the device while sampling", st.n_resident, st.n_blocks,
                 st.streamed_bytes / GIB, st.working_set / GIB, st.model_bytes / GIB)
    else:
        log.info("QuantLoRA offload: %s (%s), %.3f of %.2f GiB of weights resident while sampling",
                 st.mode, st.strategy, st.working_set / GIB, st.model_bytes / GIB)


def _sync_lora(patcher, model_options) -> None:
    """This sampling's LoRA set under offload (LoRAHotswap: slots and merge entries alike, through
    runtime.activate_loras), written now, before the first forward, while every streamed block is
    at rest in host memory: slot buffers are written in place, merge entries into the layers'
    weight storage, which for a streamed block is its pinned host copy (what the next copy reads).
    The hot-swap wrapper would otherwise do it inside the first forward; its ensure_device would
    replace buffers the hooks are keyed on. The merge state is verified first (as the pack's outer
    sample wrapper does): a re-plan or a removal of the offload moves the weights, so a merged set
    is merged again from its pristine copy rather than trusted."""
    from . import runtime

    dm = _diffusion_model(patcher)
    state, merged = runtime.hotswap_state(dm), runtime.merge_state(dm)
    if state is None and merged is None:
        return
    if state is not None:
        state.buffers_placed_by_offload = True
    swaps = 0
    if merged is not None:
        merged.verify()
        swaps = merged.swaps
    cfg = (model_options or {}).get("transformer_options", {}).get(runtime.OPTS_KEY, {})
    runtime.activate_loras(dm, tuple(cfg.get("loras", ())))
    st = off.offload_state(dm)
    if merged is not None and merged.swaps != swaps and st is not None and st.streamer is not None:
        st.streamer.refresh_forms()  # tensor subclasses streamed in another layout: made again from the host tensor


def _release_lora(dm) -> None:
    from . import runtime

    state = runtime.hotswap_state(dm)
    if state is not None:
        state.buffers_placed_by_offload = False


def _on_detach(patcher, unpatch_all=True, *args, **kwargs) -> None:
    """CallbacksMP.ON_DETACH: ModelPatcher.detach calls it as (patcher, unpatch_all)."""
    st = _STATE.get(patcher)
    if st is None:
        return
    if not unpatch_all and patcher in _LOADING:
        # load_models_gpu detaches (without unpatching) every loaded clone of the weights it loads,
        # this very patcher included, then loads it again: our own load, keep the hooks. Any other
        # detach means ComfyUI unloads us, another patcher of these weights is being loaded, or
        # this clone is being freed: take the offload off.
        return
    _STATE.pop(patcher, None)
    dm = _diffusion_model(patcher)
    if off.offload_state(dm) is st:
        _release_lora(dm)
        off.remove_offload(dm)
        dm.__dict__.pop(_OWNER, None)
    patcher.unpatch_model(patcher.offload_device, unpatch_weights=True)
    comfy_door.forget_size(patcher)  # model_size() measures again


def _prepare_args(args, kwargs):
    """(model, model_options) from the arguments ComfyUI's _prepare_sampling takes:
    (model, noise_shape, conds, model_options=None, **v0.33: force_full_load, force_offload)."""
    model = args[0] if args else kwargs["model"]
    model_options = args[3] if len(args) > 3 else kwargs.get("model_options")
    return model, model_options


def _offload_wrapper(holder):
    """holder["plan"]: the plan of the run in progress (the clone and its wrapper are reused across
    runs; the budget may change between them). A Plan is taken as a fixed one."""
    if isinstance(holder, Plan):
        holder = {"plan": holder}

    def prepare_sampling(executor, *args, **kwargs):
        model, model_options = _prepare_args(args, kwargs)
        _install(model, holder["plan"])
        _sync_lora(model, model_options)
        _LOADING.add(model)
        try:
            return executor(*args, **kwargs)
        finally:
            _LOADING.discard(model)
    return prepare_sampling


def _full_load_wrapper(executor, *args, **kwargs):
    out = executor(*args, **kwargs)
    model, _ = _prepare_args(args, kwargs)
    if comfy_door.loaded_partially(model):  # ComfyUI loaded part of it: model mode wants all of it
        mm.load_models_gpu([model], force_full_load=True)
    return out


def offload_patcher(model, plan: Plan):
    """The patcher to sample with: the input itself (none / inactive), a per-run clone (model),
    or the cached clone carrying the offload wrapper and callback (block / leaf). Under dynamic
    VRAM (v0.33+) model/block/leaf run on ComfyUI's non-dynamic delegate of the input: the node
    owns placement of that one model (comfy_door.non_dynamic says so in the log)."""
    if not plan.active or plan.mode == "none":
        return model
    src = comfy_door.non_dynamic(model, "CPUOffloadSampler", f"offload_mode {plan.mode} places the weights itself")
    if plan.mode == "model":
        p = src.clone()
        p.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, _full_load_wrapper)
        return p
    settings = (plan.mode, plan.blocks_per_group)
    cached = _CLONES.get(model)
    if cached is not None:
        if cached[0] == settings:
            cached[2]["plan"] = plan
            return cached[1]
        unload(cached[1])  # through ComfyUI: its callback takes the old hooks off
    p = src.clone()
    comfy_door.own_patcher(p)  # lives exactly as long as `model` (held by _CLONES); no LoadedModel hand-over
    holder = {"plan": plan}
    p.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, _offload_wrapper(holder))
    p.add_callback_with_key(pe.CallbacksMP.ON_DETACH, KEY, _on_detach)
    _CLONES[model] = (settings, p, holder)
    return p


def _sample_once(model, plan: Plan, args: tuple):
    """(patcher, latent): one stock KSampler run (nodes.common_ksampler) under `plan`. A torch OOM
    from a MODEL not from the pack's loader becomes the pack's error (models unloaded), as the
    loader's own sampling wrapper does for its MODELs."""
    import nodes  # ComfyUI's nodes.py

    dev = torch.device(model.load_device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    patcher = offload_patcher(model, plan)
    *ksampler_args, latent_image, denoise = args
    failed = None
    try:
        latent = nodes.common_ksampler(patcher, *ksampler_args, latent_image, denoise=denoise)[0]
    except torch.OutOfMemoryError as e:
        failed = oom.detail(e)
    finally:
        if plan.active and plan.mode == "model":
            unload(patcher)
    if failed is not None:
        from .runtime import sampling_oom

        raise sampling_oom(patcher, tuple(latent_image["samples"].shape), failed, plan.mode if plan.active else None)
    return patcher, latent


def _retry_after_oom(plan: Plan, vram_budget_gb: float) -> bool:
    """Block offload whose budget came from the card's free memory: a larger reserve can fit."""
    return plan.active and plan.mode == "block" and vram_budget_gb <= 0


def sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           offload_mode="auto", blocks_per_group=1, vram_budget_gb=0.0):
    """(latent dict, report text)."""
    plan = plan_offload(model, offload_mode, blocks_per_group, vram_budget_gb, latent_image, cfg=cfg)
    args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
    dev = torch.device(model.load_device)
    retried = ""
    try:
        patcher, latent = _sample_once(model, plan, args)
    except oom.SamplingOutOfMemory:
        if not _retry_after_oom(plan, vram_budget_gb):
            raise
        # The reserve beside a budget read from the card was too small for this model and
        # resolution (an activation peak above the estimate, fragmentation, another process's
        # allocation): once more with twice the reserve, streaming more. A second OOM is the error
        # (the models were unloaded and the memory returned before either).
        reserve = sampling_reserve(model, latent_image, cfg)
        retried = (f"out of GPU memory with {reserve / GIB:.2f} GiB for sampling; re-planned with "
                   f"{2 * reserve / GIB:.2f} GiB")
        log.warning("CPUOffloadSampler: %s (was: %s)", retried, plan.describe())
        plan = plan_offload(model, offload_mode, blocks_per_group, vram_budget_gb, latent_image, cfg=cfg,
                            extra_reserve=reserve)
        patcher, latent = _sample_once(model, plan, args)
    mode = f"{plan.mode}{' (auto)' if plan.auto else ''}" if plan.active else offload_mode
    if plan.mode == "block" and plan.active:
        st = _STATE.get(patcher)
        ahead = st.residency.lookahead if st is not None and st.residency is not None else plan.blocks_per_group
        mode += f", prefetch {ahead}" + (", side stream" if st and st.spec.use_stream else "")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        text = f"offload {mode}: peak VRAM {torch.cuda.max_memory_allocated(dev) / GIB:.2f} GiB"
    else:
        text = f"offload {mode}: peak VRAM n/a ({plan.reason or 'no CUDA device'})"
    if plan.active and plan.mode == "block" and plan.residency is not None:
        text += f" [{plan.describe()}]"
    elif plan.auto and plan.reason and dev.type == "cuda":
        text += f" [{plan.reason}]"
    if retried:
        text += f" ({retried})"
    log.info("CPUOffloadSampler: %s", text)
    return latent, text

