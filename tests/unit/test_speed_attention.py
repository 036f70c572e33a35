"""speed/attention.py and speed/fa3.py without a GPU: what `auto` resolves to, why FlashAttention-3
cannot run here, and that its override hands every call it cannot take to ComfyUI's own function
unchanged (the fa3-fwd package is optional: a machine without it must sample as before)."""
import torch

from quantlora.speed import attention, fa3


def test_auto_without_a_gpu_is_pytorchs_default():
    assert attention.resolve("auto", torch.device("cpu")) == "default"
    assert attention.override_for("auto", torch.device("cpu")) is None


def test_fa3_says_why_it_cannot_run_here():
    why = attention.unavailable("fa3", torch.device("cpu"))
    assert why and "NVIDIA" in why
    assert attention.unavailable("cudnn", torch.device("cpu")) is None


def test_fa3_override_passes_what_it_cannot_take_to_comfy(monkeypatch):
    calls = []

    def comfy_attention(q, k, v, heads, **kwargs):
        calls.append((q, k, v, heads, kwargs))
        return "comfy"

    q = k = v = torch.zeros(1, 2, 8, 4)
    for load in ((None, "no package"), (object(), None)):  # without the kernel; with one, on CPU tensors
        monkeypatch.setattr(fa3, "_load", lambda load=load: load)
        over = fa3.make_override()
        assert over(comfy_attention, q, k, v, 2, mask=None, skip_reshape=True, transformer_options={}) == "comfy"
        q_, k_, v_, heads, kwargs = calls[-1]
        assert q_ is q and k_ is k and v_ is v and heads == 2
        assert kwargs["skip_reshape"] is True and kwargs["transformer_options"] == {}
    assert len(calls) == 2


def test_fa3_load_failure_is_a_sentence():
    fa3._load.cache_clear()
    try:
        kernel, why = fa3._load()
    finally:
        fa3._load.cache_clear()
    if kernel is None:  # the CI machine has no fa3-fwd (no CUDA build of it for CPU wheels)
        assert "fa3-fwd" in why and "pip install" in why


def test_fa3_fp8_is_a_choice_that_says_why_it_cannot_run_here():
    assert "fa3-fp8" in attention.ATTENTION_CHOICES
    why = attention.unavailable("fa3-fp8", torch.device("cpu"))
    assert why and "NVIDIA" in why


def test_fp8_attention_inputs_saturate_instead_of_becoming_nan():
    """A plain cast to e4m3 makes NaN of anything beyond 448; FA3's fp8 inputs are saturated, and
    values inside the range are rounded as the plain cast rounds them."""
    t = torch.tensor([1000.0, -1000.0, 448.0, 3.3, -0.02, 1e-4, 0.0]).bfloat16()
    got = fa3.to_fp8_unscaled(t).float()
    assert not got.isnan().any()
    assert got[:3].tolist() == [448.0, -448.0, 448.0]
    assert torch.equal(got[3:], t[3:].to(torch.float8_e4m3fn).float())


def test_fa3_overrides_have_names_a_restarted_server_finds(monkeypatch):
    """Blocks compiled ahead of time record transformer_options' override by module:name (the GPU run of
    BENCHMARKS.md's eighteenth round refused a closure); both FA3 overrides are module-level functions."""
    from quantlora.speed import aot_blocks

    monkeypatch.setattr(fa3, "_load", lambda: (None, "no package"))
    for fp8, name in ((False, "fa3_override"), (True, "fa3_fp8_override")):
        over = fa3.make_override(fp8=fp8)
        assert aot_blocks._to_json(over) == {"__callable__": f"{fa3.__name__}:{name}"}
        assert getattr(fa3, name) is over
    assert aot_blocks._to_json(attention.sdpa_override)["__callable__"].endswith(":sdpa_override")
