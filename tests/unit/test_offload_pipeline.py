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


def test_instant_copies_keep_the_fewest_bytes_plan():
    room = int(14 * GIB)
    assert plan_residency(FLUX_BF16, room, 1, timing=(1e30, 0.003)).streamed == plan_residency(FLUX_BF16, room, 1).streamed


def test_no_room_or_all_room():
    assert plan_residency(FLUX_BF16, None, 1, timing=(55e9, 0.003)).streamed == tuple(range(57))
    assert plan_residency(FLUX_BF16, sum(FLUX_BF16), 1, timing=(55e9, 0.003)).streamed == ()
