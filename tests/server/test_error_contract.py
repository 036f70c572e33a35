"""The error contract (docs/errors.md): user-caused failures that used to escape as another
exception type (KeyError, TypeError, ZeroDivisionError, RuntimeError from torch or a quantization
library, FileNotFoundError) now raise QuantLoRAError naming the input and what to do. In-process
on CPU, plus two cases through the real server (API-format values the UI cannot send)."""
import asyncio
import inspect
import itertools
import json
import math
import os
import shutil
import uuid

import pytest
import torch
from safetensors.torch import save_file

from quantlora.errors import QuantLoRAError

_seeds = itertools.count(int.from_bytes(os.urandom(3), "big"))


def _raises(fn, *args, **kwargs) -> str:
    with pytest.raises(QuantLoRAError) as e:
        out = fn(*args, **kwargs)
        if inspect.iscoroutine(out):  # QuantizedFluxLoader.execute is async (nodes/load_overlap.py)
            asyncio.run(out)
    assert type(e.value) is QuantLoRAError
    return str(e.value)


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    sd = dm.flux_bfl_state_dict(dm.TINY, seed=5, dtype=torch.float32)
    return dm.write_bfl(str(tmp_path_factory.mktemp("contract") / "flux-contract.safetensors"), sd)


# ---------------------------------------------------------------- combo values (not checked by ComfyUI 0.3.75 for V3 nodes)

@pytest.mark.parametrize("name,value", [("quantization", "int3"), ("lora_targets", "everything"),
                                        ("lora_slot_layout", "diagonal"), ("compile", "max-autotune"),
                                        ("attention", "xformers"), ("compute_dtype", "bf17"), ("model_name", 7)])
def test_loader_combo_values(comfy, name, value):
    from quantlora.nodes.loader_node import QuantizedFluxLoader
    from quantlora.tools.demo_models import DEMO_FLUX

    args = dict(model_name=DEMO_FLUX, quantization="none", compute_dtype="auto")
    args[name] = value
    msg = _raises(QuantizedFluxLoader.execute, **args)
    assert name in msg and repr(value) in msg, msg


def test_fa3_where_it_cannot_run(comfy):
    """attention 'fa3' on a machine without a Hopper GPU (or without the fa3-fwd package): the
    loader says why and what to pick instead, before loading anything."""
    from quantlora.nodes.loader_node import QuantizedFluxLoader
    from quantlora.tools.demo_models import DEMO_FLUX

    msg = _raises(QuantizedFluxLoader.execute, model_name=DEMO_FLUX, quantization="none", compute_dtype="auto",
                  attention="fa3")
    assert "attention 'fa3'" in msg and ("NVIDIA" in msg or "Hopper" in msg or "fa3-fwd" in msg) and "'auto'" in msg, msg


@pytest.mark.parametrize("attention", ["fa3", "fa3-fp8"])
def test_fa3_choices_where_they_cannot_run(comfy, attention):
    """Both FlashAttention-3 choices say why they cannot run here and what to pick instead."""
    from quantlora.nodes.loader_node import QuantizedFluxLoader
    from quantlora.tools.demo_models import DEMO_FLUX

    msg = _raises(QuantizedFluxLoader.execute, model_name=DEMO_FLUX, quantization="none", compute_dtype="auto",
                  attention=attention)
    assert f"attention {attention!r}" in msg and "NVIDIA" in msg and "'auto'" in msg, msg


def test_cuda_graphs_where_they_cannot_run(comfy):
    """compile 'regional+cudagraphs' without a CUDA device (or under ComfyUI's default cudaMallocAsync
    allocator): the loader says why and what to pick instead, before loading anything."""
    from quantlora.nodes.loader_node import QuantizedFluxLoader
    from quantlora.tools.demo_models import DEMO_FLUX

    msg = _raises(QuantizedFluxLoader.execute, model_name=DEMO_FLUX, quantization="none", compute_dtype="auto",
                  compile="regional+cudagraphs")
    assert "compile 'regional+cudagraphs'" in msg and "no CUDA device" in msg and "'regional'" in msg, msg


