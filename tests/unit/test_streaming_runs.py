"""Layer 1: memory/streaming.py copies each streamed block's neighbouring pinned leaves with one copy
into one device allocation (issue 13: a Flux block has 10-35 leaves, many tiny; a copy each cost host
time and copy-engine gaps). Checked on plain torch modules with a stand-in arena (no ComfyUI): one
run per block, leaves that are exact views at their host offsets, outputs equal to the model never
offloaded, and the runs follow the leaves when a block is demoted again."""
import copy

import pytest
import torch
from torch import nn

from quantlora.memory import offload as off
from quantlora.memory import streaming as s

D = 32
N = 4


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 3 * D), nn.GELU(), nn.Linear(3 * D, D), nn.LayerNorm(D)) for _ in range(N))
        self.out = nn.Linear(D, D)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


@pytest.fixture
def arena(monkeypatch):
    """A pageable stand-in for the pinned arena (chunks large enough for a whole block) and fresh
    "device" copies, as on CUDA; one thread so every copy of the same weights rounds the same."""
    monkeypatch.setattr(s._PinnedArena, "alloc", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)
    real_init = s.BlockStreamer.__init__

    def init(self, blocks, streamed, onload, lookahead=1, pin=True, own_only=False):
        real_init(self, [], (), onload, lookahead, pin, own_only)
        self.arena, self.blocks = s._PinnedArena(chunk=1 << 20), blocks
        self.set_streamed(streamed)

    monkeypatch.setattr(s.BlockStreamer, "__init__", init)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def test_one_copy_per_block_views_at_host_offsets(arena):
    torch.manual_seed(0)
    tree = Tree().eval()
    ref = copy.deepcopy(tree)
    x = torch.randn(5, D)
    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    streamer = st.streamer
    assert set(streamer.units) == set(range(N))
    seen = {}

    def spy(i):
        def hook(module, args):
            if i in seen:  # the first forward only (the last one below runs without offload)
                return
            u = streamer.units[i]
            seen[i] = (len(u.bufs), [(d.untyped_storage().data_ptr(), d.data_ptr()) for d in u.dev],
                       [p.data_ptr() for p in module.parameters()])
        return hook

    for i, b in enumerate(tree.blocks):
        b[0].register_forward_pre_hook(spy(i))
    assert torch.equal(tree(x), ref(x))
    for i, u in streamer.units.items():
        n_bufs, dev_ptrs, module_ptrs = seen[i]
        runs, alone = u.copy_runs()
        assert len(runs) == 1 and not alone, (i, len(runs), alone)
        assert n_bufs == 1
        assert len(u.host) == 6  # 2 x (weight, bias) + LayerNorm (weight, bias)
        # every leaf a view of the one allocation, at its offset in the host run
        bases = {b for b, _ in dev_ptrs}
        assert len(bases) == 1
        base = bases.pop()
        _, members = runs[0]
        for (j, at, n), (_, ptr) in zip(sorted(members), sorted(dev_ptrs, key=lambda p: p[1])):
            assert ptr - base == at
        # the module computed with the device views, not the host leaves
        host_ptrs = {h.data_ptr() for h in u.host}
        assert not host_ptrs & set(module_ptrs)
        # at rest the module is back on its host leaves and no device copy is held
        assert u.dev is None and u.bufs is None
        assert {p.data_ptr() for p in u.module.parameters()} <= host_ptrs
    off.remove_offload(tree)
    assert torch.equal(tree(x), ref(x))


