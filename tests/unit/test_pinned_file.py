"""memory/pinned_file.py and the weight cache read through it (layer 1: plain torch, no ComfyUI).

The cache file is written with each layer on a 64 KiB boundary, so each layer is one registered piece;
reads through the mapping give the bytes a pread gives; copies and views never span two pieces; where
the pages cannot be locked (no CUDA here: the driver call fails) the reader falls back to its reads."""
import mmap
import os

import pytest
import torch

from quantlora.checkpoint.direct_read import DirectReader
from quantlora.memory.pinned_file import PinnedFile
from quantlora.quant import weight_cache as wc

from test_weight_cache import _quantized, ckpt  # noqa: F401 (the fixture)


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "blob.bin"
    data = torch.arange(5 * mmap.PAGESIZE, dtype=torch.int32).to(torch.uint8)
    p.write_bytes(data.numpy().tobytes())
    return str(p), data


def test_pieces_must_be_page_aligned_ordered_and_disjoint(blob):
    path, _ = blob
    P = mmap.PAGESIZE
    for bad in ([(1, P)], [(0, 2 * P), (P, 3 * P)], [(P, 2 * P), (0, P)], [(0, 6 * P)]):
        with pytest.raises(ValueError):
            PinnedFile(path, lock=False, bounds=bad)


def test_copies_and_views_give_the_file_bytes_and_stop_at_gaps(blob):
    path, data = blob
    P = mmap.PAGESIZE
    f = PinnedFile(path, lock=False, bounds=[(0, 2 * P), (2 * P, 3 * P), (4 * P, 5 * P)])
    out = torch.empty(2 * P, dtype=torch.uint8)
    assert f.copy_to(out, P // 2) and torch.equal(out, data[P // 2:P // 2 + 2 * P])  # across two pieces
    assert not f.copy_to(torch.empty(P, dtype=torch.uint8), 3 * P - 8)  # runs into the gap [3P, 4P)
    assert not f.ready(3 * P, 4)
    v = f.view(4 * P + 8, 16, torch.int32, (4,))
    assert v is not None and torch.equal(v.view(torch.uint8), data[4 * P + 8:4 * P + 24])
    assert f.view(P, 4, torch.int32, (1,)) is not None


def test_without_cuda_locking_fails_and_the_reader_reads_instead(ckpt, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    path, ident = wc.cache_path(str(tmp_path / "c"), [ckpt], "torchao-int8-weight-only", torch.bfloat16)
    layers = {f"blocks.{i}.lin.": _quantized(i, (40 + 8 * i, 32)) for i in range(4)}
    w = wc.CacheWriter(path, ident)
    for prefix, lin in layers.items():
        w.add(prefix, lin.weight, lin.bias)
    assert w.write()
    found = wc.CachedWeights.find(path, ident)
    pieces = found.pieces(mmap.PAGESIZE)
    assert len(pieces) == len(layers) and all(lo % wc.ALIGN == 0 for lo, _ in pieces)
    for locked in (False, True):  # True: the CUDA call fails on this machine, nothing is locked
        pinned = PinnedFile(path, lock=locked, bounds=pieces)
        reader = DirectReader([])
        reader.add_file(found.header, mapped=pinned)
        for prefix, lin in layers.items():
            for n in lin.weight.__tensor_flatten__()[0]:
                got = reader.read(prefix + n, torch.device("cpu"))
                assert torch.equal(got, getattr(lin.weight, n)), (prefix, n)
                view = reader.host_view(prefix + n)
                assert (view is None) == locked and (locked or torch.equal(view, getattr(lin.weight, n)))
        st = reader.stats
        assert (st["mapped"] > 0) != locked and (st["direct"] > 0) == locked, st
        assert (pinned.failed is not None) == locked and pinned.locked_bytes() == 0
        reader.close()
        pinned.unlock()
