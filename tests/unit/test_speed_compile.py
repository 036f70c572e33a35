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
