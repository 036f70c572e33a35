"""Layer 3: LoRAHotswap in a real ComfyUI server. Prompts alternating LoRAs and strengths on one
loaded model give the same latents as fresh loads with that LoRA; two branches of one graph each
get their own LoRA; a prompt without LoRA gets the bare base."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load as load_safetensors

from graphs import loader, txt2img
from harness.server import execution_error
from quantlora.tools.demo_models import DEMO_FLUX, write_demo_lora

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def models(server):
    root = os.path.join(server.base, "models")
    flux = os.path.join(root, "diffusion_models", DEMO_FLUX)
    write_demo_lora(os.path.join(root, "loras", "qlt-a.safetensors"), flux, rank=8, seed=1, fmt="bfl")
    write_demo_lora(os.path.join(root, "loras", "qlt-b.safetensors"), flux, rank=4, seed=2, fmt="kohya")
    write_demo_lora(os.path.join(root, "loras", "qlt-big.safetensors"), flux, rank=128, seed=3)
    copies = []
    for i in range(12):  # one file per reference: each reference is a fresh load that never swapped
        name = f"qlt-fresh-{i}.safetensors"
        shutil.copy(flux, os.path.join(root, "diffusion_models", name))
        copies.append(name)
    return copies


def graph(model_name, loras, seed, prefix, max_rank=16):
    g = loader(model_name)
    g["model"]["inputs"]["lora_max_rank"] = max_rank
    last = "model"
    for i, (name, strength) in enumerate(loras):
        g[f"lora{i}"] = {"class_type": "LoRAHotswap", "inputs": {"model": [last, 0], "lora_name": name, "strength": strength,
                                                                 "max_rank": max_rank, "targets": "blocks"}}
        last = f"lora{i}"
    g = txt2img({k: v for k, v in g.items()}, seed=seed, decode=False)
    g["sample"]["inputs"]["model"] = [last, 0]
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    return g


def latents(server, entry, node="save"):
    assert execution_error(entry) is None, execution_error(entry)
    info = entry["outputs"][node]["latents"][0]
    return load_safetensors(server.view(info))["latent_tensor"]


def run(server, g, node="save"):
    return latents(server, server.run(g), node)


def test_alternating_loras_equal_fresh_loads(server, models):
    fresh = iter(models)
    steps = [([("qlt-a.safetensors", 1.0)], 11), ([("qlt-b.safetensors", 0.5)], 12), ([], 13),
             ([("qlt-a.safetensors", 1.0)], 14), ([("qlt-a.safetensors", 0.3)], 15),
             ([("qlt-a.safetensors", 1.0), ("qlt-b.safetensors", -0.7)], 16), ([], 17)]
    for i, (loras, seed) in enumerate(steps):
        got = run(server, graph(DEMO_FLUX, loras, seed, f"alt-{i}"))
        want = run(server, graph(next(fresh), loras, seed, f"alt-ref-{i}"))
        assert torch.equal(got, want), (i, loras, (got - want).abs().max())
    with_lora = run(server, graph(DEMO_FLUX, [("qlt-a.safetensors", 1.0)], 18, "eff-a"))
    without = run(server, graph(next(fresh), [], 18, "eff-0"))
    assert (with_lora - without).abs().max() > 1e-3  # the LoRA changes the image


def test_two_branches_get_their_own_lora(server, models):
    a = graph(DEMO_FLUX, [("qlt-a.safetensors", 1.0)], 21, "branch-a")
    b = graph(DEMO_FLUX, [("qlt-b.safetensors", 0.5)], 22, "branch-b")
    both = dict(a)
    for k, v in b.items():  # second branch: same loader node, its own LoRA, sampler and save
        if k not in ("model", "clip", "pos", "guided", "neg", "latent"):
            both[f"b_{k}"] = v
    both["b_lora0"]["inputs"]["model"] = ["model", 0]
    both["b_sample"]["inputs"]["model"] = ["b_lora0", 0]
    both["b_save"]["inputs"]["samples"] = ["b_sample", 0]
    entry = server.run(both)
    got_a, got_b = latents(server, entry, "save"), latents(server, entry, "b_save")
    want_a = run(server, graph(models[-2], [("qlt-a.safetensors", 1.0)], 21, "branch-ref-a"))
    want_b = run(server, graph(models[-1], [("qlt-b.safetensors", 0.5)], 22, "branch-ref-b"))
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)


def test_rank_above_slots_is_a_clear_error_and_server_goes_on(server, models):
    entry = server.run(graph(DEMO_FLUX, [("qlt-big.safetensors", 1.0)], 31, "big"))
    err = execution_error(entry)
    assert err and "max_rank" in err["exception_message"] and "Set max_rank to 128" in err["exception_message"]
    assert err["node_type"] == "LoRAHotswap"
    run(server, graph(DEMO_FLUX, [("qlt-a.safetensors", 1.0)], 32, "after-big"))


def test_lora_for_another_architecture(server, models):
    from safetensors.torch import save_file

    path = os.path.join(server.base, "models", "loras", "qlt-sdxl.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, path)
    err = execution_error(server.run(graph(DEMO_FLUX, [("qlt-sdxl.safetensors", 1.0)], 41, "sdxl")))
    assert err and "qlt-sdxl.safetensors" in err["exception_message"] and "SD" in err["exception_message"]


def test_replaced_lora_with_same_size_and_mtime_is_read_again(server, models):
    """Issue 11: a different LoRA of the same size and mtime (cp -p, rsync -t, tar x) kept its old
    weights, and ComfyUI logged 'fingerprint_inputs() missing 1 required positional argument' on
    every queue (it passes only the widget values), so the re-read check never ran."""
    root = os.path.join(server.base, "models")
    flux = os.path.join(root, "diffusion_models", DEMO_FLUX)
    target = os.path.join(root, "loras", "qlt-replaced.safetensors")
    other = os.path.join(root, "loras", "qlt-replacement.safetensors")
    write_demo_lora(target, flux, rank=8, seed=41)
    write_demo_lora(other, flux, rank=8, seed=42)  # same shapes: same size
    assert os.path.getsize(target) == os.path.getsize(other)
    g = graph(DEMO_FLUX, [("qlt-replaced.safetensors", 1.0)], 31, "replaced")
    before = run(server, g)
    reference = run(server, graph(DEMO_FLUX, [("qlt-replacement.safetensors", 1.0)], 31, "replacement"))
    st = os.stat(target)
    tmp = target + ".new"
    shutil.copy2(other, tmp)  # cp -p: the new content, the old file's mtime
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, target)
    assert os.stat(target).st_mtime_ns == st.st_mtime_ns and os.path.getsize(target) == st.st_size
    after = run(server, g)
    assert not torch.equal(after, before) and torch.equal(after, reference)
    assert "fingerprint_inputs" not in server.log_tail(10 ** 7)
