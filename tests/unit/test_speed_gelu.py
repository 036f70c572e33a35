"""speed/gelu.py on plain torch modules: compile_blocks writes the blocks' tanh-GELU in its sigmoid form
inside the compiled graphs only (QUANTLORA_SIGMOID_GELU=0 keeps torch's GELU), the function stays the
same (against torch's GELU, per dtype) and eager calls keep torch's own kernel bit for bit."""
import pytest
import torch
from torch import nn

from quantlora.speed import compile as comp
from quantlora.speed import gelu


class Block(nn.Module):  # Flux's two uses: an nn.Sequential MLP and a block attribute
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 8))
        self.mlp_act = nn.GELU(approximate="tanh")
        self.exact = nn.GELU()  # erf GELU: another function, left alone
        self.silu = nn.SiLU()

    def forward(self, x):
        return self.mlp(x) + self.exact(self.mlp_act(x)) + self.silu(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([Block()])
        self.single_blocks = nn.ModuleList([Block(), Block()])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -10)])
def test_the_sigmoid_form_is_torchs_tanh_gelu(dtype, tol):
    """Against the tanh-GELU in float64: within the dtype's rounding wherever the value is not tiny,
    and no further from it than torch's own GELU in that dtype (the sigmoid form avoids 1 + tanh's
    cancellation in the negative tail, where torch's fp32 GELU loses digits)."""
    x = (torch.linspace(-12, 12, 20001, dtype=torch.float64) ** 3 / 100).to(dtype)  # dense near 0, both tails
    exact = nn.functional.gelu(x.double(), approximate="tanh")
    got = gelu.sigmoid_gelu(x)
    assert got.dtype == dtype
    err = (got.double() - exact).abs()
    torch_err = (nn.functional.gelu(x, approximate="tanh").double() - exact).abs()
    big = exact.abs() > 1e-2
    assert (err[big] / exact[big].abs()).max() <= tol
    one_ulp_at_the_top = torch.finfo(dtype).eps * exact.abs().max()  # where both forms only round
    assert err.max() <= max(torch_err.max(), one_ulp_at_the_top), (err.max(), torch_err.max())


def graph_ops(model, x):
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    comp.compile_blocks(model, backend=backend)
    with torch.no_grad():
        out = model.double_blocks[0](x)
    return seen, out


def test_compiled_blocks_trace_the_sigmoid_form_and_eager_is_unchanged(monkeypatch):
    monkeypatch.delenv(gelu.ENV, raising=False)
    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 8)
    with torch.no_grad():
        eager = model.double_blocks[0](x)
    ops, compiled = graph_ops(model, x)
    assert sum("gelu" in o for o in ops) == 1, ops  # the erf GELU only: both tanh ones are the sigmoid form
    assert sum("sigmoid" in o for o in ops) == 2, ops
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    swapped = [m for m in model.modules() if isinstance(m, gelu.SigmoidGELU)]
    assert len(swapped) == 6 and all(m.approximate == "tanh" for m in swapped)
    # eager afterwards (the block's forward outside its compiled call): torch's own GELU kernel, bit for bit
    plain = Model()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.single_blocks[1].forward(x), plain.single_blocks[1](x))


def test_switched_off_the_graph_keeps_torchs_gelu(monkeypatch):
    monkeypatch.setenv(gelu.ENV, "0")
    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 8)
    ops, _ = graph_ops(model, x)
    assert sum("gelu" in o for o in ops) == 3, ops
    assert not any(isinstance(m, gelu.SigmoidGELU) for m in model.modules())


def test_swap_counts_only_plain_tanh_gelus():
    class Custom(nn.GELU):
        pass

    m = nn.Sequential(nn.GELU(approximate="tanh"), nn.GELU(), Custom(approximate="tanh"), nn.Sequential(nn.GELU(approximate="tanh")))
    assert gelu.swap_tanh_gelus(m) == 2
    assert [type(c).__name__ for c in m] == ["SigmoidGELU", "GELU", "Custom", "Sequential"]
    assert gelu.swap_tanh_gelus(m) == 0  # idempotent
