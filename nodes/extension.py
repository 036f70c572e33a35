"""The pack's node list and HTTP routes for ComfyUI's V3 extension API."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .fp8_cast_node import FP8LayerwiseCast
from .hotswap_node import LoRAHotswap
from .loader_node import QuantizedFluxLoader
from .offload_sampler_node import CPUOffloadSampler


class QuantLoRAExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        from . import routes

        routes.register()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75's loader never calls on_load (newer ones do); register() is idempotent.
        from . import routes

        routes.register()
        return [QuantizedFluxLoader, LoRAHotswap, FP8LayerwiseCast, CPUOffloadSampler]
