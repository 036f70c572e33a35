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
}
