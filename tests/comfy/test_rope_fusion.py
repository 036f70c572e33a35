"""Layer 2: by default (QUANTLORA_FUSE_ROPE unset; =0 turns it off) nodes/rope_fusion.py makes dynamo trace ComfyUI's pure-torch RoPE
in the pack's compiled blocks instead of comfy_kitchen's custom ops (which inductor cannot fuse), and
the compiled model still computes what the eager one does. In a subprocess: the substitution is
process-wide and cannot be undone."""
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_fused_rope_leaves_no_custom_op_in_the_compiled_graphs(comfy, tmp_path):
    from quantlora.tools import demo_models as dm

    path = dm.write_bfl(str(tmp_path / "flux.safetensors"),
                        dm.flux_bfl_state_dict(dm.demo_flux_config(), seed=5, dtype=torch.float32))
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTLORA_FUSE_ROPE", "QUANTLORA_COMPILE_BACKEND")}
    env["QUANTLORA_SIGMOID_GELU"] = "0"  # RoPE alone: the GELU's sigmoid form rounds differently (test_sigmoid_gelu.py)
    r = subprocess.run([sys.executable, os.path.join(HERE, "rope_fusion_probe.py"), path],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    kernel, shipped = got["kernel"], got["shipped"]
    # switched off, every block's graph calls comfy_kitchen's RoPE ops (the control: the probe sees them)
    assert kernel["graphs"] >= 2 and any("apply_rope" in op for op in kernel["kitchen_ops"]), kernel
    assert not kernel["installed"]
    # as shipped, the same blocks trace plain torch: no comfy_kitchen op is left to fuse around
    assert shipped["installed"] and shipped["graphs"] >= 2 and shipped["kitchen_ops"] == [], shipped
    # the same arithmetic as the kernel (fp32 on this CPU): equal to the eager forward
    assert kernel["max_abs_diff"] == 0.0 and shipped["max_abs_diff"] <= 1e-6, got
