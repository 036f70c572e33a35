"""Layers 1-2: fp8 weight storage with a per-layer upcast (quant/fp8_cast.py, FP8LayerwiseCast).

Bounds used below (stated, then measured in the assertions):
- one cast layer: e4m3fn keeps 3 mantissa bits, so each weight is off by at most 2^-4 of itself
  (round to nearest); a layer's output is off by well under that in norm: < 4% (e4m3fn), < 8% (e5m2).
- the whole tiny Flux forward (fp32 compute): < 2% (e4m3fn), < 4% (e5m2) relative L2 error
  against the uncast model.
- ComfyUI's UNETLoader Flux (hidden 3072, random weights, bf16 compute): < 10% (measured 7.3%:
  random weights at that width put most of the output through the cast blocks). The same width is
  the smallest Flux ComfyUI 0.3.75 loads, so there the whole-model bounds are < 10% (e4m3fn,
  measured 7-8%) and < 16% (e5m2, measured 11-12%).
- against the uncast model whose weights were rounded to fp8 by hand the cast model is exact up
  to summation order (< 1e-5 fp32; measured 0 in bf16): the upcast path is nothing but
  "fp8 storage, compute dtype math".
"""
import copy
import re
import time

import pytest
import torch
from torch import nn

from quantlora.errors import QuantLoRAError
from test_oracle_diffusers import comfy_forward, flux_inputs, rel

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
BOUND_MODEL_NARROW = {"float8_e4m3fn": 0.02, "float8_e5m2": 0.04}
BOUND_MODEL_WIDE = {"float8_e4m3fn": 0.10, "float8_e5m2": 0.16}  # hidden 3072 (ComfyUI 0.3.75's smallest Flux)
BOUND_LAYER = {"float8_e4m3fn": 0.04, "float8_e5m2": 0.08}


