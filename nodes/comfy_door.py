"""The one door into ComfyUI internals.

Everything the pack needs from ComfyUI beyond its documented node API goes through this module:
the loader entry point it calls (comfy.sd.load_diffusion_model_state_dict with model_options
and custom_operations, as ComfyUI-GGUF does), the base operations class it extends, dynamic VRAM
(v0.33+), and every write into ModelPatcher / BaseModel bookkeeping. `CONTRACT` lists each internal
this relies on; tests/test_comfy_contract.py checks them against the installed ComfyUI, so a
release that renames one fails a test instead of a user's prompt. A missing internal raises
`ComfyUIIncompatible`, which names the ComfyUI version and what is missing.
"""
from __future__ import annotations

import inspect
import logging

from ..errors import QuantLoRAError

log = logging.getLogger("quantlora")

# Oldest ComfyUI the pack supports, and the newest it was tested on.
MIN_VERSION = (0, 3, 75)
TESTED_VERSION = (0, 33, 0)


class ComfyUIIncompatible(QuantLoRAError):
    pass


def comfy_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # very old trees have no version file
        return "unknown"


def version_tuple(v: str | None = None) -> tuple:
    v = v or comfy_version()
    try:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:3])
    except ValueError:
        return ()


def version_problem() -> str | None:
    """A sentence for the start-up log when this ComfyUI is older than the pack supports."""
    v = version_tuple()
    if v and v < MIN_VERSION:
        return (f"QuantLoRA needs ComfyUI {'.'.join(map(str, MIN_VERSION))} or newer (tested up to "
                f"{'.'.join(map(str, TESTED_VERSION))}); this is ComfyUI {comfy_version()}. Update ComfyUI.")
    return None


def incompatible(what: str) -> ComfyUIIncompatible:
    return ComfyUIIncompatible(
        f"QuantLoRA cannot work with ComfyUI {comfy_version()}: {what}. QuantLoRA supports ComfyUI "
        f"{'.'.join(map(str, MIN_VERSION))} to {'.'.join(map(str, TESTED_VERSION))}; update QuantLoRA "
        "(or tell its developers which ComfyUI release this is).")


def _attr(path: str):
    """comfy.a.b.c -> the object, or ComfyUIIncompatible naming what is missing."""
    import importlib

    mod_name, _, rest = path.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise incompatible(f"module {mod_name} cannot be imported ({e})") from None
    for part in filter(None, rest.split(".")):
        if not hasattr(obj, part):
            raise incompatible(f"{mod_name}:{rest} is missing ({part!r} not found)")
        obj = getattr(obj, part)
    return obj


# ---------- loading ----------
def base_operations():
    """ComfyUI's operations class whose layers skip weight init (weights come from the file)."""
    return _attr("comfy.ops:disable_weight_init")


def dynamic_vram_enabled() -> bool:
    """True when this ComfyUI runs dynamic VRAM (comfy-aimdo places weights; v0.33+ on NVIDIA)."""
    try:
        import comfy.memory_management as mem
    except ImportError:
        return False
    return bool(getattr(mem, "aimdo_enabled", False))


def load_diffusion_model_state_dict(sd: dict, model_options: dict, metadata: dict | None):
    """ComfyUI's own diffusion-model loader (what UNETLoader calls), returning a plain ModelPatcher:
    the pack places quantized weights itself, so the model is kept out of dynamic VRAM
    (`disable_dynamic`, v0.33+). Returns None where ComfyUI does not recognise the model."""
    fn = _attr("comfy.sd:load_diffusion_model_state_dict")
    params = inspect.signature(fn).parameters
    if "model_options" not in params:
        raise incompatible("comfy.sd.load_diffusion_model_state_dict takes no model_options")
    kw = {"model_options": model_options}
    if "metadata" in params:
        kw["metadata"] = metadata
    if "disable_dynamic" in params:
        kw["disable_dynamic"] = True
        if dynamic_vram_enabled():
            log.info("QuantLoRA: this model is placed by QuantLoRA, not by ComfyUI's dynamic VRAM "
                     "(quantized weights and LoRA slots live where the pack puts them)")
    return fn(sd, **kw)


