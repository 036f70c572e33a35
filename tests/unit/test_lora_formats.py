"""lora/formats.py: every LoRA format parses to exact BFL-module deltas; bad files fail with clear errors.

Layer 1: no ComfyUI. The writers and name tables here are written independently of the parser
(and of checkpoint/flux_keys.py), so a wrong mapping in either shows up as a dense-delta mismatch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from quantlora.errors import QuantLoRAError
from quantlora.lora.formats import FluxDims, LoRATarget, ParsedLoRA, load_lora, parse_lora

H, MLP = 64, 256
DIMS = FluxDims(hidden=H, mlp_hidden=MLP, depth=2, depth_single=2)
IN_IMG, IN_TXT, IN_VEC, OUT_FINAL = 64, 32, 24, 16  # embedder sizes FluxDims does not fix


# ----------------------------------------------------------------------------- test-side tables

def bfl_shape(m: str) -> tuple[int, int]:
    """(out, in) of a BFL Linear at the test dims."""
    tail = m.split(".", 2)[-1] if m.startswith(("double_blocks.", "single_blocks.")) else m
    return {
        "img_attn.qkv": (3 * H, H), "txt_attn.qkv": (3 * H, H), "img_attn.proj": (H, H), "txt_attn.proj": (H, H),
        "img_mlp.0": (MLP, H), "txt_mlp.0": (MLP, H), "img_mlp.2": (H, MLP), "txt_mlp.2": (H, MLP),
        "img_mod.lin": (6 * H, H), "txt_mod.lin": (6 * H, H),
        "linear1": (3 * H + MLP, H), "linear2": (H, H + MLP), "modulation.lin": (3 * H, H),
        "img_in": (H, IN_IMG), "txt_in": (H, IN_TXT), "time_in.in_layer": (H, 256), "time_in.out_layer": (H, H),
        "vector_in.in_layer": (H, IN_VEC), "vector_in.out_layer": (H, H),
        "guidance_in.in_layer": (H, 256), "guidance_in.out_layer": (H, H),
        "final_layer.linear": (OUT_FINAL, H), "final_layer.adaLN_modulation.1": (2 * H, H),
    }[tail]


def all_bfl_modules(depth=2, depth_single=2) -> list[str]:
    out = []
    for i in range(depth):
        out += [f"double_blocks.{i}.{s}_{n}" for s in ("img", "txt")
                for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin")]
    for i in range(depth_single):
        out += [f"single_blocks.{i}.{n}" for n in ("linear1", "linear2", "modulation.lin")]
    return out + ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                  "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
                  "final_layer.linear", "final_layer.adaLN_modulation.1"]


def diffusers_table(depth=2, depth_single=2) -> dict[str, tuple[str, int, int | None, bool]]:
    """diffusers Linear -> (BFL module, row offset, rows or None = all, swap (shift, scale) halves)."""
    t = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        t[f"{d}.attn.to_q"] = (f"{b}.img_attn.qkv", 0, H, False)
        t[f"{d}.attn.to_k"] = (f"{b}.img_attn.qkv", H, H, False)
        t[f"{d}.attn.to_v"] = (f"{b}.img_attn.qkv", 2 * H, H, False)
        t[f"{d}.attn.add_q_proj"] = (f"{b}.txt_attn.qkv", 0, H, False)
        t[f"{d}.attn.add_k_proj"] = (f"{b}.txt_attn.qkv", H, H, False)
        t[f"{d}.attn.add_v_proj"] = (f"{b}.txt_attn.qkv", 2 * H, H, False)
        t[f"{d}.attn.to_out.0"] = (f"{b}.img_attn.proj", 0, None, False)
        t[f"{d}.attn.to_add_out"] = (f"{b}.txt_attn.proj", 0, None, False)
        t[f"{d}.norm1.linear"] = (f"{b}.img_mod.lin", 0, None, False)
        t[f"{d}.norm1_context.linear"] = (f"{b}.txt_mod.lin", 0, None, False)
        t[f"{d}.ff.net.0.proj"] = (f"{b}.img_mlp.0", 0, None, False)
        t[f"{d}.ff.net.2"] = (f"{b}.img_mlp.2", 0, None, False)
        t[f"{d}.ff_context.net.0.proj"] = (f"{b}.txt_mlp.0", 0, None, False)
        t[f"{d}.ff_context.net.2"] = (f"{b}.txt_mlp.2", 0, None, False)
    for i in range(depth_single):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        t[f"{s}.attn.to_q"] = (f"{b}.linear1", 0, H, False)
        t[f"{s}.attn.to_k"] = (f"{b}.linear1", H, H, False)
        t[f"{s}.attn.to_v"] = (f"{b}.linear1", 2 * H, H, False)
        t[f"{s}.proj_mlp"] = (f"{b}.linear1", 3 * H, MLP, False)
        t[f"{s}.proj_out"] = (f"{b}.linear2", 0, None, False)
        t[f"{s}.norm.linear"] = (f"{b}.modulation.lin", 0, None, False)
    t.update({
        "x_embedder": ("img_in", 0, None, False), "context_embedder": ("txt_in", 0, None, False),
        "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, None, False),
        "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, None, False),
        "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0, None, False),
        "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0, None, False),
        "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, None, False),
        "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0, None, False),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, None, True),
        "proj_out": ("final_layer.linear", 0, None, False),
    })
    return t


def xlabs_table(depth=2, depth_single=2) -> dict[str, tuple[str, int, int | None, bool]]:
    t = {}
    for i in range(depth):
        b = f"double_blocks.{i}"
        t[f"{b}.processor.qkv_lora1"] = (f"{b}.img_attn.qkv", 0, None, False)
        t[f"{b}.processor.proj_lora1"] = (f"{b}.img_attn.proj", 0, None, False)
        t[f"{b}.processor.qkv_lora2"] = (f"{b}.txt_attn.qkv", 0, None, False)
        t[f"{b}.processor.proj_lora2"] = (f"{b}.txt_attn.proj", 0, None, False)
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        t[f"{b}.processor.qkv_lora"] = (f"{b}.linear1", 0, 3 * H, False)
        t[f"{b}.processor.proj_lora"] = (f"{b}.linear2", 0, None, False)
    return t


BFL_TABLE = {m: (m, 0, None, False) for m in all_bfl_modules()}
TABLES = {"kohya": BFL_TABLE, "bfl": BFL_TABLE, "diffusers": diffusers_table(), "onetrainer": diffusers_table(),
          "xlabs": xlabs_table()}
HAS_ALPHA = {"kohya": True, "bfl": True, "diffusers": True, "onetrainer": True, "xlabs": False}


# ----------------------------------------------------------------------------- ground truth + writers

@dataclass
class Piece:
    src: str              # module name in the source format's naming
    bfl: str
    offset: int
    rows: int
    down: torch.Tensor    # as stored
    up_bfl: torch.Tensor  # BFL row order, as stored (rounded to the storage dtype)
    alpha: torch.Tensor | None
    swap: bool


def make_pieces(fmt: str, names: list[str], ranks: list[int], seed: int, dtype=torch.float32,
                alpha: bool | None = None) -> list[Piece]:
    g = torch.Generator().manual_seed(seed)
    alpha = HAS_ALPHA[fmt] if alpha is None else alpha
    out = []
    for name, r in zip(names, ranks):
        bfl, off, rows, swap = TABLES[fmt][name]
        o, i = bfl_shape(bfl)
        rows = o if rows is None else rows
        down = (torch.randn(r, i, generator=g) / i ** 0.5).to(dtype)
        up = torch.randn(rows, r, generator=g).to(dtype)
        a = torch.tensor(float(torch.randint(1, 17, (1,), generator=g)), dtype=torch.float32) if alpha else None
        out.append(Piece(name, bfl, off, rows, down, up, a, swap))
    return out


def expected(pieces: list[Piece]) -> dict[str, torch.Tensor]:
    e = {}
    for p in pieces:
        d = e.setdefault(p.bfl, torch.zeros(bfl_shape(p.bfl), dtype=torch.float64))
        s = float(p.alpha) / p.down.shape[0] if p.alpha is not None else 1.0
        d[p.offset:p.offset + p.rows] += s * (p.up_bfl.double() @ p.down.double())
    return e


def _swap(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


SUFFIXES = {"A/B": (".lora_A.weight", ".lora_B.weight"), "down/up": (".lora_down.weight", ".lora_up.weight"),
            "A/B.default": (".lora_A.default.weight", ".lora_B.default.weight"),
            "lora.down/up": (".lora.down.weight", ".lora.up.weight"), "xlabs": (".down.weight", ".up.weight")}


def encode(fmt: str, pieces: list[Piece], prefix: str = "", suffix: str = "A/B") -> dict[str, torch.Tensor]:
    sd = {}
    for p in pieces:
        up = _swap(p.up_bfl) if p.swap else p.up_bfl   # diffusers stores (scale, shift)
        if fmt == "kohya":
            base, (dn, un) = "lora_unet_" + p.src.replace(".", "_"), SUFFIXES["down/up"]
        elif fmt == "onetrainer":
            base, (dn, un) = "lora_transformer_" + p.src.replace(".", "_"), SUFFIXES["down/up"]
        elif fmt == "xlabs":
            base, (dn, un) = prefix + p.src, SUFFIXES["xlabs"]
        else:  # diffusers, bfl
            base, (dn, un) = prefix + p.src, SUFFIXES[suffix]
        sd[base + dn] = p.down.contiguous()
        sd[base + un] = up.contiguous()
        if p.alpha is not None:
            sd[base + ".alpha"] = p.alpha
    return sd


def assert_matches(parsed: ParsedLoRA, exp: dict[str, torch.Tensor]):
    assert set(parsed.modules) == set(exp), (parsed.modules, sorted(exp))
    for m, e in exp.items():
        got = parsed.dense_delta(m, *bfl_shape(m))
        assert got.dtype == torch.float32
        err = (got.double() - e).abs().max().item()
        assert err <= 1e-6 * max(e.abs().max().item(), 1e-12), (m, err)


# Ground truths per format: several modules incl. fused qkv, linear1 with mlp rows, a mod.lin,
# final_layer.adaLN_modulation.1 (norm_out in diffusers naming) and globals.
GT_NAMES = {
    "kohya": ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_mod.lin",
              "double_blocks.1.img_mlp.0", "double_blocks.0.txt_mlp.2", "double_blocks.0.txt_attn.proj",
              "single_blocks.0.linear1", "single_blocks.1.linear2", "single_blocks.1.modulation.lin",
              "final_layer.adaLN_modulation.1", "final_layer.linear", "img_in", "txt_in", "time_in.in_layer",
              "vector_in.in_layer", "guidance_in.out_layer"],
    "diffusers": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                  "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_v_proj",
                  "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_add_out",
                  "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                  "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
                  "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                  "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                  "single_transformer_blocks.1.proj_out", "single_transformer_blocks.1.norm.linear",
                  "norm_out.linear", "proj_out", "x_embedder", "context_embedder",
                  "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                  "time_text_embed.guidance_embedder.linear_1"],
    "xlabs": list(xlabs_table()),
}
GT_NAMES["bfl"] = GT_NAMES["kohya"]
GT_NAMES["onetrainer"] = GT_NAMES["diffusers"]


def ground_truth(fmt: str, seed: int = 0, dtype=torch.float32, alpha=None):
    names = GT_NAMES[fmt]
    ranks = [1 + (i * 3) % 8 for i in range(len(names))]
    return make_pieces(fmt, names, ranks, seed, dtype, alpha)


# ----------------------------------------------------------------------------- per-format round trips

CASES = [
    # (id, format, prefix, suffix, detected format label)
    ("diffusers", "diffusers", "transformer.", "A/B", "diffusers"),
    ("diffusers-noprefix", "diffusers", "", "A/B", "diffusers"),
    ("diffusers-peft", "diffusers", "base_model.model.", "A/B", "diffusers"),
    ("diffusers-peft-adapter", "diffusers", "transformer.", "A/B.default", "diffusers"),
    ("diffusers-old", "diffusers", "transformer.", "lora.down/up", "diffusers"),
    ("kohya", "kohya", "", "down/up", "kohya"),
    ("bfl-comfy", "bfl", "diffusion_model.", "A/B", "bfl"),
    ("bfl-comfy-downup", "bfl", "diffusion_model.", "down/up", "bfl"),
    ("bfl-noprefix", "bfl", "", "A/B", "bfl"),
    ("bfl-full-checkpoint-prefix", "bfl", "model.diffusion_model.", "down/up", "bfl"),
    ("bfl-fal", "bfl", "base_model.model.", "A/B", "bfl"),
    ("xlabs", "xlabs", "", "xlabs", "xlabs"),
    ("xlabs-prefixed", "xlabs", "diffusion_model.", "xlabs", "xlabs"),
    ("onetrainer", "onetrainer", "", "down/up", "onetrainer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_format_round_trip(case, tmp_path):
    _, fmt, prefix, suffix, label = case
    pieces = ground_truth(fmt, seed=sum(map(ord, case[0])))
    path = tmp_path / "lora.safetensors"
    save_file(encode(fmt, pieces, prefix, suffix), str(path))
    parsed = load_lora(str(path), DIMS)
    assert parsed.name == "lora.safetensors"
    assert parsed.format == label
    assert parsed.unmatched == [] and parsed.ignored == []
    assert parsed.max_rank == max(p.down.shape[0] for p in pieces)
    assert_matches(parsed, expected(pieces))
    for t in parsed.targets:
        assert isinstance(t, LoRATarget)
        assert t.rows == t.up.shape[0] and t.up.shape[1] == t.down.shape[0]
        assert t.offset + t.rows <= bfl_shape(t.module)[0] and t.down.shape[1] == bfl_shape(t.module)[1]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_bf16_and_no_alpha(fmt, tmp_path):
    pieces = ground_truth(fmt, seed=7, dtype=torch.bfloat16, alpha=False)
    path = tmp_path / "lora.safetensors"
    save_file(encode(fmt, pieces, "transformer." if fmt == "diffusers" else ""), str(path))
    parsed = load_lora(str(path), DIMS)
    assert all(t.scale == 1.0 for t in parsed.targets)
    assert_matches(parsed, expected(pieces))


def test_target_layout():
    """A fused (kohya) qkv LoRA is one target over all rows; diffusers q/k/v are three at 0/h/2h."""
    k = parse_lora(encode("kohya", make_pieces("kohya", ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"],
                                               [4, 4], 1)), "k", DIMS)
    assert [(t.module, t.offset, t.rows) for t in k.targets] == [
        ("double_blocks.0.img_attn.qkv", 0, 3 * H), ("single_blocks.0.linear1", 0, 3 * H + MLP)]
    names = [f"transformer_blocks.1.attn.to_{n}" for n in "qkv"] + \
        [f"single_transformer_blocks.0.attn.to_{n}" for n in "qkv"] + ["single_transformer_blocks.0.proj_mlp"]
    d = parse_lora(encode("diffusers", make_pieces("diffusers", names, [2] * 7, 2), "transformer."), "d", DIMS)
    assert [(t.module, t.offset, t.rows) for t in d.targets] == [
        ("double_blocks.1.img_attn.qkv", 0, H), ("double_blocks.1.img_attn.qkv", H, H),
        ("double_blocks.1.img_attn.qkv", 2 * H, H),
        ("single_blocks.0.linear1", 0, H), ("single_blocks.0.linear1", H, H), ("single_blocks.0.linear1", 2 * H, H),
        ("single_blocks.0.linear1", 3 * H, MLP)]


def test_fused_vs_split_same_delta(tmp_path):
    """kohya fused qkv/linear1 and the diffusers split of the same LoRA give the same dense delta, both ways."""
    g = torch.Generator().manual_seed(3)
    # fused -> split: down copied to each split, up split by rows (as diffusers' converter does)
    r = 4
    fused = {"double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_" + n for n in "qkv"],
             "single_blocks.1.linear1": ["single_transformer_blocks.1.attn.to_" + n for n in "qkv"]
             + ["single_transformer_blocks.1.proj_mlp"]}
    sizes = {"double_blocks.0.img_attn.qkv": [H] * 3, "single_blocks.1.linear1": [H] * 3 + [MLP]}
    kohya, diff = {}, {}
    for m, parts in fused.items():
        down, up = torch.randn(r, H, generator=g), torch.randn(sum(sizes[m]), r, generator=g)
        k = "lora_unet_" + m.replace(".", "_")
        kohya.update({k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(2.0)})
        for name, u in zip(parts, up.split(sizes[m])):
            diff[f"transformer.{name}.lora_A.weight"] = down.clone()
            diff[f"transformer.{name}.lora_B.weight"] = u.contiguous()
            diff[f"transformer.{name}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(diff, str(tmp_path / "d.safetensors"))
    pk, pd = load_lora(str(tmp_path / "k.safetensors"), DIMS), load_lora(str(tmp_path / "d.safetensors"), DIMS)
    assert len(pk.targets) == 2 and len(pd.targets) == 7
    for m in fused:
        a, b = pk.dense_delta(m, *bfl_shape(m)), pd.dense_delta(m, *bfl_shape(m))
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()

    # split -> fused: three independent rank-r LoRAs == one rank-3r LoRA with block-diagonal up
    names = ["transformer_blocks.1.attn.add_" + n + "_proj" for n in "qkv"]
    pieces = make_pieces("diffusers", names, [r] * 3, 5, alpha=False)
    split = parse_lora(encode("diffusers", pieces, "transformer."), "split", DIMS)
    down = torch.cat([p.down for p in pieces])
    up = torch.block_diag(*[p.up_bfl for p in pieces])
    k = "lora_unet_double_blocks_1_txt_attn_qkv"
    one = parse_lora({k + ".lora_down.weight": down, k + ".lora_up.weight": up}, "fused", DIMS)
    m = "double_blocks.1.txt_attn.qkv"
    a, b = split.dense_delta(m, 3 * H, H), one.dense_delta(m, 3 * H, H)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert_matches(split, expected(pieces))


def test_mixed_file_and_text_encoder_keys(caplog):
    pieces_k = make_pieces("kohya", ["double_blocks.0.img_attn.proj"], [2], 11)
    pieces_d = make_pieces("diffusers", ["transformer_blocks.0.attn.to_out.0"], [3], 12)
    sd = {**encode("kohya", pieces_k), **encode("diffusers", pieces_d, "transformer."),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 8),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 8)}
    with caplog.at_level(logging.WARNING, logger="quantlora"):
        p = parse_lora(sd, "mixed.safetensors", DIMS)
    assert not caplog.records  # ignored keys are not a warning
    assert len(p.ignored) == 5 and all(k.startswith(("lora_te", "text_encoders.")) for k in p.ignored)
    assert p.unmatched == [] and set(p.format.split("+")) == {"kohya", "diffusers"}
    assert_matches(p, expected(pieces_k + pieces_d))  # both LoRAs on the same module add up


def test_peft_metadata_alpha(tmp_path):
    """diffusers' save_lora_weights stores lora_alpha/alpha_pattern in the safetensors metadata."""
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"]
    pieces = make_pieces("diffusers", names, [4, 4], 13, alpha=False)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_k": 2}})}
    save_file(encode("diffusers", pieces, "transformer."), str(tmp_path / "m.safetensors"), metadata=meta)
    p = load_lora(str(tmp_path / "m.safetensors"), DIMS)
    assert [t.scale for t in p.targets] == [2.0, 0.5]