def test_compute_dtype_of_the_bridge(comfy):
    from quantlora.nodes.bridge import resolve_compute_dtype

    msg = _raises(resolve_compute_dtype, "bf17", 10)
    assert "compute_dtype 'bf17'" in msg and "bf16" in msg and "Pick one" in msg


def test_fp8_cast_compute_dtype(flux_file):
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.nodes.fp8_cast_run import cast_model

    patcher, _ = load_flux_model_patcher(flux_file, "none", "fp32")
    msg = _raises(cast_model, patcher, "float8_e4m3fn", "fp8", None)
    assert "compute_dtype 'fp8'" in msg and "bf16" in msg


@pytest.mark.parametrize("name,value", [("sampler_name", "eulerr"), ("scheduler", "linear"), ("offload_mode", "disk")])
def test_offload_sampler_combo_values(comfy, name, value):
    from quantlora.nodes.offload_sampler_node import CPUOffloadSampler

    args = dict(model=None, seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", positive=[], negative=[],
                latent_image={"samples": torch.zeros(1, 16, 2, 2)}, denoise=1.0, offload_mode="auto",
                blocks_per_group=1, vram_budget_gb=0.0)
    args[name] = value
    msg = _raises(CPUOffloadSampler.execute, **args)
    assert name in msg and repr(value) in msg, msg


def test_offload_plan_errors_are_the_pack_type(flux_file):
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.nodes.offload_run import _diffusion_model, plan_offload

    patcher, _ = load_flux_model_patcher(flux_file, "none", "fp32")
    assert "offload_mode 'disk'" in _raises(plan_offload, patcher, "disk", 1, 0.0)

    class NoDiffusionModel:
        model = object()

    assert "no diffusion_model" in _raises(_diffusion_model, NoDiffusionModel())


# ---------------------------------------------------------------- LoRAHotswap

@pytest.fixture(scope="module")
def lora_setup(flux_file, tmp_path_factory):
    import folder_paths
    from quantlora.tools.demo_models import write_demo_lora

    d = tmp_path_factory.mktemp("contract-loras")
    name = f"contract-{uuid.uuid4().hex[:6]}.safetensors"
    write_demo_lora(str(d / name), flux_file, rank=4, seed=9)
    folder_paths.add_model_folder_path("loras", str(d))
    return d, name


def _pack_model(flux_file):
    from quantlora.nodes import runtime
    from quantlora.nodes.bridge import load_flux_model_patcher

    patcher, _ = load_flux_model_patcher(flux_file, "none", "fp32")
    runtime.install(patcher)
    return patcher


@pytest.mark.parametrize("strength", [math.nan, math.inf])
def test_hotswap_strength_not_a_number(flux_file, lora_setup, strength):
    from quantlora.nodes.hotswap_node import LoRAHotswap

    msg = _raises(LoRAHotswap.execute, _pack_model(flux_file), lora_setup[1], strength, 8, "blocks")
    assert lora_setup[1] in msg and "strength" in msg and "-10 to 10" in msg, msg


@pytest.mark.parametrize("name,value", [("lora_name", 3), ("targets", "mlp"), ("mode", "merged")])
def test_hotswap_bad_values(flux_file, lora_setup, name, value):
    from quantlora.nodes.hotswap_node import LoRAHotswap

    args = dict(model=_pack_model(flux_file), lora_name=lora_setup[1], strength=1.0, max_rank=8, targets="blocks")
    args[name] = value
    msg = _raises(LoRAHotswap.execute, **args)
    assert name in msg and repr(value) in msg, msg


