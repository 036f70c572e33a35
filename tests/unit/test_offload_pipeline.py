"""memory/pipeline.py's schedule model and the residency planner that ranks plans by it (layer 1:
plain numbers, no ComfyUI, no GPU)."""
import heapq
import random

import pytest

from quantlora.memory.pipeline import step_seconds
from quantlora.memory.streaming import plan_residency


def event_sim(compute, copy, streamed, lookahead):
    """An independent reference: BlockStreamer's rules run with an explicit pool of lookahead + 1
    device buffers (each entry: when that buffer is free) and one copy engine serving the copies in
    streamed order; a streamed block gives its buffer back when it has computed."""
    order = sorted(streamed)
    pool = [0.0] * (lookahead + 1)
    engine = 0.0
    landed = {}
    copies = iter(order)
    t = 0.0
    for i, c in enumerate(compute):
        while i in streamed and i not in landed:
            j = next(copies)
            start = max(engine, heapq.heappop(pool))  # the copy engine and a buffer, whichever frees last
            engine = landed[j] = start + copy[j]
        t = max(t, landed.get(i, 0.0)) + c
        if i in streamed:
            heapq.heappush(pool, t)
    return t


def event_sim_bytes(compute, copy, streamed, lookahead, sizes, window):
    """An independent reference for the byte window: each copy starts at the first moment (the copy
    engine free, scanning the release times of the copies before it) when the copies still held
    (their blocks not yet computed) leave room for it in `window` bytes, or when at most lookahead of
    them are held; a streamed block releases its copy when it has computed."""
    order = sorted(streamed)
    released, engine, landed, t = [], 0.0, {}, 0.0  # released: (time, bytes) of earlier copies
    nxt = 0
    for i, c in enumerate(compute):
        while i in streamed and i not in landed:
            j = order[nxt]
            nxt += 1
            for at in sorted({engine} | {r for r, _ in released if r > engine}):
                held = [b for r, b in released if r > at]
                if sum(held) + sizes[j] <= window or len(held) <= lookahead:
                    break
            engine = landed[j] = at + copy[j]
            released.append((float("inf"), sizes[j]))  # held until its block computes
        t = max(t, landed.get(i, 0.0)) + c
        if i in streamed:
            k = order.index(i)
            released[k] = (t, released[k][1])
    return t


def test_nothing_streamed_is_the_compute():
    assert step_seconds([1.0, 2.0, 3.0], [9.0, 9.0, 9.0], (), 1) == pytest.approx(6.0)


def test_free_copies_cost_nothing_but_the_first_wait():
    assert step_seconds([1.0] * 5, [0.0] * 5, (0, 1, 2, 3, 4), 1) == pytest.approx(5.0)


def test_copy_bound_runs_at_copy_speed():
    # every block streamed, a copy twice the compute: copies back to back, the last block computes after
    n = 10
    assert step_seconds([1.0] * n, [2.0] * n, tuple(range(n)), 1) == pytest.approx(2.0 * n + 1.0)


def test_two_buffers_stall_behind_a_resident_run():
    # 4 resident blocks then 4 streamed: with lookahead 1 only two copies overlap the resident run
    compute, copy = [1.0] * 8, [1.5] * 8
    t1 = step_seconds(compute, copy, (4, 5, 6, 7), 1)
    t4 = step_seconds(compute, copy, (4, 5, 6, 7), 3)
    assert t4 < t1
    assert t4 == pytest.approx(8.0)  # four buffers: every copy lands before its block is reached


@pytest.mark.parametrize("seed", range(40))
def test_byte_window_agrees_with_an_event_simulation(seed):
    rnd = random.Random(1000 + seed)
    n = rnd.randint(1, 30)
    compute = [rnd.uniform(0.5, 2.0) for _ in range(n)]
    copy = [rnd.uniform(0.0, 4.0) for _ in range(n)]
    sizes = [rnd.choice([10, 24]) for _ in range(n)]
    streamed = tuple(i for i in range(n) if rnd.random() < 0.6)
    la = rnd.randint(1, 3)
    window = (la + 1) * max([sizes[i] for i in streamed], default=0)
    got = step_seconds(compute, copy, streamed, la, sizes, window)
    assert got == pytest.approx(event_sim_bytes(compute, copy, streamed, la, sizes, window))
    # never slower than whole buffers of the largest block, equal when every block is that large
    assert got <= step_seconds(compute, copy, streamed, la) + 1e-9
    same = [24] * n
    assert step_seconds(compute, copy, streamed, la, same, (la + 1) * 24) == pytest.approx(
        step_seconds(compute, copy, streamed, la))


