"""What runs around each sampling of a pack MODEL: LoRA set activation and attention choice.

A MODEL's LoRA set lives in its model_options (transformer_options["quantlora"]["loras"]),
so each ModelPatcher clone means "base + these LoRAs"; the slots on the shared transformer
are written when a sampling of that clone starts and switched off when it ends, so no other
MODEL (another branch, a later prompt without LoRA) ever sees a stale adapter.
"""
from __future__ import annotations

import weakref

import torch

import comfy.patcher_extension as pe

from ..errors import QuantLoRAError
from ..lora.formats import FluxDims
from ..lora.hotswap import HotswapState, LoRACache, TARGET_SETS, attach_slots
from ..lora.merge import MergeState
from ..memory import oom, pinned_file
from ..speed import aot_store, guards
from ..speed.attention import override_for, sdpa_context, sdpa_override, unavailable
from ..speed.compile import is_compiled, uses_cudagraphs

OPTS_KEY = "quantlora"
STATE_ATTR = "_quantlora_hotswap"
MERGE_ATTR = "_quantlora_merge"
WRAPPER_KEY = "quantlora"
LORAS = LoRACache()
_STATES: "weakref.WeakSet[HotswapState]" = weakref.WeakSet()  # live models with slots, for stats()
_MERGES: "weakref.WeakSet[MergeState]" = weakref.WeakSet()     # live models in merge mode, for stats()
MODES = ("auto", "merge", "merge-gpu", "slots")


def entry(path: str, identity: tuple, mode: str, strength: float) -> tuple:
    """One LoRA of a MODEL's set, in transformer_options: strength last, mode ("merge"/"slots") before it."""
    return (path, identity, mode, float(strength))


def entry_mode(e: tuple) -> str:
    return e[2] if len(e) >= 4 else "slots"


def flux_module(patcher):
    dm = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks") or not hasattr(dm, "img_in"):
        raise QuantLoRAError(f"this MODEL is not a FLUX.1 transformer ({type(dm).__name__}); QuantLoRA's LoRA hot-swap supports FLUX.1 dev/schnell.")
    return dm


def dims_of(dm) -> FluxDims:
    return FluxDims(hidden=dm.hidden_size, mlp_hidden=int(dm.hidden_size * dm.params.mlp_ratio), depth=len(dm.double_blocks),
                    depth_single=len(dm.single_blocks), img_in_features=dm.img_in.in_features,
                    txt_in_features=dm.txt_in.in_features,
                    vec_in_features=dm.vector_in.in_layer.in_features if dm.vector_in is not None else None)


def hotswap_state(dm) -> HotswapState | None:
    return getattr(dm, STATE_ATTR, None)


def ensure_slots(dm, max_rank: int, targets: str, layout: str = "per-projection") -> HotswapState:
    state = hotswap_state(dm)
    if state is None:
        if targets not in TARGET_SETS:
            raise QuantLoRAError(f"lora targets {targets!r} unknown; choices: {', '.join(TARGET_SETS)}.")
        d = dims_of(dm)
        failed = None
        try:
            slots = attach_slots(dm, max_rank, targets, dtype=_slot_dtype(dm), hidden=d.hidden,
                                 mlp_hidden=d.mlp_hidden, layout=layout)
        except torch.OutOfMemoryError as e:  # attach_slots put the plain layers back
            failed = oom.detail(e)
        if failed is not None:
            oom.release()
            raise oom.slots_error(max_rank, targets, failed)
        state = HotswapState(slots)
        setattr(dm, STATE_ATTR, state)
        _STATES.add(state)
    return state


def merge_state(dm) -> MergeState | None:
    return getattr(dm, MERGE_ATTR, None)


def ensure_merge(dm, place: str = "host") -> MergeState:
    """The model's merge state (made once). Hooks on the shared transformer keep a merged LoRA from
    reaching anything that is not a pack MODEL carrying that LoRA: a forward from another clone of
    the same weights (ComfyUI's KSampler on the loader's bare MODEL, a graph branch without LoRA)
    and state_dict() (model saving and merging nodes) get the weights restored first."""
    state = merge_state(dm)
    if state is None:
        state = MergeState(dm, pristine=place)
        setattr(dm, MERGE_ATTR, state)
        _MERGES.add(state)
        dm.register_forward_pre_hook(_restore_for_foreign_forward, with_kwargs=True)
        dm.register_state_dict_pre_hook(_restore_before_state_dict)
    elif place == "device" and state.place != "device":
        state.move_pristine("device")
    return state