@torch.no_grad()
def test_runs_split_at_gaps_and_misalignment():
    """Leaves join a run only as neighbours in one buffer at aligned offsets; others copy alone."""
    buf = torch.arange(4096, dtype=torch.uint8)
    a = buf[0:64].view(torch.float32)                  # run 1: [0, 64)
    b = buf[512:640].view(torch.float32)               # within ALIGN of a's end: joins run 1
    c = buf[3000:3008].view(torch.float32)             # far after b: a run of its own
    d = buf[644:652].view(torch.float32)               # 4 bytes after b's end, offset 644 not 16-aligned: own run
    other = torch.ones(8)                              # another storage: own run
    strided = torch.ones(8, 8).t()                     # not contiguous: alone
    empty = torch.ones(0)                              # empty: alone
    runs, alone = s._copy_runs([a, b, c, d, other, strided, empty])
    assert sorted(alone) == [5, 6]
    groups = sorted(sorted(i for i, _, _ in m) for _, m in runs)
    assert groups == [[0, 1], [2], [3], [4]]
    for src, members in runs:
        for i, at, n in members:
            leaf = [a, b, c, d, other][i]
            assert torch.equal(src[at:at + n], leaf.view(torch.uint8).reshape(-1))


@torch.no_grad()
def test_runs_follow_the_leaves_after_a_replan(arena):
    """Resident, then streamed again: the runs are made from the leaves it holds now, so a write
    made while resident (a LoRA merge) reaches the next forward's copies."""
    torch.manual_seed(2)
    tree = Tree().eval()
    ref = copy.deepcopy(tree)
    x = torch.randn(5, D)
    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    assert torch.equal(tree(x), ref(x))
    off.apply_offload(tree, "block", "cpu", "cpu", budget=1 << 30)  # everything resident
    assert not st.streamer.units
    for t in (tree, ref):
        t.blocks[1][2].weight.mul_(-1.5)
    off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    assert torch.equal(tree(x), ref(x))
    off.remove_offload(tree)


# ---------------------------------------------------------------- prefetch across forwards (carry)
@torch.no_grad()
def test_carry_prefetches_the_next_forward_and_drops_it_when_off(arena):
    """With carry on, a forward ends with the next forward's first streamed block already copied in
    (so its copy overlaps this forward's last blocks); outputs stay equal. Off drops that copy, so a
    write into the host weights after the run is what the next forward computes with: were the
    copy kept, the forward after the write would use the old weights and differ from the reference."""
    torch.manual_seed(3)
    tree = Tree().eval()
    ref = copy.deepcopy(tree)
    x = torch.randn(5, D)
    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    streamer = st.streamer
    first = streamer.units[streamer.order[0]]
    with off.carrying(tree):
        assert streamer.carry
        for _ in range(3):
            assert torch.equal(tree(x), ref(x))
            assert first.dev is not None and not first.installed  # copied in for the next forward
            others = [u for u in streamer.units.values() if u is not first]
            assert all(u.dev is None for u in others)
        assert streamer.stats["carried"] == 2  # forwards 2 and 3 found it there
        assert streamer.stats["on_the_spot"] == 0
    assert not streamer.carry
    assert all(u.dev is None and u.bufs is None for u in streamer.units.values())
    # a LoRA-like write into the first streamed block's host weights between runs
    for t in (tree, ref):
        t.blocks[streamer.order[0]][0].weight.mul_(0.5)
    assert torch.equal(tree(x), ref(x))
    off.remove_offload(tree)
    assert torch.equal(tree(x), ref(x))


@torch.no_grad()
def test_carry_off_by_default_and_on_an_error(arena):
    """The streamer never carries unless told (the benchmark and other callers keep the old
    behaviour), and a failed forward inside a carrying block still turns it off."""
    torch.manual_seed(4)
    tree = Tree().eval()
    ref = copy.deepcopy(tree)
    x = torch.randn(5, D)
    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    tree(x)
    assert not st.streamer.carry and all(u.dev is None for u in st.streamer.units.values())
    with pytest.raises(RuntimeError):
        with off.carrying(tree):
            tree(x)
            tree(torch.randn(5, D + 1))  # wrong width: fails inside the first block
    assert not st.streamer.carry
    assert all(u.dev is None for u in st.streamer.units.values() if not u.installed)
    assert torch.equal(tree(x), ref(x))  # the next forward starts clean
    off.remove_offload(tree)
    assert torch.equal(tree(x), ref(x))
