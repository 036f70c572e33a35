"""Layer 2: every quantization that runs on CPU, on the same seeded tiny Flux, against the
unquantized model (fp32 compute).

Per layer (one quantized Linear against the same weights in fp32, Gaussian input) the error is
the quantizer's resolution, so the bounds follow from it:
- int8 (per-channel absmax, 255 levels, Gaussian weights ~4 sigma max): ~0.5-1% -> < 2%
- fp8 e4m3 (3 mantissa bits, relative step 2^-4, rms rounding error ~1/(16*sqrt(12))*2): ~2-3% -> < 5%
- NF4 / int4 (16 levels, blockwise / group-wise scales): ~8-10% -> < 15%
Whole model: on random weights the residual stream carries most of the output, so errors are
about 30x smaller than per layer; bounds are the per-layer bound / 10. Both must be > 0: a
quantizer that did nothing fails.
"""
import pytest
import torch

from test_oracle_diffusers import comfy_forward, flux_inputs, rel

LAYER_BOUNDS = {
    "bnb-int8": 0.02, "torchao-int8-weight-only": 0.02, "torchao-int8-dynamic": 0.03, "quanto-int8": 0.02,
    "torchao-fp8-weight-only": 0.05, "quanto-fp8": 0.05,
    "bnb-nf4": 0.15, "quanto-int4": 0.15,
}
BOUNDS = {k: v / 10 for k, v in LAYER_BOUNDS.items()}


def test_every_backend_has_bounds_here_and_a_merge_test():
    """A new backend is one record in quant/backends.py plus its tests: this fails until it has
    error bounds here and a LoRA-merge fidelity bound in tests/unit/test_lora_merge.py."""
    from quantlora.quant.backends import BACKENDS
    from test_lora_merge import EFFECT_BOUND

    # backends that need a GPU (fp8 matmuls) are measured by bench/bench_flux.py (load path, merge check)
    quantized = {n for n, b in BACKENDS.items() if b.apply is not None and b.needs != "fp8-matmul"}
    assert set(LAYER_BOUNDS) == quantized
    assert quantized | {"none"} <= set(EFFECT_BOUND)
    assert all(0 < b.bits <= 16 for b in BACKENDS.values())


@pytest.fixture(scope="module")
def tiny_file(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.TINY, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
    sd = dm.flux_bfl_state_dict(cfg, seed=5, dtype=torch.float32)
    return cfg, dm.write_bfl(str(tmp_path_factory.mktemp("q") / "flux.safetensors"), sd)


@pytest.fixture(scope="module")
def baseline(tiny_file):
    from quantlora.nodes.bridge import load_flux_model_patcher

    cfg, path = tiny_file
    patcher, report = load_flux_model_patcher(path, "none", "fp32")
    model = patcher.model.diffusion_model
    with torch.no_grad():
        outs = [comfy_forward(model, flux_inputs(cfg, s)) for s in (1, 2)]
    return outs, report, model


@pytest.mark.parametrize("quantization", list(BOUNDS))
@torch.no_grad()
def test_quantized_error_and_memory(tiny_file, baseline, quantization):
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.memory.sizes import module_bytes

    if quantization == "quanto-int4":
        pytest.importorskip("optimum.quanto")
    cfg, path = tiny_file
    ref_outs, ref_report, ref_model = baseline
    patcher, report = load_flux_model_patcher(path, quantization, "fp32")
    model = patcher.model.diffusion_model
    errs = [rel(comfy_forward(model, flux_inputs(cfg, s)), ref) for s, ref in zip((1, 2), ref_outs)]
    err = max(errs)
    x = torch.randn(3, 17, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    name = "double_blocks.1.img_mlp.0"
    layer_err = rel(model.get_submodule(name)(x), ref_model.get_submodule(name)(x))
    blocks = sum(module_bytes(b) for b in [*model.double_blocks, *model.single_blocks])
    print(f"\n{quantization}: layer rel err {layer_err:.4f} (bound {LAYER_BOUNDS[quantization]}), "
          f"model rel err {err:.5f} (bound {BOUNDS[quantization]:.4f}), weights {report.weights_bytes} B "
          f"vs {ref_report.weights_bytes} B fp32, blocks {blocks} B")
    assert 0 < layer_err < LAYER_BOUNDS[quantization]
    assert 0 < err < BOUNDS[quantization]
    assert report.weights_bytes < ref_report.weights_bytes * 0.6  # fp32 -> <=8-bit blocks at least
    # embedders and final layer stay in high precision
    assert model.img_in.weight.dtype == torch.float32 and model.final_layer.linear.weight.dtype == torch.float32
    for layer in (model.img_in, model.final_layer.linear):  # plain weights, not a quantized layer or tensor
        assert type(layer.weight) is torch.nn.Parameter and type(layer.weight.data) is torch.Tensor
    qkv = model.double_blocks[0].img_attn.qkv
    assert not (type(qkv.weight.data) is torch.Tensor and qkv.weight.dtype == torch.float32)


def test_unrunnable_backend_names_reason_and_choices(tiny_file):
    from quantlora.errors import QuantLoRAError
    from quantlora.nodes.bridge import load_flux_model_patcher

    if torch.cuda.is_available():
        pytest.skip("fp8 matmul may run on this GPU")
    with pytest.raises(QuantLoRAError) as e:
        load_flux_model_patcher(tiny_file[1], "torchao-fp8-dynamic", "fp32")
    msg = str(e.value)
    assert "torchao-fp8-dynamic" in msg and "compute capability 8.9" in msg and "bnb-nf4" in msg


def test_comfyui_sees_the_bytes_really_held(tiny_file):
    """ComfyUI's model_size() would count 8-bit tensor subclasses at their bf16 size; the loader tells
    it the bytes the model holds, so ComfyUI frees only what is needed."""
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.memory.sizes import module_bytes

    bf, _ = load_flux_model_patcher(tiny_file[1], "none", "fp32")
    q, _ = load_flux_model_patcher(tiny_file[1], "torchao-int8-weight-only", "fp32")
    assert q.model_size() == module_bytes(q.model) and bf.model_size() == module_bytes(bf.model)
    assert q.model_size() < 0.5 * bf.model_size()
    assert q.clone().model_size() == q.model_size()
