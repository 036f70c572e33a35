"""Layer 1: speed/rowquant.py, the one-pass per-row fp8 quantization of GELU-fed Linears, on plain torch
modules. The reference is torchao itself: its activation quantization (`_choose_scale_float8`,
`_quantize_affine_float8`) and its F.linear on the same Float8Tensor weight. The Triton kernel runs on
a GPU only (bench/rowquant_probe.py checks it against `reference_quant_rows` there); here the op runs
its torch arithmetic."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlora.speed import rowquant
from quantlora.speed.gelu import SigmoidGELU, sigmoid_gelu

f8 = pytest.importorskip("torchao.quantization.quantize_.workflows.float8.float8_tensor")
qp = importlib.import_module("torchao.quantization.quant_primitives")
from torchao.quantization.granularity import PerRow  # noqa: E402


def fp8_weight(w):
    """What the pack's torchao-fp8-dynamic makes of a weight (the config itself refuses a CPU)."""
    from torchao.quantization.quant_api import Float8MMConfig

    act = f8.QuantizeTensorToFloat8Kwargs(granularity=PerRow())
    w8 = f8.Float8Tensor.from_hp(w, granularity=PerRow(), act_quant_kwargs=act, mm_config=Float8MMConfig(use_fast_accum=True))
    return nn.Parameter(w8, requires_grad=False)


def fp8_linear(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    lin.weight = fp8_weight(lin.weight.data)
    return lin


def test_rows_quantized_as_torchao_quantizes_activations():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 8).bfloat16()
    q, s = torch.ops.quantlora.quant_rows_fp8(x, -1)
    ts = qp._choose_scale_float8(x, [1, 300], torch.float8_e4m3fn)
    tq = qp._quantize_affine_float8(x, ts, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(s, ts.reshape(64, 1))
    # x * (448 / amax) against torchao's x / (amax / 448): the same fp8 value but where the two fp32
    # products straddle a rounding boundary
    same = (q.float() == tq.float()).float().mean().item()
    assert same > 0.995, same
    assert (q.float() - tq.float()).abs().max() <= (tq.float().abs() / 8).max()  # one fp8 step at most


def test_gelu_columns_are_the_sigmoid_gelu_in_the_input_dtype():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 96, generator=g) * 3).bfloat16()
    q, s = torch.ops.quantlora.quant_rows_fp8(x, 40)
    want = torch.cat((x[:, :40], sigmoid_gelu(x[:, 40:])), 1)
    q2, s2 = torch.ops.quantlora.quant_rows_fp8(want, -1)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
    q0, _ = torch.ops.quantlora.quant_rows_fp8(x, 0)  # from column 0: the whole row
    assert torch.equal(q0.float(), torch.ops.quantlora.quant_rows_fp8(sigmoid_gelu(x), -1)[0].float())


def test_a_zero_row_gets_a_finite_scale():
    q, s = torch.ops.quantlora.quant_rows_fp8(torch.zeros(3, 32, dtype=torch.bfloat16), -1)
    assert torch.isfinite(s).all() and (s > 0).all() and (q.float() == 0).all()


def test_linear_equals_torchaos_linear_on_the_same_weight():
    lin = fp8_linear(256, 96, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 256, generator=g).bfloat16()
    want = F.linear(x, lin.weight, lin.bias)  # torchao's dispatch: quantize x per row, _scaled_mm
    got = rowquant.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 2e-3, rel  # the rare fp8 rounding flips above
    exact = F.linear(x, lin.weight.dequantize(), lin.bias)  # and it is a Linear: within fp8's error
    assert ((got.float() - exact.float()).norm() / exact.float().norm()).item() < 0.06


class Single(nn.Module):
    """The shape of ComfyUI's SingleStreamBlock tail: linear2(cat(attn, mlp_act(mlp)))."""

    def __init__(self, act):
        super().__init__()
        self.linear1 = fp8_linear(32, 96, 4)
        self.mlp_act = act
        self.linear2 = fp8_linear(96, 32, 5)

    def forward(self, x):
        attn, mlp = self.linear1(x).split([32, 64], -1)
        return x + self.linear2(torch.cat((attn, self.mlp_act(mlp)), -1))


