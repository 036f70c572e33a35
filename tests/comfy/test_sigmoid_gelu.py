"""Layer 2: the pack's regional compile of ComfyUI's own Flux traces its tanh-GELUs (the double blocks'
MLPs, the single blocks' mlp_act) in the sigmoid form (speed/gelu.py, on by default;
QUANTLORA_SIGMOID_GELU=0 keeps torch's GELU), and the compiled model computes what the eager one does."""
import torch

from test_oracle_diffusers import comfy_forward, flux_inputs

GRAPHS = []


@torch._dynamo.register_backend(name="quantlora_gelu_graphs")
def keep_graphs(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward


def ops_named(word):
    return sum(word in str(n.target) for g in GRAPHS for n in g.graph.nodes if n.op in ("call_function", "call_method"))


def test_compiled_flux_blocks_trace_the_sigmoid_gelu(comfy, tmp_path, monkeypatch):
    from quantlora.nodes.bridge import build_model
    from quantlora.speed import gelu
    from quantlora.tools import demo_models as dm

    cfg = dm.demo_flux_config()
    path = dm.write_bfl(str(tmp_path / "flux.safetensors"), dm.flux_bfl_state_dict(cfg, seed=5, dtype=torch.float32))
    inp = flux_inputs(cfg, seed=3)
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "quantlora_gelu_graphs")
    got = {}
    with torch.no_grad():
        eager = comfy_forward(build_model(path, "none", "fp32").model.diffusion_model, inp)
        for label, switch in (("off", "0"), ("shipped", None)):
            if switch is None:
                monkeypatch.delenv(gelu.ENV, raising=False)
            else:
                monkeypatch.setenv(gelu.ENV, switch)
            torch._dynamo.reset()
            GRAPHS.clear()
            model = build_model(path, "none", "fp32", compile="regional").model.diffusion_model
            out = comfy_forward(model, inp)
            got[label] = dict(graphs=len(GRAPHS), gelu=ops_named("gelu"), sigmoid=ops_named("sigmoid"),
                              swapped=sum(isinstance(m, gelu.SigmoidGELU) for m in model.modules()),
                              diff=(out - eager).abs().max().item())
    off, shipped = got["off"], got["shipped"]
    blocks = cfg["depth"] + cfg["depth_single_blocks"]
    # the control: switched off, one GELU per graph kind (a double block has two, img and txt)
    assert off["graphs"] >= 2 and off["gelu"] >= 3 and off["swapped"] == 0 and off["diff"] == 0.0, got
    assert shipped["graphs"] == off["graphs"] and shipped["gelu"] == 0, got
    assert shipped["sigmoid"] == off["gelu"] + off["sigmoid"], got
    assert shipped["swapped"] == 2 * cfg["depth"] + cfg["depth_single_blocks"] and blocks >= 2, got
    assert shipped["diff"] <= 1e-5 * eager.abs().max().item(), got  # fp32 rounding of the same function
