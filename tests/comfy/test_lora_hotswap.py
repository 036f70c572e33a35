"""Layer 2: LoRA hot-swap slots on ComfyUI's Flux, streamed and quantized by the pack, against
references built independently: the LoRA's ground-truth delta merged into the weights by
hand (unquantized base), or added by a plain dense hook on the same quantized layers."""
import contextlib

import pytest
import torch
from safetensors.torch import save_file

import test_lora_formats as formats
from quantlora.errors import QuantLoRAError
from test_lora_formats import GT_NAMES, IN_TXT, IN_VEC, encode, expected, make_pieces
from test_oracle_diffusers import comfy_forward, flux_inputs, rel

# The smallest Flux the running ComfyUI's own loader builds (set by the flux_file fixture): ComfyUI
# v0.33+ builds heads of 128 and derives their count from the width, so hidden 128 is one head;
# 0.3.75 fixes 24 heads of 128 (hidden 3072). The format tests' tables are at hidden 64; the LoRA
# files here are written with the same tables at these widths (_at_model_dims).
H = MLP = CFG = None


def model_cfg() -> dict:
    from quantlora.tools import demo_models as dm

    h = dm.demo_flux_config()["hidden_size"]
    return dict(hidden_size=h, num_heads=h // 128, depth=2, depth_single_blocks=2, context_in_dim=IN_TXT,
                vec_in_dim=IN_VEC, in_channels=16, mlp_ratio=4.0, guidance_embed=True, qkv_bias=True)


FORMAT_FILES = {"diffusers": ("transformer.", "A/B"), "kohya": ("", "down/up"), "bfl": ("diffusion_model.", "A/B"),
                "xlabs": ("", "xlabs"), "onetrainer": ("", "down/up")}
# final_layer.linear is left out: the format tests' tables give it another output width.
NAMES = {f: [n for n in GT_NAMES[f] if n not in ("proj_out", "final_layer.linear")] for f in GT_NAMES}
STRENGTH = 0.8


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    global H, MLP, CFG
    from quantlora.tools import demo_models as dm

    CFG = model_cfg()
    H, MLP = CFG["hidden_size"], int(CFG["hidden_size"] * CFG["mlp_ratio"])
    sd = dm.flux_bfl_state_dict(CFG, seed=21, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("hs") / "flux.safetensors"), sd)


def load(path, quantization="none"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, "fp32")[0].model.diffusion_model


@contextlib.contextmanager
def _at_model_dims():
    """test_lora_formats' shape and split tables at this file's H/MLP while a LoRA is written."""
    saved = formats.H, formats.MLP, formats.TABLES
    formats.H, formats.MLP = H, MLP
    formats.TABLES = dict(saved[2], diffusers=formats.diffusers_table(), onetrainer=formats.diffusers_table(),
                          xlabs=formats.xlabs_table())
    try:
        yield
    finally:
        formats.H, formats.MLP, formats.TABLES = saved


def lora_file(tmp_path, fmt, seed, ranks=None, names=None):
    names = names or NAMES[fmt]
    ranks = ranks or [1 + (i * 3) % 8 for i in range(len(names))]
    with _at_model_dims():
        pieces = make_pieces(fmt, names, ranks, seed)
        prefix, suffix = FORMAT_FILES[fmt]
        path = str(tmp_path / f"{fmt}-{seed}.safetensors")
        save_file(encode(fmt, pieces, prefix=prefix, suffix=suffix if fmt not in ("kohya", "onetrainer", "xlabs") else "A/B"), path)
        return path, expected(pieces)


def slots_on(dm, max_rank=16, targets="all"):
    from quantlora.lora.hotswap import HotswapState, attach_slots

    return HotswapState(attach_slots(dm, max_rank, targets, torch.float32, H, MLP))


def activate(state, dm, path, strength=STRENGTH):
    from quantlora.nodes.runtime import dims_of
    from quantlora.lora.formats import load_lora

    state.activate(((path, strength),), [(load_lora(path, dims_of(dm)), strength)])


def merge_by_hand(dm, deltas, strength=STRENGTH):
    with torch.no_grad():
        for module, d in deltas.items():
            dm.get_submodule(module).weight += strength * d.to(torch.float32)
    return dm


def outputs(dm, seeds=(1, 2)):
    with torch.no_grad():
        return [comfy_forward(dm, flux_inputs(CFG, s)) for s in seeds]


@pytest.mark.parametrize("fmt", list(FORMAT_FILES))
def test_each_format_equals_hand_merged(flux_file, tmp_path, fmt):
    path, deltas = lora_file(tmp_path, fmt, seed=3)
    dm = load(flux_file)
    state = slots_on(dm)
    activate(state, dm, path)
    ref = merge_by_hand(load(flux_file), deltas)
    for got, want in zip(outputs(dm), outputs(ref)):
        assert rel(got, want) < 1e-5  # fp32: only summation order differs


def dense_hook_reference(dm, deltas, strength=STRENGTH):
    """Quantized base + x @ delta^T through a plain forward hook: the merge, without touching
    the quantized weights."""
    for module, d in deltas.items():
        w = (strength * d).to(torch.float32)
        dm.get_submodule(module).register_forward_hook(lambda m, inp, out, w=w: out + torch.nn.functional.linear(inp[0], w))
    return dm


