"""FP8LayerwiseCast: MODEL in, MODEL out, transformer weights stored as fp8 and upcast per layer.
This file is the node's schema and one call (fp8_cast_run.cast_model); the graph semantics and
the ComfyUI side are nodes/fp8_cast_run.py, the cast itself (plain torch) quant/fp8_cast.py.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..quant.fp8_cast import DEFAULT_SKIP_TEXT, STORAGE_DTYPES
from . import fp8_cast_run
from .fp8_cast_run import COMPUTE_NAMES, cast_model  # noqa: F401  (cast_model: bench/comfy_peers.py imports it from here)
from .search_aliases import search_aliases

log = logging.getLogger("quantlora")


class FP8LayerwiseCast(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FP8LayerwiseCast",
            display_name="FP8 Layerwise Cast",
            category="QuantLoRA",
            description="Stores the transformer's weights as fp8 (half of bf16) and upcasts each layer to the compute "
                        "dtype just before use. Embedders, norms and the final layer stay in high precision by default. "
                        "Works on any MODEL; the input MODEL is not modified.",
            **search_aliases("fp8", "float8", "layerwise cast", "low vram"),
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion MODEL; the cast applies to a copy, the input stays as it is."),
                io.Combo.Input("storage_dtype", options=list(STORAGE_DTYPES), default="float8_e4m3fn",
                               tooltip="e4m3fn: more precision (the usual choice). e5m2: more range."),
                io.Combo.Input("compute_dtype", options=COMPUTE_NAMES, default="auto",
                               tooltip="The dtype layers compute in. auto = the model's current dtype."),
                io.String.Input("skip_pattern", default=DEFAULT_SKIP_TEXT, multiline=True,
                                tooltip="Layers kept in high precision: globs, one per line (or comma-separated); * is any "
                                        "run of characters, ? one character. A glob matches a layer's dotted name under the "
                                        "diffusion model or any run of its parts (final_layer, *norm*, double_blocks.0.*)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, storage_dtype, compute_dtype, skip_pattern) -> io.NodeOutput:
        out, msg = fp8_cast_run.cast_model(model, storage_dtype, compute_dtype, skip_pattern)
        log.info("FP8LayerwiseCast: %s", msg)
        return io.NodeOutput(out)
