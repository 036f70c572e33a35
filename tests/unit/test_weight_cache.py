"""quant/weight_cache.py on plain torch modules (layer 1: no ComfyUI): the written file holds each
quantized layer's inner tensors, read back through a DirectReader they rebuild the library's own
tensor subclass bit for bit, and a cache made for other files, versions or quantizations is not used."""
import json
import os

import pytest
import torch
from torch import nn

from quantlora.checkpoint.direct_read import DirectReader
from quantlora.quant import weight_cache as wc
from quantlora.quant.backends import BACKENDS, quantize_linear


@pytest.fixture
def ckpt(tmp_path):
    p = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4)}, str(p))
    return str(p)


def _quantized(seed, shape=(48, 32)):
    torch.manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0]).to(torch.bfloat16)
    quantize_linear(BACKENDS["torchao-int8-weight-only"], lin, torch.bfloat16, torch.device("cpu"))
    return lin


def test_round_trip_rebuilds_the_same_tensor(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, ident = wc.cache_path(str(tmp_path / "c"), [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    layers = {f"blocks.{i}.lin.": _quantized(i) for i in range(3)}
    w = wc.CacheWriter(path, ident)
    for prefix, lin in layers.items():
        w.add(prefix, lin.weight, lin.bias)
    w.add("plain.", nn.Linear(4, 4).weight)  # not a subclass: not cached
    assert w.write() and os.path.isfile(path) and list(w.layers) == list(layers)
    found = wc.CachedWeights.find(path, ident)
    assert found is not None and set(found.layers) == set(layers)
    reader = DirectReader([])
    reader.add_file(found.header)
    template = _quantized(99)  # a layer of the same shape, other values: its flattening context only
    found.remember_template(template)
    for prefix, lin in layers.items():
        got = found.rebuild(template, prefix, lambda key: reader.read(key, torch.device("cpu")))
        assert type(got) is type(lin.weight)
        for n in lin.weight.__tensor_flatten__()[0]:
            assert torch.equal(getattr(got, n), getattr(lin.weight, n)), (prefix, n)
        # the bias beside its weight in the file
        assert torch.equal(reader.read(found.bias_key(prefix), torch.device("cpu")), lin.bias.detach())
    assert found.bias_key("plain.") is None
    reader.close()


def test_identity_names_what_the_contents_depend_on(ckpt, tmp_path):
    d = str(tmp_path / "c")
    a, ident = wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    assert a == wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.bfloat16)[0]
    assert a != wc.cache_path(d, [ckpt], "torchao-fp8-dynamic", torch.bfloat16)[0]
    assert a != wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.float16)[0]
    assert ident["torch"] == torch.__version__ and ident["files"][0]["size"] == os.path.getsize(ckpt)
    os.utime(ckpt, ns=(1, 1))  # touched: another file as far as the cache knows
    assert a != wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.bfloat16)[0]
    # a file of the same name elsewhere: its own cache, which does not replace this one's
    twin = tmp_path / "elsewhere" / os.path.basename(ckpt)
    twin.parent.mkdir()
    twin.write_bytes(open(ckpt, "rb").read())
    b = wc.cache_path(d, [str(twin)], "torchao-int8-weight-only", torch.bfloat16)[0]
    assert os.path.basename(a).split("-")[:2] != os.path.basename(b).split("-")[:2]


def test_a_file_for_another_identity_is_not_used(ckpt, tmp_path, caplog):
    path, ident = wc.cache_path(str(tmp_path / "c"), [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    w = wc.CacheWriter(path, dict(ident, torchao="0.0-other"))  # e.g. written by another torchao
    w.add("l.", _quantized(0).weight)
    assert w.write()
    assert wc.CachedWeights.find(path, ident) is None
    assert any("ignoring the weight cache" in m for m in caplog.messages)
    meta = wc.read_header(path).metadata
    assert json.loads(meta["quantlora_identity"])["torchao"] == "0.0-other"


def test_a_new_file_replaces_older_ones_of_the_same_checkpoint(ckpt, tmp_path):
    d = str(tmp_path / "c")
    old, ident = wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    for p, i in ((old, ident),):
        w = wc.CacheWriter(p, i)
        w.add("l.", _quantized(0).weight)
        assert w.write()
    os.utime(ckpt, ns=(2, 2))
    new, ident2 = wc.cache_path(d, [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    other, ident3 = wc.cache_path(d, [ckpt], "torchao-int8-dynamic", torch.bfloat16)
    for p, i in ((other, ident3), (new, ident2)):
        w = wc.CacheWriter(p, i)
        w.add("l.", _quantized(0).weight)
        assert w.write()
    assert sorted(os.listdir(d)) == sorted(os.path.basename(p) for p in (new, other))


def test_no_room_on_disk_writes_nothing(ckpt, tmp_path, monkeypatch, caplog):
    path, ident = wc.cache_path(str(tmp_path / "c"), [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    monkeypatch.setattr(wc, "FREE_MARGIN", 1 << 60)
    w = wc.CacheWriter(path, ident)
    w.add("l.", _quantized(0).weight)
    assert not w.write() and not os.path.exists(path)
    assert any("weight cache not written" in m for m in caplog.messages)


def test_the_folder_keeps_under_its_size_limit_least_recently_used_first(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    d = str(tmp_path / "c")
    paths = []
    for i in range(3):  # three checkpoints: a cache file each
        src = tmp_path / f"m{i}.safetensors"
        save_file({"x": torch.zeros(4)}, str(src))
        paths.append(wc.cache_path(d, [str(src)], "torchao-int8-weight-only", torch.bfloat16))
    size = None
    for i, (p, ident) in enumerate(paths[:2]):
        w = wc.CacheWriter(p, ident)
        w.add("l.", _quantized(i).weight)
        assert w.write()
        os.utime(p, (1000 + i, 1000 + i))
        size = os.path.getsize(p)
    assert wc.CachedWeights.find(*paths[0]) is not None  # used now: the first file is the newest in use
    monkeypatch.setenv("QUANTLORA_WEIGHT_CACHE_MAX_GIB", str(2.5 * size / 2**30))  # room for two files
    p, ident = paths[2]
    w = wc.CacheWriter(p, ident)
    w.add("l.", _quantized(2).weight)
    assert w.write()
    assert sorted(os.listdir(d)) == sorted(os.path.basename(q) for q in (paths[0][0], p))  # the second went
    # a file the cache did not write is never deleted, however old (a models folder given as the cache's)
    save_file({"x": torch.zeros(1 << 16)}, os.path.join(d, "someones-model.safetensors"))
    os.utime(os.path.join(d, "someones-model.safetensors"), (1, 1))
    w = wc.CacheWriter(paths[1][0], paths[1][1])
    w.add("l.", _quantized(1).weight)
    assert w.write()
    assert "someones-model.safetensors" in os.listdir(d) and len(os.listdir(d)) == 3