# ---------------- layer 1: plain torch trees ----------------
class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2)])
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.final_layer = nn.Linear(16, 4)

    def forward(self, x):
        h = self.img_in(x)
        for b in self.blocks:
            h = h + b(h)
        h = self.conv(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.final_layer(h)


def test_to_fp8_saturates_and_rounds():
    from quantlora.quant.fp8_cast import to_fp8

    t = torch.tensor([1e6, -1e6, 0.3, 1.0])
    for dt in (E4, E5):
        q = to_fp8(t, dt)
        assert q.dtype == dt and torch.isfinite(q.float()).all()
        assert q.float()[0] == torch.finfo(dt).max and q.float()[1] == -torch.finfo(dt).max
        assert q.float()[3] == 1.0


def test_parse_skip():
    from quantlora.quant.fp8_cast import DEFAULT_SKIP, DEFAULT_SKIP_TEXT, LEGACY_DEFAULT_SKIP_TEXT, parse_skip

    assert parse_skip(DEFAULT_SKIP_TEXT) == DEFAULT_SKIP
    assert parse_skip(LEGACY_DEFAULT_SKIP_TEXT) == DEFAULT_SKIP  # workflows saved with the regex default
    assert parse_skip("a\nb, c") == ("a", "b", "c")  # one per line, as the README says; commas too
    assert parse_skip("") == ()
    assert parse_skip(None) == DEFAULT_SKIP
    for bad, named in [("blocks[", "'['"), ("(a|b)", "'('"), ("x{1,3}", "'{'"), ("norm$", "'$'")]:
        with pytest.raises(QuantLoRAError, match=r"skip_pattern: .*uses .*" + re.escape(named) + ".*globs") as e:
            parse_skip(bad)
        assert "Regular expressions are not accepted" in str(e.value)
    with pytest.raises(QuantLoRAError, match="at most 200"):
        parse_skip("a" * 201)
    with pytest.raises(QuantLoRAError, match="65 patterns; at most 64"):
        parse_skip(",".join(["a"] * 65))


def test_glob_names_match_like_the_regex_default():
    """The glob default keeps exactly the layers the old regex default kept, on ComfyUI's Flux names."""
    from quantlora.quant import name_patterns
    from quantlora.quant.fp8_cast import DEFAULT_SKIP

    old = [re.compile(p) for p in (r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(\.|$)", r"norm")]
    names = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "guidance_in.out_layer",
             "final_layer.linear", "final_layer.adaLN_modulation.1", "double_blocks.0.img_mod.lin",
             "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.norm.query_norm", "double_blocks.0.img_mlp.0",
             "single_blocks.3.linear1", "single_blocks.3.norm.key_norm", "single_blocks.3.modulation.lin",
             "double_blocks.1.txt_norm1", "my_img_in_proj"]
    for n in names:
        assert name_patterns.matches(DEFAULT_SKIP, n) == any(p.search(n) for p in old), n
    assert name_patterns.matches(("double_blocks.1.*",), "double_blocks.1.img_attn.qkv")
    assert not name_patterns.matches(("double_blocks.1.*",), "double_blocks.10.img_attn.qkv")
    assert name_patterns.matches(("*.qkv",), "double_blocks.0.img_attn.qkv")
    assert name_patterns.matches(("single_blocks.?.linear?",), "single_blocks.3.linear2")
    assert not name_patterns.matches((), "img_in")


def test_glob_matching_is_bounded():
    """Patterns that make a backtracking engine explode (issue 11: a nested-quantifier regex held the
    server for minutes) take microseconds: the matcher retries only the last star."""
    from quantlora.quant import name_patterns

    for pat, text in [("*a" * 100 + "b", "a" * 200), ("*" * 199 + "z", "x" * 200 + "y"), ("a*" * 100 + "c", "a" * 199 + "b")]:
        t0 = time.perf_counter()
        assert not name_patterns.glob_match(pat, text)
        assert time.perf_counter() - t0 < 0.5, pat[:20]
    t0 = time.perf_counter()
    worst = ",".join(["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b"] * 64)
    pats = name_patterns.parse(worst, "skip_pattern", "")
    assert not name_patterns.matches(pats, ".".join(["a" * 30] * 6))
    assert time.perf_counter() - t0 < 5
    # the reference: fnmatch (a regex translation) on short strings agrees
    import fnmatch
    import random

    rnd = random.Random(0)
    for _ in range(3000):
        pat = "".join(rnd.choice("ab*?.") for _ in range(rnd.randint(0, 7)))
        text = "".join(rnd.choice("ab.") for _ in range(rnd.randint(0, 8)))
        assert name_patterns.glob_match(pat, text) == fnmatch.fnmatchcase(text, pat), (pat, text)


@torch.no_grad()
def test_plain_tree_cast_is_fp8_storage_plus_upcast():
    from quantlora.quant.fp8_cast import apply_fp8_cast, plan

    torch.manual_seed(0)
    tree = Tree().eval()
    x = torch.randn(2, 5, 8)
    cast, kept = plan(tree)
    assert set(kept) == {"img_in", "final_layer"} and "conv" in cast and "blocks.0.0" in cast
    # reference: the same tree with its weights rounded to fp8 by hand, computed in fp32
    ref_tree = copy.deepcopy(tree)
    for n in cast:
        m = ref_tree.get_submodule(n)
        m.weight.copy_(m.weight.to(E4).float())
    report = apply_fp8_cast(tree, E4, torch.float32)
    assert report.layers == len(cast) and not report.already
    assert all(tree.get_submodule(n).weight.dtype == E4 for n in cast)
    assert tree.img_in.weight.dtype == torch.float32 and tree.norm.weight.dtype == torch.float32
    assert torch.allclose(tree(x), ref_tree(x), rtol=0, atol=1e-6)
    assert apply_fp8_cast(tree, E4, torch.float32).already  # idempotent
    with pytest.raises(QuantLoRAError, match="already cast"):
        apply_fp8_cast(tree, E5, torch.float32)


# ---------------- layer 2: ComfyUI Flux (the pack's loader, ComfyUI's UNETLoader) ----------------
@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    sd = dm.flux_bfl_state_dict(tiny_cfg(), seed=4, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("fp8") / "flux.safetensors"), sd)


def load(path, quantization="none", dtype="fp32"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, dtype)[0]


def bound_model() -> dict:
    return BOUND_MODEL_NARROW if tiny_cfg()["hidden_size"] <= 256 else BOUND_MODEL_WIDE


def tiny_cfg():
    """The smallest Flux the running ComfyUI's loader builds: hidden 128 (one head) on v0.33+;
    hidden 3072 (24 heads, one block of each kind) on 0.3.75, which fixes the head count."""
    from quantlora.tools import demo_models as dm

    return dm.demo_flux_config()


@torch.no_grad()
@pytest.mark.parametrize("storage", ["float8_e4m3fn", "float8_e5m2"])
def test_cast_model_close_to_uncast(flux_file, storage):
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.quant.fp8_cast import plan

    model = load(flux_file)
    out, msg = cast_model(model, storage, "auto")
    src, dm = model.model.diffusion_model, out.model.diffusion_model
    names, kept = plan(src)
    assert {"img_in", "txt_in", "final_layer.linear"} <= set(kept) and "double_blocks.0.img_attn.qkv" in names
    assert all(dm.get_submodule(n).weight.dtype == getattr(torch, storage) for n in names)
    assert all(dm.get_submodule(n).comfy_cast_weights for n in names)  # ComfyUI's own per-layer cast
    errs = []
    for seed in (1, 2):
        inp = flux_inputs(tiny_cfg(), seed)
        errs.append(rel(comfy_forward(dm, inp), comfy_forward(src, inp)))
    assert max(errs) < bound_model()[storage], (storage, errs)
    # one layer on its own
    x = torch.randn(4, tiny_cfg()["hidden_size"])
    lin_src, lin = src.double_blocks[0].img_mlp[0], dm.double_blocks[0].img_mlp[0]
    err = rel(lin(x), lin_src(x))
    assert 0 < err < BOUND_LAYER[storage], (storage, err)
    # exact against fp8 rounding done by hand
    ref = copy.deepcopy(src)
    for n in names:
        w = ref.get_submodule(n).weight
        w.copy_(w.to(getattr(torch, storage)).float())
    inp = flux_inputs(tiny_cfg(), 3)
    assert rel(comfy_forward(dm, inp), comfy_forward(ref, inp)) < 1e-5


def test_weight_bytes_halve(flux_file):
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.quant.fp8_cast import plan
    from quantlora.memory.sizes import module_bytes

    model = load(flux_file, dtype="bf16")
    out, _ = cast_model(model, "float8_e4m3fn", "auto")
    src, dm = model.model.diffusion_model, out.model.diffusion_model
    names, _ = plan(src)
    cast_w_before = sum(src.get_submodule(n).weight.numel() * 2 for n in names)
    cast_w_after = sum(dm.get_submodule(n).weight.numel() * dm.get_submodule(n).weight.element_size() for n in names)
    assert cast_w_after * 2 == cast_w_before > 0
    for blocks in ("double_blocks", "single_blocks"):
        b0, b1 = module_bytes(getattr(src, blocks)), module_bytes(getattr(dm, blocks))
        assert 0.5 <= b1 / b0 < 0.52, (blocks, b1 / b0)  # biases and norm scales stay bf16
    assert module_bytes(src) - module_bytes(dm) == cast_w_before // 2
    assert out.model_size() == module_bytes(out.model)  # ComfyUI sees the fp8 size


@torch.no_grad()
def test_input_untouched_idempotent(flux_file):
    from quantlora.nodes.fp8_cast_run import cast_model

    model = load(flux_file)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out, _ = cast_model(model, "float8_e4m3fn", "auto")
    assert out is not model and out.model is not model.model and not out.is_clone(model)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    again, msg = cast_model(out, "float8_e4m3fn", "auto")
    assert again is out and "already" in msg
    with pytest.raises(QuantLoRAError, match="already cast"):
        cast_model(out, "float8_e5m2", "auto")
    with pytest.raises(QuantLoRAError, match="already cast"):
        cast_model(out, "float8_e4m3fn", "auto", "norm")


def test_quantized_model_has_nothing_to_cast(flux_file):
    from quantlora.nodes.fp8_cast_run import cast_model

    model = load(flux_file, "torchao-int8-weight-only")
    out, msg = cast_model(model, "float8_e4m3fn", "auto")
    assert out is model and "nothing to cast" in msg


def make_lora(dm, rank=4, seed=0):
    from quantlora.lora.formats import LoRATarget, ParsedLoRA

    g = torch.Generator().manual_seed(seed)
    targets = []
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1",
                 "single_blocks.0.linear2"):
        lin = dm.get_submodule(name)
        lin = getattr(lin, "base", lin)
        targets.append(LoRATarget(name, 0, lin.out_features, torch.randn(rank, lin.in_features, generator=g) * 0.2,
                                  torch.randn(lin.out_features, rank, generator=g) * 0.2, 0.5))
    return ParsedLoRA("test", "bfl", targets)


