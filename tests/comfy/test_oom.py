"""Out of GPU memory while loading or sampling, injected on CPU.

The fault is real torch.OutOfMemoryError raised from a function inside the load or sampling
path (an injected fault, nothing of ComfyUI is mocked). Checked: the pack's one error type with
a message that says what ran out and which settings would fit; the OOM is not chained to it (its
traceback would keep the partial state alive); everything the failed attempt allocated is
released (weak references dead while the error is still held, as ComfyUI holds it); the next
load / sampling succeeds and gives exactly the result of a clean one. On a GPU:
bench/oom_check.py (real memory pressure).
"""
import importlib
import os
import weakref

import pytest

from conftest import write_tiny_flux
import torch

from quantlora.errors import QuantLoRAError

OOM_TEXT = ("CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity of 23.65 GiB of which "
            "12.00 MiB is free. (injected by the test)")
CFG = None


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    global CFG
    CFG, path = write_tiny_flux(tmp_path_factory, "flux-oom.safetensors", seed=11, depth=2, depth_single_blocks=2)
    return path


@pytest.fixture(scope="module")
def lora_file(flux_file, tmp_path_factory):
    from quantlora.tools.demo_models import write_demo_lora

    return write_demo_lora(str(tmp_path_factory.mktemp("oom-lora") / "oom-lora.safetensors"), flux_file, rank=4, seed=3)


def load(path, quantization="none"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, "fp32")