class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_mlp = nn.Sequential(fp8_linear(32, 128, 6), nn.GELU(approximate="tanh"), fp8_linear(128, 32, 7))
        self.silu_mlp = nn.Sequential(fp8_linear(32, 64, 8), nn.SiLU(), fp8_linear(64, 32, 9))

    def forward(self, x):
        return x + self.img_mlp(x) + self.silu_mlp(x)


def test_targets_are_the_gelu_fed_linears_only():
    single, double = Single(nn.GELU(approximate="tanh")), Double()
    assert rowquant.targets(single) == [single.linear2]
    assert rowquant.targets(Single(SigmoidGELU())) != []  # after speed/gelu.py's swap too
    assert rowquant.targets(Single(nn.SiLU())) == [] and rowquant.targets(Single(nn.GELU())) == []
    assert rowquant.targets(double) == [double.img_mlp[2]]


GRAPHS = []


@torch._dynamo.register_backend(name="quantlora_rowquant_graphs")
def keep_graphs(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward


def op_calls():
    return [n.args[1] for g in GRAPHS for n in g.graph.nodes if "quant_rows_fp8" in str(n.target)]


def gelu_calls():
    return sum("gelu" in str(n.target) or "sigmoid" in str(n.target) for g in GRAPHS for n in g.graph.nodes)


@pytest.mark.parametrize("kind", ["single", "double"])
def test_compiled_block_takes_the_kernel_and_eager_stays_torchaos(kind, monkeypatch):
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    block = Single(nn.GELU(approximate="tanh")) if kind == "single" else Double()
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(10)).bfloat16()
    with torch.no_grad():
        eager = block(x)
        assert rowquant.use_in(block) == 1
        assert torch.equal(block(x), eager)  # not compiling: torchao's own path, bit for bit
        torch._dynamo.reset()
        GRAPHS.clear()
        compiled = torch.compile(block, backend="quantlora_rowquant_graphs")
        out = compiled(x)
        # a single block's linear2 takes its GELU'd input; a GELU MLP's GELU moves into the kernel
        assert op_calls() == ([-1] if kind == "single" else [0]), [str(n.target) for g in GRAPHS for n in g.graph.nodes]
        assert gelu_calls() == (1 if kind == "single" else 0)
        delta = (out - x).float()
        rel = ((out.float() - eager.float()).norm() / (eager - x).float().norm()).item()
        assert rel < 1e-2, rel
        assert delta.abs().max() > 0
        # a layer ComfyUI patches at run time (its weight functions) keeps ComfyUI's forward
        target = rowquant.targets(block)[0]
        target.weight_function = [lambda w: w]
        torch._dynamo.reset()
        GRAPHS.clear()
        torch.compile(block, backend="quantlora_rowquant_graphs")(x)
        assert op_calls() == [] and gelu_calls() == 1


def test_rows_wider_than_the_kernel_holds_keep_torchaos_quantization(monkeypatch):
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    monkeypatch.setattr(rowquant, "MAX_ROW", 64)  # the single block's linear2 reads 96 columns
    block = Single(nn.GELU(approximate="tanh"))
    rowquant.use_in(block)
    torch._dynamo.reset()
    GRAPHS.clear()
    with torch.no_grad():
        torch.compile(block, backend="quantlora_rowquant_graphs")(torch.randn(1, 8, 32).bfloat16())
    assert op_calls() == []


def test_gelu_mlp_without_the_fusion_keeps_its_gelu(monkeypatch):
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    block = Double()
    rowquant.use_in(block, fuse_gelu=False)
    torch._dynamo.reset()
    GRAPHS.clear()
    with torch.no_grad():
        torch.compile(block, backend="quantlora_rowquant_graphs")(torch.randn(1, 8, 32).bfloat16())
    assert op_calls() == [-1] and gelu_calls() == 1

