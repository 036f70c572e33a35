"""Small seeded random-weight models in the file layouts users have, for tests and the demo job.

Random weights: these exercise the machinery (loading, quantization, LoRA, sampling);
their images are noise. Needs ComfyUI importable (its Flux class gives the BFL key set).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

# hidden 128 = one head of 128 (ComfyUI builds Flux with heads of 128 and derives the head count
# from the width); context and pooled widths match a CLIP-L text encoder (768), so stock
# CLIPTextEncode conditioning drives it in a real server.
TINY = dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, context_in_dim=768, vec_in_dim=768,
            in_channels=16, mlp_ratio=4.0, guidance_embed=True, qkv_bias=True)
# The smallest Flux ComfyUI 0.3.75's own loader detects (it fixes 24 heads of 128).
COMFY_MIN = dict(TINY, hidden_size=3072, num_heads=24, context_in_dim=4096)


def comfy_detects_width() -> bool:
    """True where ComfyUI derives Flux's head count from its width (v0.33+); 0.3.75 fixes 24 heads."""
    try:
        import comfyui_version
        major, minor = (int(p) for p in comfyui_version.__version__.split(".")[:2])
    except Exception:
        return True
    return (major, minor) >= (0, 4)


def demo_flux_config() -> dict:
    """The demo Flux for the running ComfyUI: TINY, or on 0.3.75 the smallest it can load (one block
    of each kind at hidden 3072, CLIP-L widths: ~0.5 B parameters)."""
    return TINY if comfy_detects_width() else dict(COMFY_MIN, context_in_dim=768)


def _axes(head_dim: int) -> list[int]:
    side = ((head_dim - head_dim // 8) // 2) // 2 * 2
    return [head_dim - 2 * side, side, side]


def flux_bfl_state_dict(cfg: dict = TINY, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Seeded random weights under the BFL file layout's names (QK-norm scales as `.scale`, as
    files have them; newer ComfyUI names the module parameter `.weight`)."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.ops

    c = dict(cfg)
    kw = dict(in_channels=c["in_channels"], out_channels=c["in_channels"], vec_in_dim=c["vec_in_dim"],
              context_in_dim=c["context_in_dim"], hidden_size=c["hidden_size"], mlp_ratio=c["mlp_ratio"],
              num_heads=c["num_heads"], depth=c["depth"], depth_single_blocks=c["depth_single_blocks"],
              axes_dim=_axes(c["hidden_size"] // c["num_heads"]), theta=10000, patch_size=2,
              qkv_bias=c["qkv_bias"], guidance_embed=c["guidance_embed"])
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        kw["txt_ids_dims"] = []
    meta = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **kw)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in meta.state_dict().items():
        if k.endswith("_norm.weight"):
            k = k[: -len("weight")] + "scale"
        if k.endswith(".scale"):  # RMSNorm scales near 1
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g) if k.endswith("weight") else 0.01 * torch.randn(p.shape, generator=g)
        sd[k] = t.to(dtype)
    return sd


def write_bfl(path: str, sd: dict, prefix: str = "") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, path)
    return path


def diffusers_config(cfg: dict) -> dict:
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg["in_channels"] * 4,
            "num_layers": cfg["depth"], "num_single_layers": cfg["depth_single_blocks"],
            "attention_head_dim": head_dim, "num_attention_heads": cfg["num_heads"],
            "joint_attention_dim": cfg["context_in_dim"], "pooled_projection_dim": cfg["vec_in_dim"],
            "guidance_embeds": cfg["guidance_embed"], "axes_dims_rope": _axes(head_dim)}


def diffusers_key_names(cfg: dict) -> set:
    """The tensor names diffusers' FluxTransformer2DModel has for this config."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    return set(ref.state_dict())


def to_diffusers(sd: dict, cfg: dict) -> dict:
    """BFL -> diffusers through ComfyUI's own key map (independent of the pack's table)."""
    import comfy.utils

    mlp = int(cfg["hidden_size"] * cfg["mlp_ratio"])
    key_map = comfy.utils.flux_to_diffusers({"depth": cfg["depth"], "depth_single_blocks": cfg["depth_single_blocks"],
                                             "hidden_size": cfg["hidden_size"]})
    names = diffusers_key_names(cfg)
    out = {}
    for dkey, target in key_map.items():
        if dkey not in names:
            continue  # aliases newer ComfyUI also reads (ff.linear_in, single blocks' attn.to_out)
        if isinstance(target, str) and target.endswith("_norm.weight") and target not in sd:
            target = target[: -len("weight")] + "scale"  # files name QK-norm scales .scale; newer ComfyUI's map .weight
        if isinstance(target, str):
            if target in sd:
                out[dkey] = sd[target]
            continue
        bkey, sl = target[0], target[1]
        if bkey not in sd:
            continue
        t = sd[bkey]
        if sl is not None:
            dim, start, length = sl
            if dkey.endswith(("proj_mlp.weight", "proj_mlp.bias")):
                length = mlp  # ComfyUI's map assumes mlp_ratio 4 * hidden
            t = t.narrow(dim, start, length)
        if len(target) > 2:
            t = target[2](t)  # swap_scale_shift: BFL (shift, scale) <-> diffusers (scale, shift)
        out[dkey] = t.clone()
    return out


def write_diffusers(folder: str, sd: dict, cfg: dict = TINY, shards: int = 2) -> str:
    dsd = to_diffusers(sd, cfg)
    os.makedirs(folder, exist_ok=True)
    keys = sorted(dsd)
    per = (len(keys) + shards - 1) // shards
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: dsd[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(diffusers_config(cfg), f)
    return folder


def write_clip_l(path: str, seed: int = 0) -> str:
    """A CLIP-L text encoder (ComfyUI's fixed 768x12 config) with random weights, fp16."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12, max_position_embeddings=77, projection_dim=768))
    # The HF checkpoint layout ComfyUI reads: everything under text_model., plus a projection.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v.to(torch.float16).contiguous()
          for k, v in model.state_dict().items()}
    sd["text_projection.weight"] = torch.eye(768, dtype=torch.float16)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)  # atomic: concurrent test sessions share the cached file
    return path