@pytest.mark.parametrize("mode", ["slots", "merge"])
def test_lora_removed_between_node_and_sampling(flux_file, lora_setup, mode):
    """Was FileNotFoundError from os.stat inside the sampler."""
    import nodes
    from quantlora.nodes import runtime
    from quantlora.nodes.hotswap_node import LoRAHotswap

    folder, name = lora_setup
    gone = f"gone-{uuid.uuid4().hex[:6]}.safetensors"
    shutil.copy(folder / name, folder / gone)
    model = LoRAHotswap.execute(_pack_model(flux_file), gone, 0.5, 8, "blocks", mode).args[0]
    os.remove(folder / gone)
    runtime.LORAS._items.clear()  # as after the cache evicted it
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 4, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    msg = _raises(nodes.common_ksampler, model, 1, 1, 1.0, "euler", "simple", cond, cond,
                  {"samples": torch.zeros(1, 16, 4, 4)})
    assert gone in msg and "removed or renamed" in msg and "queue the prompt again" in msg, msg
    assert runtime.active_loras(model.model.diffusion_model) == ()


# ---------------------------------------------------------------- damaged or inconsistent files

def _header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
                                   {"dtype": 5, "shape": [4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}])
def test_malformed_header_entries(tmp_path, entry):
    from quantlora.checkpoint.safetensors_io import read_header

    path = _header_file(tmp_path / "bad-entry.safetensors", {"w": entry}, b"\0" * 16)
    msg = _raises(read_header, path)
    assert "bad-entry.safetensors" in msg and "malformed" in msg and "Re-download" in msg


def test_unknown_dtype_in_data(tmp_path):
    """A header safetensors itself refuses: its own error type, wrapped."""
    from quantlora.checkpoint.safetensors_io import load_state_dict

    path = _header_file(tmp_path / "bad-dtype.safetensors", {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}},
                        b"\0" * 16)
    msg = _raises(load_state_dict, path)
    assert "bad-dtype.safetensors" in msg and "Re-download" in msg


def test_norm_scale_of_size_zero(comfy):
    """Was ZeroDivisionError in the architecture inference."""
    from quantlora.checkpoint.flux_config import infer_arch

    shapes = {"img_in.weight": (64, 64), "double_blocks.0.img_attn.norm.key_norm.scale": (0,)}
    msg = _raises(infer_arch, shapes, "zero-norm.safetensors")
    assert "zero-norm.safetensors" in msg and "size 0" in msg and "Re-download" in msg


def test_model_that_cannot_be_built(flux_file, tmp_path):
    """hidden size 0: was ZeroDivisionError inside ComfyUI's model construction."""
    from safetensors.torch import load_file

    from quantlora.nodes.bridge import load_flux_model_patcher

    sd = load_file(flux_file)
    sd["img_in.weight"] = torch.zeros(0, 64)
    path = str(tmp_path / "hidden-0.safetensors")
    save_file(sd, path)
    msg = _raises(load_flux_model_patcher, path, "none", "fp32")
    assert "hidden-0.safetensors" in msg and "cannot be built" in msg and "re-download" in msg


def test_diffusers_qkv_that_do_not_concatenate(flux_file, tmp_path):
    """Was RuntimeError from torch.cat while fusing q/k/v."""
    from safetensors.torch import load_file

    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.tools import demo_models as dm

    folder = dm.write_diffusers(str(tmp_path / "qkv"), load_file(flux_file), dm.TINY, shards=1)
    shard = os.path.join(folder, "diffusion_pytorch_model-00001-of-00001.safetensors")
    sd = load_file(shard)
    sd["transformer_blocks.0.attn.to_k.weight"] = torch.zeros(64, 32)
    save_file(sd, shard)
    msg = _raises(load_flux_model_patcher, folder, "none", "fp32")
    assert "qkv" in msg and "could not build a Flux model" in msg and "damaged" in msg, msg


def test_quantization_library_failure(flux_file, monkeypatch):
    """A quantization library's own exception while quantizing a block."""
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.quant import backends

    def broken(module, dtype, device):
        raise RuntimeError("kernel not compiled for this architecture")

    monkeypatch.setitem(backends.BACKENDS, "bnb-int8", backends.BACKENDS["bnb-int8"].__class__(
        **{**backends.BACKENDS["bnb-int8"].__dict__, "apply": broken}))
    msg = _raises(load_flux_model_patcher, flux_file, "bnb-int8", "fp32")
    assert "quantization 'bnb-int8' failed on double_blocks.0" in msg and "kernel not compiled" in msg, msg
    assert "Pick another quantization" in msg