CPU_BACKENDS = ["bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "torchao-fp8-weight-only", "quanto-int8", "quanto-fp8"]


@pytest.mark.parametrize("quantization", CPU_BACKENDS)
def test_quantized_base_lora_and_base_never_degraded(flux_file, tmp_path, quantization):
    path_a, deltas_a = lora_file(tmp_path, "kohya", seed=4)
    path_b, _ = lora_file(tmp_path, "diffusers", seed=5)
    block_deltas = {m: d for m, d in deltas_a.items() if m.startswith(("double_blocks", "single_blocks"))}
    fresh = outputs(load(flux_file, quantization))
    dm = load(flux_file, quantization)
    state = slots_on(dm, targets="blocks")
    base_with_slots = outputs(dm)
    for a, b in zip(base_with_slots, fresh):
        assert torch.equal(a, b), "idle slots must add exactly zero"
    # kohya LoRA restricted to the blocks (the slot target set here)
    from quantlora.lora.formats import load_lora
    from quantlora.nodes.runtime import dims_of

    lora_a = load_lora(path_a, dims_of(dm))
    lora_a.targets = [t for t in lora_a.targets if t.module in block_deltas]
    lora_b = load_lora(path_b, dims_of(dm))
    lora_b.targets = [t for t in lora_b.targets if t.module.startswith(("double_blocks", "single_blocks"))]
    state.activate(("a",), [(lora_a, STRENGTH)])
    got = outputs(dm)
    ref = outputs(dense_hook_reference(load(flux_file, quantization), block_deltas))
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-4, quantization
    # A -> B -> A -> none: the bare base is bit-identical to a fresh load
    state.activate(("b",), [(lora_b, 1.0)])
    state.activate(("a",), [(lora_a, STRENGTH)])
    for g, r in zip(outputs(dm), got):
        assert torch.equal(g, r)
    state.activate((), [])
    for a, b in zip(outputs(dm), fresh):
        assert torch.equal(a, b), f"{quantization}: base changed after swaps"


def test_two_loras_at_once_and_strengths(flux_file, tmp_path):
    path_a, deltas_a = lora_file(tmp_path, "bfl", seed=6)
    path_b, deltas_b = lora_file(tmp_path, "xlabs", seed=7)
    from quantlora.lora.formats import load_lora
    from quantlora.nodes.runtime import dims_of

    dm = load(flux_file)
    state = slots_on(dm, max_rank=16)
    d = dims_of(dm)
    state.activate(("ab",), [(load_lora(path_a, d), 0.5), (load_lora(path_b, d), -1.25)])
    ref = load(flux_file)
    merge_by_hand(ref, deltas_a, 0.5)
    merge_by_hand(ref, deltas_b, -1.25)
    for g, r in zip(outputs(dm), outputs(ref)):
        assert rel(g, r) < 1e-5


def test_rank_above_max_rank_names_value_to_set(flux_file, tmp_path):
    path, _ = lora_file(tmp_path, "kohya", seed=8, ranks=[24] * len(NAMES["kohya"]))
    dm = load(flux_file)
    state = slots_on(dm, max_rank=16)
    with pytest.raises(QuantLoRAError) as e:
        activate(state, dm, path)
    assert "max_rank=16" in str(e.value) and "Set max_rank to 32" in str(e.value)
    assert state.active_key == ()  # nothing half-written


def test_lora_on_layers_without_slots(flux_file, tmp_path):
    path, _ = lora_file(tmp_path, "kohya", seed=9)  # includes embedders
    dm = load(flux_file)
    state = slots_on(dm, targets="blocks")
    with pytest.raises(QuantLoRAError, match="lora_max_rank above 0, set the loader's lora_targets to 'all'; with lora_max_rank 0, set targets to 'all' on the first LoRAHotswap"):
        activate(state, dm, path)


@pytest.mark.slow
def test_compiled_swaps_never_recompile(flux_file, tmp_path):
    import torch._dynamo
    from quantlora.speed.compile import compile_blocks

    paths = {k: lora_file(tmp_path, f, seed=s)[0] for k, f, s in (("A", "kohya", 10), ("B", "diffusers", 11))}
    eager, compiled = load(flux_file), load(flux_file)
    se, sc = slots_on(eager), slots_on(compiled)
    compile_blocks(compiled)
    activate(sc, compiled, paths["A"])
    outputs(compiled, seeds=(1,))  # compiles here
    torch._dynamo.config.error_on_recompile = True
    try:
        for key, strength in (("B", 1.0), ("A", STRENGTH), ("A", -0.3), (None, 0), ("B", 0.5)):
            for state, dm in ((se, eager), (sc, compiled)):
                if key is None:
                    state.activate((), [])
                else:
                    activate(state, dm, paths[key], strength)
            got, want = outputs(compiled, seeds=(1,))[0], outputs(eager, seeds=(1,))[0]
            assert rel(got, want) < 1e-5, (key, strength)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_shared_layout_fits_fused_rank_and_counts_split_qkv(flux_file, tmp_path):
    from quantlora.lora.hotswap import HotswapState, attach_slots

    fused, deltas = lora_file(tmp_path, "kohya", seed=12, ranks=[8] * len(NAMES["kohya"]))
    split, _ = lora_file(tmp_path, "diffusers", seed=13, ranks=[8] * len(NAMES["diffusers"]))
    dm = load(flux_file)
    state = HotswapState(attach_slots(dm, 8, "all", torch.float32, H, MLP, layout="shared"))
    assert dm.double_blocks[0].img_attn.qkv.pool == 8
    activate(state, dm, fused)  # fused rank 8 fits a shared pool of 8
    ref = merge_by_hand(load(flux_file), deltas)
    for g, r in zip(outputs(dm), outputs(ref)):
        assert rel(g, r) < 1e-5
    with pytest.raises(QuantLoRAError, match=r"need 16 rank rows on double_blocks.0.img_attn.qkv.*layout shared.*Set max_rank to 16"):
        activate(state, dm, split)  # separate q and k LoRAs of rank 8 already need 16 rows of the fused qkv
