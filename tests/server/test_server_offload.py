"""Layer 3: FP8LayerwiseCast and CPUOffloadSampler in a real ComfyUI server (CPU: offload is a
no-op there, so the offload sampler must give KSampler's image, byte for byte)."""
import io

import pytest
from PIL import Image

from graphs import loader, txt2img
from harness.server import execution_error

pytestmark = pytest.mark.server


def fp8_offload_graph(mode="block", seed=3, prefix="offload", sampler="CPUOffloadSampler", quantization="none"):
    g = txt2img({"loader": loader(quantization=quantization)["model"],
                 "model": {"class_type": "FP8LayerwiseCast",
                           "inputs": {"model": ["loader", 0], "storage_dtype": "float8_e4m3fn",
                                      "compute_dtype": "auto",
                                      "skip_pattern": r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(\.|$), norm"}}},
                seed=seed, prefix=prefix)
    if sampler == "CPUOffloadSampler":
        g["sample"]["class_type"] = "CPUOffloadSampler"
        g["sample"]["inputs"].update(offload_mode=mode, blocks_per_group=1, vram_budget_gb=0.0)
    return g


def test_object_info(server):
    cast = server.object_info("FP8LayerwiseCast")
    req = cast["input"]["required"]
    assert {"model", "storage_dtype", "compute_dtype", "skip_pattern"} <= set(req)
    assert cast["output"] == ["MODEL"]
    samp = server.object_info("CPUOffloadSampler")
    req = samp["input"]["required"]
    ks = server.object_info("KSampler")["input"]["required"]
    assert set(ks) <= set(req), "every stock KSampler input"
    assert {"offload_mode", "blocks_per_group", "vram_budget_gb"} <= set(req)
    modes = req["offload_mode"][0] if isinstance(req["offload_mode"][0], list) else req["offload_mode"][1]["options"]
    assert modes == ["auto", "none", "model", "block", "leaf"]
    assert samp["output"] == ["LATENT"]


def test_loader_fp8_offload_decode_save(server):
    entry = server.run(fp8_offload_graph("block", prefix="fp8-offload-block"))
    assert execution_error(entry) is None, execution_error(entry)
    text = entry["outputs"]["sample"]["text"][0]
    assert text.startswith("offload block") and "peak VRAM" in text, text
    png = Image.open(io.BytesIO(server.view(entry["outputs"]["save"]["images"][0])))
    assert png.size == (64, 64) and len(set(png.getdata())) > 10
    log = server.log_tail(1 << 22)
    assert "FP8LayerwiseCast:" in log and "CPUOffloadSampler: offload block" in log


def test_offload_sampler_image_equals_ksampler(server):
    a = server.run(fp8_offload_graph(sampler="KSampler", seed=11, prefix="fp8-ks"))
    b = server.run(fp8_offload_graph("leaf", seed=11, prefix="fp8-off-leaf"))
    c = server.run(fp8_offload_graph("model", seed=11, prefix="fp8-off-model"))
    for e in (a, b, c):
        assert execution_error(e) is None, execution_error(e)
    imgs = [server.view(e["outputs"]["save"]["images"][0]) for e in (a, b, c)]
    pixels = [Image.open(io.BytesIO(x)).tobytes() for x in imgs]
    assert pixels[0] == pixels[1] == pixels[2]


def test_quantized_loader_through_offload_sampler(server):
    entry = server.run(fp8_offload_graph("auto", seed=5, prefix="nf4-fp8-auto", quantization="bnb-nf4"))
    assert execution_error(entry) is None, execution_error(entry)
    assert "nothing to cast" in server.log_tail(1 << 22)