def test_byte_window_runs_small_blocks_further_ahead():
    # 4 resident blocks, then 6 streamed small ones; room for 2 large = 5 small: with whole buffers
    # only 2 copies overlap the resident run, with the window 5
    compute, copy = [1.0] * 10, [1.5] * 10
    sizes = [25] * 4 + [10] * 6
    streamed = (4, 5, 6, 7, 8, 9)
    whole = step_seconds(compute, copy, streamed, 1)
    windowed = step_seconds(compute, copy, streamed, 1, sizes, 2 * 25)
    assert windowed < whole - 1.0
    assert windowed == pytest.approx(event_sim_bytes(compute, copy, streamed, 1, sizes, 50))


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_an_event_simulation(seed):
    rnd = random.Random(seed)
    n = rnd.randint(1, 30)
    compute = [rnd.uniform(0.5, 2.0) for _ in range(n)]
    copy = [rnd.uniform(0.0, 4.0) for _ in range(n)]
    streamed = tuple(i for i in range(n) if rnd.random() < 0.6)
    la = rnd.randint(1, 4)
    assert step_seconds(compute, copy, streamed, la) == pytest.approx(event_sim(compute, copy, streamed, la))


FLUX_BF16 = [679_600_000] * 19 + [283_200_000] * 38   # double then single blocks, bytes
GIB = 2 ** 30


@pytest.mark.parametrize("card", [12, 16, 20])
def test_timed_plan_fits_and_is_never_slower(card):
    room = int((card - 1.9) * GIB)
    timing = (55.4e9, 0.1725 / 57)   # H200: pinned copies, bf16 compute per block
    bytes_only = plan_residency(FLUX_BF16, room, 1)
    timed = plan_residency(FLUX_BF16, room, 1, timing=timing)
    assert timed.working_set <= room and bytes_only.working_set <= room
    t_bytes_only = step_seconds([timing[1]] * 57, [b / timing[0] for b in FLUX_BF16], bytes_only.streamed, 1)
    assert timed.predicted_s <= t_bytes_only + 1e-12
    assert timed.lookahead >= 1
    floor = max(57 * timing[1], timed.streamed_bytes / timing[0])
    assert timed.predicted_s >= floor - 1e-9   # no schedule beats its own transfer floor


def test_card_16_streams_double_blocks_to_overlap():
    # the bytes-only plan streams the single blocks, which come last, so copies wait behind the
    # resident double blocks (measured 1.35x on an H200); timing moves some streaming to the doubles
    room = int((16 - 1.9) * GIB)
    timing = (55.4e9, 0.1725 / 57)
    bytes_only = plan_residency(FLUX_BF16, room, 1)
    timed = plan_residency(FLUX_BF16, room, 1, timing=timing)
    assert all(i >= 19 for i in bytes_only.streamed)
    assert any(i < 19 for i in timed.streamed)
    t_bytes_only = step_seconds([timing[1]] * 57, [b / timing[0] for b in FLUX_BF16], bytes_only.streamed, 1)
    assert timed.predicted_s < 0.97 * t_bytes_only


def test_card_16_compute_even_spread():
    """The second candidate family (streamed blocks spread evenly in compute time, not bytes): on
    the H200's bf16 16 GiB card the bytes-even plans bottom out at ~1.27x (measured 1.25x); spreading
    by compute streams fewer double blocks where the copies would fall behind. Measured after the
    change: 1.11x (h200-full-offload-cards-compute-even). Checked with the independent event
    simulation, not the model the planner ranked by."""
    room = int((16 - 1.9) * GIB)
    per_block = 0.1725 / 57
    timing = (55.4e9, per_block)
    timed = plan_residency(FLUX_BF16, room, 1, timing=timing)
    compute, copy = [per_block] * 57, [b / timing[0] for b in FLUX_BF16]
    t = event_sim_bytes(compute, copy, set(timed.streamed), timed.lookahead, FLUX_BF16, timed.inflight_bytes)
    assert abs(t - timed.predicted_s) < 1e-9
    assert t < 1.20 * 57 * per_block
    assert timed.working_set <= room
    # not the bytes-even spread: fewer double blocks streamed than their share of the bytes
    doubles = sum(1 for i in timed.streamed if i < 19)
    assert doubles < 19 * timed.streamed_bytes / sum(FLUX_BF16)