@torch.no_grad()
def test_lora_slots_on_fp8_equal_hand_merged(flux_file):
    from quantlora.lora.hotswap import attach_slots
    from quantlora.nodes import runtime
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.quant.fp8_cast import plan

    model = load(flux_file)
    src = model.model.diffusion_model
    names, _ = plan(src)
    # slots attached after the cast without a dtype: bf16, never the fp8 storage dtype
    bare = cast_model(model, "float8_e4m3fn", "auto")[0].model.diffusion_model
    h = tiny_cfg()["hidden_size"]
    slots = attach_slots(bare, 8, "blocks", hidden=h, mlp_hidden=int(h * tiny_cfg()["mlp_ratio"]))
    assert {s.down.dtype for s in slots.values()} == {torch.bfloat16}
    # the LoRAHotswap path: slots in the model's compute dtype (fp32 here)
    dm = cast_model(model, "float8_e4m3fn", "auto")[0].model.diffusion_model
    state = runtime.ensure_slots(dm, 8, "blocks")
    assert {s.down.dtype for s in state.slots.values()} == {torch.float32}
    lora, strength = make_lora(dm), 0.9
    state.activate(("test", strength), [(lora, strength)])
    # hand-merged references: the uncast model, and the uncast model with fp8-rounded weights
    merged, merged8 = copy.deepcopy(src), copy.deepcopy(src)
    for n in names:
        w = merged8.get_submodule(n).weight
        w.copy_(w.to(E4).float())
    for t in lora.targets:
        delta = strength * t.scale * (t.up @ t.down)
        for ref in (merged, merged8):
            ref.get_submodule(t.module).weight[t.offset:t.offset + t.rows] += delta
    inp = flux_inputs(tiny_cfg(), 5)
    out = comfy_forward(dm, inp)
    assert rel(out, comfy_forward(merged8, inp)) < 1e-5
    assert rel(out, comfy_forward(merged, inp)) < bound_model()["float8_e4m3fn"]
    assert rel(out, comfy_forward(src, inp)) > 10 * rel(out, comfy_forward(merged, inp))  # the LoRA is really on
    state.deactivate()
    assert rel(comfy_forward(dm, inp), comfy_forward(src, inp)) < bound_model()["float8_e4m3fn"]