# ---------------------------------------------------------------- through the real server

@pytest.mark.server
def test_server_bad_combo_value_and_nan_strength(server):
    from graphs import loader, txt2img
    from harness.server import execution_error
    from quantlora.tools.demo_models import DEMO_FLUX, write_demo_lora

    from harness.server import PromptError

    g = txt2img(loader(compute_dtype="bf17"), seed=next(_seeds), decode=False)
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "contract"}}
    try:  # v0.33 checks a V3 combo's value itself (400); 0.3.75 does not, and the node's own check answers
        err = execution_error(server.run(g))
        assert err and err["node_type"] == "QuantizedFluxLoader" and err["exception_type"].endswith("QuantLoRAError"), err
        assert "compute_dtype 'bf17'" in err["exception_message"]
    except PromptError as e:
        assert e.status == 400 and "compute_dtype" in json.dumps(e.body) and "bf17" in json.dumps(e.body), e.body

    root = os.path.join(server.base, "models")
    write_demo_lora(os.path.join(root, "loras", "contract-nan.safetensors"), os.path.join(root, "diffusion_models", DEMO_FLUX))
    g = txt2img(loader(), seed=next(_seeds), decode=False)
    g["lora"] = {"class_type": "LoRAHotswap", "inputs": {"model": ["model", 0], "lora_name": "contract-nan.safetensors",
                                                         "strength": math.nan, "max_rank": 16, "targets": "blocks"}}
    g["sample"]["inputs"]["model"] = ["lora", 0]
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "contract"}}
    err = execution_error(server.run(g))  # json.dumps writes NaN; ComfyUI's min/max check lets NaN through
    assert err and err["node_type"] == "LoRAHotswap" and err["exception_type"].endswith("QuantLoRAError"), err
    assert "strength nan" in err["exception_message"]
    g["lora"]["inputs"]["strength"] = 0.5
    entry = server.run(g)
    assert execution_error(entry) is None and entry["outputs"]["save"]["latents"], (execution_error(entry) or {}).get("exception_message")  # the server goes on


# ---------------------------------------------------------------- the rest of the table in docs/errors.md (in-process)

def test_checkpoint_name_is_not_a_path(tmp_path):
    from quantlora.checkpoint.sources import resolve_checkpoint

    for name in ("/etc/passwd", "../secret.safetensors", "a/../../b.safetensors"):
        assert "give a name from the model list" in _raises(resolve_checkpoint, name, [str(tmp_path)])
    msg = _raises(resolve_checkpoint, "absent.safetensors", [str(tmp_path)])
    assert "absent.safetensors" in msg and "not found" in msg and "refresh" in msg


