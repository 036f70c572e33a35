"""Layer 2: the loader's weight cache (quant/weight_cache.py). A load with the cache on writes the
quantized layers; the next load of the same file reads them instead of quantizing, and builds a model
equal bit for bit to a load without the cache (every quantized tensor's inner tensors, the forward).
A changed checkpoint, another quantization, a damaged cache file: each is a miss that loads from the
checkpoint and writes a fresh file. On this CPU machine the load device is the CPU
(DirectReader.on_cpu makes the reads those a GPU load makes)."""
import logging
import os

import pytest
import torch

from test_oracle_diffusers import comfy_forward, flux_inputs


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.demo_flux_config(), depth=3, depth_single_blocks=3)
    sd = dm.flux_bfl_state_dict(cfg, seed=31, dtype=torch.bfloat16)
    return cfg, dm.write_bfl(str(tmp_path_factory.mktemp("wcache") / "flux.safetensors"), sd)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    from quantlora.checkpoint.direct_read import DirectReader
    from quantlora.quant import weight_cache

    d = tmp_path / "cache"
    monkeypatch.setenv(weight_cache.ENV_DIR, str(d))
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    return d


def _load(path, quantization, mode):
    from quantlora.nodes import bridge

    patcher, report = bridge.load_flux_model_patcher(path, quantization, "bf16", weight_cache_mode=mode)
    return patcher.model.diffusion_model.eval(), report


def _inner(t):
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [getattr(t, n) for n in names]


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert type(sa[k]) is type(sb[k]), k
        for x, y in zip(_inner(sa[k]), _inner(sb[k])):
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.dtype.itemsize == 1 else x,
                                                      y.view(torch.uint8) if y.dtype.itemsize == 1 else y), k


def _files(d):
    return sorted(p for p in os.listdir(d) if not p.startswith("."))


@torch.no_grad()
@pytest.mark.parametrize("quantization", ["torchao-int8-weight-only", "quanto-int8", "quanto-fp8"])
def test_second_load_reads_the_cache_and_builds_the_same_model(flux_file, cache_dir, quantization, caplog):
    cfg, path = flux_file
    plain, _ = _load(path, quantization, "off")
    assert not cache_dir.exists()  # off writes nothing
    first, r1 = _load(path, quantization, "on")
    assert r1.weight_cache["written"] and not r1.weight_cache["read"] and r1.weight_cache["layers"] == r1.quantized_layers > 0
    assert len(_files(cache_dir)) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second, r2 = _load(path, quantization, "on")
    # the cache file's alignment padding never reaches ComfyUI (its "unet unexpected: [quantlora_pad.3, ...]"
    # warning, ~300 names long on the full model, was in every cached load's log on the H200)
    assert not [m for m in caplog.messages if "unexpected" in m or "quantlora_pad" in m], caplog.messages
    assert r2.weight_cache["read"] and r2.weight_cache["layers"] == r1.quantized_layers == r2.quantized_layers, r2.weight_cache
    assert r2.phases["cache_hits"] == r1.quantized_layers and r2.phases["quantize_s"] < 1e-3 + r2.phases["cached_s"]
    assert r2.phases["direct_gib"] < r1.phases["direct_gib"]  # the bf16 weights were not read again
    from quantlora.quant.weight_cache import BIAS, read_header

    header = read_header(r2.weight_cache["path"])
    held = header.tensors
    assert "double_blocks.2.img_attn.qkv." + BIAS in held  # biases read from the cache, beside their weights
    # read through the file's mapping (memory/pinned_file.py), each layer on its own 64 KiB boundary
    from quantlora.memory import pinned_file
    from quantlora.quant.weight_cache import ALIGN

    assert r2.phases["mapped_gib"] > 0 and r2.phases["cache_map"]["copies"] > 0
    starts = [header.data_start + min(held[k].start for k in held if k.startswith(p) and not k.startswith("quantlora_pad"))
              for p in r2_layers(header)]
    assert starts and all(s % ALIGN == 0 for s in starts)
    assert set(pinned_file.of(second).views) == {p.rstrip(".") for p in r2_layers(header)}
    for m in (first, second):
        _assert_same_model(plain, m)
    # the rebuilt weights are the library's own class, with what its quantize_ gives a module
    a = plain.double_blocks[2].img_attn.qkv
    b = second.double_blocks[2].img_attn.qkv
    assert type(a.weight) is type(b.weight) and repr(a) == repr(b)
    inp = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in flux_inputs(cfg, seed=3).items()}
    assert torch.equal(comfy_forward(second, inp), comfy_forward(plain, inp))


def r2_layers(header):
    import json

    return list(json.loads(header.metadata["quantlora_layers"]))


def _lora(names, seed=5, rank=4):
    from quantlora.lora.formats import LoRATarget, ParsedLoRA

    g = torch.Generator().manual_seed(seed)
    targets = []
    for name, rows, fan_in in names:
        down = torch.randn(rank, fan_in, generator=g) * fan_in ** -0.5
        up = torch.randn(rows, rank, generator=g) * 0.05 * fan_in ** -0.5
        targets.append(LoRATarget(name, 0, rows, down.to(torch.bfloat16), up.to(torch.bfloat16), 1.0))
    return ParsedLoRA("file-pristine", "test", targets)