def test_partial_match_warns(caplog):
    pieces = make_pieces("kohya", ["double_blocks.0.img_mod.lin"], [2], 14)
    sd = {**encode("kohya", pieces), "lora_unet_double_blocks_0_img_attn_norm_query_norm.diff": torch.ones(8),
          "something.else": torch.ones(2), "lora_unet_double_blocks_0_img_attn_qkv.diff_b": torch.zeros(3 * H)}
    with caplog.at_level(logging.WARNING, logger="quantlora"):
        p = parse_lora(sd, "partial.safetensors", DIMS)
    assert sorted(p.unmatched) == ["lora_unet_double_blocks_0_img_attn_norm_query_norm.diff", "something.else"]
    assert p.ignored == ["lora_unet_double_blocks_0_img_attn_qkv.diff_b"]  # all-zero bias delta: no effect
    msg = caplog.records[-1].getMessage()
    assert "partial.safetensors" in msg and "2 of 6 keys" in msg and "something.else" in msg
    assert_matches(p, expected(pieces))


# ----------------------------------------------------------------------------- errors

def err(sd, name="bad.safetensors", dims=DIMS) -> str:
    with pytest.raises(QuantLoRAError) as e:
        parse_lora(sd, name, dims)
    assert name in str(e.value)
    return str(e.value)