def test_instant_copies_keep_the_fewest_bytes_plan():
    room = int(14 * GIB)
    assert plan_residency(FLUX_BF16, room, 1, timing=(1e30, 0.003)).streamed == plan_residency(FLUX_BF16, room, 1).streamed


def test_no_room_or_all_room():
    assert plan_residency(FLUX_BF16, None, 1, timing=(55e9, 0.003)).streamed == tuple(range(57))
    assert plan_residency(FLUX_BF16, sum(FLUX_BF16), 1, timing=(55e9, 0.003)).streamed == ()


class _FluxShaped(__import__("torch").nn.Module):
    """Block lists named as Flux's, double blocks 2.4x the single blocks' bytes, a hidden size."""

    def __init__(self, hidden=64):
        from torch import nn

        super().__init__()
        self.hidden_size = hidden
        self.img_in = nn.Linear(hidden, hidden)
        self.double_blocks = nn.ModuleList(nn.Linear(hidden, 12 * hidden) for _ in range(4))
        self.single_blocks = nn.ModuleList(nn.Linear(hidden, 5 * hidden) for _ in range(8))
        self.final_layer = nn.Linear(hidden, hidden)


def test_node_plan_ranks_by_the_schedule_and_offload_follows_it():
    """budget_plan with a measured card: the residency is ranked by memory/pipeline.py, the predicted
    ratio is that schedule's, and apply_offload builds the streamer with the plan's lookahead."""
    import torch
    from quantlora.memory import offload as off
    from quantlora.memory import offload_plan as op

    dm = _FluxShaped()
    sizes = off.tree_sizes(dm)
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in off.flat_blocks(dm)]
    shape = [1, 16, 128, 128]
    lookaheads = set()
    # copy-bound ... compute-bound; at 80% and 10 MB/s a deeper prefetch wins (measured with this tree)
    for bw, share in ((1e7, 0.55), (1e7, 0.8), (3e7, 0.55), (1e9, 0.55)):
        card = {"free_bytes": 10 ** 9, "bandwidth": bw, "flops": 1e12}
        budget_gb = (sizes.model * share) / op.GIB
        plan = op.budget_plan(dm, "block", 1, budget_gb, 0, card, shape)
        r = plan.residency
        assert plan.timing is not None and r.predicted_s is not None
        per_block = plan.resident_s / len(blocks)
        want = step_seconds([per_block] * len(blocks), [b / bw for b in blocks], r.streamed, r.lookahead,
                            blocks, r.inflight_bytes)
        assert r.predicted_s == pytest.approx(want)
        assert plan.predicted_ratio == pytest.approx(want / plan.resident_s)
        assert plan.predicted_ratio >= 1.0 - 1e-9
        assert plan.nonblock + r.working_set <= plan.budget
        st = off.apply_offload(dm, "block", torch.device("cpu"), "cpu", 1, use_stream=False, pin=False,
                               budget=plan.budget, timing=plan.timing)
        try:
            assert st.residency.streamed == r.streamed and st.streamer.lookahead == r.lookahead
            assert st.streamer.window == r.inflight_bytes  # the streamer counts the room as the model does
        finally:
            off.remove_offload(dm)
        lookaheads.add(r.lookahead)
    assert max(lookaheads) > 1  # the planner raised the node's prefetch somewhere, and the streamer followed


def test_subblock_prediction_for_bf16_on_16_gib():
    """bench/subblock_prediction.py (issue 13's next step, predicted before it is built), with the H200
    numbers of bf16 on a 16 GiB card: streaming parts of blocks (smaller copy buffers, more resident)
    and copying across the end of a step each cut the predicted step, but the copies (~9.5 GiB at
    55 GB/s, 1.05 steps) keep it well above 1.0x: no plan here reaches the step time of the bytes."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "subblock_prediction.py")
    spec = importlib.util.spec_from_file_location("subblock_prediction", path)
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    room, step, bw = 13.2 * sp.GIB, 0.1716, 55.3e9
    whole = sp.predict(1, room, step, bw)
    quarters = sp.predict(4, room, step, bw)
    quarters_wrap = sp.predict(4, room, step, bw, wrap=True)
    assert whole["ratio"] > 1.25
    assert quarters["ratio"] < whole["ratio"] - 0.05 and quarters["streamed_gib"] < whole["streamed_gib"]
    assert quarters_wrap["ratio"] <= quarters["ratio"]
    assert quarters_wrap["ratio"] > 1.05 and quarters_wrap["ratio"] >= quarters_wrap["floor"]