@torch.no_grad()
def test_merge_takes_the_mapped_cache_as_its_pristine_copy(flux_file, cache_dir):
    """A model read from the weight cache merges a LoRA with the cache file's bytes as the pristine copy
    (nothing copied back from the weights): the merged weights equal those of a model whose pristine
    copy was taken from its weights, and taking the LoRA off gives the file's weights bit for bit."""
    from quantlora.lora.merge import MergeState
    from quantlora.memory import pinned_file
    from quantlora.quant import weight_codecs as codecs

    _, path = flux_file
    quantization = "torchao-int8-weight-only"
    plain, _ = _load(path, quantization, "off")
    _load(path, quantization, "on")  # writes the cache
    cached, r = _load(path, quantization, "on")
    assert r.weight_cache["read"] and pinned_file.of(cached) is not None
    pristine = {n: [t.clone() for t in codecs.storage(cached.get_submodule(n))]
                for n in ("double_blocks.1.img_attn.qkv", "single_blocks.2.linear1", "final_layer.linear")}
    layer = cached.double_blocks[1].img_attn.qkv
    lin1 = cached.single_blocks[2].linear1
    fl = cached.final_layer.linear  # not quantized, not in the cache: its pristine copy is taken as before
    lo = _lora([("double_blocks.1.img_attn.qkv", layer.out_features, layer.in_features),
                ("single_blocks.2.linear1", lin1.out_features, lin1.in_features),
                ("final_layer.linear", fl.out_features, fl.in_features)])
    from quantlora.lora.merge import pristine_bytes_needed

    # auto mode's host-memory check counts only what a merge would copy: here the final layer
    assert pristine_bytes_needed(cached, [(lo, 1.0)]) == codecs.nbytes(fl) < pristine_bytes_needed(plain, [(lo, 1.0)])
    mine, theirs = MergeState(cached), MergeState(plain)
    mine.activate(("a",), [(lo, 1.0)])
    theirs.activate(("a",), [(lo, 1.0)])
    file_bytes = sum(t.numel() * t.element_size() for n in ("double_blocks.1.img_attn.qkv", "single_blocks.2.linear1")
                     for t in codecs.storage(cached.get_submodule(n)))
    assert mine.report.pristine_file_bytes == file_bytes and theirs.report.pristine_file_bytes == 0
    assert mine.report.pristine_bytes == theirs.report.pristine_bytes
    for n in pristine:
        a, b = codecs.storage(cached.get_submodule(n)), codecs.storage(plain.get_submodule(n))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), n
        assert not all(torch.equal(x, y) for x, y in zip(a, pristine[n])), f"{n}: the LoRA was not merged"
    mine.deactivate()
    for n, before in pristine.items():
        assert all(torch.equal(x, y) for x, y in zip(codecs.storage(cached.get_submodule(n)), before)), n
    # released (a sampling with no host-side merge): a later merge state takes its copy from the weights
    pinned_file.release(cached)
    again = MergeState(cached)
    again.activate(("a",), [(lo, 1.0)])
    assert again.report.pristine_file_bytes == 0
    again.deactivate()
    for n, before in pristine.items():
        assert all(torch.equal(x, y) for x, y in zip(codecs.storage(cached.get_submodule(n)), before)), n


@torch.no_grad()
def test_a_changed_checkpoint_or_quantization_misses(flux_file, cache_dir, tmp_path):
    from quantlora.tools import demo_models as dm

    cfg, path = flux_file
    _load(path, "torchao-int8-weight-only", "on")
    (old,) = _files(cache_dir)
    # another quantization: its own file beside the first
    _, r = _load(path, "torchao-int8-dynamic", "on")
    assert r.weight_cache["written"] and len(_files(cache_dir)) == 2
    # the checkpoint rewritten with other weights (same name and size): a miss, the old file replaced
    sd = dm.flux_bfl_state_dict(cfg, seed=32, dtype=torch.bfloat16)
    changed = dm.write_bfl(str(tmp_path / "flux.safetensors"), sd)
    os.replace(changed, path)
    model, r = _load(path, "torchao-int8-weight-only", "on")
    assert not r.weight_cache["read"] and r.weight_cache["written"]
    assert old not in _files(cache_dir) and len(_files(cache_dir)) == 2
    plain, _ = _load(path, "torchao-int8-weight-only", "off")
    _assert_same_model(plain, model)


@torch.no_grad()
def test_a_damaged_cache_file_is_ignored_and_written_again(flux_file, cache_dir, caplog):
    _, path = flux_file
    _load(path, "torchao-int8-weight-only", "on")
    (name,) = _files(cache_dir)
    f = cache_dir / name
    with open(f, "r+b") as fh:  # truncated: the header promises more bytes than the file has
        fh.truncate(os.path.getsize(f) // 2)
    model, r = _load(path, "torchao-int8-weight-only", "on")
    assert not r.weight_cache["read"] and r.weight_cache["written"]
    assert any("ignoring the weight cache" in m for m in caplog.messages)
    again, r = _load(path, "torchao-int8-weight-only", "on")
    assert r.weight_cache["read"]
    _assert_same_model(model, again)


def test_no_quantization_writes_nothing(flux_file, cache_dir):
    _, path = flux_file
    _, r = _load(path, "none", "on")
    assert r.weight_cache["layers"] == 0 and not r.weight_cache["written"]
    assert not cache_dir.exists() or not _files(cache_dir)


def test_bad_mode_is_named(flux_file):
    from quantlora.errors import QuantLoRAError
    from quantlora.nodes import bridge

    with pytest.raises(QuantLoRAError, match="weight_cache"):
        bridge.load_flux_model_patcher(flux_file[1], "none", "bf16", weight_cache_mode="yes")