# Internals the pack relies on: "module:attribute.path" -> what for. Checked by the contract test.
CONTRACT = {
    "comfy.sd:load_diffusion_model_state_dict": "the loader (model_options: dtype, custom_operations)",
    "comfy.ops:disable_weight_init.Linear": "base class of the quantizing Linear",
    "comfy.model_patcher:ModelPatcher": "the MODEL type",
    "comfy.patcher_extension:WrappersMP.DIFFUSION_MODEL": "LoRA set activation per sampling",
    "comfy.patcher_extension:WrappersMP.OUTER_SAMPLE": "LoRA slots switched off after sampling",
    "comfy.patcher_extension:WrappersMP.PREPARE_SAMPLING": "offload placement before sampling",
    "comfy.patcher_extension:CallbacksMP.ON_DETACH": "offload removal when ComfyUI unloads",
    "comfy.model_management:get_torch_device": "load device",
    "comfy.model_management:unet_offload_device": "offload device",
    "comfy.model_management:unet_dtype": "auto compute dtype",
    # the nodes' other calls into ComfyUI
    "comfy.model_management:unet_manual_cast": "whether ComfyUI casts layers per call",
    "comfy.model_management:load_models_gpu": "model mode: load the rest of a partial load",
    "comfy.model_management:current_loaded_models": "unload clones of the same weights (comfy_door.unload_where)",
    "comfy.model_management:LoadedModel.model_unload": "unload one loaded model as free_memory does",
    "comfy.model_management:soft_empty_cache": "after unloading",
    "comfy.model_management:unload_all_models": "after an OOM while sampling",
    "comfy.model_management:get_total_memory": "offload auto budget",
    "comfy.model_management:extra_reserved_memory": "offload auto budget",
    "comfy.model_management:minimum_inference_memory": "offload auto budget",
    "comfy.model_patcher:ModelPatcher.clone": "every node output",
    "comfy.model_patcher:ModelPatcher.is_clone": "which loaded patchers share weights",
    "comfy.model_patcher:ModelPatcher.model_size": "size ComfyUI accounts",
    "comfy.model_patcher:ModelPatcher.loaded_size": "what ComfyUI believes is resident (mark_resident)",
    "comfy.model_patcher:ModelPatcher.partially_load": "a marked-resident model is not loaded again",
    "comfy.model_patcher:ModelPatcher.unpatch_model": "host weights restored before offload hooks go on",
    "comfy.model_patcher:ModelPatcher.patch_weight_to_device": "LoraLoader patches baked into host weights",
    "comfy.model_patcher:ModelPatcher.add_wrapper_with_key": "wrappers",
    "comfy.model_patcher:ModelPatcher.add_callback_with_key": "callbacks",
    "comfy.model_patcher:ModelPatcher.get_wrappers": "idempotent wrapper install",
    "comfy.patcher_extension:WrapperExecutor": "what calls the wrappers",
    "comfy.sampler_helpers:prepare_sampling": "calls PREPARE_SAMPLING wrappers",
    "comfy.sampler_helpers:_prepare_sampling": "what the PREPARE_SAMPLING wrapper wraps",
    "comfy.samplers:CFGGuider.outer_sample": "what the OUTER_SAMPLE wrapper wraps (class_obj.model_patcher)",
    "comfy.samplers:KSampler.SAMPLERS": "CPUOffloadSampler choices",
    "comfy.samplers:KSampler.SCHEDULERS": "CPUOffloadSampler choices",
    "comfy.sample:fix_empty_latent_channels": "offload auto: latent shape",
    "comfy.ldm.flux.model:Flux._forward": "what the DIFFUSION_MODEL wrapper wraps",
    "comfy.model_base:BaseModel.memory_required": "offload auto: activation estimate",
    "nodes:common_ksampler": "CPUOffloadSampler samples through it",
    "comfy.ldm.modules.attention:wrap_attn": "calls transformer_options['optimized_attention_override']",
    "comfy.ops:CastWeightBiasOp.comfy_cast_weights": "FP8LayerwiseCast turns on ComfyUI's own per-layer cast",
    "comfy.ops:manual_cast": "the loader's other layers when the device computes in another dtype",
}

