"""Layer 2: the pack's regional compile of ComfyUI's own Flux sends the GELU-fed fp8 Linears through
speed/rowquant.py's one-pass quantization (a double block's two MLP output layers, a single block's
linear2; the MLPs' GELU moves into the kernel), and the compiled model computes what torchao's
eager path on the same fp8 weights does (up to the sigmoid form of the GELU, speed/gelu.py).
This is what breaks if a ComfyUI release reshapes its blocks (the kernel would then silently not be
used, or be used on the wrong input). On a CPU the op runs its torch arithmetic; the fp8 weights are
torchao's Float8Tensor made directly (torchao's config refuses a CPU)."""
import torch
from torch import nn

from test_oracle_diffusers import comfy_forward, flux_inputs

GRAPHS = []


@torch._dynamo.register_backend(name="quantlora_rowquant_flux_graphs")
def keep_graphs(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward


def op_calls(gm):
    return sum("quant_rows_fp8" in str(n.target) for n in gm.graph.nodes)


def gelu_from(gm):
    return sorted(n.args[1] for n in gm.graph.nodes if "quant_rows_fp8" in str(n.target))


def fp8_blocks(model):
    import importlib

    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_api import Float8MMConfig

    f8 = importlib.import_module("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    act = f8.QuantizeTensorToFloat8Kwargs(granularity=PerRow())
    for blocks in (model.double_blocks, model.single_blocks):
        for m in blocks.modules():
            if isinstance(m, nn.Linear):
                w = f8.Float8Tensor.from_hp(m.weight.data, granularity=PerRow(), act_quant_kwargs=act,
                                            mm_config=Float8MMConfig(use_fast_accum=True))
                m.weight = nn.Parameter(w, requires_grad=False)
                # as on a GPU that computes in bf16 (ComfyUI's manual cast is for a CPU's missing bf16)
                m.comfy_cast_weights = False


def test_compiled_flux_blocks_quantize_gelu_outputs_in_one_pass(comfy, tmp_path, monkeypatch):
    from quantlora.nodes.bridge import build_model
    from quantlora.speed import rowquant
    from quantlora.speed.compile import compile_blocks
    from quantlora.tools import demo_models as dm

    cfg = dm.demo_flux_config()
    path = dm.write_bfl(str(tmp_path / "flux.safetensors"), dm.flux_bfl_state_dict(cfg, seed=7, dtype=torch.float32))
    inp = {k: (v.bfloat16() if v.is_floating_point() and v.dim() > 1 else v) for k, v in flux_inputs(cfg, seed=4).items()}
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    got = {}
    with torch.no_grad():
        for label, switch in (("off", "0"), ("shipped", None)):
            if switch is None:
                monkeypatch.delenv("QUANTLORA_ROWQUANT", raising=False)
            else:
                monkeypatch.setenv("QUANTLORA_ROWQUANT", switch)
            model = build_model(path, "none", "bf16").model.diffusion_model
            fp8_blocks(model)
            eager = comfy_forward(model, inp)
            torch._dynamo.reset()
            GRAPHS.clear()
            compile_blocks(model, backend="quantlora_rowquant_flux_graphs")
            out = comfy_forward(model, inp)
            again = comfy_forward(model, inp)
            got[label] = dict(graphs=len(GRAPHS), calls=sorted(op_calls(g) for g in GRAPHS),
                              gelu_from=sorted(gelu_from(g) for g in GRAPHS),
                              rel=((out.float() - eager.float()).norm() / eager.float().norm()).item(),
                              stable=torch.equal(out, again))
    off, shipped = got["off"], got["shipped"]
    assert off["calls"] == [0] * off["graphs"] and off["rel"] < 1e-3, got  # the control: torchao's own
    # one graph per block kind, no recompiles: a single block's linear2, a double block's img and txt MLPs
    assert shipped["graphs"] == off["graphs"] == 2 and shipped["calls"] == [1, 2], got
    # the single block's linear2 after ComfyUI's own GELU and cat; the MLPs' GELU inside the kernel
    assert shipped["gelu_from"] == [[-1], [0, 0]], got
    assert shipped["stable"] and shipped["rel"] < 2e-2, got  # at most fp8 rounding flips, as in layer 1


def test_comfys_single_block_graph_matches_the_concatenation_pass(comfy, tmp_path, monkeypatch):
    """speed/rowquant_cat.py: ComfyUI v0.33's single block, compiled by the pack (the pass
    on by default), has the shape the pre-grad pass rewrites, and the rewritten graph computes
    the same bits (on a CPU both quantizations run their torch arithmetic)."""
    from quantlora.nodes.bridge import build_model
    from quantlora.speed import rowquant, rowquant_cat
    from quantlora.speed.compile import compile_blocks
    from quantlora.tools import demo_models as dm

    seen = []

    @torch._dynamo.register_backend(name="quantlora_rowquant_cat_flux")
    def keep(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    cfg = dm.demo_flux_config()
    path = dm.write_bfl(str(tmp_path / "flux.safetensors"), dm.flux_bfl_state_dict(cfg, seed=8, dtype=torch.float32))
    inp = {k: (v.bfloat16() if v.is_floating_point() and v.dim() > 1 else v) for k, v in flux_inputs(cfg, seed=5).items()}
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    monkeypatch.setenv("QUANTLORA_ROWQUANT_CAT", "1")
    with torch.no_grad():
        model = build_model(path, "none", "bf16").model.diffusion_model
        fp8_blocks(model)
        torch._dynamo.reset()
        compile_blocks(model, backend="quantlora_rowquant_cat_flux")
        comfy_forward(model, inp)
        assert all(isinstance(b.mlp_act, rowquant_cat.PairGELU) for b in model.single_blocks)
        single = [(gm, ex) for gm, ex in seen if any("pair_gelu" in str(n.target) for n in gm.graph.nodes)]
        assert len(single) == 1 and len(seen) == 2, [str(g.graph) for g, _ in seen]
        gm, ex = single[0]
        cats = lambda: sum(n.op == "call_function" and "cat" in str(n.target) for n in gm.graph.nodes)  # noqa: E731
        cats_before = cats()
        before = gm(*ex)
        n = rowquant_cat.CatQuantPass.rewrites
        rowquant_cat.CatQuantPass()(gm.graph)
        gm.recompile()
        after = gm(*ex)
    assert rowquant_cat.CatQuantPass.rewrites == n + 1
    assert not any("pair_gelu" in str(n.target) for n in gm.graph.nodes) and cats() == cats_before - 1
    assert all(torch.equal(a, b) for a, b in zip(after, before))
