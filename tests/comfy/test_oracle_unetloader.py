"""Layer 2 oracle: on a BFL file ComfyUI's own UNETLoader accepts (hidden 3072, 24 heads, one
double and one single block), the pack's MODEL and UNETLoader's MODEL give the same latent
through the stock KSampler (nodes.common_ksampler), same seed, same conditioning."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def comfy_min_file(comfy, tmp_path_factory):
    import folder_paths
    from quantlora.tools import demo_models as dm

    d = tmp_path_factory.mktemp("unet")
    sd = dm.flux_bfl_state_dict(dm.COMFY_MIN, seed=11, dtype=torch.bfloat16)
    path = dm.write_bfl(str(d / "quantlora-oracle-unet.safetensors"), sd)  # unique: other tests register folders too
    del sd
    folder_paths.add_model_folder_path("diffusion_models", str(d))
    return path


def sample(model, seed=3):
    import nodes

    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    return nodes.common_ksampler(model, seed, 3, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]


@torch.no_grad()
def test_pack_model_equals_unetloader_through_ksampler(comfy_min_file):
    import nodes
    from quantlora.nodes.bridge import load_flux_model_patcher

    name = os.path.basename(comfy_min_file)
    theirs = nodes.UNETLoader().load_unet(name, "default")[0]
    ref = sample(theirs)
    their_dtype = theirs.model.diffusion_model.img_in.weight.dtype
    theirs_sampling = theirs.model.model_sampling
    del theirs
    ours, report = load_flux_model_patcher(comfy_min_file, "none", "auto")
    assert ours.model.diffusion_model.img_in.weight.dtype == their_dtype
    assert type(ours.model).__name__ == "Flux"
    assert type(ours.model.model_sampling).__name__ == type(theirs_sampling).__name__
    out = sample(ours)
    assert torch.isfinite(ref).all() and ref.abs().mean() > 0
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-6, err