# Signatures the pack's wrappers, callbacks and calls depend on: "module:callable" -> every parameter
# list seen in a supported ComfyUI (0.3.75, 0.33.0). A release that changes one fails the contract
# test; then check the wrapper or call named in CONTRACT and add the new list here.
SIGNATURES = {
    # PREPARE_SAMPLING wrapper: (executor, model, noise_shape, conds, model_options, ...) -- v0.33 added two kwargs
    "comfy.sampler_helpers:_prepare_sampling": [
        ("model", "noise_shape", "conds", "model_options"),
        ("model", "noise_shape", "conds", "model_options", "force_full_load", "force_offload")],
    # OUTER_SAMPLE wrapper: args[0] is the noise
    "comfy.samplers:CFGGuider.outer_sample": [
        ("self", "noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed",
         "latent_shapes")],
    # DIFFUSION_MODEL wrapper: args[0] is x, args[7] transformer_options
    "comfy.ldm.flux.model:Flux._forward": [
        ("self", "x", "timestep", "context", "y", "guidance", "ref_latents", "control", "transformer_options", "kwargs")],
    # ON_DETACH callback: (patcher, unpatch_all)
    "comfy.model_patcher:ModelPatcher.detach": [("self", "unpatch_all")],
    "comfy.model_patcher:ModelPatcher.clone": [("self",), ("self", "disable_dynamic", "model_override", "force_deepcopy")],
    "comfy.model_patcher:ModelPatcher.__init__": [
        ("self", "model", "load_device", "offload_device", "size", "weight_inplace_update")],
    "comfy.model_patcher:ModelPatcher.unpatch_model": [("self", "device_to", "unpatch_weights")],
    "comfy.model_patcher:ModelPatcher.patch_weight_to_device": [
        ("self", "key", "device_to", "inplace_update"),
        ("self", "key", "device_to", "inplace_update", "return_weight", "force_cast")],
    "comfy.model_patcher:ModelPatcher.partially_load": [("self", "device_to", "extra_memory", "force_patch_weights")],
    "comfy.model_management:LoadedModel.model_unload": [("self", "memory_to_free", "unpatch_weights")],
    "comfy.model_management:load_models_gpu": [
        ("models", "memory_required", "force_patch_weights", "minimum_memory_required", "force_full_load")],
    "comfy.sd:load_diffusion_model_state_dict": [("sd", "model_options", "metadata"),
                                                 ("sd", "model_options", "metadata", "disable_dynamic")],
    "nodes:common_ksampler": [
        ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent", "denoise",
         "disable_noise", "start_step", "last_step", "force_full_denoise")],
    "comfy.sample:fix_empty_latent_channels": [("model", "latent_image"),
                                               ("model", "latent_image", "downscale_ratio_spacial",
                                                "downscale_ratio_temporal")],
    "comfy.model_base:BaseModel.memory_required": [("self", "input_shape", "cond_shapes")],
    # the loader's Linear receives its tensors here (nodes/quant_ops.py)
    "comfy.ops:disable_weight_init.Linear._load_from_state_dict": [
        ("self", "state_dict", "prefix", "local_metadata", "strict", "missing_keys", "unexpected_keys", "error_msgs")],
}

# How ComfyUI calls the pack's wrappers and callbacks: "module:function" -> the call in its source
# (one string per supported version). The wrapper receives exactly these arguments.
CALL_SITES = {
    "comfy.sampler_helpers:prepare_sampling": [
        "executor.execute(model, noise_shape, conds, model_options=model_options)",
        "executor.execute(model, noise_shape, conds, model_options=model_options, force_full_load=force_full_load, "
        "force_offload=force_offload)"],
    "comfy.samplers:CFGGuider.sample": [
        "executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, "
        "latent_shapes=latent_shapes)"],
    "comfy.ldm.flux.model:Flux.forward": [
        ".execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)"],
    "comfy.model_patcher:ModelPatcher.detach": ["callback(self, unpatch_all)"],
    # transformer_options["optimized_attention_override"] (runtime.set_attention, cuDNN SDPA): (func, *args, **kwargs)
    "comfy.ldm.modules.attention:wrap_attn": [
        '["optimized_attention_override"](func, *args, **kwargs)',
        "optimized_attention_override(func, *args, **kwargs)"],
}

