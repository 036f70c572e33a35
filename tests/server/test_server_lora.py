"""Layer 3: LoRAHotswap in a real ComfyUI server. Prompts alternating LoRAs and strengths on one
loaded model give the same latents as fresh loads with that LoRA; two branches of one graph each
get their own LoRA; a prompt without LoRA gets the bare base."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import load as load_safetensors

from graphs import loader, txt2img
from harness.server import execution_error, fresh_names
from quantlora.tools.demo_models import DEMO_FLUX, write_demo_lora

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def models(server, demo_digest):
    root = os.path.join(server.base, "models")
    flux = os.path.join(root, "diffusion_models", DEMO_FLUX)
    write_demo_lora(os.path.join(root, "loras", "qlt-a.safetensors"), flux, rank=8, seed=1, fmt="bfl")
    write_demo_lora(os.path.join(root, "loras", "qlt-b.safetensors"), flux, rank=4, seed=2, fmt="kohya")
    write_demo_lora(os.path.join(root, "loras", "qlt-big.safetensors"), flux, rank=128, seed=3)
    # one name per reference: each reference is a fresh load that never swapped
    return fresh_names(flux, "qlt-fresh", 18)


@pytest.fixture(scope="module")
def demo_digest(server):
    return file_digest(os.path.join(server.base, "models", "diffusion_models", DEMO_FLUX))


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def graph(model_name, loras, seed, prefix, max_rank=16, mode=None):
    """mode None: the loader makes rank-max_rank slots and the LoRA nodes run as in older workflows
    (no mode input: auto, which keeps the loader's slots). Otherwise no loader slots and that mode;
    a LoRA given as (name, strength, mode) has its own."""
    g = loader(model_name)
    g["model"]["inputs"]["lora_max_rank"] = max_rank if mode is None else 0
    last = "model"
    for i, (name, strength, *own) in enumerate(loras):
        g[f"lora{i}"] = {"class_type": "LoRAHotswap", "inputs": {"model": [last, 0], "lora_name": name, "strength": strength,
                                                                 "max_rank": max_rank, "targets": "blocks"}}
        if own or mode is not None:
            g[f"lora{i}"]["inputs"]["mode"] = own[0] if own else mode
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


@pytest.mark.parametrize("mode", [None, "merge"])
def test_two_branches_get_their_own_lora(server, models, mode):
    a = graph(DEMO_FLUX, [("qlt-a.safetensors", 1.0)], 21, "branch-a", mode=mode)
    b = graph(DEMO_FLUX, [("qlt-b.safetensors", 0.5)], 22, "branch-b", mode=mode)
    both = dict(a)
    for k, v in b.items():  # second branch: same loader node, its own LoRA, sampler and save
        if k not in ("model", "clip", "pos", "guided", "neg", "latent"):
            both[f"b_{k}"] = v
    both["b_lora0"]["inputs"]["model"] = ["model", 0]
    both["b_sample"]["inputs"]["model"] = ["b_lora0", 0]
    both["b_save"]["inputs"]["samples"] = ["b_sample", 0]
    entry = server.run(both)
    got_a, got_b = latents(server, entry, "save"), latents(server, entry, "b_save")
    k = 2 if mode is None else 4
    want_a = run(server, graph(models[-k], [("qlt-a.safetensors", 1.0)], 21, "branch-ref-a", mode=mode))
    want_b = run(server, graph(models[-k + 1], [("qlt-b.safetensors", 0.5)], 22, "branch-ref-b", mode=mode))
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)


def test_merge_mode_swaps_equal_fresh_loads(server, models):
    """Merge mode: each prompt's LoRA set is merged into the loaded weights from the pristine copy, so
    alternating sets, strengths, a stack of two, a mixed chain (one merged, one in slots) and no LoRA
    give exactly what a fresh load with that set gives; the node reports the mode it chose."""
    fresh = iter(models[8:14])
    steps = [([("qlt-a.safetensors", 1.0)], 51), ([("qlt-b.safetensors", 0.5)], 52),
             ([("qlt-a.safetensors", 1.0), ("qlt-b.safetensors", -0.7)], 53), ([], 54),
             ([("qlt-a.safetensors", 0.3), ("qlt-b.safetensors", 1.0, "slots")], 55), ([], 56)]
    for i, (loras, seed) in enumerate(steps):
        entry = server.run(graph(DEMO_FLUX, loras, seed, f"merge-{i}", mode="auto"))
        got = latents(server, entry)
        want = run(server, graph(next(fresh), loras, seed, f"merge-ref-{i}", mode="auto"))
        assert torch.equal(got, want), (i, loras, (got - want).abs().max())
        if loras:
            text = " ".join(entry["outputs"]["lora0"]["text"])
            assert ": merge (" in text and "layers when sampling starts" in text, text


def test_merged_lora_never_reaches_a_model_without_it(server, models):
    """ComfyUI's own UNETLoader MODEL with a merged LoRA, then the same (cached) UNETLoader MODEL
    sampled without it, in the next prompt and in one graph: the bare weights each time. That MODEL
    carries none of the pack's wrappers; the pack's hook on the shared transformer restores the
    weights for a forward from a clone without the LoRA."""
    def unet_graph(name, loras, seed, prefix):
        g = graph(name, loras, seed, prefix, mode="merge")
        g["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
        return g

    lora = [("qlt-a.safetensors", 1.0)]
    merged = run(server, unet_graph(DEMO_FLUX, lora, 61, "unet-merged"))
    bare = run(server, unet_graph(DEMO_FLUX, [], 61, "unet-bare"))
    assert torch.equal(bare, run(server, unet_graph(models[14], [], 61, "unet-bare-ref")))
    assert torch.equal(merged, run(server, unet_graph(models[15], lora, 61, "unet-merged-ref")))
    assert not torch.equal(merged, bare)
    g = unet_graph(DEMO_FLUX, lora, 62, "unet-both")  # one graph: a merged branch and a bare one
    g["bare_sample"] = dict(g["sample"], inputs=dict(g["sample"]["inputs"], model=["model", 0]))
    g["bare_save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["bare_sample", 0], "filename_prefix": "bare"}}
    entry = server.run(g)
    assert torch.equal(latents(server, entry, "bare_save"), run(server, unet_graph(models[14], [], 62, "unet-bare-ref2")))
    assert torch.equal(latents(server, entry, "save"), run(server, unet_graph(models[15], lora, 62, "unet-merged-ref2")))


def test_model_file_unchanged_by_swaps_and_merges(server, models, demo_digest):
    """Runs last in this module: after every swap and merge above, the base file (which the fresh
    references share by hard link) still has the bytes it had before the first prompt."""
    assert file_digest(os.path.join(server.base, "models", "diffusion_models", DEMO_FLUX)) == demo_digest
