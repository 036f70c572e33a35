"""The pack's `custom_operations` for ComfyUI's loader: ComfyUI's own layers, except that each
Linear hands its tensors to the pack's LayerLoader (quant/loader.py), which quantizes block layers
as they arrive. The same route ComfyUI-GGUF takes for its quantized weights.

One class per ComfyUI base (not one per load): torch.compile guards on a module's type, so a new
class at each load would recompile every compiled block after a reload (and, past dynamo's
recompile limit, fall back to eager). The loader in charge is found through a context variable
set only while the pack's load runs.
"""
from __future__ import annotations

import contextlib
import contextvars

from ..quant.loader import LayerLoader
from .comfy_door import base_operations

_LOADER: contextvars.ContextVar[LayerLoader | None] = contextvars.ContextVar("quantlora_layer_loader", default=None)
_CLASSES: dict = {}


@contextlib.contextmanager
def loading_with(loader: LayerLoader):
    token = _LOADER.set(loader)
    try:
        yield
    finally:
        _LOADER.reset(token)


def operations_for(cast: bool = False):
    """cast: the device computes in another dtype than the weights are stored in (ComfyUI's manual
    cast), so unquantized layers cast their weights to the input's dtype on each call."""
    base = base_operations()
    key = (base, cast)
    if key not in _CLASSES:
        _CLASSES[key] = _make(base, cast)
    return _CLASSES[key]


def _make(base, cast: bool):
    class Linear(base.Linear):
        comfy_cast_weights = cast

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            loader = _LOADER.get()
            if loader is None:  # a load_state_dict outside the pack's loader: ComfyUI's own behaviour
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                     unexpected_keys, error_msgs)
            loader.load_linear(self, state_dict, prefix, missing_keys)

    Linear.__qualname__ = Linear.__name__ = "QuantLoRALinear" + ("Cast" if cast else "")
    attrs = {"Linear": Linear}
    if cast:  # the other layers (norms, embeddings) as ComfyUI's manual_cast has them
        import comfy.ops

        attrs.update({n: getattr(comfy.ops.manual_cast, n) for n in dir(comfy.ops.manual_cast)
                      if n != "Linear" and isinstance(getattr(comfy.ops.manual_cast, n), type)})
    return type("QuantLoRAOperations" + ("Cast" if cast else ""), (base,), attrs)