# ModelPatcher's instance fields in each supported ComfyUI. rebind() gives a patcher around another
# model its own bookkeeping, so a release that adds a field (v0.33 added backup_buffers,
# cached_patcher_init, clone_base_uuid, is_multigpu_base_clone) must be looked at: does rebind
# need to reset it?
_FIELDS_0_3_75 = frozenset((
    "additional_models", "attachments", "backup", "cached_hook_patches", "callbacks", "current_hooks",
    "force_cast_weights", "forced_hooks", "hook_backup", "hook_mode", "hook_patches", "hook_patches_backup",
    "injections", "is_clip", "is_injected", "load_device", "model", "model_options", "object_patches",
    "object_patches_backup", "offload_device", "parent", "patches", "patches_uuid", "pinned", "size",
    "skip_injection", "weight_inplace_update", "weight_wrapper_patches", "wrappers"))
PATCHER_FIELDS = [
    _FIELDS_0_3_75,
    _FIELDS_0_3_75 | {"backup_buffers", "cached_patcher_init", "clone_base_uuid", "is_multigpu_base_clone"},
]
# Every ModelPatcher field the pack writes (all in this module); `optional` ones only where present.
PATCHER_FIELDS_WRITTEN = ("size", "parent", "model", "backup", "object_patches_backup", "pinned", "hook_backup",
                          "cached_hook_patches", "is_injected")
PATCHER_FIELDS_WRITTEN_OPTIONAL = ("backup_buffers", "cached_patcher_init", "clone_base_uuid", "is_multigpu_base_clone")

# v0.33+ only, used where present: QUANTLORA_FUSE_ROPE (nodes/rope_fusion.py) traces ComfyUI's pure-torch
# RoPE in place of comfy_kitchen's custom ops; without them the switch is ignored with a log line.
ROPE_CONTRACT = {
    "comfy.quant_ops:ck.apply_rope": "QUANTLORA_FUSE_ROPE: the custom op replaced in compiled graphs",
    "comfy.quant_ops:ck.apply_rope1": "QUANTLORA_FUSE_ROPE: the custom op replaced in compiled graphs",
    "comfy.ldm.flux.math:_apply_rope": "QUANTLORA_FUSE_ROPE: ComfyUI's pure-torch RoPE traced instead",
    "comfy.ldm.flux.math:_apply_rope1": "QUANTLORA_FUSE_ROPE: ComfyUI's pure-torch RoPE traced instead",
}

# Dynamic VRAM (v0.33+), used only where present (feature checks in non_dynamic / fresh_non_dynamic_copy).
DYNAMIC_CONTRACT = {
    "comfy.model_patcher:ModelPatcherDynamic.get_non_dynamic_delegate": "LoRAHotswap / CPUOffloadSampler on a dynamic MODEL",
    "comfy.model_patcher:ModelPatcher.is_dynamic": "feature check",
    "comfy.memory_management:aimdo_enabled": "dynamic VRAM on",
}