def conds():
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 6, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    neg = [[torch.randn(1, 6, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    return pos, neg


LATENT = {"samples": torch.zeros(1, 16, 16, 16)}


@torch.no_grad()
def ksample(model, seed=5):
    import nodes

    pos, neg = conds()
    return nodes.common_ksampler(model, seed, 2, 1.5, "euler", "simple", pos, neg, LATENT)[0]["samples"]


def raised(fn, *args):
    """Calls fn; returns the QuantLoRAError it raised."""
    try:
        fn(*args)
    except QuantLoRAError as e:
        return e
    pytest.fail(f"{fn.__name__} did not raise QuantLoRAError")


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("quantization", ["none", "bnb-int8"])
def test_load_oom_releases_partial_weights_and_next_load_succeeds(flux_file, monkeypatch, quantization):
    from quantlora.quant import loader
    from quantlora.quant.backends import BACKENDS, unavailable_reason

    if unavailable_reason(quantization, torch.device("cpu")):
        pytest.skip(unavailable_reason(quantization, torch.device("cpu")))
    # Import the library first: bitsandbytes logs a warning at import with the exception it caught as
    # an argument, and pytest's log capture keeps that record (so the exception's frames, and their
    # callers' through f_back) for the test's duration. ComfyUI's logging keeps no records.
    importlib.import_module(BACKENDS[quantization].module)
    refs, calls = [], {"n": 0}
    real_load_linear = loader.LayerLoader.load_linear

    def load_linear(self, module, state_dict, prefix, missing_keys):
        calls["n"] += 1
        if calls["n"] == 12:  # eleven layers loaded (and quantized), the twelfth fails
            raise torch.OutOfMemoryError(OOM_TEXT)
        real_load_linear(self, module, state_dict, prefix, missing_keys)
        refs.extend([weakref.ref(module), weakref.ref(module.weight)])

    monkeypatch.setattr(loader.LayerLoader, "load_linear", load_linear)
    try:
        load(flux_file, quantization)
    except QuantLoRAError as e:
        err = e
        alive = [r() for r in refs if r() is not None]  # while the error is still held
    else:
        pytest.fail("no error")
    assert calls["n"] == 12 and len(refs) == 22
    assert not alive, f"{len(alive)} of {len(refs)} partly loaded modules/tensors still referenced"
    assert err.__context__ is None and err.__cause__ is None  # the OOM's traceback is not kept
    msg = str(err)
    assert "flux-oom.safetensors" in msg and "out of GPU memory while loading" in msg, msg
    assert f"quantization {quantization!r}" in msg and "Tried to allocate 64.00 MiB" in msg, msg
    assert "released" in msg and "bnb-nf4" in msg and "offload_mode block" in msg, msg
    del err

    monkeypatch.undo()
    patcher, report = load(flux_file, quantization)
    assert report.weights_bytes > 0
    assert not any(p.is_meta for p in patcher.model.diffusion_model.parameters())
    if quantization == "none":
        from safetensors.torch import load_file

        want = load_file(flux_file)
        got = patcher.model.diffusion_model.state_dict()
        renamed = lambda k: k if k in got else k.replace("_norm.scale", "_norm.weight")  # noqa: E731 (v0.33's names)
        assert all(torch.equal(got[renamed(k)], v) for k, v in want.items())


def test_load_message_lists_settings_that_fit(monkeypatch):
    from quantlora.memory import oom

    gib = 2 ** 30
    # 40 blocks of one 10000x10000 Linear (4e9 quantizable weights) + 1e8 other weights
    shapes = {f"double_blocks.{i}.img_mlp.0.weight": (10000, 10000) for i in range(40)}
    shapes["img_in.weight"] = (10000, 10000)
    est, block = oom.weight_estimates(shapes, torch.bfloat16, ["none", "bnb-int8", "bnb-nf4"])
    assert est["none"] == 2 * 41 * 10 ** 8 and est["bnb-int8"] == 40 * 10 ** 8 + 2 * 10 ** 8
    assert block == 2 * 10 ** 8
    monkeypatch.setattr(oom, "gpu_memory", lambda device: (4 * gib, 24 * gib))
    msg = str(oom.load_error("big.safetensors", "bnb-int8", torch.bfloat16, "cuda:0", shapes,
                             ["none", "bnb-int8", "bnb-nf4"], OOM_TEXT))
    assert "4.0 GiB of 24.0 GiB are free" in msg, msg
    fits = msg.split("Settings that would fit:")[1].split(".")[0]
    assert "bnb-nf4" in fits and "bnb-int8" not in fits and "none" not in fits, msg
    monkeypatch.setattr(oom, "gpu_memory", lambda device: (512 * 2 ** 20, 24 * gib))
    msg = str(oom.load_error("big.safetensors", "bnb-nf4", torch.bfloat16, "cuda:0", shapes,
                             ["none", "bnb-int8", "bnb-nf4"], OOM_TEXT))
    assert "No quantization fits" in msg and "quantization 'none'" in msg and "offload_mode" in msg, msg


# ---------------------------------------------------------------- sampling

def _inject_forward_oom(monkeypatch, refs):
    import comfy.ldm.flux.model as flux

    def forward_orig(self, img, *args, **kwargs):
        act = torch.empty(4 * 2 ** 20 // 4)  # stands for the activations in flight
        refs.extend([weakref.ref(img), weakref.ref(act)])
        raise torch.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(flux.Flux, "forward_orig", forward_orig)


def test_sampling_oom_unloads_keeps_no_adapter_and_next_sampling_is_exact(flux_file, lora_file, monkeypatch):
    import comfy.model_management as mm
    from quantlora.nodes import runtime

    patcher, _ = load(flux_file)
    runtime.install(patcher)
    runtime.ensure_slots(patcher.model.diffusion_model, 8, "blocks")
    m = patcher.clone()
    st = os.stat(lora_file)
    runtime.options(m)["loras"] = ((lora_file, (st.st_mtime_ns, st.st_size), 0.8),)
    want = ksample(m)
    base = ksample(patcher)
    assert not torch.equal(want, base)

    refs = []
    _inject_forward_oom(monkeypatch, refs)
    try:
        ksample(m)
    except QuantLoRAError as e:
        err = e
        alive = [r for r in refs if r() is not None]
    else:
        pytest.fail("no error")
    assert refs and not alive, "activations of the failed sampling still referenced"
    assert err.__context__ is None
    msg = str(err)
    assert "out of GPU memory while sampling 128x128 (batch 1)" in msg and "Tried to allocate" in msg, msg
    assert "unloaded" in msg and "lower resolution (e.g. 64x64" in msg and "offload_mode block" in msg, msg
    state = runtime.hotswap_state(patcher.model.diffusion_model)
    assert not state.active  # no adapter left behind
    assert not any(lm.model is m or lm.model is patcher for lm in mm.current_loaded_models)
    del err

    monkeypatch.undo()
    assert torch.equal(ksample(m), want)
    assert torch.equal(ksample(patcher), base)


def test_offload_sampler_oom_on_a_model_without_the_pack_wrappers(flux_file, monkeypatch):
    from quantlora.nodes.offload_sampler_node import CPUOffloadSampler

    patcher, _ = load(flux_file)  # the bridge alone: no hot-swap/OOM wrapper on it
    pos, neg = conds()

    def run():
        return CPUOffloadSampler.execute(patcher, 5, 2, 1.5, "euler", "simple", pos, neg, LATENT, 1.0, "auto", 1, 0.0)

    want = run().args[0]["samples"]
    refs = []
    _inject_forward_oom(monkeypatch, refs)
    err = raised(run)
    assert refs and not [r for r in refs if r() is not None]
    assert err.__context__ is None
    msg = str(err)
    assert "out of GPU memory while sampling 128x128" in msg and "offload_mode block" in msg, msg
    del err
    monkeypatch.undo()
    assert torch.equal(run().args[0]["samples"], want)


def test_slots_oom_puts_the_plain_layers_back(flux_file, monkeypatch):
    from torch import nn

    from quantlora.lora import hotswap
    from quantlora.lora.slots import LoRASlots
    from quantlora.nodes import runtime

    patcher, _ = load(flux_file)
    dm = patcher.model.diffusion_model
    calls, refs = {"n": 0}, []

    class Failing(LoRASlots):
        def __init__(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise torch.OutOfMemoryError(OOM_TEXT)
            super().__init__(*a, **k)
            refs.append(weakref.ref(self.down))

    monkeypatch.setattr(hotswap, "LoRASlots", Failing)
    err = raised(runtime.ensure_slots, dm, 8, "blocks")
    assert len(refs) == 4 and not [r for r in refs if r() is not None]
    assert "adding LoRA hot-swap slots (max_rank 8" in str(err) and "Lower max_rank" in str(err)
    assert not any(isinstance(m, LoRASlots) for m in dm.modules()) and runtime.hotswap_state(dm) is None
    assert isinstance(dm.double_blocks[0].img_attn.qkv, nn.Linear)
    monkeypatch.undo()
    state = runtime.ensure_slots(dm, 8, "blocks")
    assert state.slots and all(isinstance(s, LoRASlots) for s in state.slots.values())


def test_cuda_text_is_cut_after_a_sentence():
    """Issue 11: the load-OOM message cut CUDA's own text mid-word ('... 139.00 GiB is allocated b')."""
    import torch

    from quantlora.memory.oom import detail

    text = ("CUDA out of memory. Tried to allocate 48.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
            "45.12 MiB is free. Including non-PyTorch memory, this process has 139.75 GiB memory in use. Of the "
            "allocated memory 139.00 GiB is allocated by PyTorch, and 20.00 MiB is reserved by PyTorch but unallocated.")
    got = detail(torch.OutOfMemoryError(text))
    assert got.endswith("memory in use.") and len(got) <= 240 and text.startswith(got)


def test_quantized_models_are_loaded_whole(flux_file):
    """Issue 11 (H200, v0.33): with too little VRAM ComfyUI loaded a bnb-int8 model partly, a layer met
    its input on the other device, and 'Expected a cuda device, but got: cpu' escaped instead of the
    out-of-memory advice. The pack asks prepare_sampling for a full load of its quantized models
    (the GPU run of bench/oom_check.py now passes 9 of 9); unquantized ones keep ComfyUI's partial loading."""
    import comfy.patcher_extension as pe

    from quantlora.nodes import runtime

    bf, _ = load(flux_file, "none")
    q, _ = load(flux_file, "torchao-int8-weight-only")
    for p in (bf, q):
        runtime.install(p)
    assert not bf.get_wrappers(pe.WrappersMP.PREPARE_SAMPLING, runtime.WRAPPER_KEY)
    (wrapper,) = q.get_wrappers(pe.WrappersMP.PREPARE_SAMPLING, runtime.WRAPPER_KEY)
    seen = {}

    def executor(model, noise_shape, conds, model_options=None, force_full_load=False, force_offload=False):
        seen.update(force_full_load=force_full_load)
        return "prepared"

    assert wrapper(executor, q, (1, 16, 8, 8), {}, model_options={}, force_full_load=False, force_offload=False) == "prepared"
    assert seen == {"force_full_load": True}
    # and the ComfyUI in use passes that argument (the contract a newer release could break)
    import inspect

    import comfy.sampler_helpers as sh

    if "force_full_load" in inspect.signature(sh._prepare_sampling).parameters:
        assert "force_full_load=force_full_load" in inspect.getsource(sh.prepare_sampling)


def test_overflowing_lora_is_reported_by_name(flux_file, tmp_path):
    """Issue 11: finite but huge LoRA weights gave an all-black image without a word."""
    from quantlora.nodes import runtime
    from quantlora.tools.demo_models import write_demo_lora

    huge = write_demo_lora(str(tmp_path / "huge-lora.safetensors"), flux_file, rank=4, seed=9, scale=1e36)
    patcher, _ = load(flux_file)
    runtime.install(patcher)
    runtime.ensure_slots(patcher.model.diffusion_model, 8, "blocks")
    m = patcher.clone()
    runtime.options(m)["loras"] = ((huge, (0,), 0.7),)
    msg = str(raised(ksample, m))
    assert "'huge-lora.safetensors' at strength 0.7" in msg and "non-finite" in msg and "lower its strength" in msg, msg
    assert not runtime.hotswap_state(patcher.model.diffusion_model).active
    assert torch.isfinite(ksample(patcher)).all()  # the bare model, untouched


def _inject_oom_times(monkeypatch, n: int) -> dict:
    """The first n forwards raise a CUDA OOM; later ones run. Returns the call counter."""
    import comfy.ldm.flux.model as flux

    orig, calls = flux.Flux.forward_orig, {"n": 0}

    def forward_orig(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n:
            raise torch.OutOfMemoryError(OOM_TEXT)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(flux.Flux, "forward_orig", forward_orig)
    return calls


@pytest.mark.parametrize("wrapped", [True, False], ids=["pack-loader", "bridge-only"])
def test_offload_block_oom_replans_once_with_twice_the_reserve(flux_file, monkeypatch, caplog, wrapped):
    """The budget read from the card leaves ComfyUI's headroom for sampling; when that was too
    little (an OOM) the node re-plans once with twice the reserve and samples again: the result is
    the clean run's, the node's text says so. A second OOM is the error; an explicit
    vram_budget_gb is not second-guessed."""
    from quantlora.nodes import offload_run as node
    from quantlora.nodes import runtime
    monkeypatch.setattr(node, "FORCE_ON_CPU", True)
    patcher, _ = load(flux_file)
    if wrapped:
        runtime.install(patcher)  # the loader's sampling wrapper turns the OOM into the pack's error
    pos, neg = conds()
    reserves = []
    plan_offload = node.plan_offload
    monkeypatch.setattr(node, "plan_offload", lambda *a, **k: reserves.append(k.get("extra_reserve", 0))
                        or plan_offload(*a, **k))

    def run(budget=0.0):  # what CPUOffloadSampler.execute calls: (latent, the node's text)
        return node.sample(patcher, 5, 2, 1.5, "euler", "simple", pos, neg, LATENT, 1.0, "block", 1, budget)

    want = run()[0]["samples"]
    reserves.clear()
    calls = _inject_oom_times(monkeypatch, 1)
    with caplog.at_level("WARNING", logger="quantlora"):
        out, text = run()
    assert torch.equal(out["samples"], want)
    first = node.sampling_reserve(patcher, LATENT, 1.5)
    assert reserves == [0, first] and calls["n"] > 1
    assert "re-planned with" in text, text
    assert any("re-planned with" in r.getMessage() for r in caplog.records)

    calls = _inject_oom_times(monkeypatch, 10 ** 6)
    reserves.clear()
    err = raised(run)
    assert "out of GPU memory while sampling" in str(err) and calls["n"] == 2 and len(reserves) == 2
    del err
    calls["n"], reserves[:] = 0, []
    err = raised(run, 3.0)  # an explicit budget: no second try
    assert calls["n"] == 1 and len(reserves) == 1
    del err
    monkeypatch.undo()
