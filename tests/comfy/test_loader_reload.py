"""Layer 2: loading the same checkpoint again gives layers of the same classes, so torch.compile'd
blocks of the new model reuse the graphs compiled for the old one. A class made per load made dynamo's
type guard fail after every reload and, past its recompile limit, fall back to eager silently."""
import pytest
import torch


@pytest.fixture(scope="module")
def flux_path(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    sd = dm.flux_bfl_state_dict(dm.demo_flux_config(), seed=21, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("reload") / "flux.safetensors"), sd)


def _load(path, quantization="none"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, "fp32")[0].model.diffusion_model


def _classes(dm):
    return [type(m) for m in dm.modules()]


@pytest.mark.parametrize("quantization", ["none", "torchao-int8-weight-only"])
def test_reload_gives_the_same_layer_classes(flux_path, quantization):
    assert _classes(_load(flux_path, quantization)) == _classes(_load(flux_path, quantization))


@pytest.mark.slow
def test_compiled_blocks_of_a_reloaded_model_do_not_recompile(flux_path):
    import torch._dynamo

    from quantlora.speed.compile import compile_blocks

    block_in = None
    torch._dynamo.reset()
    outs = []
    for i in range(2):
        dm = _load(flux_path)
        compile_blocks(dm)
        blk = dm.single_blocks[0]
        if block_in is None:
            g = torch.Generator().manual_seed(0)
            h = dm.hidden_size
            block_in = dict(x=torch.randn(1, 24, h, generator=g), vec=torch.randn(1, h, generator=g),
                            pe=dm.pe_embedder(torch.zeros(1, 24, 3)))
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=(i == 1)):
            outs.append(blk(block_in["x"], vec=block_in["vec"], pe=block_in["pe"]))
    assert torch.equal(outs[0], outs[1])