# ---------- feature checks ----------
def is_dynamic(patcher) -> bool:
    """True for a dynamic-VRAM patcher (v0.33+: ModelPatcherDynamic); False on older ComfyUI."""
    fn = getattr(patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_SAID: set = set()


def say_once(key, msg: str, *args) -> None:
    """Log `msg` once per key (a model is taken out of dynamic VRAM once, not on every run)."""
    if key in _SAID:
        return
    _SAID.add(key)
    log.info(msg, *args)


# ---------- dynamic VRAM ----------
_DYNAMIC_ADVICE = ("Load it with QuantizedFluxLoader (its MODEL is placed by QuantLoRA), or start ComfyUI with "
                   "--disable-dynamic-vram")


def _no_plain_copy(node: str) -> QuantLoRAError:
    return QuantLoRAError(
        f"{node}: this MODEL is placed by ComfyUI {comfy_version()}'s dynamic VRAM, and the loader that made it gives "
        f"ComfyUI no way to reload it outside dynamic VRAM (no cached_patcher_init), which {node} needs. "
        f"{_DYNAMIC_ADVICE}.")


def non_dynamic(patcher, node: str, why: str):
    """`patcher` itself, or, for a dynamic-VRAM patcher, ComfyUI's own non-dynamic delegate of it
    (ModelPatcherDynamic.get_non_dynamic_delegate, what ComfyUI's samplers use for hooks): a plain
    ModelPatcher with the same patches and options on a plain copy of the model, which ComfyUI loads
    once and keeps with the input MODEL. The node then owns placement of that copy only; the input
    MODEL stays under dynamic VRAM for every other node. Said once per model."""
    if not is_dynamic(patcher):
        return patcher
    delegate = getattr(patcher, "get_non_dynamic_delegate", None)
    if delegate is None or getattr(patcher, "cached_patcher_init", None) is None:
        raise _no_plain_copy(node)
    out = delegate()
    say_once(("delegate", node, id(out.model)),
             "QuantLoRA %s: this MODEL (%s) is under ComfyUI's dynamic VRAM; %s, so it runs on a plain "
             "(non-dynamic) copy ComfyUI reloads once and keeps beside it (host memory for a second copy of "
             "the weights). %s to avoid the copy.", node, type(patcher.model).__name__, why, _DYNAMIC_ADVICE)
    return out


def fresh_non_dynamic_copy(patcher, node: str, why: str):
    """For a dynamic-VRAM patcher: a plain ModelPatcher on a fresh copy of its model that nothing else
    holds (ComfyUI's clone(disable_dynamic=True): the model's loader runs again outside dynamic VRAM),
    so the node may change that copy in place. None for a plain patcher."""
    if not is_dynamic(patcher):
        return None
    if not _accepts(patcher.clone, "disable_dynamic") or getattr(patcher, "cached_patcher_init", None) is None:
        raise _no_plain_copy(node)
    out = patcher.clone(disable_dynamic=True)
    new_identity(out)
    log.info("QuantLoRA %s: the input MODEL (%s) is under ComfyUI's dynamic VRAM; %s, so the output is a plain "
             "(non-dynamic) ModelPatcher on its own copy of the weights, placed the classic way.",
             node, type(patcher.model).__name__, why)
    return out


# ---------- ModelPatcher / BaseModel bookkeeping: every write the pack makes ----------
# BaseModel fields ModelPatcher keeps its load state in (ModelPatcher.__init__/load/unpatch_model).
BASE_MODEL_LOAD_FIELDS = ("device", "model_loaded_weight_memory", "model_offload_buffer_memory",
                          "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid", "current_patcher")


def new_identity(patcher) -> None:
    """A patcher whose model is no longer its source's weights (a cast or private copy): not the
    source's LoadedModel heir (parent), not its multi-GPU twin (clone_base_uuid), and no loader
    recipe that would rebuild the source's weights (cached_patcher_init)."""
    import uuid

    patcher.parent = None
    forget_reload_recipe(patcher)
    if hasattr(patcher, "clone_base_uuid"):
        patcher.clone_base_uuid = uuid.uuid4()
    if hasattr(patcher, "is_multigpu_base_clone"):
        patcher.is_multigpu_base_clone = False


def forget_reload_recipe(patcher) -> None:
    """The patcher's model is no longer what its loader gives (cast, own copy): ComfyUI must not
    rebuild it from the loader (v0.33 multi-GPU deepclone / non-dynamic delegate)."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = None


def copy_memo(base) -> dict:
    """Entries for copy.deepcopy's memo when copying BaseModel `base` (the fp8 cast): its patcher
    back-reference is not copied, and its model config is copied without asking its class for
    attributes it lacks (v0.33's configs answer None for any missing attribute, which breaks
    copy.deepcopy's __setstate__ lookup)."""
    memo = {}
    if getattr(base, "current_patcher", None) is not None:
        memo[id(base.current_patcher)] = None
    cfg = base.__dict__.get("model_config")
    if cfg is not None:
        import copy

        new = object.__new__(type(cfg))
        memo[id(cfg)] = new
        new.__dict__.update(copy.deepcopy(dict(cfg.__dict__), memo))
    return memo


def set_compute_dtype(base, dtype) -> None:
    """What BaseModel casts inputs to (diffusion_model.dtype, manual_cast_dtype)."""
    import torch

    dm = getattr(base, "diffusion_model", None)
    if isinstance(getattr(dm, "dtype", None), torch.dtype):
        dm.dtype = dtype
    if getattr(base, "manual_cast_dtype", None) is not None:
        base.manual_cast_dtype = dtype


def casts_per_layer(base) -> bool:
    """ComfyUI runs this model with manual cast: its layers cast weights to the compute dtype per call
    (e.g. bf16 weights computed in fp32 on a CPU, v0.33), so weights need not be stored in it."""
    return getattr(base, "manual_cast_dtype", None) is not None


def compute_dtype_of(base):
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def _reset_load_state(base, offload_device) -> None:
    base.device = offload_device
    base.model_loaded_weight_memory = 0
    base.model_offload_buffer_memory = 0
    base.lowvram_patch_counter = 0
    base.model_lowvram = False
    base.current_weight_patches_uuid = None
    base.current_patcher = None


def rebind(src, new_base):
    """A patcher like `src` (same patches, options, wrappers, callbacks) around another BaseModel,
    with its own, empty bookkeeping: nothing loaded, no backups, no pins, not a clone of `src`.
    The output is a plain ModelPatcher even when `src` is dynamic. v0.33+: ModelPatcher.clone's
    model_override (what ComfyUI's get_non_dynamic_delegate uses); older: clone() and reset."""
    _reset_load_state(new_base, src.offload_device)
    empty = ({}, {}, {}, set())  # backup, backup_buffers, object_patches_backup, pinned
    if _accepts(src.clone, "model_override"):
        p = src.clone(disable_dynamic=True, model_override=(new_base, empty))
    else:
        p = src.clone()
        p.model = new_base
        p.backup, p.object_patches_backup, p.pinned = {}, {}, set()
        if hasattr(p, "backup_buffers"):
            p.backup_buffers = {}
    new_identity(p)
    p.size = 0
    p.hook_backup, p.cached_hook_patches = {}, {}
    p.is_injected = False
    p.model_size()
    return p


def own_patcher(patcher) -> None:
    """A clone that lives on its own: when it is freed ComfyUI must not hand its LoadedModel entry
    over to the patcher it was cloned from (LoadedModel follows `parent`)."""
    patcher.parent = None


def set_true_size(patcher, nbytes: int) -> None:
    """ModelPatcher.model_size() counts each state-dict tensor at its logical size, so a torchao or
    quanto 8-bit model reads as its bf16 size (22.2 instead of 11.2 GiB for FLUX.1, seen on an H200)
    and ComfyUI frees twice the memory it needs. The pack knows the bytes really held."""
    patcher.size = int(nbytes)


def forget_size(patcher) -> None:
    """ModelPatcher caches model_size(); 0 makes it measure again."""
    patcher.size = 0


def mark_resident(patcher, working_set: int) -> None:
    """Tell ComfyUI's model management what QuantLoRA's offload hooks keep on the load device, the
    way ModelPatcher.load records a full load: load_models_gpu then finds the model loaded (moves
    nothing), frees only what the working set needs, and keeps it in current_loaded_models with its
    real footprint. The patcher's size is that working set too (it is a private clone)."""
    m = patcher.model
    m.device = patcher.load_device
    m.model_loaded_weight_memory = working_set
    m.model_offload_buffer_memory = 0
    m.model_lowvram = False
    m.lowvram_patch_counter = 0
    m.current_weight_patches_uuid = patcher.patches_uuid
    patcher.size = working_set


def weights_patched_for(patcher) -> bool:
    """The model's weights carry exactly this patcher's weight patches."""
    return getattr(patcher.model, "current_weight_patches_uuid", None) == patcher.patches_uuid


def weight_patch_count(patcher) -> int:
    """Layers with ComfyUI weight patches (LoraLoader and friends) on this MODEL (`patches` is a
    field the contract test checks on every supported version)."""
    return len(getattr(patcher, "patches", None) or {})


def loaded_partially(patcher) -> bool:
    """ComfyUI loaded only part of the weights (lowvram)."""
    return bool(getattr(patcher.model, "model_lowvram", False))


# ---------- ComfyUI's list of loaded models ----------
def _loaded():
    return _attr("comfy.model_management:current_loaded_models")


def unload_where(pred) -> int:
    """Unload every loaded model whose patcher matches, as free_memory does (LoadedModel.model_unload,
    then out of current_loaded_models). Returns how many."""
    loaded = _loaded()
    n = 0
    for lm in list(loaded):
        p = lm.model
        if p is None or not pred(p):
            continue
        lm.model_unload()
        if lm in loaded:
            loaded.remove(lm)
        n += 1
    return n


def unload_clones_of(patcher, include_self: bool = False) -> int:
    """Have ComfyUI unload every loaded patcher of the same weights (and `patcher` itself if asked)."""
    return unload_where(lambda p: (p is not patcher or include_self) and p.is_clone(patcher))


def unload(patcher) -> None:
    unload_where(lambda p: p is patcher)
    _attr("comfy.model_management:soft_empty_cache")()


def loaded_patchers() -> list:
    return [lm.model for lm in _loaded() if lm.model is not None]
