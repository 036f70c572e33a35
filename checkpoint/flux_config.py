"""Flux architecture read from tensor names and shapes, for BFL and diffusers layouts.

ComfyUI builds the model (nodes/bridge.py); this reading only checks a file before ComfyUI sees it
(naming what a foreign file is, and a damaged one's problem) and gives the LoRA parser its widths."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import QuantLoRAError

# Prefixes under which full checkpoints or other tools store the transformer.
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


@dataclass(frozen=True)
class FluxArch:
    hidden_size: int
    num_heads: int
    depth: int
    depth_single_blocks: int
    in_channels: int
    context_in_dim: int
    vec_in_dim: int
    mlp_hidden: int
    qkv_bias: bool
    guidance_embed: bool
    patch_size: int = 2
    theta: int = 10000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.hidden_size

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embed else "schnell"

    def as_dict(self) -> dict:
        return asdict(self)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def strip_prefix(keys) -> str:
    """The prefix under which the Flux transformer sits in a file ('' if none)."""
    keys = list(keys)
    for p in BFL_PREFIXES:
        if any(k.startswith(p + "double_blocks.") or k.startswith(p + "transformer_blocks.") for k in keys):
            return p
    return ""


def describe_foreign(keys, name: str) -> str:
    """Best guess of what a non-FLUX.1 file is, for the error message."""
    ks = list(keys)
    s = " ".join(ks[:2000])
    if "double_stream_modulation_img" in s:
        return "a FLUX.2 transformer (not supported: FLUX.2 has another block layout)"
    if "distilled_guidance_layer" in s:
        return "a Chroma transformer (not supported)"
    if "input_blocks." in s or "down_blocks." in s:
        return "a Stable Diffusion / SDXL UNet"
    if "joint_blocks." in s:
        return "an SD3 MMDiT"
    if "encoder.down." in s or "decoder.up." in s or "decoder.conv_in" in s:
        return "a VAE"
    if "text_model." in s or "encoder.block." in s or "shared.weight" in s:
        return "a text encoder"
    if any(".lora_" in k or "lora_down" in k or "lora_A" in k for k in ks[:200]):
        return "a LoRA (load it with LoRAHotswap, not the model loader)"
    return "not a FLUX.1 transformer"


# Where each layout keeps what the architecture is read from.
_LAYOUT_KEYS = {
    "bfl": dict(key_norm="double_blocks.0.img_attn.norm.key_norm.scale", img_in="img_in.weight",
                double=r"double_blocks\.(\d+)\.", single=r"single_blocks\.(\d+)\.", txt_in="txt_in.weight",
                vec_in="vector_in.in_layer.weight", mlp_in="double_blocks.0.img_mlp.0.weight",
                q_bias="double_blocks.0.img_attn.qkv.bias", guidance="guidance_in.in_layer.weight"),
    "diffusers": dict(key_norm="transformer_blocks.0.attn.norm_k.weight", img_in="x_embedder.weight",
                      double=r"transformer_blocks\.(\d+)\.", single=r"single_transformer_blocks\.(\d+)\.",
                      txt_in="context_embedder.weight", vec_in="time_text_embed.text_embedder.linear_1.weight",
                      mlp_in="transformer_blocks.0.ff.net.0.proj.weight", q_bias="transformer_blocks.0.attn.to_q.bias",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight"),
}


def _layout(sh: dict) -> str | None:
    if "double_stream_modulation_img.lin.weight" in sh:  # FLUX.2 shares the BFL names
        return None
    for layout, k in _LAYOUT_KEYS.items():
        if k["key_norm"] in sh and k["img_in"] in sh:
            return layout
    return None


def infer_arch(shapes: dict, name: str) -> tuple[FluxArch, str, str]:
    """Returns (arch, layout 'bfl'|'diffusers', key prefix) from {key: shape}."""
    prefix = strip_prefix(shapes)
    sh = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    layout = _layout(sh)
    try:
        if layout is not None:
            k = _LAYOUT_KEYS[layout]
            hidden = sh[k["img_in"]][0]
            return FluxArch(
                hidden_size=hidden, num_heads=hidden // sh[k["key_norm"]][0],
                depth=_count(sh, k["double"]), depth_single_blocks=_count(sh, k["single"]),
                in_channels=sh[k["img_in"]][1] // 4, context_in_dim=sh[k["txt_in"]][1],
                vec_in_dim=sh[k["vec_in"]][1], mlp_hidden=sh[k["mlp_in"]][0],
                qkv_bias=k["q_bias"] in sh, guidance_embed=k["guidance"] in sh,
            ), layout, prefix
    except (KeyError, IndexError, ZeroDivisionError) as e:
        what = f"tensor {e}" if not isinstance(e, ZeroDivisionError) else "a norm scale of size 0"
        raise QuantLoRAError(f"{name}: looks like a Flux transformer but {what} is missing or misshapen; the file is "
                             "incomplete or damaged. Re-download it.") from None
    raise QuantLoRAError(
        f"{name}: {describe_foreign(shapes.keys(), name)}, not a FLUX.1 transformer "
        f"({len(shapes)} tensors, e.g. {', '.join(list(shapes)[:3])}). "
        "Pick a FLUX.1 dev/schnell transformer (BFL single file or diffusers transformer folder)."
    )
