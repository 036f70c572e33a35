"""Layer 2: a model read from the mapped weight cache (memory/pinned_file.py) through ComfyUI's own
sampler, in-process. A LoRA merged on it takes the cache file's bytes as its pristine copy and samples
what a model loaded without the cache samples with that LoRA, and the bare base after it; a model
sampled with no host-side merge gives the file's pages back (nodes/runtime.py: unlocked at the
sampling's start). On this CPU machine DirectReader.on_cpu makes the load read as on a GPU."""
import pytest
import torch

from test_offload_sampler import flux_file, ksample, lora_files  # noqa: F401 (fixtures)


@pytest.fixture
def cached_loads(tmp_path, monkeypatch):
    from quantlora.checkpoint.direct_read import DirectReader
    from quantlora.quant import weight_cache

    monkeypatch.setenv(weight_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(DirectReader, "on_cpu", True)


@torch.no_grad()
def test_merge_on_the_mapped_cache_samples_as_a_plain_load(flux_file, lora_files, cached_loads):  # noqa: F811
    import folder_paths
    from quantlora.memory import pinned_file
    from quantlora.nodes import bridge, runtime

    quantization = "torchao-int8-weight-only"
    plain = bridge.build_model(flux_file, quantization, "fp32")
    bridge.build_model(flux_file, quantization, "fp32", weight_cache_mode="on")  # writes the cache
    cached = bridge.build_model(flux_file, quantization, "fp32", weight_cache_mode="on")
    dm = cached.model.diffusion_model
    assert pinned_file.of(dm) is not None and pinned_file.of(plain.model.diffusion_model) is None
    name = lora_files[0]
    path = folder_paths.get_full_path("loras", name)
    mine, _ = runtime.add_lora(cached, name, path, 1.0, "merge", 16, "blocks")
    theirs, _ = runtime.add_lora(plain, name, path, 1.0, "merge", 16, "blocks")
    got = ksample(mine)
    assert torch.equal(got, ksample(theirs))
    state = runtime.merge_state(dm)
    assert state.report.pristine_file_bytes > 0 and state.report.pristine_file_bytes == state.report.pristine_bytes
    assert pinned_file.of(dm) is not None  # kept: the host-side merge restores from it
    bare = ksample(cached)  # the loader's MODEL: the bare base, restored from the file's bytes
    assert torch.equal(bare, ksample(plain)) and not torch.equal(bare, got)

    again = bridge.build_model(flux_file, quantization, "fp32", weight_cache_mode="on")
    assert pinned_file.of(again.model.diffusion_model) is not None
    assert torch.equal(ksample(again), bare)
    assert pinned_file.of(again.model.diffusion_model) is None  # no merge will take it: given back