def _restore_for_foreign_forward(dm, args, kwargs):
    state = merge_state(dm)
    if state is not None and state.active_key:
        topts = kwargs.get("transformer_options") or {}
        if OPTS_KEY not in topts:  # not a pack MODEL: the bare base (the pack's wrapper handles its own)
            state.deactivate()


def _restore_before_state_dict(dm, *args, **kwargs):
    state = merge_state(dm)
    if state is not None and state.active_key:
        state.deactivate()


def activate_loras(dm, loras: tuple) -> None:
    """Make the shared transformer hold this MODEL's LoRA set: slot entries into the slots, merge
    entries into the weights. Cheap when nothing changed (two tuple comparisons)."""
    slot_set = tuple(e for e in loras if entry_mode(e) == "slots")
    merge_set = tuple(e for e in loras if entry_mode(e) == "merge")
    state = hotswap_state(dm)
    if state is not None and slot_set != state.active_key:
        state.activate(slot_set, parsed_set(dm, slot_set))
    merged = merge_state(dm)
    if merged is not None and merge_set != merged.active_key:
        before = merged.report.pristine_bytes
        merged.activate(merge_set, parsed_set(dm, merge_set))
        _log_merge(merged, merge_set, before)
    elif merge_set and merged is None:
        raise QuantLoRAError("LoRA merge mode: this model has no merge state (the LoRAHotswap node did not run on it); "
                             "queue the prompt again.")


def _log_merge(state: MergeState, merge_set: tuple, pristine_before: int) -> None:
    import logging
    import os

    r = state.report
    names = ", ".join(f"{os.path.basename(e[0])}@{e[-1]:g}" for e in merge_set) or "none (bare base restored)"
    grew = r.pristine_bytes - pristine_before
    logging.getLogger("quantlora").info(
        "QuantLoRA: LoRA merge: %s into %d layers (%d rewritten) in %.3f s; pristine copy %.2f GiB on %s%s%s",
        names, r.layers, r.touched, r.seconds, r.pristine_bytes / 2**30, r.pristine_place,
        f" (+{grew / 2**30:.2f} GiB taken now)" if grew else "",
        f", {r.pristine_file_bytes / 2**30:.2f} GiB of it the weight cache file's own locked pages (no copy)"
        if r.pristine_file_bytes else "")


def active_loras(dm) -> tuple:
    """The LoRA entries the shared transformer holds now (slots and merged)."""
    state, merged = hotswap_state(dm), merge_state(dm)
    return (state.active_key if state is not None else ()) + (merged.active_key if merged is not None else ())


def stats() -> dict:
    """Bounded numbers about the pack's long-lived state (GET /quantlora/stats)."""
    states, merges = list(_STATES), list(_MERGES)
    return {"lora_cache": {"entries": len(LORAS), "capacity": LORAS.capacity, "parses": LORAS.parses},
            "hotswap": {"models": len(states), "active": sum(1 for s in states if s.active),
                        "swaps": sum(s.swaps for s in states)},
            "merge": {"models": len(merges), "active": sum(1 for m in merges if m.active_key),
                      "swaps": sum(m.swaps for m in merges),
                      "pristine_bytes": sum(m.report.pristine_bytes for m in merges)}}


def _slot_dtype(dm):
    import torch

    dt = getattr(dm, "dtype", None)
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def options(patcher) -> dict:
    topts = patcher.model_options.setdefault("transformer_options", {})
    cfg = dict(topts.get(OPTS_KEY, {}))
    topts[OPTS_KEY] = cfg
    return cfg


def parsed_set(dm, loras: tuple) -> list:
    d = dims_of(dm)
    return [(LORAS.get(entry[0], d), entry[-1]) for entry in loras]


def _diffusion_model_wrapper(executor, *args, **kwargs):
    dm = executor.class_obj
    x = args[0]
    topts = args[7] if len(args) > 7 else kwargs.get("transformer_options", {})
    cfg = (topts or {}).get(OPTS_KEY, {})
    state = hotswap_state(dm)
    if state is not None:
        state.ensure_device(x.device)
    if state is not None or merge_state(dm) is not None:
        activate_loras(dm, tuple(cfg.get("loras", ())))
    with sdpa_context(cfg.get("attention", "default"), x.device):
        if not is_compiled(dm):
            return executor(*args, **kwargs)
        if uses_cudagraphs(dm):  # compile regional+cudagraphs: a new step; the last one's graph outputs are done
            torch.compiler.cudagraph_mark_step_begin()
        with guards.for_model(dm).forward(args, kwargs):  # QUANTLORA_SKIP_GUARDS=1 (speed/guards.py)
            return executor(*args, **kwargs)