def write_taef1(folder: str, seed: int = 0) -> str:
    """vae_approx/taef1_{encoder,decoder}.safetensors: ComfyUI's tiny Flux VAE, random weights.
    ComfyUI's layers skip init, so every tensor is drawn here (He-scaled, so images have contrast)."""
    from comfy.taesd.taesd import Decoder, Encoder

    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for name, net in (("encoder", Encoder(latent_channels=16)), ("decoder", Decoder(latent_channels=16))):
        sd = {}
        for k, v in net.state_dict().items():
            if v.ndim == 4:
                fan_in = v.shape[1] * v.shape[2] * v.shape[3]
                sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
                if name == "decoder" and v.shape[0] == 3:
                    sd[k] *= 0.01  # the RGB head: pixel values mostly inside [-1, 1]
            else:
                sd[k] = torch.zeros(v.shape)
        save_file(sd, os.path.join(folder, f"taef1_{name}.safetensors"))
    return folder


DEMO_FLUX = "quantlora-demo-flux.safetensors"
DEMO_CLIP = "quantlora-demo-clip-l.safetensors"
# Two LoRAs on the demo Flux (the example workflows' defaults): A in BFL/ComfyUI layout, B in kohya's.
DEMO_LORA_A = "quantlora-demo-style-a.safetensors"
DEMO_LORA_B = "quantlora-demo-style-b.safetensors"
DEMO_LORAS = {DEMO_LORA_A: dict(rank=8, seed=1, fmt="bfl"), DEMO_LORA_B: dict(rank=16, seed=2, fmt="kohya")}


def demo_set_complete(models_dir: str) -> bool:
    """True when every file of the demo set is there (write_demo_set would write nothing)."""
    files = [os.path.join("diffusion_models", DEMO_FLUX), os.path.join("text_encoders", DEMO_CLIP),
             os.path.join("vae_approx", "taef1_decoder.safetensors"), os.path.join("vae_approx", "taef1_encoder.safetensors")]
    files += [os.path.join("loras", name) for name in DEMO_LORAS]
    return all(os.path.exists(os.path.join(models_dir, f)) for f in files)


def write_demo_set(models_dir: str, cache_dir: str | None = None, seed: int = 0) -> dict:
    """The small built-in model set: a tiny Flux (BFL file), a CLIP-L, taef1 and two LoRAs
    (DEMO_LORA_A, DEMO_LORA_B), random weights. Files already there are kept.
    The CLIP-L (250 MB) is written once into cache_dir and linked from there."""
    paths = {"flux": os.path.join(models_dir, "diffusion_models", DEMO_FLUX),
             "clip": os.path.join(models_dir, "text_encoders", DEMO_CLIP),
             "vae_approx": os.path.join(models_dir, "vae_approx"),
             "loras": {name: os.path.join(models_dir, "loras", name) for name in DEMO_LORAS}}
    if not os.path.exists(paths["flux"]):
        write_bfl(paths["flux"], flux_bfl_state_dict(demo_flux_config(), seed=seed))
    if not os.path.exists(paths["clip"]):
        cached = os.path.join(cache_dir, DEMO_CLIP) if cache_dir else None
        if cached and not os.path.exists(cached):
            write_clip_l(cached, seed)
        os.makedirs(os.path.dirname(paths["clip"]), exist_ok=True)
        if cached:
            os.symlink(os.path.abspath(cached), paths["clip"])
        else:
            write_clip_l(paths["clip"], seed)
    if not os.path.exists(os.path.join(paths["vae_approx"], "taef1_decoder.safetensors")):
        write_taef1(paths["vae_approx"], seed)
    for name, kw in DEMO_LORAS.items():
        if not os.path.exists(paths["loras"][name]):
            write_demo_lora(paths["loras"][name], paths["flux"], **kw)
    return paths


def write_demo_lora(path: str, flux_path: str, rank: int = 8, seed: int = 1, fmt: str = "bfl",
                    modules=(".qkv", ".proj", "_mlp.0", "_mlp.2", ".linear1", ".linear2"), scale: float = 1.0) -> str:
    """A random LoRA on the block layers of the Flux file at flux_path, in BFL ("diffusion_model.X.lora_A")
    or kohya ("lora_unet_X.lora_down") layout, with alpha = rank. Random weights: for trying the machinery."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    sd = {}
    with safe_open(flux_path, "pt") as f:
        for key in f.keys():
            name = key.split("diffusion_model.", 1)[-1]
            if not name.endswith(".weight") or not name.startswith(("double_blocks.", "single_blocks.")):
                continue
            mod = name[: -len(".weight")]
            if not mod.endswith(tuple(modules)):
                continue
            out_f, in_f = f.get_slice(key).get_shape()
            down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            up = torch.randn(out_f, rank, generator=g) * (0.05 * scale)
            if fmt == "kohya":
                base, dn, un = "lora_unet_" + mod.replace(".", "_"), "lora_down.weight", "lora_up.weight"
            else:
                base, dn, un = "diffusion_model." + mod, "lora_A.weight", "lora_B.weight"
            sd[f"{base}.{dn}"], sd[f"{base}.{un}"] = down.contiguous(), up.contiguous()
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(sd, path)
    return path
