"""How long one forward takes under block streaming: a schedule model the residency planner ranks
its candidate plans by.

BlockStreamer (memory/streaming.py) runs the blocks in order on the compute stream and copies the
streamed ones in order on one side stream; a copy needs a free device buffer, and there are
lookahead + 1 of them, so the copy of the m-th streamed block starts only when streamed block
m - lookahead - 1 has finished computing. A block computes when the one before it has and, if
streamed, when its copy has landed. The host runs ahead of the GPU, so host time is not modelled.

Why it matters (H200, full-size Flux, bf16, a 16 GiB card): the planner that streamed the fewest
bytes kept all 19 double blocks resident and streamed 33 of the 38 single blocks, which come last:
the copies could not start before the double blocks' compute ended (two buffers), and the step took
1.35x where the bytes alone (8.7 GiB at 55 GB/s against a 0.17 s step) allowed ~1.0x. Plain torch,
no ComfyUI.
"""
from __future__ import annotations


def step_seconds(block_compute_s: list[float], block_copy_s: list[float], streamed: tuple, lookahead: int,
                 block_bytes: list[int] | None = None, window: int | None = None) -> float:
    """Seconds of one forward: block_compute_s[i] is block i's compute, block_copy_s[i] its copy
    time when streamed; streamed: the streamed blocks' indices.

    With `window` (bytes) and block_bytes, the in-flight room is counted in bytes, as BlockStreamer
    does with a window: copy k may start once the streamed blocks copied before it that have not yet
    computed, with it, fit the window (and always when only `lookahead` of them are in flight), so
    small blocks run further ahead than lookahead + 1 whole buffers of the largest would allow."""
    order = sorted(streamed)
    rank = {b: m for m, b in enumerate(order)}
    copy_end: list[float] = []
    compute_end_streamed: list[float] = []
    t = 0.0
    for i, c in enumerate(block_compute_s):
        m = rank.get(i)
        if m is not None:
            # copies are scheduled in order, each when the previous copy is done and its room is free
            while len(copy_end) <= m:
                k = len(copy_end)
                first_live = _first_live(order, k, lookahead, block_bytes, window)
                free_at = compute_end_streamed[first_live - 1] if first_live >= 1 else 0.0
                start = max(copy_end[-1] if copy_end else 0.0, free_at)
                copy_end.append(start + block_copy_s[order[k]])
            t = max(t, copy_end[m])
        t += c
        if m is not None:
            compute_end_streamed.append(t)
    return t


def _first_live(order: list, k: int, lookahead: int, block_bytes, window) -> int:
    """The earliest streamed block (rank) still holding its copy when copy k starts: k - lookahead
    with whole buffers; with a byte window, the earliest j whose copies j..k fit it (never later than
    k - lookahead: the next lookahead blocks are always copied)."""
    j = k - lookahead
    if window is None or block_bytes is None:
        return j
    used = block_bytes[order[k]]
    i = k - 1
    while i >= 0 and used + block_bytes[order[i]] <= window:
        used += block_bytes[order[i]]
        i -= 1
    return min(j, i + 1)
