"""Layer 1: speed/rowquant_cat.py, the pre-grad pass that quantizes linear2(cat(attn,
gelu(mlp))) without the concatenation, on plain torch modules. The reference is the graph before the
pass (rowquant's quantization of the concatenation) and rowquant's own arithmetic; on a CPU both ops
run their torch forms, so the rewritten graph must compute the same bits."""
import pytest
import torch
from torch import nn

from quantlora.speed import rowquant, rowquant_cat
from quantlora.speed.gelu import SigmoidGELU, sigmoid_gelu
from test_speed_rowquant import Single

GRAPHS = []


@torch._dynamo.register_backend(name="quantlora_rowquant_cat_graphs")
def keep_graphs(gm, example_inputs):
    GRAPHS.append((gm, list(example_inputs)))
    return gm.forward


def ops(gm, word):
    return sum(word in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_pair_op_is_rowquant_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 16, generator=g).bfloat16()
    m = (torch.randn(2, 5, 48, generator=g) * 3).bfloat16()
    q, s = torch.ops.quantlora.quant_rows_fp8_pair(a, m)
    wq, ws = torch.ops.quantlora.quant_rows_fp8(torch.cat((a, sigmoid_gelu(m)), -1).reshape(10, 64), -1)
    assert torch.equal(q.float(), wq.float()) and torch.equal(s, ws)


def captured_single(monkeypatch, act):
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    block = Single(act)
    rowquant.use_in(block)
    marked = rowquant_cat.use_in(block)
    torch._dynamo.reset()
    GRAPHS.clear()
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        eager = block(x)
        torch.compile(block, backend="quantlora_rowquant_cat_graphs")(x)
    (gm, inputs), = GRAPHS
    return block, marked, gm, inputs, eager


def test_pass_reads_both_halves_where_they_lie(monkeypatch):
    block, marked, gm, inputs, eager = captured_single(monkeypatch, SigmoidGELU())
    assert marked and isinstance(block.mlp_act, rowquant_cat.PairGELU)
    h = torch.randn(3, 7).bfloat16()
    assert torch.equal(block.mlp_act(h), nn.GELU(approximate="tanh")(h))  # eager: torch's GELU
    with torch.no_grad():
        before = gm(*inputs)
        n = rowquant_cat.CatQuantPass.rewrites
        rowquant_cat.CatQuantPass()(gm.graph)
        gm.recompile()
        after = gm(*inputs)
    assert rowquant_cat.CatQuantPass.rewrites == n + 1
    assert ops(gm, "quant_rows_fp8_pair") == 1 and ops(gm, "pair_gelu") == 0 and ops(gm, "cat") == 0
    assert ops(gm, "quant_rows_fp8") == 1  # the pair op only: the concatenation's quantization is gone
    assert torch.equal(after[0], before[0])
    assert ((after[0].float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2


def test_unmarked_or_shared_concatenations_are_left_alone(monkeypatch):
    _, marked, gm, inputs, _ = captured_single(monkeypatch, nn.SiLU())  # no GELU: nothing is marked
    assert not marked
    text = str(gm.graph)
    rowquant_cat.CatQuantPass()(gm.graph)
    assert str(gm.graph) == text

    class Shared(Single):  # the GELU's output also read elsewhere: the concatenation must stay
        def forward(self, x):
            attn, mlp = self.linear1(x).split([32, 64], -1)
            g = self.mlp_act(mlp)
            return x + self.linear2(torch.cat((attn, g), -1)) + g[..., :32]

    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    block = Shared(nn.GELU(approximate="tanh"))
    rowquant.use_in(block)
    assert rowquant_cat.use_in(block)
    torch._dynamo.reset()
    GRAPHS.clear()
    with torch.no_grad():
        torch.compile(block, backend="quantlora_rowquant_cat_graphs")(torch.randn(1, 4, 32).bfloat16())
    (gm, _), = GRAPHS
    rowquant_cat.CatQuantPass()(gm.graph)
    assert ops(gm, "quant_rows_fp8_pair") == 0 and ops(gm, "pair_gelu") == 1


def test_a_linear2_without_the_kernel_gets_no_marker(monkeypatch):
    """A bf16 linear2 (or any the kernel does not take) keeps the plain sigmoid GELU in the graph: the
    marker is only traced where the pass can use it."""
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    block = Single(SigmoidGELU())
    block.linear2 = nn.Linear(96, 32).bfloat16()
    rowquant.use_in(block)
    assert rowquant_cat.use_in(block)  # marked by structure; decided in the trace
    torch._dynamo.reset()
    GRAPHS.clear()
    with torch.no_grad():
        torch.compile(block, backend="quantlora_rowquant_cat_graphs")(torch.randn(1, 4, 32).bfloat16())
    (gm, _), = GRAPHS
    assert ops(gm, "pair_gelu") == 0 and ops(gm, "sigmoid") == 1 and ops(gm, "quant_rows_fp8") == 0


def test_an_unrewritten_marker_decomposes_to_the_sigmoid_gelu(monkeypatch):
    """Where the pass does not run or match, AOTAutograd decomposes the marker: the compiled block
    computes exactly what it computes with speed/gelu.py's SigmoidGELU."""
    monkeypatch.setattr(rowquant, "ALLOW_CPU", True)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    outs = []
    for mark in (False, True):
        block = Single(SigmoidGELU())
        rowquant.use_in(block)
        if mark:
            rowquant_cat.use_in(block)
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(block, backend="aot_eager")(x))
    assert torch.equal(outs[0], outs[1])


def test_the_pass_has_a_cache_key_of_its_source():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    p = rowquant_cat.CatQuantPass()
    assert isinstance(p, CustomGraphPass) and p.uuid() == rowquant_cat.CatQuantPass().uuid() and len(p.uuid()) == 64


@pytest.mark.parametrize("env, want", [({}, True), ({"QUANTLORA_ROWQUANT_CAT": "0"}, False),
                                       ({"QUANTLORA_ROWQUANT_CAT": "1", "QUANTLORA_ROWQUANT": "0"}, False)])
def test_the_switch(monkeypatch, env, want):
    from quantlora.speed import compile as comp

    for k in ("QUANTLORA_ROWQUANT_CAT", "QUANTLORA_ROWQUANT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert comp.rowquant_cat_wanted() is want
    assert isinstance(comp.inductor_options().get("pre_grad_custom_pass"), rowquant_cat.CatQuantPass) is want
