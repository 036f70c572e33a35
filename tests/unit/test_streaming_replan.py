"""Layer 1: memory/streaming.py's re-plans in place (no ComfyUI). A block demoted again reuses the
pinned host buffers it had before (issue 13: pinned memory grew each time a budget went back and
forth), with its current values copied in (a LoRA merge may have changed resident weights in place)."""
import copy

import pytest
import torch
from torch import nn

from quantlora.memory import offload as off
from quantlora.memory import streaming as s
from quantlora.memory.sizes import module_bytes

D = 64
N = 8
CHUNK = 4096  # leaves above CHUNK / 4 get a buffer of their own, exactly their size


class Tree(nn.Module):
    """Top-level parts plus one block list, like a Flux transformer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D), nn.LayerNorm(D)) for _ in range(N))
        self.out = nn.Linear(D, D)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


@pytest.fixture
def stand_in_arena(monkeypatch):
    """The streamer as on CUDA where it matters here: a pinned arena (pageable stand-in buffers:
    no pinned memory without CUDA) and fresh "device" copies of resident blocks."""
    monkeypatch.setattr(s._PinnedArena, "alloc", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)
    real_init = s.BlockStreamer.__init__

    def init(self, blocks, streamed, onload, lookahead=1, pin=True, own_only=False):
        real_init(self, [], (), onload, lookahead, pin, own_only)
        self.arena, self.blocks = s._PinnedArena(chunk=CHUNK), blocks
        self.set_streamed(streamed)

    monkeypatch.setattr(s.BlockStreamer, "__init__", init)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: matmuls round the same on every copy of the same weights
    yield
    torch.set_num_threads(threads)


def _budget(tree, resident: int) -> int:
    """Device bytes for the weights that keep `resident` blocks on the device (plus the two
    in-flight copies of the streamed ones)."""
    sizes = [module_bytes(b) for b in off.flat_blocks(tree)]
    _, nonblock = off.plan_blocks(tree, None)
    return nonblock + resident * max(sizes) + 2 * max(sizes)


@torch.no_grad()
def test_replans_back_and_forth_keep_one_pinned_copy(stand_in_arena):
    torch.manual_seed(0)
    tree = Tree().eval()
    ref = copy.deepcopy(tree)
    x = torch.randn(3, D)
    one_copy = sum(module_bytes(b) for b in tree.blocks)
    # what streaming every block once pins (arena rounding included), on a copy of the tree
    other = copy.deepcopy(tree)
    all_pinned = off.apply_offload(other, "block", "cpu", "cpu", budget=None).streamer.pinned_bytes
    off.remove_offload(other)
    assert one_copy <= all_pinned <= one_copy + N * CHUNK

    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=_budget(tree, N // 2))
    streamer = st.streamer
    assert 0 < st.n_resident < N
    assert torch.equal(tree(x), ref(x))
    seen_plans, peak = set(), 0
    budgets = [None, _budget(tree, N - 1), _budget(tree, 1), _budget(tree, N), _budget(tree, 3), None,
               _budget(tree, 6), _budget(tree, 0), _budget(tree, 5), _budget(tree, 2)]
    for round_ in range(4):
        for k, budget in enumerate(budgets):
            st = off.apply_offload(tree, "block", "cpu", "cpu", budget=budget)
            assert st.streamer is streamer  # re-planned in place, not rebuilt
            seen_plans.add(st.residency.streamed)
            # a write into the weights where they are now (resident: the device copy; streamed: the
            # pinned leaf), as a LoRA merge does, on both trees
            i = (round_ * len(budgets) + k) % N
            for a, b in ((tree.blocks[i][0], ref.blocks[i][0]), (tree.blocks[i][2], ref.blocks[i][2])):
                delta = torch.randn_like(b.weight) * 0.01
                a.weight.add_(delta)
                b.weight.add_(delta)
            peak = max(peak, streamer.pinned_bytes)
            assert streamer.pinned_bytes <= all_pinned, (round_, k, streamer.pinned_bytes, all_pinned)
            assert torch.equal(tree(x), ref(x)), (round_, k)
    assert len(seen_plans) >= 6  # blocks really went back and forth between the device and pinned memory
    assert peak <= all_pinned
    off.remove_offload(tree)
    assert torch.equal(tree(x), ref(x))


@torch.no_grad()
def test_demoted_again_lands_in_its_old_buffers(stand_in_arena):
    """The very buffers come back: a block streamed, then resident, then streamed again holds the
    pinned leaves it had the first time, filled with its current values."""
    torch.manual_seed(1)
    tree = Tree().eval()
    st = off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    streamer = st.streamer
    first = {i: [h.data_ptr() for h in u.host] for i, u in streamer.units.items()}
    pinned = streamer.pinned_bytes
    off.apply_offload(tree, "block", "cpu", "cpu", budget=_budget(tree, N))
    assert not streamer.units and set(streamer._parked) == set(range(N))
    tree.blocks[0][0].weight.mul_(2)
    want = tree.blocks[0][0].weight.clone()
    off.apply_offload(tree, "block", "cpu", "cpu", budget=None)
    assert {i: [h.data_ptr() for h in u.host] for i, u in streamer.units.items()} == first
    assert streamer.pinned_bytes == pinned and not streamer._parked
    assert torch.equal(tree.blocks[0][0].weight, want)
    off.remove_offload(tree)
