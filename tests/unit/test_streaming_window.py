"""Layer 1: BlockStreamer's byte window (no ComfyUI). In block mode the room for in-flight copies is
the plan's inflight_bytes (lookahead + 1 of the largest streamed block); where smaller blocks stream,
more of them are copied ahead within it (issue 13's 8 GiB card: the single blocks of a plan sized for
double ones), the copies in flight never exceed it, and the output stays the plain model's."""
import torch
from torch import nn

from quantlora.memory import streaming as s

D = 32


class Tree(nn.Module):
    """Two large blocks then eight small ones (Flux: double blocks ~2.4x a single block's bytes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.ModuleList(nn.Sequential(nn.Linear(D, 5 * D), nn.GELU(), nn.Linear(5 * D, D)) for _ in range(2))
        self.small = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(8))

    def forward(self, x):
        for b in list(self.big) + list(self.small):
            x = x + b(x)
        return x


def _run(window):
    tree = Tree().eval()
    x = torch.randn(4, D)
    with torch.no_grad():
        want = tree(x)
    blocks = list(tree.big) + list(tree.small)
    st = s.BlockStreamer(blocks, tuple(range(len(blocks))), "cpu", 1, pin=False)
    st.copy_on_cpu = True  # fresh "device" copies, as on a GPU
    big = max(u.bytes for u in st.units.values())
    st.window = None if window is None else window * big
    s.install_hooks(tree, blocks, st)
    seen = []
    prefetch = st._prefetch

    def watched(u):
        prefetch(u)
        seen.append((st._live, st._live_bytes))

    st._prefetch = watched
    with torch.no_grad():
        got = tree(x)
    return want, got, seen, big, st


def test_small_blocks_run_further_ahead_within_the_window():
    want, got, seen, big, st = _run(window=2)
    assert torch.equal(got, want)
    assert max(n for n, _ in seen) > st.lookahead + 1  # more than two small copies held at once
    assert max(b for _, b in seen) <= 2 * big  # never more bytes than the room
    assert st._live == 0 and st._live_bytes == 0  # every copy released at the end


def test_without_a_window_lookahead_plus_one_units():
    want, got, seen, _, st = _run(window=None)
    assert torch.equal(got, want)
    assert max(n for n, _ in seen) <= st.lookahead + 1