def test_error_no_flux_keys():
    sd = {f"some.module{i}.weight": torch.zeros(2, 2) for i in range(5)}
    msg = err(sd)
    assert "5 keys" in msg and "'some.module0.weight'" in msg and "'some.module2.weight'" in msg
    assert "'some.module3.weight'" not in msg and "lora_unet_double_blocks" in msg


def test_error_text_encoder_only():
    msg = err({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 2)})
    assert "text-encoder" in msg and "LoraLoader" in msg


def test_error_lycoris():
    msg = err({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(4, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.zeros(48, 16)})
    assert "LyCORIS" in msg


@pytest.mark.parametrize("key,arch", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", "Stable Diffusion 1"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight", "Stable Diffusion 1"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", "Stable Diffusion 1"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "SD3"),
    ("diffusion_model.joint_blocks.3.context_block.attn.qkv.lora_A.weight", "SD3"),
    ("diffusion_model.double_stream_modulation_img.lin.lora_A.weight", "FLUX.2"),
    ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight", "FLUX.2"),
    ("diffusion_model.double_blocks.0.img_mlp.fc1.lora_A.weight", "HunyuanVideo"),
    ("transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight", "Qwen-Image"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
    ("diffusion_model.layers.0.attention.qkv.lora_A.weight", "Z-Image"),
])
def test_error_foreign_architecture(key, arch):
    sd = {key: torch.zeros(4, 64), key.replace("down", "up").replace("lora_A", "lora_B"): torch.zeros(64, 4)}
    # a few Flux-looking keys do not hide the foreign ones
    sd.update(encode("kohya", make_pieces("kohya", ["double_blocks.0.img_attn.proj"], [2], 0)))
    msg = err(sd)
    assert arch in msg and "FLUX.1" in msg


def test_error_sdxl_named():
    msg = err({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(4, 640),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)})
    assert "SDXL" in msg


