"""The pack's `custom_operations` for ComfyUI's loader: ComfyUI's own layers, except that each
Linear hands its tensors to the pack's LayerLoader (quant/loader.py), which quantizes block layers
as they arrive. The same route ComfyUI-GGUF takes for its quantized weights."""
from __future__ import annotations

from ..quant.loader import LayerLoader
from .comfy_door import base_operations


def operations_for(loader: LayerLoader, cast: bool = False):
    """cast: the device computes in another dtype than the weights are stored in (ComfyUI's manual
    cast), so unquantized layers cast their weights to the input's dtype on each call."""
    base = base_operations()

    class Linear(base.Linear):
        comfy_cast_weights = cast

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            loader.load_linear(self, state_dict, prefix, missing_keys)

    attrs = {"Linear": Linear}
    if cast:  # the other layers (norms, embeddings) as ComfyUI's manual_cast has them
        import comfy.ops

        attrs.update({n: getattr(comfy.ops.manual_cast, n) for n in dir(comfy.ops.manual_cast)
                      if n != "Linear" and isinstance(getattr(comfy.ops.manual_cast, n), type)})
    return type("QuantLoRAOperations", (base,), attrs)
