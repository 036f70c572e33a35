"""Layer 2 oracle: the pack's unquantized transformer (ComfyUI's Flux class, weights streamed by
our loader) against diffusers' FluxTransformer2DModel on the same weights, in fp32."""
import pytest
import torch



def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pack(x):  # (B, C, H, W) -> (B, H/2*W/2, C*4), diffusers' packing
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(t, c, h, w):
    b = t.shape[0]
    return t.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_inputs(cfg, seed=1, h=8, w=8, txt=5):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, cfg["in_channels"], h, w, generator=g),
                t=torch.tensor([0.7]), context=torch.randn(1, txt, cfg["context_in_dim"], generator=g),
                y=torch.randn(1, cfg["vec_in_dim"], generator=g), guidance=torch.tensor([3.5]))


def diffusers_forward(model, inp):
    x = inp["x"]
    b, c, h, w = x.shape
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    out = model(hidden_states=pack(x), encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
                timestep=inp["t"], img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(inp["context"].shape[1], 3),
                guidance=inp["guidance"], return_dict=False)[0]
    return unpack(out, c, h, w)


def comfy_forward(model, inp):
    return model(inp["x"], inp["t"], inp["context"], y=inp["y"], guidance=inp["guidance"])


@pytest.fixture(scope="module")
def tiny(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    d = tmp_path_factory.mktemp("oracle")
    sd = dm.flux_bfl_state_dict(dm.demo_flux_config(), seed=0, dtype=torch.float32)
    return dict(sd=sd, bfl=dm.write_bfl(str(d / "tiny-flux.safetensors"), sd, prefix="model.diffusion_model."),
                folder=dm.write_diffusers(str(d / "tiny-diffusers" / "transformer"), sd, dm.demo_flux_config()))


@pytest.fixture(scope="module")
def reference(tiny):
    from diffusers import FluxTransformer2DModel
    from quantlora.tools import demo_models as dm

    ref = FluxTransformer2DModel(**{k: v for k, v in dm.diffusers_config(dm.demo_flux_config()).items() if not k.startswith("_")})
    ref.load_state_dict(dm.to_diffusers(tiny["sd"], dm.demo_flux_config()), strict=True)
    return ref.eval()


def load_pack(path, quantization="none", dtype="fp32"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    patcher, report = load_flux_model_patcher(path, quantization, dtype)
    return patcher.model.diffusion_model.eval(), report


@torch.no_grad()
@pytest.mark.parametrize("layout", ["bfl", "folder"])
def test_pack_matches_diffusers_fp32(tiny, reference, layout):
    from quantlora.tools import demo_models as dm

    model, report = load_pack(tiny[layout])
    assert report.layout == ("bfl" if layout == "bfl" else "diffusers")
    for seed in (1, 2):
        inp = flux_inputs(dm.demo_flux_config(), seed)
        err = rel(comfy_forward(model, inp), diffusers_forward(reference, inp))
        assert err < 1e-4, f"{layout}: rel err {err}"


@torch.no_grad()
def test_schnell_and_inferred_arch(comfy, tmp_path):
    from quantlora.checkpoint.flux_config import infer_arch
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.demo_flux_config(), guidance_embed=False)
    if dm.comfy_detects_width():  # 0.3.75 loads only hidden 3072: keep its model at one block of each kind
        cfg.update(depth=2, depth_single_blocks=3, hidden_size=256, num_heads=2)
    sd = dm.flux_bfl_state_dict(cfg, seed=3, dtype=torch.float32)
    arch, layout, prefix = infer_arch({k: tuple(v.shape) for k, v in sd.items()}, "x")
    assert (arch.depth, arch.depth_single_blocks, arch.hidden_size, arch.num_heads, arch.guidance_embed) == \
        (cfg["depth"], cfg["depth_single_blocks"], cfg["hidden_size"], cfg["num_heads"], False)
    assert arch.variant == "schnell" and layout == "bfl" and prefix == ""
    path = dm.write_bfl(str(tmp_path / "schnell.safetensors"), sd)
    model, _ = load_pack(path)
    # The reference: ComfyUI's own loader (what UNETLoader calls) on the same tensors, no pack code.
    ref = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32}).model.diffusion_model
    assert type(model) is type(ref) and not ref.params.guidance_embed
    inp = flux_inputs(cfg)
    inp["guidance"] = None
    assert rel(comfy_forward(model, inp), comfy_forward(ref.eval(), inp)) < 1e-5  # fp32 summation order only


def test_scaled_fp8_checkpoint(comfy, tiny, tmp_path):
    """'Scaled fp8' files (ComfyUI's own fp8_scaled releases): weight stored as fp8(w / s) with a
    per-tensor scale_weight; the pack's Linear applies the scale as the weight arrives."""
    from quantlora.tools import demo_models as dm

    sd8, key = {}, "double_blocks.0.img_attn.qkv"
    for k, v in tiny["sd"].items():
        if v.ndim == 2 and k.startswith(("double_blocks", "single_blocks")):
            s = v.abs().max() / 448.0
            sd8[k] = (v / s).to(torch.float8_e4m3fn)
            sd8[k[: -len("weight")] + "scale_weight"] = s.reshape(1)
        else:
            sd8[k] = v
    sd8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = dm.write_bfl(str(tmp_path / "scaled-fp8.safetensors"), sd8)
    model, _ = load_pack(path)
    w = model.double_blocks[0].img_attn.qkv.weight
    want = sd8[key + ".weight"].float() * sd8[key + ".scale_weight"].float()
    assert torch.equal(w, want) and rel(w, tiny["sd"][key + ".weight"]) < 0.05


def test_fp8_checkpoint_upcasts(comfy, tiny, tmp_path):
    from quantlora.tools import demo_models as dm

    sd8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in tiny["sd"].items()}
    path = dm.write_bfl(str(tmp_path / "fp8.safetensors"), sd8)
    model, report = load_pack(path)
    assert "F8_E4M3" in report.file_dtypes
    w = model.double_blocks[0].img_attn.qkv.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, sd8["double_blocks.0.img_attn.qkv.weight"].float())
