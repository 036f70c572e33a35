"""The resident step the offload planner ranks plans against, for weights whose GEMMs run in fp8
(layer 1: plain torch and torchao, no ComfyUI, no GPU)."""
import pytest
import torch
from torch import nn

from quantlora.memory import streaming


def test_fp8_linears_at_the_fp8_rate():
    n, tokens, hidden, blocks = 12_000_000_000, 4608, 3072, 57
    bf16 = streaming.resident_step_seconds(n, tokens, hidden, blocks, 1, 630e12)
    attention = 4 * tokens * tokens * hidden * blocks / 630e12
    linear = bf16 - attention
    # every linear in fp8 at twice the rate: the linears' share halves, attention stays
    half = streaming.resident_step_seconds(n, tokens, hidden, blocks, 1, 630e12, n, 1260e12)
    assert half == pytest.approx(attention + linear / 2, rel=1e-12)
    # no measured fp8 rate: as before, whatever the count
    assert streaming.resident_step_seconds(n, tokens, hidden, blocks, 1, 630e12, n, None) == pytest.approx(bf16)
    # more fp8 params than linears is clipped to the linears
    assert streaming.resident_step_seconds(n, tokens, hidden, blocks, 1, 630e12, 2 * n, 1260e12) == pytest.approx(half)


def test_only_dynamic_fp8_weights_count():
    """torchao Float8Tensor weights that quantize activations run fp8 GEMMs; weight-only fp8 and
    plain weights compute in bf16. Built with torchao's own from_hp (the dynamic config refuses a
    CPU, so the weight is made directly with the activation kwargs the config would attach)."""
    f8 = pytest.importorskip("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    from torchao.quantization.granularity import PerRow

    root = nn.Module()
    root.plain = nn.Linear(64, 32).to(torch.bfloat16)
    root.weight_only = nn.Linear(64, 48).to(torch.bfloat16)
    root.dynamic = nn.Linear(64, 16).to(torch.bfloat16)
    root.weight_only.weight = nn.Parameter(f8.Float8Tensor.from_hp(root.weight_only.weight.data, granularity=PerRow()),
                                           requires_grad=False)
    act = f8.QuantizeTensorToFloat8Kwargs(granularity=PerRow())
    root.dynamic.weight = nn.Parameter(f8.Float8Tensor.from_hp(root.dynamic.weight.data, granularity=PerRow(),
                                                               act_quant_kwargs=act), requires_grad=False)
    assert streaming.linear_params(root) == 64 * (32 + 48 + 16)
    assert streaming.fp8_compute_params(root) == 64 * 16


def test_no_fp8_rate_without_cuda():
    assert streaming.fp8_matmul_rate(torch.device("cpu")) is None
