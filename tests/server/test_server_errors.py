"""Layer 3: bad inputs to QuantizedFluxLoader through a real ComfyUI server.

Each bad input, posted through /prompt, must end in an execution error whose message names the
file or value and says what to do, and the server must go on serving: a good prompt afterwards
succeeds. Bad files are written into the server's models/diffusion_models with unique names.
"""
import itertools
import os
import pickle
import random
import shutil
import uuid

import pytest
import torch
from safetensors.torch import save_file

from graphs import loader, txt2img
from harness.server import PromptError, execution_error
from quantlora.tools.demo_models import DEMO_FLUX, TINY, flux_bfl_state_dict, write_diffusers

pytestmark = pytest.mark.server

_seeds = itertools.count(1000)


@pytest.fixture(scope="module")
def models(server):
    return os.path.join(server.base, "models", "diffusion_models")


def unique(stem: str, ext: str = ".safetensors") -> str:
    return f"bad-{stem}-{uuid.uuid4().hex[:8]}{ext}"


def listed(server) -> list:
    spec = server.object_info("QuantizedFluxLoader")["input"]["required"]["model_name"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def loader_error(server, name: str, quantization: str = "none") -> str:
    """Runs txt2img on `name`; asserts the loader failed with the pack's error and returns its message."""
    entry = server.run(txt2img(loader(name, quantization), seed=next(_seeds), prefix="bad-input"))
    err = execution_error(entry)
    assert err is not None, f"{name} ({quantization}) did not fail: {entry['status']}"
    assert err["node_type"] == "QuantizedFluxLoader", err
    assert err["exception_type"].endswith("QuantLoRAError"), (err["exception_type"], err["exception_message"],
                                                              "".join(err.get("traceback", [])))
    return err["exception_message"]


def assert_still_serving(server):
    assert server.alive()
    entry = server.run(txt2img(loader(), seed=next(_seeds), prefix="after-error"))
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["outputs"]["save"]["images"], entry["outputs"]


def small(*shape):
    return torch.zeros(shape, dtype=torch.float16)


def test_truncated_safetensors(server, models):
    name = unique("truncated")
    with open(os.path.join(models, DEMO_FLUX), "rb") as f:
        data = f.read()
    with open(os.path.join(models, name), "wb") as f:
        f.write(data[: len(data) // 2])
    assert name in listed(server)
    msg = loader_error(server, name)
    assert name in msg and "truncated" in msg and "re-download" in msg, msg
    assert_still_serving(server)


def test_random_bytes_named_safetensors(server, models):
    name = unique("random-bytes")
    rng = random.Random(7)
    data = bytes([0x11]) + rng.randbytes(64 * 1024)  # 0x11: not a pickle opcode or zip magic
    with open(os.path.join(models, name), "wb") as f:
        f.write(data)
    msg = loader_error(server, name)
    assert name in msg and "not a valid safetensors file" in msg and "re-download" in msg, msg
    assert_still_serving(server)


class _Canary:
    """Unpickling this creates a marker file: proof of whether anything unpickled the checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_is_never_unpickled(server, models, tmp_path):
    # The canary is live: unpickling its payload really does create the marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Canary(str(probe)))).close()
    assert probe.exists()

    marker = tmp_path / "unpickled-marker"
    payload = {"state_dict": {"double_blocks.0.img_attn.qkv.weight": _Canary(str(marker))}}

    # A .ckpt: the node lists only safetensors. ComfyUI 0.3.75 does not check a V3 combo's value
    # against its options, so the prompt is queued and the loader refuses it; a ComfyUI that does
    # check answers 400 value_not_in_list. Either way it is never unpickled.
    ckpt = unique("pickle", ".ckpt")
    with open(os.path.join(models, ckpt), "wb") as f:
        pickle.dump(payload, f, protocol=2)
    assert ckpt not in listed(server)
    try:
        msg = loader_error(server, ckpt)
    except PromptError as e:
        assert e.status == 400, e
        errors = e.body["node_errors"]["model"]["errors"]
        assert any(x["type"] == "value_not_in_list" and ckpt in x["details"] for x in errors), errors
    else:
        assert ckpt in msg and "pickle" in msg and "never unpickles" in msg and "safetensors" in msg, msg

    # The same pickle under a .safetensors name (listed, so it reaches the loader), raw and in
    # torch.save's zip format: refused by content, never unpickled.
    raw = unique("pickle-raw")
    shutil.copy(os.path.join(models, ckpt), os.path.join(models, raw))
    zipped = unique("pickle-zip")
    torch.save(payload, os.path.join(models, zipped))
    for name in (raw, zipped):
        assert name in listed(server)
        msg = loader_error(server, name)
        assert name in msg and "pickle" in msg and "never unpickles" in msg and "safetensors" in msg, msg
    assert not marker.exists(), "a pickle checkpoint was unpickled"
    assert_still_serving(server)
    assert not marker.exists(), "a pickle checkpoint was unpickled"


def test_sdxl_unet_checkpoint(server, models):
    name = unique("sdxl-unet")
    p = "model.diffusion_model."
    save_file({
        p + "input_blocks.0.0.weight": small(8, 4, 3, 3), p + "input_blocks.0.0.bias": small(8),
        p + "time_embed.0.weight": small(16, 8), p + "label_emb.0.0.weight": small(16, 32),
        p + "middle_block.1.norm.weight": small(8), p + "output_blocks.0.0.in_layers.0.weight": small(16),
        p + "out.2.weight": small(4, 8, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": small(16, 8),
        "first_stage_model.decoder.conv_in.weight": small(8, 4, 3, 3),
    }, os.path.join(models, name))
    msg = loader_error(server, name)
    assert name in msg and "SDXL" in msg and "not a FLUX.1 transformer" in msg and "Pick a FLUX.1" in msg, msg
    assert_still_serving(server)


def test_flux2_checkpoint(server, models):
    name = unique("flux2")
    h = 64
    save_file({
        "img_in.weight": small(h, 128), "txt_in.weight": small(h, 256), "time_in.in_layer.weight": small(h, 256),
        "double_stream_modulation_img.lin.weight": small(6 * h, h),
        "double_stream_modulation_txt.lin.weight": small(6 * h, h),
        "single_stream_modulation.lin.weight": small(3 * h, h),
        "double_blocks.0.img_attn.qkv.weight": small(3 * h, h),
        "double_blocks.0.img_attn.norm.key_norm.scale": small(16),
        "double_blocks.0.img_attn.norm.query_norm.scale": small(16),
        "double_blocks.0.img_mlp.0.weight": small(6 * h, h),
        "single_blocks.0.linear1.weight": small(9 * h, h),
        "final_layer.linear.weight": small(128, h),
    }, os.path.join(models, name))
    msg = loader_error(server, name)
    assert name in msg and "FLUX.2" in msg and "not supported" in msg and "Pick a FLUX.1" in msg, msg
    assert_still_serving(server)


def test_quantization_this_device_cannot_run(server):
    if torch.cuda.is_available():
        pytest.skip("on a GPU torchao-fp8-dynamic may run; this case is for CPU machines")
    msg = loader_error(server, DEMO_FLUX, "torchao-fp8-dynamic")
    assert "'torchao-fp8-dynamic'" in msg and "cannot run here" in msg, msg
    reason, _, choices = msg.partition("Choices that work on this device:")
    assert "fp8 matrix multiplication needs an NVIDIA GPU" in reason and "this device is cpu" in reason, msg
    offered = {c.strip(" .\n") for c in choices.split(",")}
    assert {"none", "bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "quanto-int8"} <= offered, msg
    assert "torchao-fp8-dynamic" not in offered, msg
    assert_still_serving(server)


def test_file_removed_after_listing(server, models):
    name = unique("removed")
    path = os.path.join(models, name)
    shutil.copy(os.path.join(models, DEMO_FLUX), path)
    assert name in listed(server)
    # Hold the queue with a slower prompt, post ours (validation sees the file), then remove it
    # before it runs.
    blocker = server.queue(txt2img(loader(), seed=next(_seeds), size=256, steps=8, prefix="blocker"))
    victim = server.queue(txt2img(loader(name), seed=next(_seeds)))
    os.remove(path)
    pending = [item[1] for item in server.get("/queue")["queue_pending"]]
    assert victim in pending, "the blocker finished before the file was removed; make it slower"
    assert execution_error(server.wait(blocker)) is None
    err = execution_error(server.wait(victim))
    assert err is not None and err["exception_type"].endswith("QuantLoRAError"), err
    msg = err["exception_message"]
    assert name in msg and "not found" in msg and "Put the file there" in msg, msg
    assert_still_serving(server)


def test_diffusers_folder_missing_a_shard(server, models):
    folder = unique("diffusers", "")
    path = write_diffusers(os.path.join(models, folder), flux_bfl_state_dict(TINY, seed=1), TINY, shards=2)
    gone = "diffusion_pytorch_model-00002-of-00002.safetensors"
    os.remove(os.path.join(path, gone))
    name = folder + "/"
    assert name in listed(server)
    msg = loader_error(server, name)
    assert folder in msg and gone in msg and "missing" in msg and "re-download" in msg, msg
    assert_still_serving(server)



def test_valid_file_whose_header_length_looks_like_pickle_loads(server, models):
    """The pickle sniff must not misfire: a safetensors header length of 0x..80 starts the file with
    the byte a pickle starts with."""
    from safetensors.torch import load_file, save

    sd = load_file(os.path.join(models, DEMO_FLUX))
    for k in range(512):
        data = save(sd, metadata={"pad": "x" * k})
        if data[0] == 0x80:
            break
    name = unique("header-0x80").replace("bad-", "good-")
    with open(os.path.join(models, name), "wb") as f:
        f.write(data)
    entry = server.run(txt2img(loader(name), seed=next(_seeds), prefix="header-0x80"))
    assert execution_error(entry) is None, execution_error(entry)


def test_runaway_skip_pattern_is_refused_and_the_server_keeps_serving(server):
    """Issue 11: a nested-quantifier regex in FP8LayerwiseCast's skip_pattern held the whole server
    for minutes. Regexes are refused now with a clear error, at once; globs that would make a
    backtracking engine explode are matched in linear time. Either way the next prompt runs."""
    import time

    def cast_graph(pattern, prefix):
        return txt2img({"loader": loader()["model"],
                        "model": {"class_type": "FP8LayerwiseCast",
                                  "inputs": {"model": ["loader", 0], "storage_dtype": "float8_e4m3fn",
                                             "compute_dtype": "auto", "skip_pattern": pattern}}},
                       seed=next(_seeds), prefix=prefix)

    t0 = time.time()
    entry = server.run(cast_graph(r"(double_blocks(\.\w+)*)*$x", "runaway-regex"))
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "FP8LayerwiseCast", entry["status"]
    assert "layer patterns are globs" in err["exception_message"] and "'('" in err["exception_message"], err
    glob_bomb = "\n".join(["*a" * 60 + "*b"] * 64)  # the most patterns and characters the parser takes
    entry = server.run(cast_graph(glob_bomb, "glob-bomb"))
    assert execution_error(entry) is None, execution_error(entry)
    assert time.time() - t0 < 120
    assert_still_serving(server)