def _outer_sample_wrapper(executor, *args, **kwargs):
    failed = None
    dm = getattr(executor.class_obj.model_patcher.model, "diffusion_model", None)
    merged = merge_state(dm) if dm is not None else None
    if dm is not None:
        guards.for_model(dm).reset()  # each sampling checks its forwards' guards afresh
    if merged is not None:
        merged.verify()  # once per sampling: someone else's write to a merged layer means merge again
    if dm is not None and (merged is None or merged.place != "host"):
        pinned_file.release(dm)  # no host-side merge takes the weight cache's locked pages: unlock them
    try:
        with aot_store.BUILDER.hold():  # packages exported in this sampling are built after it
            out = executor(*args, **kwargs)
    except torch.OutOfMemoryError as e:
        failed = oom.detail(e)
    else:
        _check_finite(out, executor.class_obj.model_patcher)
        return out
    finally:
        # Slots switch off at the end of each sampling (zeroing scales is free). A merged set stays
        # merged (restoring costs a swap): the next sampling of another set, a foreign forward or a
        # state_dict() restores it (ensure_merge's hooks).
        state = hotswap_state(dm) if dm is not None else None
        if state is not None:
            state.deactivate()

    # Out of the except block: the activations the failed sampling held are unreferenced now.
    noise = args[0] if args else kwargs.get("noise")
    raise sampling_oom(executor.class_obj.model_patcher, getattr(noise, "shape", None), failed)


def _check_finite(out, patcher) -> None:
    """A LoRA whose weights or alpha overflow the compute dtype gave an all-black image without a
    word (issue 11): a non-finite result of a sampling with LoRAs active is reported, naming them."""
    if not isinstance(out, torch.Tensor) or bool(torch.isfinite(out).all()):
        return
    dm = getattr(patcher.model, "diffusion_model", None)
    active = active_loras(dm) if dm is not None else ()
    if not active:
        return  # not the pack's LoRA: ComfyUI's own result, as it is
    import os

    named = ", ".join(f"{os.path.basename(e[0])!r} at strength {e[-1]:g}" for e in active)
    raise QuantLoRAError(f"sampling with LoRA {named} gave non-finite values (inf/NaN: a black or broken image). "
                         "The LoRA's weights or alpha are too large for the compute dtype: lower its strength, or "
                         "check the file (it may be damaged or not meant for FLUX.1).")


def sampling_oom(patcher, shape, why: str, offload_mode: str | None = None) -> QuantLoRAError:
    """After an OOM while sampling `patcher`: unload the models (what ComfyUI does when it sees an
    OOM; it does not see ours), return the memory, and build the error with settings that fit."""
    import comfy.model_management as mm

    weights, memory_required, quantization = 0, None, None
    try:
        weights = int(patcher.model_size())
        memory_required = patcher.model.memory_required
        report = patcher.model_options.get("quantlora", {}).get("report")
        quantization = getattr(report, "quantization", None)
    except Exception:
        pass
    mm.unload_all_models()
    oom.release()
    return oom.sampling_error(tuple(shape) if shape is not None else None, patcher.load_device, why, weights, quantization, memory_required,
                              offload_mode)


