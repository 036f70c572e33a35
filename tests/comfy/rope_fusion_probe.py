"""Run in a subprocess by test_rope_fusion.py (the substitution is process-wide and permanent): one
tiny Flux through the pack's loader with regional compile, twice, with a backend that keeps dynamo's
graphs: first with QUANTLORA_FUSE_ROPE=0 (ComfyUI's kernel), then as shipped (the switch unset: fused). Prints JSON: the comfy_kitchen ops each
compile's graphs call, and how far each compiled output is from the eager forward."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # tests/comfy
import conftest  # noqa: E402  (registers the pack, imports ComfyUI in --cpu mode)

conftest.import_comfy()

import torch  # noqa: E402

from test_oracle_diffusers import comfy_forward, flux_inputs  # noqa: E402

GRAPHS = []


@torch._dynamo.register_backend(name="quantlora_keep_graphs")
def keep_graphs(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward


def kitchen_ops():
    return sorted({str(n.target) for g in GRAPHS for n in g.graph.nodes
                   if n.op == "call_function" and "comfy_kitchen" in str(n.target)})


def main(path):
    from quantlora.nodes import rope_fusion
    from quantlora.nodes.bridge import build_model
    from quantlora.tools import demo_models as dm

    os.environ["QUANTLORA_COMPILE_BACKEND"] = "quantlora_keep_graphs"
    inp = flux_inputs(dm.demo_flux_config(), seed=3)
    out = {}
    with torch.no_grad():
        eager = comfy_forward(build_model(path, "none", "fp32").model.diffusion_model, inp)
        for label, fuse in (("kernel", "0"), ("shipped", None)):
            if fuse is None:
                os.environ.pop(rope_fusion.ENV, None)
            else:
                os.environ[rope_fusion.ENV] = fuse
            torch._dynamo.reset()
            GRAPHS.clear()
            dm_ = build_model(path, "none", "fp32", compile="regional").model.diffusion_model
            got = comfy_forward(dm_, inp)
            out[label] = {"graphs": len(GRAPHS), "kitchen_ops": kitchen_ops(),
                          "max_abs_diff": (got - eager).abs().max().item(), "installed": rope_fusion._state.get("installed", False)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
