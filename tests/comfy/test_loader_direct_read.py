"""Layer 2: the weights the loader quantizes on the load device are read from the file with pread
(checkpoint/direct_read.py) instead of through the memory mapping: the model ComfyUI builds is the
same, bit for bit, as with the mapping (QUANTLORA_DIRECT_READS=0). On this CPU machine the load
device is the CPU; DirectReader.on_cpu makes it read there as it does for a GPU."""
import pytest
import torch

from test_oracle_diffusers import comfy_forward, flux_inputs


@pytest.fixture(scope="module")
def flux_bf16(comfy, tmp_path_factory):
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.demo_flux_config(), depth=3, depth_single_blocks=3)  # blocks after the first: read-ahead
    sd = dm.flux_bfl_state_dict(cfg, seed=23, dtype=torch.bfloat16)
    return cfg, dm.write_bfl(str(tmp_path_factory.mktemp("direct") / "flux.safetensors"), sd)


def _load(path, quantization, monkeypatch, direct: bool):
    from quantlora.checkpoint.direct_read import DirectReader
    from quantlora.nodes import bridge

    seen = []
    real_close = DirectReader.close
    monkeypatch.setattr(DirectReader, "on_cpu", True)
    monkeypatch.setattr(DirectReader, "close", lambda self: seen.append(dict(self.stats)) or real_close(self))
    monkeypatch.setattr(bridge, "DIRECT_READS", direct)
    patcher, report = bridge.load_flux_model_patcher(path, quantization, "bf16")
    _loaded_phases[direct] = report.phases
    return patcher.model.diffusion_model.eval(), (seen[0] if seen else None)


_loaded_phases = {}


@torch.no_grad()
@pytest.mark.parametrize("quantization", ["torchao-int8-weight-only", "quanto-int8"])
def test_direct_reads_build_the_same_model(flux_bf16, monkeypatch, quantization):
    cfg, path = flux_bf16
    mapped, none = _load(path, quantization, monkeypatch, direct=False)
    direct, stats = _load(path, quantization, monkeypatch, direct=True)
    assert none is None
    n_block_linears = len([m for n, m in direct.named_modules() if hasattr(m, "in_features") and "blocks." in n])
    assert stats["direct"] >= n_block_linears > 0, stats  # every quantized block Linear was read directly
    # the read-ahead learned ComfyUI's order from the first block of each kind and the step to the
    # second, then guessed every later weight right
    per_block = [len([m for m in blocks[0].modules() if hasattr(m, "in_features")])
                 for blocks in (direct.double_blocks, direct.single_blocks)]
    assert stats["ahead_misses"] == 0 and stats["ahead_hits"] == n_block_linears - sum(n + 1 for n in per_block), stats
    inp = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in flux_inputs(cfg, seed=2).items()}  # the model's dtype, as ComfyUI hands it
    assert torch.equal(comfy_forward(direct, inp), comfy_forward(mapped, inp))
    for (k, a), (k2, b) in zip(mapped.state_dict().items(), direct.state_dict().items()):
        assert k == k2
        if type(a) is torch.Tensor and type(b) is torch.Tensor:
            assert torch.equal(a, b), k
    # the load's host phases (the restart benchmark's breakdown): the direct load's reads are counted
    # in its placing time, the mapped load has none; each load's phases add up to its own time
    on, off = _loaded_phases[True], _loaded_phases[False]
    assert on["read_s"] > 0 and on["read_s"] + on["stage_wait_s"] <= on["to_device_s"] + 1e-3, on
    assert on["direct_gib"] > 0 and on["read_threads"] >= 1 and "read_s" not in off
    for ph in (on, off):
        assert ph["quantize_s"] > 0 and ph["to_device_s"] > 0 and ph["other_s"] >= 0, ph