def test_source_kinds(tmp_path):
    from quantlora.checkpoint.sources import open_source

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert "not a .safetensors file" in _raises(open_source, str(gguf))
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    assert "a folder without diffusion_pytorch_model" in _raises(open_source, str(folder))
    bad = tmp_path / "bad-index"
    bad.mkdir()
    (bad / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    msg = _raises(open_source, str(bad))
    assert "unreadable shard index" in msg and "re-download" in msg


@pytest.mark.parametrize("content,expect", [(b"", "only 0 bytes"), (b"\x05\x00\x00\x00\x00\x00\x00\x00{abcd", "not valid JSON"),
                                            (b"\x00" * 16, "header length 0")])
def test_damaged_headers(tmp_path, content, expect):
    from quantlora.checkpoint.safetensors_io import read_header

    path = tmp_path / "damaged.safetensors"
    path.write_bytes(content)
    msg = _raises(read_header, str(path))
    assert "damaged.safetensors" in msg and expect in msg, msg


def test_incomplete_and_inconsistent_checkpoints(flux_file, tmp_path):
    from safetensors.torch import load_file

    from quantlora.nodes.bridge import load_flux_model_patcher

    sd = load_file(flux_file)
    missing = dict(sd)
    del missing["single_blocks.0.linear2.weight"]
    save_file(missing, str(tmp_path / "incomplete.safetensors"))
    msg = _raises(load_flux_model_patcher, str(tmp_path / "incomplete.safetensors"), "none", "fp32")
    assert "incomplete.safetensors" in msg and "missing from the file" in msg and "single_blocks.0.linear2.weight" in msg
    wrong = dict(sd)
    wrong["double_blocks.0.img_mlp.2.weight"] = torch.zeros(64, 128)
    save_file(wrong, str(tmp_path / "wrong-shape.safetensors"))
    msg = _raises(load_flux_model_patcher, str(tmp_path / "wrong-shape.safetensors"), "none", "fp32")
    assert "double_blocks.0.img_mlp.2.weight" in msg and "expects (128, 512)" in msg, msg


def test_quantization_errors(flux_file, tmp_path):
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.quant.backends import unavailable_reason
    from quantlora.tools import demo_models as dm

    msg = _raises(load_flux_model_patcher, flux_file, "int3", "fp32")
    assert "quantization 'int3' is unknown" in msg and "bnb-nf4" in msg
    if unavailable_reason("bnb-nf4", torch.device("cpu")) is None:
        # Every FLUX.1 width ComfyUI builds is a multiple of 128, so the width check is met at layer 1.
        from quantlora.quant.backends import BACKENDS
        from quantlora.quant.loader import LayerLoader

        layer = torch.nn.Linear(96, 64)
        sd = {"double_blocks.0.x.weight": torch.zeros(64, 96), "double_blocks.0.x.bias": torch.zeros(64)}
        ll = LayerLoader(BACKENDS["bnb-nf4"], torch.float32, torch.device("cpu"), "h96.safetensors")
        msg = _raises(ll.load_linear, layer, sd, "double_blocks.0.x.", [])
        assert "multiple of 64" in msg and "has 96" in msg and "Pick another quantization" in msg


def test_lora_on_a_model_that_is_not_flux(comfy, lora_setup):
    from quantlora.nodes.hotswap_node import LoRAHotswap

    class Other:
        class model:
            diffusion_model = torch.nn.Linear(2, 2)

    msg = _raises(LoRAHotswap.execute, Other(), lora_setup[1], 1.0, 8, "blocks")
    assert "not a FLUX.1 transformer (Linear)" in msg


def test_slot_arguments(flux_file):
    from quantlora.lora.hotswap import attach_slots
    from quantlora.nodes.bridge import load_flux_model_patcher

    dm = load_flux_model_patcher(flux_file, "none", "fp32")[0].model.diffusion_model
    assert "max_rank 0: must be at least 1" in _raises(attach_slots, dm, 0)
    assert "lora slot layout 'diagonal' unknown" in _raises(attach_slots, dm, 8, "blocks", layout="diagonal")


def test_fp8_cast_other_inputs(flux_file):
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.nodes.fp8_cast_run import cast_model

    patcher, _ = load_flux_model_patcher(flux_file, "none", "fp32")
    assert "storage_dtype 'int4'" in _raises(cast_model, patcher, "int4", "auto", None)

    class NoDm:
        model = object()

    assert "no diffusion_model to cast" in _raises(cast_model, NoDm(), "float8_e4m3fn", "auto", None)


def test_lora_not_in_the_folder(flux_file, lora_setup):
    from quantlora.nodes.hotswap_node import LoRAHotswap

    msg = _raises(LoRAHotswap.execute, _pack_model(flux_file), "absent-lora.safetensors", 1.0, 8, "blocks")
    assert "LoRA 'absent-lora.safetensors' not found in" in msg and "models/loras" in msg and "refresh" in msg
