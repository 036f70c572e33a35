"""speed/compile.py on plain torch modules: every block of a Flux-shaped model is compiled once, in
place, and the opt-in inductor settings (QUANTLORA_INDUCTOR_TUNE, QUANTLORA_INDUCTOR_CPP_WRAPPER) reach
torch.compile; without them no options are passed (torch's defaults, the measured path)."""
import pytest
from torch import nn

from quantlora.speed import compile as comp


class FluxShaped(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.single_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.final_layer = nn.Linear(4, 4)


@pytest.mark.parametrize("env, want", [({}, None),
                                       ({"QUANTLORA_INDUCTOR_TUNE": "1"}, {"coordinate_descent_tuning": True}),
                                       ({"QUANTLORA_INDUCTOR_CPP_WRAPPER": "1"}, {"cpp_wrapper": True}),
                                       ({"QUANTLORA_INDUCTOR_TUNE": "1", "QUANTLORA_INDUCTOR_CPP_WRAPPER": "1"},
                                        {"coordinate_descent_tuning": True, "cpp_wrapper": True}),
                                       ({"QUANTLORA_INDUCTOR_CPP_WRAPPER": "yes"}, None)])
def test_blocks_compiled_once_with_the_opt_in_options(monkeypatch, env, want):
    for k in ("QUANTLORA_INDUCTOR_TUNE", "QUANTLORA_INDUCTOR_CPP_WRAPPER"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = []
    real = nn.Module.compile

    def recording(self, *args, **kwargs):  # what compile_blocks hands torch.compile, then the real call
        seen.append(kwargs.get("options"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", recording)
    model = FluxShaped()
    assert comp.compile_blocks(model) == 5 and comp.is_compiled(model)
    assert seen == [want] * 5
    assert model.final_layer._compiled_call_impl is None  # only transformer blocks
    assert comp.compile_blocks(model) == 0 and len(seen) == 5  # already compiled: nothing done twice


def test_another_backend_gets_no_inductor_options(monkeypatch):
    """QUANTLORA_COMPILE_BACKEND (the CPU dry runs' aot_eager): that backend, and inductor's settings
    are not handed to it (torch.compile would pass them on as the backend's own options)."""
    monkeypatch.setenv("QUANTLORA_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("QUANTLORA_INDUCTOR_TUNE", "1")
    seen = []
    real = nn.Module.compile

    def recording(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", recording)
    comp.compile_blocks(FluxShaped())
    assert seen == [{"backend": "aot_eager"}] * 5


RESTART_SCRIPT = r'''
import json, sys
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import importlib.util
spec = importlib.util.spec_from_file_location("_bootstrap", sys.argv[1] + "/tools/bootstrap.py")
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.register_pack(sys.argv[1])
from quantlora.speed import compile as comp


class Block(nn.Module):  # attention as ComfyUI's SDPA wrapper calls it on CUDA: inside sdpa_kernel
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True):
            return nn.functional.scaled_dot_product_attention(self.proj(x), x, x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([Block()])


torch.manual_seed(0)
m = Model()
if sys.argv[2] == "plain":
    m.double_blocks[0].compile()
else:
    comp.compile_blocks(m)
with torch.no_grad():
    m.double_blocks[0](torch.randn(1, 2, 8, 16))
print(json.dumps(dict(counters["aot_autograd"])))
'''


def test_a_restart_reuses_aot_autogradss_cache_through_sdpa_priority(tmp_path):
    """The restart's compile: a block that sets SDPA's backend priority (ComfyUI's attention on CUDA)
    is served from AOTAutograd's on-disk cache by a second process once compile_blocks marks
    torch.nn.attention's helpers. Without the marking torch bypasses that cache for such a graph
    (`autograd_cache_bypass`, measured on torch 2.11 and 2.13; the script's "plain" mode shows it),
    which the first run's check catches."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(comp.__file__)))  # the repo
    script = tmp_path / "restart.py"
    script.write_text(RESTART_SCRIPT)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("QUANTLORA_COMPILE_BACKEND", None)
    runs = []
    for _ in range(2):  # a cold start, then a restart on the same cache
        out = subprocess.run([sys.executable, str(script), root, "pack"], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0].get("autograd_cache_saved") == 1 and not runs[0].get("autograd_cache_bypass"), runs
    assert runs[1].get("autograd_cache_hit") == 1, runs


def test_cuda_graphs_give_each_block_copies_of_its_inputs(monkeypatch):
    """QUANTLORA_CUDAGRAPHS=1 where CUDA graphs can run (faked here: this CPU cannot): inductor gets
    triton.cudagraphs, and each block adds into copies of its inputs (graph trees replay no graph that
    mutates an input they do not manage), so the caller's tensors stay as they were and the outputs
    equal the eager block's. Without the switch the block mutates its input, as FLUX's blocks do."""
    import torch

    class AddsInPlace(nn.Module):  # FLUX's blocks: `img += ...` on the input, returned
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, img, vec=None):
            img += self.lin(img) * vec
            return img

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.single_blocks = nn.ModuleList([AddsInPlace() for _ in range(4)])

    monkeypatch.setattr(comp, "cudagraphs_unavailable", lambda: None)
    monkeypatch.delenv("QUANTLORA_COMPILE_BACKEND", raising=False)  # inductor (on this CPU it captures nothing)
    for switch in ("1", "0", "choice"):  # the environment switch, off, the compile choice's argument
        monkeypatch.setenv(comp.CUDAGRAPHS_ENV, "1" if switch == "1" else "0")
        torch._dynamo.reset()  # "choice" traces the same forward as "1": its own graph, not the cached one
        seen = []
        real = nn.Module.compile
        monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: (seen.append(k.get("options")), real(self, *a, **k))[1])
        torch.manual_seed(0)
        m, x, vec = Model(), torch.randn(3, 4), torch.randn(4)
        want = x.clone()
        with torch.no_grad():
            for b in m.single_blocks:
                want = b.forward(want, vec=vec) + 0  # eager, on a copy
            comp.compile_blocks(m, cudagraphs=switch == "choice")
            assert comp.uses_cudagraphs(m) is (switch != "0")  # the sampler marks each step's start
            before = x.clone()
            h = x
            torch._dynamo.utils.counters.clear()
            with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every block
                for b in m.single_blocks:
                    h = b(h, vec=vec)
        torch.testing.assert_close(h, want)
        # one whole graph per block: no break around the copies (a break costs a host round trip)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and not torch._dynamo.utils.counters["graph_break"]
        if switch != "0":
            assert seen == [{"triton.cudagraphs": True}] * 4
            assert torch.equal(x, before)  # the caller's input untouched
        else:
            assert seen == [None] * 4
            assert not torch.equal(x, before)  # the control: FLUX's in-place add reaches the caller
        monkeypatch.setattr(nn.Module, "compile", real)


def test_a_gpu_compile_launches_the_rowquant_kernel_statically(monkeypatch):
    """speed/rowquant.py's kernel is user-defined Triton: inductor's static launcher for it is asked for
    where it runs (a GPU; ~70 -> ~20 us of host time a call on an H200), and not with the switch off."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(comp, "cudagraphs_wanted", lambda: False)
    assert comp.inductor_options().get("static_launch_user_defined_triton_kernels") is True
    monkeypatch.setenv("QUANTLORA_ROWQUANT", "0")
    assert "static_launch_user_defined_triton_kernels" not in comp.inductor_options()


def test_cuda_graphs_asked_for_where_they_cannot_run_raise(monkeypatch):
    """compile_blocks(cudagraphs=True) on this CPU: a ValueError saying why, nothing compiled (the
    environment switch alone only warns, as before)."""
    import pytest

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.single_blocks = nn.ModuleList([nn.Linear(4, 4)])

    m = Model()
    with pytest.raises(ValueError, match="no CUDA device"):
        comp.compile_blocks(m, cudagraphs=True)
    assert not comp.is_compiled(m) and not comp.uses_cudagraphs(m)
