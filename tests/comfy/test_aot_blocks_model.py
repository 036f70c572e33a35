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
@pytest.mark.parametrize("build", ["inline"])  # "child" passes too (50 s more in CI; its build: tests/unit)
def test_packages_built_at_the_first_forward_serve_the_next_load(flux_path, tmp_path, monkeypatch, build):
    """inline (the default): the first forward waits for the builds and runs the packages; child
    (QUANTLORA_AOT_BUILD=child): it exports, goes on torch.compile'd, and child processes build."""
    monkeypatch.setenv("QUANTLORA_WEIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTLORA_AOT_BUILD", build)
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")  # the fallback: dynamo without inductor
    ref = _forward(_model(flux_path, "off"))
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "1")
    from quantlora.speed import aot_store

    first = _model(flux_path, "regional")
    out = _forward(first)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    built = _dispatches(first)
    if build == "inline":
        assert all(d.calls == {"package": 1, "fallback": 0} for d in built), [d.calls for d in built]
    else:  # exported at the first call and built in a child process: this process goes on torch.compile'd
        assert all(d.calls == {"package": 0, "fallback": 1} for d in built), [d.calls for d in built]
        assert aot_store.BUILDER.wait(900)
    packages = sorted(p.name for p in (tmp_path / "aot" / "cpu").glob("*/*.pt2*"))
    assert len(packages) == 4 and all(p.endswith((".pt2", ".pt2.json")) for p in packages), packages  # two kinds
    assert list((tmp_path / "aot").glob("loadable-*.json"))  # the load check ran before the first build

    restarted = _model(flux_path, "regional")
    served = _dispatches(restarted)
    assert all(d.kind.entries and d._fallback is None for d in served)  # loaded, nothing compiled
    torch.testing.assert_close(_forward(restarted), ref, rtol=1e-4, atol=1e-4)
    assert all(d.calls == {"package": 1, "fallback": 0} and d._fallback is None for d in served)

    # a load beside the text encoders (warm_compiler) imports inductor's compiler ahead of the first step
    # only where a block will compile: with every block served by packages it would just hold the lock
    from quantlora.nodes import bridge
    from quantlora.speed import compile as speed_compile, warmup

    warmed = []
    monkeypatch.setattr(warmup, "warm_compiler", lambda device: warmed.append(device) or 0.0)
    monkeypatch.setattr(speed_compile, "compile_backend", lambda: None)  # inductor, as on a GPU
    bridge.build_model(flux_path, "none", "fp32", compile="regional", warm_compiler=True)
    assert warmed == []
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "0")
    bridge.build_model(flux_path, "none", "fp32", compile="regional", warm_compiler=True)
    assert len(warmed) == 1



@pytest.mark.parametrize("build", ["inline", "child"])
def test_where_packages_cannot_load_the_switch_is_ignored_with_a_warning(flux_path, tmp_path, monkeypatch, caplog, build):
    """A machine whose test package crashes in a child process (the GPU image of BENCHMARKS.md issue 12).
    inline: the load check runs at the first load, which warns and compiles its blocks as without the
    switch. child: the first load, with no verdict kept, runs compiled and the build's child says why
    nothing is built; once the verdict is kept, a load warns as inline does. No package is ever loaded
    into the server's process."""
    from quantlora.speed import aot_store
    from quantlora.speed.aot_blocks import AOTDispatch

    monkeypatch.setenv("QUANTLORA_WEIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("QUANTLORA_AOT_BUILD", build)
    ref = _forward(_model(flux_path, "off"))
    monkeypatch.setenv("QUANTLORA_AOT_BLOCKS", "1")

    class Crashed:
        returncode, stdout, stderr = -11, "", "Fatal Python error: Segmentation fault"

    if build == "child":
        # the first load on this machine: no verdict kept, the build's child runs the load check; where
        # it fails, the child says so (speed/aot_store.child_build) and the warning names why
        class Said:
            returncode = 0
            stdout = "NOLOAD a test package did not load in a child process (exit -11: Segmentation fault)\n"

        children = []  # the child writes its output to the file it is given (speed/aot_store.build_in_child)
        monkeypatch.setattr(aot_store.subprocess, "run",
                            lambda cmd, **k: (children.append(cmd), k["stdout"].write(Said.stdout), Said())[-1])
        with caplog.at_level("WARNING", logger="quantlora"):
            first = _model(flux_path, "regional")
            torch.testing.assert_close(_forward(first), ref, rtol=1e-4, atol=1e-4)
            assert aot_store.BUILDER.wait(60)
        assert "no package can be loaded here: a test package did not load in a child process (exit -11" in caplog.text
        assert len(children) == 2 and not list((tmp_path / "aot").glob("*/*/*.pt2"))  # a build per kind, none made
        # the verdicts the check keeps (here its test package's child crashed)
        monkeypatch.setattr(aot_store.subprocess, "run", lambda *a, **k: Crashed())
        assert aot_store.compiler_here(str(tmp_path / "aot"), torch.device("cpu"))[0] is None
        caplog.clear()
    else:
        monkeypatch.setattr(aot_store.subprocess, "run", lambda *a, **k: Crashed())
    with caplog.at_level("WARNING", logger="quantlora"):
        dm = _model(flux_path, "regional")
    assert "QUANTLORA_AOT_BLOCKS=1 ignored: a test package did not load in a child process (exit -11" in caplog.text
    calls = [b.__dict__.get("_compiled_call_impl") for b in [*dm.double_blocks, *dm.single_blocks]]
    assert all(c is not None and not isinstance(c, AOTDispatch) for c in calls)
