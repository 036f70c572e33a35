"""Issue 13, bf16 on a 16 GiB card: what streaming parts of blocks (k units per block, each with its
own copy and buffer) would give, by the schedule model the residency planner already trusts
(memory/pipeline.py: copies in order on one side stream, lookahead + 1 buffers; its predictions were
within 2-4% of the measured steps). Compute per block from its multiply-adds (a double block ~1.17x
a single one), split evenly over its units. Numbers default to the H200 run `h200-full-offload-cards-timed`:
bf16 step 0.1716 s, 55.3 GB/s pinned, 13.2 GiB of room for block weights and copy buffers.
No GPU: a prediction to measure against once sub-block streaming exists.

  python bench/subblock_prediction.py [--room-gib 13.2] [--step 0.1716] [--gb-s 55.3]
"""
from __future__ import annotations

import argparse
import importlib.util
import os

GIB = 2**30
DOUBLE, SINGLE = 0.6797e9, 0.2833e9  # bf16 bytes of one FLUX.1 double / single block (before scaling)
DOUBLE_MACS, SINGLE_MACS = 9.1e11, 7.8e11  # multiply-adds of one block at 1024x1024 (4096 + 512 tokens)


def _pipeline():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "memory", "pipeline.py")
    spec = importlib.util.spec_from_file_location("quantlora_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def predict(k: int, room: float, step: float, bw: float, weights_gib: float = 22.17, max_lookahead: int = 8,
            wrap: bool = False) -> dict:
    """The best plan the planner's search finds when each block streams as k equal units. wrap: the
    streamer keeps copying across the end of a step (the next step's first units)."""
    step_seconds = _pipeline().step_seconds
    scale = weights_gib * GIB / (19 * DOUBLE + 38 * SINGLE)
    units = [DOUBLE * scale / k] * (19 * k) + [SINGLE * scale / k] * (38 * k)
    n, total = len(units), sum(units)
    # compute per block from its multiply-adds at 1024x1024: a double block's text-stream half sees 512
    # tokens, not 4608, so it costs ~1.17x a single block (9.1e11 vs 7.8e11 with attention), not its 2.4x bytes
    work = [DOUBLE_MACS / k] * (19 * k) + [SINGLE_MACS / k] * (38 * k)
    compute = [step * w / sum(work) for w in work]
    copy = [u / bw for u in units]
    best = None
    for la in range(1, max_lookahead + 1):
        for cap in sorted(set(units)):  # the planner's search: each size class as the largest streamed unit
            eligible = [i for i in range(n) if units[i] <= cap]
            lo, hi, fit = 0.0, 1.0, None
            for _ in range(30):
                phi = (lo + hi) / 2
                acc, pick = -0.5 * units[eligible[0]], []
                for i in eligible:
                    acc += phi * units[i]
                    if acc >= units[i] / 2:
                        pick.append(i)
                        acc -= units[i]
                streamed = sum(units[i] for i in pick)
                in_flight = min(la + 1, len(pick)) * max((units[i] for i in pick), default=0)
                if total - streamed + in_flight <= room:
                    fit, hi = (tuple(pick), streamed), phi
                else:
                    lo = phi
            if fit is None:
                continue
            t = step_seconds(compute, copy, fit[0], la)
            if wrap:  # copies for the next step start as buffers free up in this one: the steady step
                t = step_seconds(compute * 3, copy * 3, tuple(i + j * n for j in range(3) for i in fit[0]), la) \
                    - step_seconds(compute * 2, copy * 2, tuple(i + j * n for j in range(2) for i in fit[0]), la)
            if best is None or t < best["step_s"]:
                best = {"units_per_block": k, "step_s": t, "ratio": t / step, "lookahead": la,
                        "streamed_gib": fit[1] / GIB, "floor": max(1.0, fit[1] / bw / step)}
    best["vs_floor"] = best["ratio"] / best["floor"]
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--room-gib", type=float, default=13.2)
    ap.add_argument("--step", type=float, default=0.1716)
    ap.add_argument("--gb-s", type=float, default=55.3)
    a = ap.parse_args()
    for wrap in (False, True):
        for k in (1, 2, 4, 8):
            r = predict(k, a.room_gib * GIB, a.step, a.gb_s * 1e9, wrap=wrap)
            print(f"{k} unit(s) per block{', copies across steps' if wrap else ''}: {r['ratio']:.3f}x, "
                  f"{r['streamed_gib']:.2f} GiB streamed, lookahead {r['lookahead']}, floor {r['floor']:.3f}x, "
                  f"{r['vs_floor']:.3f} of the floor")


if __name__ == "__main__":
    main()