@pytest.mark.parametrize("fmt,name,kind,idx,n", [
    ("kohya", "double_blocks.1.img_attn.qkv", "double", 5, 2),
    ("diffusers", "single_transformer_blocks.1.attn.to_k", "single", 37, 2),
])
def test_error_block_beyond_depth(fmt, name, kind, idx, n):
    pieces = make_pieces(fmt, [name], [2], 0)
    sd = {k.replace(".1.", f".{idx}.").replace("_1_", f"_{idx}_"): v for k, v in encode(fmt, pieces, "transformer.").items()}
    msg = err(sd)
    assert f"{kind} block {idx}" in msg and f"{n} {kind} blocks" in msg


def test_error_shape_mismatch():
    big = FluxDims(hidden=128, mlp_hidden=512, depth=2, depth_single=2)
    k = "lora_unet_double_blocks_0_img_attn_qkv"
    msg = err({k + ".lora_down.weight": torch.zeros(4, 128), k + ".lora_up.weight": torch.zeros(384, 4)})
    assert "384x128" in msg and "192x64" in msg and "double_blocks.0.img_attn.qkv" in msg
    # split q of a bigger model: rows 0..64 of the fused layer
    msg = err({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)})
    assert "128x64" in msg and "64x64" in msg
    # the same LoRA is fine on the bigger model
    p = parse_lora({k + ".lora_down.weight": torch.zeros(4, 128), k + ".lora_up.weight": torch.zeros(384, 4)}, "b", big)
    assert p.targets[0].rows == 384


