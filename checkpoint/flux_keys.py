"""Name maps between the BFL/ComfyUI Flux layout (fused qkv, linear1) and diffusers' layout.

One table serves both loading diffusers-layout checkpoints and placing LoRA weights:
each diffusers Linear maps to a BFL Linear and, where BFL fuses several projections into
one layer, to a row range of that layer's output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The block vocabulary, one place for the pack: BFL/ComfyUI's block lists (in forward order) and
# diffusers' names for the same lists.
BFL_BLOCK_LISTS = ("double_blocks", "single_blocks")
DIFFUSERS_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
_BFL = "|".join(BFL_BLOCK_LISTS)
_ANY = "|".join(BFL_BLOCK_LISTS + DIFFUSERS_BLOCK_LISTS)
# A BFL layer inside a block: group(0) is the block's prefix ("double_blocks.3."), group(1) its index.
BLOCK_LAYER = re.compile(rf"^(?:{_BFL})\.(\d+)\.")
# A block inside any tensor name, either layout, behind any prefix: group(1) is "double_blocks.3".
ANY_BLOCK = re.compile(rf"(?:^|\.)((?:{_ANY})\.\d+)\.")
# A layer of a block, either layout, dotted ("double_blocks.3.img_attn.qkv") or underscored as in
# kohya/OneTrainer names ("double_blocks_3_img_attn_qkv"): groups (list, index, rest).
BLOCK_DOT = re.compile(rf"^({_ANY})\.(\d+)\.(.+)$")
BLOCK_US = re.compile(rf"^({_ANY})_(\d+)_(.+)$")


@dataclass(frozen=True)
class ModuleMap:
    diffusers: str      # e.g. "transformer_blocks.0.attn.to_q"
    bfl: str            # e.g. "double_blocks.0.img_attn.qkv"
    offset: int = 0     # first output row inside the BFL layer
    rows: int | None = None  # output rows, None = the whole layer
    swap_halves: bool = False  # BFL (shift, scale) vs diffusers (scale, shift)


def linear_maps(depth: int, depth_single: int, hidden: int, mlp_hidden: int) -> list[ModuleMap]:
    h, out = hidden, []
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, n in enumerate("qkv"):
            out.append(ModuleMap(f"{d}.attn.to_{n}", f"{b}.img_attn.qkv", j * h, h))
            out.append(ModuleMap(f"{d}.attn.add_{n}_proj", f"{b}.txt_attn.qkv", j * h, h))
        out += [
            ModuleMap(f"{d}.attn.to_out.0", f"{b}.img_attn.proj"),
            ModuleMap(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj"),
            ModuleMap(f"{d}.norm1.linear", f"{b}.img_mod.lin"),
            ModuleMap(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin"),
            ModuleMap(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0"),
            ModuleMap(f"{d}.ff.net.2", f"{b}.img_mlp.2"),
            ModuleMap(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0"),
            ModuleMap(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2"),
        ]
    for i in range(depth_single):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, n in enumerate("qkv"):
            out.append(ModuleMap(f"{s}.attn.to_{n}", f"{b}.linear1", j * h, h))
        out += [
            ModuleMap(f"{s}.proj_mlp", f"{b}.linear1", 3 * h, mlp_hidden),
            ModuleMap(f"{s}.proj_out", f"{b}.linear2"),
            ModuleMap(f"{s}.norm.linear", f"{b}.modulation.lin"),
        ]
    out += [
        ModuleMap("x_embedder", "img_in"),
        ModuleMap("context_embedder", "txt_in"),
        ModuleMap("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ModuleMap("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ModuleMap("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ModuleMap("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ModuleMap("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ModuleMap("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ModuleMap("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
        ModuleMap("proj_out", "final_layer.linear"),
    ]
    return out


def norm_maps(depth: int, depth_single: int) -> dict[str, str]:
    """diffusers RMSNorm weight -> BFL scale parameter."""
    out = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        out[f"{d}.norm_q.weight"] = f"{b}.img_attn.norm.query_norm.scale"
        out[f"{d}.norm_k.weight"] = f"{b}.img_attn.norm.key_norm.scale"
        out[f"{d}.norm_added_q.weight"] = f"{b}.txt_attn.norm.query_norm.scale"
        out[f"{d}.norm_added_k.weight"] = f"{b}.txt_attn.norm.key_norm.scale"
    for i in range(depth_single):
        d, b = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        out[f"{d}.norm_q.weight"] = f"{b}.norm.query_norm.scale"
        out[f"{d}.norm_k.weight"] = f"{b}.norm.key_norm.scale"
    return out


def fused_splits(bfl_module: str, hidden: int, mlp_hidden: int) -> list[int] | None:
    """Output row sizes of the projections a BFL layer fuses, or None for a plain layer."""
    if bfl_module.endswith(("img_attn.qkv", "txt_attn.qkv")):
        return [hidden] * 3
    if bfl_module.startswith("single_blocks.") and bfl_module.endswith(".linear1"):
        return [hidden] * 3 + [mlp_hidden]
    return None


def swap_halves(t):
    """(a, b) -> (b, a) along dim 0: converts between BFL and diffusers final-norm order."""
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