@pytest.mark.slow
@torch.no_grad()
def test_compiled_cast_block_has_no_graph_breaks(flux_file):
    """The upcast is ComfyUI's own op path: a compiled block of the cast model is one graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from quantlora.nodes.fp8_cast_run import cast_model

    dm = cast_model(load(flux_file), "float8_e4m3fn", "auto")[0].model.diffusion_model
    inp = flux_inputs(tiny_cfg(), 6)
    eager = comfy_forward(dm, inp)
    torch._dynamo.reset()
    counters.clear()
    for b in (*dm.double_blocks, *dm.single_blocks):
        b.compile()
    out = comfy_forward(dm, inp)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel(out, eager) < 1e-4
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_unetloader_model_any_architecture(comfy, tmp_path):
    """ComfyUI's own UNETLoader MODEL (its ops, its Flux detection) casts too. Hidden 512 (four heads
    of 128, which v0.33 derives from the width), two blocks of each kind: the blocks outweigh the
    embedders that stay in bf16, as in a real Flux (0.3.75 would need hidden 3072: 20 s more here)."""
    import folder_paths
    import nodes
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.memory.sizes import module_bytes
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.TINY, hidden_size=512, num_heads=4, depth=2, depth_single_blocks=2) if dm.comfy_detects_width() \
        else dm.COMFY_MIN
    sd = dm.flux_bfl_state_dict(cfg, seed=12, dtype=torch.bfloat16)
    dm.write_bfl(str(tmp_path / "quantlora-fp8cast-unet.safetensors"), sd)
    del sd
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    theirs = nodes.UNETLoader().load_unet("quantlora-fp8cast-unet.safetensors", "default")[0]
    src = theirs.model.diffusion_model
    w = src.double_blocks[0].img_attn.qkv.weight
    w_dtype, w0 = w.dtype, w[:4, :4].clone()
    out, msg = cast_model(theirs, "float8_e4m3fn", "auto")
    new = out.model.diffusion_model
    assert new.double_blocks[0].img_attn.qkv.weight.dtype == E4 and new.img_in.weight.dtype == w_dtype
    assert src.double_blocks[0].img_attn.qkv.weight.dtype == w_dtype and torch.equal(w[:4, :4], w0)
    assert module_bytes(new) < 0.6 * module_bytes(src)
    g = torch.Generator().manual_seed(0)
    dt = theirs.model.get_dtype()
    inp = dict(x=torch.randn(1, 16, 8, 8, generator=g).to(dt), t=torch.tensor([0.5]).to(dt),
               context=torch.randn(1, 4, cfg["context_in_dim"], generator=g).to(dt), y=torch.randn(1, 768, generator=g).to(dt),
               guidance=torch.tensor([3.5]).to(dt))
    out8 = comfy_forward(new, inp)
    err = rel(out8, comfy_forward(src, inp))
    # the same model with its weights rounded to fp8 by hand: differs only by bf16 summation order
    names = [n for n, m in new.named_modules() if getattr(m, "_quantlora_fp8_layer", False)]
    saved = {n: src.get_submodule(n).weight.clone() for n in names}
    for n in names:
        src.get_submodule(n).weight.copy_(src.get_submodule(n).weight.to(E4).to(w_dtype))
    err_hand = rel(out8, comfy_forward(src, inp))
    for n in names:
        src.get_submodule(n).weight.copy_(saved[n])
    print(f"UNETLoader model, fp8 vs uncast {err:.4f}, vs hand-rounded {err_hand:.5f}")
    assert err_hand < 0.01, err_hand
    assert err < 0.1, err
