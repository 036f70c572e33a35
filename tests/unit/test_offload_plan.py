"""Layer 1: memory/offload_plan.py, CPUOffloadSampler's plan from numbers (no ComfyUI)."""
import pytest
import torch
from torch import nn

from quantlora.errors import QuantLoRAError
from quantlora.memory import offload as off
from quantlora.memory import offload_plan as op

D = 64
N = 8


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.Linear(2 * D, D)) for _ in range(N))
        self.out = nn.Linear(D, D)


def test_fixed_plans():
    with pytest.raises(QuantLoRAError, match="offload_mode 'fast'"):
        op.fixed_plan("fast", 1, True, torch.device("cuda"))
    p = op.fixed_plan("auto", 1, False, torch.device("cpu"))
    assert not p.active and p.auto and "no CUDA device (cpu)" in p.reason and p.describe() == p.reason
    for mode in ("none", "model", "leaf"):
        p = op.fixed_plan(mode, 2, True, torch.device("cuda"))
        assert (p.mode, p.blocks_per_group, p.active, p.auto) == (mode, 2, True, False)
    assert op.fixed_plan("auto", 1, True, torch.device("cuda")) is None
    assert op.fixed_plan("block", 1, True, torch.device("cuda")) is None


def test_budget_plan_from_numbers():
    tree = Tree()
    model = off.tree_sizes(tree).model
    reserve = 1000
    shape = [1, 16, 8, 8]
    big = op.budget_plan(tree, "auto", 1, 0.0, reserve, {"free_bytes": reserve + 2 * model}, shape)
    assert (big.mode, big.auto) == ("none", True) and "fit" in big.reason
    tiny = op.budget_plan(tree, "auto", 1, 0.0, reserve, {"free_bytes": reserve + model // 100}, shape)
    assert tiny.mode == "leaf" and "not even the streamed blocks fit" in tiny.reason
    half = op.budget_plan(tree, "auto", 1, 0.0, reserve, {"free_bytes": reserve + model * 6 // 10}, shape)
    r = half.residency
    assert half.mode == "block" and 0 < r.n_resident < r.n_blocks == N
    assert half.budget % max(1, min(op.BUDGET_STEP, model // 64)) == 0  # rounded down: small changes keep the plan
    assert half.nonblock + r.working_set <= half.budget <= model * 6 // 10
    assert half.predicted_ratio is None and "predicted step ratio n/a" in half.describe()
    assert f"{r.n_resident}/{N} blocks resident" in half.describe()
    # vram_budget_gb wins over the card and is not rounded; no card at all streams every block
    fixed = op.budget_plan(tree, "block", 2, (reserve + model * 6 // 10) / op.GIB, reserve, {"free_bytes": 0}, shape)
    assert fixed.mode == "block" and fixed.blocks_per_group == 2 and "vram_budget_gb" in fixed.reason
    every = op.budget_plan(tree, "block", 1, 0.0, reserve, None, shape)
    assert every.budget is None and every.residency.n_resident == 0
    assert op.budget_plan(tree, "auto", 1, 0.0, reserve, None, shape).mode == "none"


def test_prediction_and_reserve_arithmetic():
    assert op.sampling_shape([1, 16, 8, 8], 1.0) == [1, 16, 8, 8]
    assert op.sampling_shape([1, 16, 8, 8], 3.5) == [2, 16, 8, 8]
    tree = Tree()
    assert op.activation_estimate(tree, [2, 16, 8, 8], 123) == 123  # not a Flux model: the fallback
    tree.hidden_size, tree.double_blocks = D, tree.blocks
    assert op.activation_estimate(tree, [2, 16, 8, 8], 123) == 2 * (16 + 512) * D * 2 * 24
    res, _ = off.plan_blocks(tree, None)
    ratio, bw, t = op.predict(tree, res, [1, 16, 8, 8], {"bandwidth": 1e9, "flops": 1e12})
    assert bw == 1e9 and t > 0 and ratio >= 1.0
    assert op.predict(tree, res, [1, 16, 8, 8], {}) == (None, None, None)
    assert op.device_bytes_at_rest(None) == 0


def test_reserve_rules():
    G = op.GIB
    mi, extra = int(0.8 * G) + (400 << 20), 400 << 20
    act = int(0.633 * G)
    # ComfyUI's headroom (load_models_gpu): max(minimum inference memory, activations + extra reserve)
    assert op.reserve_bytes(mi, extra, act) == mi
    assert op.reserve_bytes(mi, extra, 2 * G) == 2 * G + extra
    assert op.reserve_bytes(mi, 0, act, "comfy") == mi  # --reserve-vram 0
    assert op.reserve_bytes(mi, extra, act, "sum") == mi + act
    with pytest.raises(ValueError, match="reserve rule 'x'"):
        op.reserve_bytes(mi, extra, act, "x")