def test_error_rank_mismatch():
    k = "diffusion_model.double_blocks.0.img_attn.proj"
    msg = err({k + ".lora_A.weight": torch.zeros(4, 64), k + ".lora_B.weight": torch.zeros(64, 8)})
    assert "rank 4" in msg and "rank 8" in msg and "lora_A" in msg


def test_error_down_without_up():
    k = "lora_unet_single_blocks_0_linear2"
    msg = err({k + ".lora_down.weight": torch.zeros(4, H + MLP), k + ".alpha": torch.tensor(4.0)})
    assert k + ".lora_down.weight" in msg and "no matching up" in msg
    msg = err({"transformer.proj_out.lora_B.weight": torch.zeros(16, 4)})
    assert "no matching down" in msg


def test_error_bad_alpha_and_dims():
    k = "lora_unet_double_blocks_0_img_attn_proj"
    ok = {k + ".lora_down.weight": torch.zeros(4, 64), k + ".lora_up.weight": torch.zeros(64, 4)}
    assert "alpha" in err({**ok, k + ".alpha": torch.zeros(3)})
    assert "2-D" in err({**ok, k + ".lora_down.weight": torch.zeros(4, 64, 3)})
    assert "floating point" in err({**ok, k + ".lora_up.weight": torch.zeros(64, 4, dtype=torch.int32)})
    assert "no tensors" in err({})
    assert "NaN" in err({**ok, k + ".lora_up.weight": torch.full((64, 4), float("nan"))})


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), "both infinities", "nan in one element"])
def test_error_non_finite_weights(bad):
    """The parser's finiteness check (one sum per matrix) catches every kind of non-finite value,
    including +inf and -inf together, whose sum is NaN, and a single NaN in a large matrix."""
    k = "lora_unet_double_blocks_0_img_attn_proj"
    up = torch.zeros(64, 4, dtype=torch.bfloat16)
    if bad == "both infinities":
        up[0, 0], up[5, 1] = float("inf"), float("-inf")
    elif bad == "nan in one element":
        up[63, 3] = float("nan")
    else:
        up[7, 2] = bad
    ok = {k + ".lora_down.weight": torch.zeros(4, 64), k + ".alpha": torch.tensor(4.0)}
    assert "NaN or infinite" in err({**ok, k + ".lora_up.weight": up})


