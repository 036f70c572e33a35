"""CPUOffloadSampler: the stock KSampler with the transformer's weights offloaded to host memory
while it samples. This file is the node's schema, its input checks and one call
(offload_run.sample); the design and the ComfyUI glue are nodes/offload_run.py, the plan from the
numbers memory/offload_plan.py, the moving memory/offload.py and memory/streaming.py.
"""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..errors import check_choice
from ..memory.offload_plan import OFFLOAD_MODES
from . import offload_run
from .offload_run import sample  # noqa: F401  (bench/comfy_peers.py imports it from here; its home is offload_run)
from .search_aliases import search_aliases


class CPUOffloadSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CPUOffloadSampler",
            display_name="KSampler (CPU offload)",
            category="QuantLoRA",
            description="The stock KSampler, with the transformer's weights kept in host memory and streamed to the GPU "
                        "while sampling. Same seed, same latent as KSampler. Reports the run's peak VRAM.",
            **search_aliases("ksampler", "offload", "cpu offload", "low vram", "sampler"),
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The number of steps used in the denoising process."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The Classifier-Free Guidance scale balances creativity and adherence to the "
                                       "prompt. Higher values match the prompt more closely; too high values hurt "
                                       "quality."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The algorithm used when sampling, this can affect the quality, speed, and "
                                       "style of the generated output."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The scheduler controls how noise is gradually removed to form the image."),
                io.Conditioning.Input("positive",
                                   tooltip="The conditioning describing the attributes you want to include in the image."),
                io.Conditioning.Input("negative",
                                   tooltip="The conditioning describing the attributes you want to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The amount of denoising applied; lower values keep the structure of the "
                                       "input latent (image to image)."),
                io.Combo.Input("offload_mode", options=OFFLOAD_MODES, default="auto",
                               tooltip="none: stock. model: whole transformer on the GPU only while sampling. "
                                       "block: as many transformer blocks as the budget allows stay on the GPU, the "
                                       "rest are streamed in ahead of use from pinned memory on a side stream (every "
                                       "weight kind: bf16, fp8, NF4/int8, torchao, quanto). leaf: one layer at a "
                                       "time (lowest VRAM). auto: none if the model fits, else block filling the "
                                       "card, else leaf; the UI text says what it chose, how much is resident and "
                                       "the predicted step ratio. No-op without a CUDA device."),
                io.Int.Input("blocks_per_group", default=1, min=1, max=64,
                             tooltip="block mode: how many streamed blocks are copied ahead of use (1: the next "
                                     "one, enough when the streamed blocks are spread between resident ones). More "
                                     "keeps more copies in flight: fewer stalls, less room for resident blocks."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="auto and block modes: the VRAM the weights and activations may use. 0 = "
                                       "the GPU's free memory now (what this model already holds there included); "
                                       "the activations for this latent's size and batch are set aside from it."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                offload_mode, blocks_per_group, vram_budget_gb) -> io.NodeOutput:
        check_choice("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS)
        check_choice("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)
        check_choice("offload_mode", offload_mode, OFFLOAD_MODES)
        latent, text = offload_run.sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise, offload_mode, blocks_per_group, vram_budget_gb)
        return io.NodeOutput(latent, ui=ui.PreviewText(text))
