"""Layer 2: QUANTLORA_SKIP_GUARDS=1 (speed/guards.py) runs a sampling's repeated forwards of the
compiled blocks without dynamo's guard checks, through ComfyUI's own sampler (nodes.common_ksampler).

The reference is the same compiled model sampled with every guard checked: bit for bit equal. The
unsafe case is a forward that needs a graph not compiled yet; resolutions alternating between
samplings, a batch of two (cond and uncond together) and LoRA merges must each run with guards
first, so outputs stay equal to the guarded run and nothing is silently served the wrong graph."""
import pytest
import torch

from conftest import write_tiny_flux

pytestmark = pytest.mark.skipif(
    not __import__("quantlora.speed.guards", fromlist=["x"])._stance_supported(),
    reason="torch without set_stance(skip_guard_eval_unsafe=)")


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    return write_tiny_flux(tmp_path_factory, "flux.safetensors", seed=11)[1]


def conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(1, 6, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
            for _ in range(2)]


@torch.no_grad()
def ksample(model, px=16, steps=3, cfg=1.0, seed=5):
    import nodes

    pos, neg = conds()
    latent = {"samples": torch.zeros(1, 16, px, px)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def compiled_model(path, monkeypatch):
    from quantlora.nodes.bridge import build_model

    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")  # dynamo's guards, no C++ builds here
    return build_model(path, "none", "fp32", compile="regional", attention="default")


def counts(model):
    g = model.model.diffusion_model._quantlora_guards
    return g.skipped, g.checked


def test_skipped_guards_give_the_guarded_result(flux_file, monkeypatch):
    model = compiled_model(flux_file, monkeypatch)
    monkeypatch.setenv("QUANTLORA_SKIP_GUARDS", "0")
    plan = [(16, 1.0), (24, 1.0), (16, 2.0), (16, 1.0)]  # resolution changes; cfg 2: cond+uncond batched
    want = [ksample(model, px, cfg=cfg) for px, cfg in plan]  # every forward guarded (compiles here)
    assert counts(model)[0] == 0

    monkeypatch.setenv("QUANTLORA_SKIP_GUARDS", "1")
    torch._dynamo.config.error_on_recompile = True  # the graphs above serve every forward below
    try:
        for (px, cfg), ref in zip(plan, want):
            before = counts(model)
            got = ksample(model, px, cfg=cfg)
            skipped, checked = (a - b for a, b in zip(counts(model), before))
            assert torch.equal(got, ref), (px, cfg)
            # the sampling's first forward of each signature checks guards, its repeats skip them
            assert checked >= 1 and skipped >= 1, (px, cfg, skipped, checked)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_a_new_shape_mid_run_is_checked_and_compiled(flux_file, monkeypatch):
    """The first sampling after start sees a resolution no graph was compiled for: it must compile
    (guards checked), not run an old graph; the next sampling at that size skips again."""
    monkeypatch.setenv("QUANTLORA_SKIP_GUARDS", "1")
    model = compiled_model(flux_file, monkeypatch)
    ksample(model, 16)
    got = ksample(model, 32)
    monkeypatch.setenv("QUANTLORA_SKIP_GUARDS", "0")
    torch._dynamo.reset()
    fresh = compiled_model(flux_file, monkeypatch)
    assert torch.equal(got, ksample(fresh, 32))
    assert counts(model)[0] >= 2 and counts(fresh)[0] == 0


def test_signature_tells_inputs_apart():
    from quantlora.speed.guards import signature

    x = torch.zeros(1, 4)
    opts = {"cond_or_uncond": [0], "patches": {}, "fn": print}
    same = signature((torch.ones(1, 4), opts), {})
    assert signature((x, dict(opts)), {}) == same  # values of tensors do not matter, shapes do
    assert signature((torch.zeros(2, 4), opts), {}) != same
    assert signature((x.double(), opts), {}) != same
    assert signature((x, dict(opts, cond_or_uncond=[1, 0])), {}) != same
    assert signature((x, dict(opts, fn=len)), {}) != same  # another callable: a new forward
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}
    assert signature((x, deep), {}) is None  # too deep to summarize: guards run
    assert signature((list(range(100)),), {}) is None  # too long: guards run