def test_finite_weights_whose_sum_overflows_parse():
    """Large finite values whose float32 sum overflows are still finite: the exact check decides."""
    k = "lora_unet_double_blocks_0_img_attn_proj"
    big = torch.full((64, 4), 3.0e38)
    sd = {k + ".lora_down.weight": torch.ones(4, 64), k + ".lora_up.weight": big, k + ".alpha": torch.tensor(4.0)}
    assert not torch.isfinite(big.sum()) and len(parse_lora(sd, "big.safetensors", DIMS).targets) == 1


@pytest.mark.parametrize("fmt", sorted(TABLES))
def test_every_module_of_every_format(fmt):
    """Each name in the test-side tables parses (none is mistaken for another architecture)."""
    names = sorted(TABLES[fmt])
    pieces = make_pieces(fmt, names, [1] * len(names), 21)
    prefix, suffix = {"diffusers": ("transformer.", "A/B"), "bfl": ("diffusion_model.", "A/B")}.get(fmt, ("", "down/up"))
    p = parse_lora(encode(fmt, pieces, prefix, suffix), "all", DIMS)
    assert p.format == fmt and not p.unmatched and len(p.targets) == len(names)
    assert_matches(p, expected(pieces))


def test_load_lora_refuses_pickle_and_names_file(tmp_path):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(QuantLoRAError, match="evil.ckpt.*pickle"):
        load_lora(str(p), DIMS)
    p = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(QuantLoRAError, match="foreign.safetensors.*SD3"):
        load_lora(str(p), DIMS)


