"""checkpoint/direct_read.py: checkpoint weights read with pread for the device instead of through
the memory mapping (layer 1: plain torch and safetensors, no ComfyUI). With the CPU as the device,
DirectReader.on_cpu runs the same reads into ordinary memory (no pinned buffers, no streams)."""
import os

import pytest
import torch
from safetensors.torch import save_file

from quantlora.checkpoint import direct_read
from quantlora.checkpoint.direct_read import DirectReader
from quantlora.checkpoint.safetensors_io import TensorReader, read_header
from quantlora.errors import QuantLoRAError


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(33, 17, generator=g),                      # odd sizes, fp32
        "c.weight": (torch.randn(64, 64, generator=g) * 8).to(torch.float8_e4m3fn),
        "d.bias": torch.randn(5, generator=g).to(torch.float16),
    }
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path, metadata={"note": "x" * 1000})  # a longer header moves the data section
    return path, tensors


def mapped(path):
    h = read_header(path)
    reader = TensorReader([h])
    direct = DirectReader([h], threads=3)
    sd = {}
    for k in reader.keys():
        sd[k] = reader.get(k)
        direct.register(reader.path_of(k), k, sd[k])
    return sd, direct


@pytest.mark.parametrize("chunk", [1 << 20, 100])  # one read per tensor; many chunks over the threads
def test_direct_reads_equal_the_mapping(weights, monkeypatch, chunk):
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    monkeypatch.setattr(direct_read, "CHUNK", chunk)
    path, tensors = weights
    sd, direct = mapped(path)
    try:
        outs = {}
        for k, t in sd.items():
            outs[k] = direct.to(t, torch.device("cpu"), torch.bfloat16 if k != "c.weight" else t.dtype)
        for k, t in tensors.items():
            want = t if k == "c.weight" else t.to(torch.bfloat16)
            assert outs[k].dtype == want.dtype and torch.equal(outs[k].view(torch.uint8), want.view(torch.uint8)), k
            assert outs[k].data_ptr() != sd[k].data_ptr()  # read, not the mapping itself
        assert direct.stats["direct"] == 4 and direct.stats["fallback"] == 0
        assert direct.stats["direct_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert direct.stats["read_s"] > 0 and direct.stats["wait_s"] >= 0  # the load's phases (LoadReport.phases)
    finally:
        direct.close()


@pytest.mark.parametrize("raw, want", [("", direct_read.THREADS), ("8", 8), ("0", 1), ("1000", 64), ("eight", direct_read.THREADS)])
def test_reader_threads_from_the_environment(monkeypatch, raw, want):
    """QUANTLORA_READ_THREADS sets the readers per weight (a benchmark knob), bounded either way."""
    monkeypatch.setenv("QUANTLORA_READ_THREADS", raw)
    assert direct_read.read_threads() == want
    assert DirectReader([]).threads == want and DirectReader([], threads=2).threads == 2


def test_anything_else_takes_the_ordinary_path(weights, monkeypatch):
    """A tensor the state dict changed (a view, a converted copy, another tensor) is not the file's
    bytes: it goes through .to() as before."""
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, _ = weights
    sd, direct = mapped(path)
    try:
        a = sd["a.weight"]
        for t in (a[1:], a.t(), a.float(), a.clone(), torch.zeros(3)):
            out = direct.to(t, torch.device("cpu"), torch.bfloat16)
            assert torch.equal(out, t.to(torch.bfloat16))
        assert {k: direct.stats[k] for k in ("direct", "direct_bytes", "fallback")} == {"direct": 0, "direct_bytes": 0, "fallback": 5}
        assert direct.stats["read_s"] == 0
    finally:
        direct.close()


def test_without_the_flag_a_cpu_device_reads_nothing_itself(weights):
    path, _ = weights
    sd, direct = mapped(path)
    try:
        out = direct.to(sd["a.weight"], torch.device("cpu"), torch.bfloat16)
        assert torch.equal(out, sd["a.weight"]) and direct.stats["fallback"] == 1
    finally:
        direct.close()


def test_a_file_cut_short_after_opening_names_the_file(weights, monkeypatch):
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, _ = weights
    sd, direct = mapped(path)
    try:
        a = sd.pop("a.weight")
        last = max(sd.values(), key=lambda t: direct._entries[t.data_ptr()][1])
        end = direct._entries[last.data_ptr()][1]
        with open(path, "r+b") as f:  # cut into the last tensor's bytes
            f.truncate(end + 4)
        with pytest.raises(QuantLoRAError, match=os.path.basename(path)):
            direct.to(last, torch.device("cpu"), last.dtype)
        del a
    finally:
        direct.close()


@pytest.fixture
def blocks(tmp_path):
    """Four blocks of three weights, visited in an order that is not the file's (c, a, b per block)."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"model.blocks.{i}.{x}.weight": torch.randn(8 + i, 16, generator=g).to(torch.bfloat16)
               for i in range(4) for x in "abc"}
    tensors["head.weight"] = torch.randn(4, 4, generator=g)
    path = str(tmp_path / "blocks.safetensors")
    save_file(tensors, path)
    order = [f"model.blocks.{i}.{x}.weight" for i in range(4) for x in "cab"] + ["head.weight"]
    return path, tensors, order


def test_read_ahead_learns_the_visiting_order(blocks, monkeypatch):
    """The reader learns block 0's order and the step to block 1, then reads each next weight before it
    is asked for: 8 of the 12 block weights come from the background read, each with its own bytes;
    a guess that is not asked for next is a miss, and the weight asked for is read as usual."""
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, tensors, order = blocks
    sd, direct = mapped(path)
    try:
        for k in order:
            out = direct.to(sd[k], torch.device("cpu"), tensors[k].dtype)
            assert torch.equal(out, tensors[k]) and out.data_ptr() != sd[k].data_ptr(), k
        assert (direct.stats["ahead_hits"], direct.stats["ahead_misses"]) == (8, 0)
        assert direct.stats["direct"] == len(order)
        first = "model.blocks.0.a.weight"  # out of order: its learned successor (0.b) is guessed...
        assert torch.equal(direct.to(sd[first], torch.device("cpu"), torch.bfloat16), tensors[first])
        other = "model.blocks.2.c.weight"  # ...and another weight is asked for
        assert torch.equal(direct.to(sd[other], torch.device("cpu"), torch.bfloat16), tensors[other])
        assert (direct.stats["ahead_hits"], direct.stats["ahead_misses"]) == (8, 1)
    finally:
        direct.close()
    assert direct._ahead is None and direct._ahead_pool is None


def test_a_background_read_that_fails_names_the_file_when_its_weight_is_asked_for(blocks, monkeypatch):
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, tensors, order = blocks
    sd, direct = mapped(path)
    try:
        last = "model.blocks.3.c.weight"  # read in the background once block 2 is done
        with open(path, "r+b") as f:
            f.truncate(direct._keys[last][1] + 4)
        with pytest.raises(QuantLoRAError, match=os.path.basename(path)):
            for k in order:
                direct.to(sd[k], torch.device("cpu"), tensors[k].dtype)
                assert k != last, "read past the cut"
        assert direct.stats["ahead_hits"] == 5  # 1.a, 1.b, 2.c, 2.a, 2.b; 3.c failed in the background
    finally:
        direct.close()