def check_attention(choice: str):
    """Raise now if the attention `choice` cannot run on ComfyUI's device; returns that device."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    why = unavailable(choice, device)
    if why:
        raise QuantLoRAError(f"attention {choice!r}: {why}. Choose 'auto' (the fastest attention this GPU has) or 'default'.")
    return device


def check_compile(choice: str) -> None:
    """Raise now if the compile `choice` cannot run in this ComfyUI process (CUDA graphs: a CUDA device
    and PyTorch's own allocator)."""
    if choice != "regional+cudagraphs":
        return
    from ..speed.compile import cudagraphs_unavailable

    why = cudagraphs_unavailable()
    if why:
        raise QuantLoRAError(f"compile {choice!r}: {why}. Choose 'regional' (compiled blocks without CUDA graphs).")


def set_attention(patcher, choice: str) -> None:
    """The attention of this MODEL: the SDPA backend order, and ComfyUI's public attention override
    for cuDNN (q/k/v made contiguous so SDPA picks it) or FlashAttention-3. An override another pack
    set stays, unless 'fa3' is asked for by name."""
    options(patcher)["attention"] = choice
    device = check_attention(choice)
    override = override_for(choice, device)
    topts = patcher.model_options["transformer_options"]
    if override is not None and (choice == "auto" or override is sdpa_override):  # another pack's override wins
        topts.setdefault("optimized_attention_override", override)
    elif override is not None:  # asked for by name
        topts["optimized_attention_override"] = override


def _full_load_wrapper(executor, model, *args, **kwargs):
    """Quantized weights (bitsandbytes, torchao, quanto) are placed by the pack and ComfyUI cannot load
    part of them: its low-VRAM path casts only its own layer types, and a bitsandbytes layer left
    behind met its input on the other device (H200, v0.33: 'Expected a cuda device, but got: cpu'
    instead of an out-of-memory message). So these models are loaded whole; where they do not fit,
    torch's out-of-memory error reaches the pack's handler and its advice."""
    if model.get_wrappers(pe.WrappersMP.PREPARE_SAMPLING, "quantlora.offload"):
        return executor(model, *args, **kwargs)  # CPUOffloadSampler places the weights itself
    if "force_full_load" in kwargs:  # v0.33+: the documented argument of prepare_sampling
        kwargs["force_full_load"] = True
        return executor(model, *args, **kwargs)
    out = executor(model, *args, **kwargs)
    from .comfy_door import loaded_partially

    if loaded_partially(model):  # older ComfyUI: load the rest now
        import comfy.model_management as mm

        mm.load_models_gpu([model], force_full_load=True)
    return out


def quantized(patcher) -> bool:
    report = patcher.model_options.get("quantlora", {}).get("report")
    return getattr(report, "quantization", "none") != "none"


def install(patcher) -> None:
    """Idempotent: the wrappers are plain functions, shared by reference across clones."""
    wrappers = [(pe.WrappersMP.DIFFUSION_MODEL, _diffusion_model_wrapper), (pe.WrappersMP.OUTER_SAMPLE, _outer_sample_wrapper)]
    if quantized(patcher):
        wrappers.append((pe.WrappersMP.PREPARE_SAMPLING, _full_load_wrapper))
    for kind, fn in wrappers:
        if fn not in patcher.get_wrappers(kind, WRAPPER_KEY):
            patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)


def add_lora(model, lora_name: str, path: str, strength: float, mode: str, max_rank: int, targets: str):
    """LoRAHotswap's job after its input checks: (a clone of `model` carrying this LoRA in its set, the
    node's text). Chooses merge or slots (lora/merge.choose), makes the merge state or the slots, and
    raises now, on the node, for a set the slots cannot hold."""
    import logging

    from ..lora import merge
    from ..lora.hotswap import file_identity
    from . import comfy_door

    log = logging.getLogger("quantlora")
    # Dynamic VRAM (v0.33+): comfy-aimdo replaces a module's buffers with device copies while it
    # places a model, so in-place writes would miss; slots and merges live on ComfyUI's plain
    # (non-dynamic) delegate of this MODEL instead. The pack's loader gives plain MODELs.
    model = comfy_door.non_dynamic(model, "LoRAHotswap", "QuantLoRA writes LoRA slots and merged weights in place")
    dm = flux_module(model)
    lora = LORAS.get(path, dims_of(dm))
    if lora.unmatched:
        log.warning("QuantLoRA: LoRA %s: %d of its keys match no Flux layer and are ignored (e.g. %s)",
                    lora_name, len(lora.unmatched), lora.unmatched[:3])
    chosen, why = merge.choose(mode, dm, [(lora, strength)], hotswap_state(dm) is not None,
                               comfy_door.weight_patch_count(model), _host_free())
    m = model.clone()
    install(m)
    cfg = options(m)
    if chosen == "merge":
        ensure_merge(dm, "device" if mode == "merge-gpu" else "host")
        cost = (f"merged into {len(merge.deltas_of(dm, [(lora, strength)]))} layers when sampling starts; the bare "
                "weights are restored from a pristine copy when another set is asked for")
    else:
        state = ensure_slots(dm, max_rank, targets)
        cost = f"slots of rank {state.max_rank} on {len(state.slots)} layers"
    cfg["loras"] = tuple(cfg.get("loras", ())) + (entry(path, file_identity(path), chosen, strength),)
    slot_set = tuple(e for e in cfg["loras"] if entry_mode(e) == "slots")
    if slot_set:
        ensure_slots(dm, max_rank, targets).check(parsed_set(dm, slot_set))  # rank / target errors, now
    text = f"{lora_name} at {strength:g}: {chosen} ({why}); {cost}."
    log.info("QuantLoRA: LoRAHotswap %s", text)
    return m, text


def _host_free() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None
