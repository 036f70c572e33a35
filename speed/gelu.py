"""The blocks' tanh-GELU written as x * sigmoid(2u) inside compiled graphs (QUANTLORA_SIGMOID_GELU=0: off).

0.5 * (1 + tanh(u)) equals sigmoid(2u), so gelu_tanh(x) = x * sigmoid(2u) with u = sqrt(2/pi) *
(x + 0.044715 x^3): the same function. Inductor generates libdevice's tanh for the first form on
CUDA (its fast tanh is ROCm-only) and tl.sigmoid on the hardware exp for the second. In Flux the GELU
sits in front of the fp8 Linear whose per-row activation quantization inductor fuses with it, in
kernels that evaluate the GELU once per pass over each row (H200, fp8 step: 13 ms of 90 ms of
kernels, 3-4x what their bytes need; bench/gelu_probe.py, BENCHMARKS.md issue 12). Eager calls keep
torch's own GELU kernel, which is faster there than the several kernels of the written-out form.
"""
from __future__ import annotations

import os

import torch
from torch import nn

ENV = "QUANTLORA_SIGMOID_GELU"
TWO_SQRT_2_OVER_PI = 2 * (2 / torch.pi) ** 0.5


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()  # as torch's GELU computes bf16/fp16 inputs
    return (x32 * torch.sigmoid(TWO_SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32))).to(x.dtype)


class SigmoidGELU(nn.GELU):
    """nn.GELU(approximate="tanh") whose compiled form is the sigmoid one (an nn.GELU still, for code
    that checks the type or reads `approximate`)."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x):
        if torch.compiler.is_compiling():
            return sigmoid_gelu(x)
        return super().forward(x)


def swap_tanh_gelus(module: nn.Module) -> int:
    """Replaces every plain nn.GELU(approximate="tanh") under `module` by a SigmoidGELU, in place.
    Returns how many. Other activations (and subclasses of nn.GELU) are left as they are."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GELU and child.approximate == "tanh":
                new = SigmoidGELU()
                new.train(child.training)
                setattr(parent, name, new)
                n += 1
    return n
