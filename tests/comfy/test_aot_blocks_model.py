"""Layer 2: QUANTLORA_AOT_BLOCKS=1 (experimental) on ComfyUI's own Flux, loaded by the pack with its
blocks compiled: the first forward builds one package per block kind (ComfyUI's calls, Flux's
transformer_options) and the next load of the same checkpoint (a restart) takes every call from those
packages, torch.compile never made. The reference is the same checkpoint loaded without compile.
(A call of another shape going to torch.compile: tests/unit/test_aot_blocks.py.)"""
import pytest
import torch


@pytest.fixture(scope="module")
def flux_path(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    sd = dm.flux_bfl_state_dict(dm.demo_flux_config(), seed=23, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("aot") / "flux.safetensors"), sd)


def _model(path, compile):
    from quantlora.nodes.bridge import build_model

    return build_model(path, "none", "fp32", compile=compile).model.diffusion_model


def _forward(dm, tokens=16):
    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5) * 2  # latent pixels: 2x2 patches
    x = torch.randn(1, dm.params.in_channels, side, side, generator=g)
    ctx = torch.randn(1, 8, dm.params.context_in_dim, generator=g)
    y = torch.randn(1, dm.params.vec_in_dim, generator=g)
    with torch.no_grad():
        return dm(x, torch.tensor([0.5]), ctx, y=y, guidance=torch.tensor([3.5]), transformer_options={})


def _dispatches(dm):
    from quantlora.speed.aot_blocks import AOTDispatch

    calls = [b.__dict__.get("_compiled_call_impl") for b in [*dm.double_blocks, *dm.single_blocks]]
    assert all(isinstance(c, AOTDispatch) for c in calls), calls
    return calls


@pytest.mark.slow
def test_packages_built_at_the_first_forward_serve_the_next_load(flux_path, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLORA_WEIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")  # the fallback: dynamo without inductor
    ref = _forward(_model(flux_path, "off"))
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "1")

    first = _model(flux_path, "regional")
    out = _forward(first)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    built = _dispatches(first)
    assert all(d.calls == {"package": 1, "fallback": 0} for d in built), [d.calls for d in built]
    assert len(list((tmp_path / "aot" / "cpu").glob("*/*.pt2"))) == 2  # one per block kind, in the device's folder

    restarted = _model(flux_path, "regional")
    served = _dispatches(restarted)
    assert all(d.kind.entries and d._fallback is None for d in served)  # loaded, nothing compiled
    torch.testing.assert_close(_forward(restarted), ref, rtol=1e-4, atol=1e-4)
    assert all(d.calls == {"package": 1, "fallback": 0} and d._fallback is None for d in served)



def test_where_packages_cannot_load_the_switch_is_ignored_with_a_warning(flux_path, tmp_path, monkeypatch, caplog):
    """A machine whose test package crashed in the child process (the GPU image of BENCHMARKS.md issue 12):
    the loader warns and compiles its blocks as without the switch; nothing is loaded in the server."""
    from quantlora.speed import aot_store
    from quantlora.speed.aot_blocks import AOTDispatch

    monkeypatch.setenv("QUANTLORA_WEIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "1")
    monkeypatch.setattr(aot_store, "loads_here", lambda root, device, cxx=None: "a test package did not load (exit -11)")
    with caplog.at_level("WARNING", logger="quantlora"):
        dm = _model(flux_path, "regional")
    assert "QUANTLORA_AOT_BLOCKS=1 ignored: a test package did not load (exit -11)" in caplog.text
    calls = [b.__dict__.get("_compiled_call_impl") for b in [*dm.double_blocks, *dm.single_blocks]]
    assert all(c is not None and not isinstance(c, AOTDispatch) for c in calls)