def test_dense_delta_checks_size():
    p = parse_lora(encode("kohya", make_pieces("kohya", ["double_blocks.0.img_attn.qkv"], [2], 0)), "x", DIMS)
    with pytest.raises(QuantLoRAError, match="does not fit"):
        p.dense_delta("double_blocks.0.img_attn.qkv", 2 * H, H)
    assert p.dense_delta("double_blocks.1.img_attn.qkv", 3 * H, H).abs().max() == 0


# ----------------------------------------------------------------------------- property-based

FMT_PREFIX = {"diffusers": ("transformer.", "A/B"), "kohya": ("", "down/up"), "bfl": ("diffusion_model.", "A/B"),
              "xlabs": ("", "xlabs"), "onetrainer": ("", "down/up")}
HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYP
@given(fmt=st.sampled_from(sorted(FMT_PREFIX)), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_round_trip(fmt, data, seed):
    names = data.draw(st.lists(st.sampled_from(sorted(TABLES[fmt])), min_size=1, max_size=6, unique=True))
    ranks = data.draw(st.lists(st.integers(1, 6), min_size=len(names), max_size=len(names)))
    alpha = data.draw(st.booleans()) and HAS_ALPHA[fmt]
    pieces = make_pieces(fmt, names, ranks, seed, alpha=alpha)
    prefix, suffix = FMT_PREFIX[fmt]
    p = parse_lora(encode(fmt, pieces, prefix, suffix), "gen", DIMS)
    assert p.format == fmt and not p.unmatched
    assert_matches(p, expected(pieces))


def _valid_keys():
    mods = ([("lora_unet_" + m.replace(".", "_"), "kohya") for m in all_bfl_modules(3, 3)]
            + [("transformer." + m, "diffusers") for m in diffusers_table(3, 3)]
            + [("diffusion_model." + m, "bfl") for m in all_bfl_modules(3, 3)]
            + [(m, "xlabs") for m in xlabs_table(3, 3)]
            + [("lora_transformer_" + m.replace(".", "_"), "onetrainer") for m in diffusers_table(3, 3)])
    ends = [".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha", ".down.weight",
            ".up.weight", ".dora_scale", ".diff", ".diff_b", ".lora_A.default.weight", ".lora.up.weight", ".lokr_w1"]
    return st.builds(lambda m, e: m[0] + e, st.sampled_from(mods), st.sampled_from(ends))


FOREIGN_KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_joint_blocks_1_x_block_attn_qkv.alpha",
                "diffusion_model.double_stream_modulation_txt.lin.lora_B.weight", "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
                "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                "diffusion_model.blocks.3.cross_attn.k.lora_A.weight"]
SHAPES = [(), (1,), (3,), (2, 64), (64, 2), (4, 64), (192, 4), (448, 4), (4, 320), (128, 2), (384, 3), (0, 64),
          (64, 0), (2, 64, 1, 1), (2, 3, 4), (16, 2), (2, 256), (256, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool, torch.float8_e4m3fn]


@st.composite
def _tensor(draw):
    shape, dtype = draw(st.sampled_from(SHAPES)), draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return torch.full(shape, fill).to(dtype)


@st.composite
def _mutated_lora(draw):
    """A valid LoRA in some format, then keys added (junk, foreign, valid-looking), dropped or given random tensors."""
    fmt = draw(st.sampled_from(sorted(FMT_PREFIX)))
    names = draw(st.lists(st.sampled_from(sorted(TABLES[fmt])), min_size=0, max_size=3, unique=True))
    prefix, suffix = FMT_PREFIX[fmt]
    sd = encode(fmt, make_pieces(fmt, names, [2] * len(names), draw(st.integers(0, 99))), prefix, suffix)
    keys = sorted(sd)
    for k in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)) if keys else []:
        if draw(st.booleans()):
            del sd[k]
        else:
            sd[k] = draw(_tensor())
    extra = st.one_of(_valid_keys(), _valid_keys(), st.sampled_from(FOREIGN_KEYS), st.text(alphabet="abc._019AB", max_size=30))
    sd.update(draw(st.dictionaries(extra, _tensor(), max_size=4)))
    return sd


@HYP
@given(_mutated_lora(),
       st.sampled_from([None, {"lora_adapter_metadata": "{not json"},
                        {"lora_adapter_metadata": json.dumps({"lora_alpha": 4, "alpha_pattern": {"(": 1}})}]))
def test_property_only_quantlora_errors(sd, metadata):
    try:
        p = parse_lora(sd, "fuzz.safetensors", DIMS, metadata=metadata)
    except QuantLoRAError as e:
        assert "fuzz.safetensors" in str(e)
        return
    assert p.targets and set(p.unmatched) <= set(sd) and set(p.ignored) <= set(sd)
    for t in p.targets:
        assert t.rows == t.up.shape[0] and t.down.shape[0] == t.up.shape[1] > 0
        out, inp = bfl_shape(t.module)
        if t.module in ("img_in", "txt_in", "vector_in.in_layer"):  # input size not in FluxDims
            inp = t.down.shape[1]
        if t.module == "final_layer.linear":  # output size not in FluxDims
            out = t.rows
        assert t.offset + t.rows <= out and t.down.shape[1] == inp
        p.dense_delta(t.module, out, inp)
