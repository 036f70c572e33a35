"""Layers 1-2: CPU offload (memory/offload.py) and CPUOffloadSampler, in-process, on the CPU.

This machine has no CUDA device, so in the node every offload mode is a no-op and it samples as
KSampler does (test_node_is_ksampler_without_cuda). The offload machinery itself is also run here
with the CPU as both the onload and the offload device (FORCE_ON_CPU): diffusers' group-offload
hooks or our module-move hooks are installed, ComfyUI's model management is told what is
resident, LoRA slots are swapped under the hooks; nothing actually moves, so these tests check
that the hooks leave the math alone (latents equal to nodes.common_ksampler bit for bit) and the
bookkeeping contract. Real transfers, side streams and pinned memory run in bench/bench_offload.py
on a GPU.
"""
import gc
import weakref

import pytest

from conftest import write_tiny_flux
import torch
from safetensors.torch import save_file

from test_oracle_diffusers import comfy_forward, flux_inputs

CFG = None  # set by the fixture (the demo Flux with two double and two single blocks; one each on 0.3.75)
MODES = ["none", "model", "block", "leaf"]


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    global CFG
    from quantlora.tools import demo_models as dm

    # two blocks of each kind on ComfyUI v0.33+ (hidden 128); 0.3.75 builds Flux only at hidden 3072,
    # where one of each keeps the CPU runs short (two block groups all the same)
    depth = 2 if dm.comfy_detects_width() else 1
    # six single blocks at hidden 128: enough blocks for a budget to keep some resident and stream the rest
    CFG, path = write_tiny_flux(tmp_path_factory, "flux.safetensors", seed=7, depth=depth,
                                depth_single_blocks=6 if depth == 2 else 1,
                                **{k: v for k, v in dm.demo_flux_config().items() if k != "depth"
                                   and k != "depth_single_blocks"})
    return path


@pytest.fixture(scope="module")
def lora_files(flux_file, tmp_path_factory):
    """Two BFL-layout LoRAs (rank 4 and 8) on every block linear, registered as ComfyUI 'loras'."""
    import folder_paths
    from quantlora.checkpoint.safetensors_io import read_header

    d = tmp_path_factory.mktemp("loras")
    shapes = {k: v.shape for k, v in read_header(flux_file).tensors.items()}
    names = []
    for rank, seed in ((4, 1), (8, 2)):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for k, shape in shapes.items():
            mod = k[: -len(".weight")]
            if k.endswith(".weight") and len(shape) == 2 and mod.startswith(("double_blocks", "single_blocks")):
                sd[f"diffusion_model.{mod}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) * 0.1
                sd[f"diffusion_model.{mod}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 0.1
                sd[f"diffusion_model.{mod}.alpha"] = torch.tensor(float(rank))
        name = f"lora-r{rank}.safetensors"
        save_file(sd, str(d / name))
        names.append(name)
    folder_paths.add_model_folder_path("loras", str(d))
    return names


def load(path, quantization="none"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, "fp32")[0]


def conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 6, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    neg = [[torch.randn(1, 6, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    return pos, neg


LATENT = {"samples": torch.zeros(1, 16, 16, 16)}


@torch.no_grad()
def ksample(model, seed=5, steps=3, cfg=1.5):
    import nodes

    pos, neg = conds()
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, LATENT)[0]["samples"]


@torch.no_grad()
def osample(model, mode, seed=5, steps=3, cfg=1.5, blocks_per_group=1, budget=0.0):
    from quantlora.nodes.offload_sampler_node import CPUOffloadSampler

    pos, neg = conds()
    out = CPUOffloadSampler.execute(model, seed, steps, cfg, "euler", "simple", pos, neg, LATENT, 1.0,
                                    mode, blocks_per_group, budget)
    return out.args[0]["samples"], out.ui.as_dict()["text"][0]


@pytest.fixture
def forced(comfy, monkeypatch):
    from quantlora.nodes import offload_run as node

    monkeypatch.setattr(node, "FORCE_ON_CPU", True)
    yield node
    comfy.model_management.unload_all_models()


@pytest.fixture
def probe(comfy, monkeypatch):
    """Counts offload hook calls (diffusers' and ours) and ComfyUI weight loads (ModelPatcher.load)."""
    import comfy.model_patcher
    from diffusers.hooks.group_offloading import GroupOffloadingHook
    from quantlora.memory import offload as off

    calls = {"hooks": 0, "comfy_load": 0}

    def counting(cls, name, key):
        orig = getattr(cls, name)

        def f(*a, **k):
            calls[key] += 1
            return orig(*a, **k)
        monkeypatch.setattr(cls, name, f)

    from quantlora.memory import streaming

    counting(GroupOffloadingHook, "pre_forward", "hooks")
    counting(off._MoveHook, "pre_forward", "hooks")
    counting(streaming._StreamHook, "pre_forward", "hooks")
    counting(comfy.model_patcher.ModelPatcher, "load", "comfy_load")
    return calls


def hooked(module) -> int:
    return sum(1 for m in module.modules() if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__)


def loaded_entry(patcher_model):
    import comfy.model_management as mm

    return [lm.model for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is patcher_model]


# ---------------- layer 1: the offload library ----------------
def test_pick_mode():
    from quantlora.memory.offload import pick_mode

    G = 2 ** 30
    assert pick_mode(24 * G, 20 * G, G // 2, nonblock_bytes=G // 4, reserve_bytes=2 * G) == ("none", 1)
    # does not fit: three blocks in flight (running, prefetching, awaiting release) fit beside the top-level parts
    assert pick_mode(4 * G, 20 * G, G // 2, nonblock_bytes=G // 4, reserve_bytes=2 * G) == ("block", 1)
    # without a stream, as many blocks per group as fit (capped at the block count)
    assert pick_mode(4 * G, 20 * G, G // 2, nonblock_bytes=G // 4, reserve_bytes=2 * G, stream=False) == ("block", 3)
    assert pick_mode(400 * G, 500 * G, G, stream=False, n_blocks=2, reserve_bytes=0)[1] <= 2
    # not even three blocks: one layer at a time
    assert pick_mode(int(2.5 * G), 20 * G, G // 2, nonblock_bytes=G // 4, reserve_bytes=2 * G) == ("leaf", 1)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["model", "block", "leaf"])
@pytest.mark.parametrize("strategy", ["diffusers", "moves"])
def test_offload_roundtrip_on_cpu(flux_file, monkeypatch, mode, strategy):
    from quantlora.memory import offload as off

    if strategy == "moves":
        if mode != "leaf":
            pytest.skip("model mode is a plain move; block mode streams every weight kind itself")
        monkeypatch.setattr(off, "needs_module_moves", lambda root: True)
    dm = load(flux_file).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=3)
    ref = comfy_forward(dm, inp)
    # groups of two blocks where the lists have two (one block each on 0.3.75: a group of two would be all)
    bpg = 2 if mode == "block" and CFG["depth"] > 1 else 1
    st = off.apply_offload(dm, mode, "cpu", "cpu", blocks_per_group=bpg)
    assert st.strategy == {"model": "model", "block": "stream"}.get(mode, strategy) and st.mode == mode
    assert 0 < st.working_set <= st.model_bytes
    if mode != "model":
        # block: the copies in flight (lookahead + 1 blocks) can be as large as this tiny tree's blocks
        assert (st.working_set < st.model_bytes or mode == "block") and hooked(dm) > 0
    assert off.apply_offload(dm, mode, "cpu", "cpu", blocks_per_group=bpg) is st  # idempotent
    assert torch.equal(comfy_forward(dm, inp), ref)
    assert torch.equal(comfy_forward(dm, inp), ref)  # second pass: prefetch order known, groups at rest again
    assert off.remove_offload(dm) and off.offload_state(dm) is None
    assert hooked(dm) == 0, "hooks and their instance forwards must be gone"
    assert torch.equal(comfy_forward(dm, inp), ref)


def test_strategy_choice(flux_file):
    from quantlora.memory.offload import needs_module_moves

    assert not needs_module_moves(load(flux_file).model.diffusion_model)
    assert needs_module_moves(load(flux_file, "bnb-nf4").model.diffusion_model)


# ---------------- layer 2: the node against nodes.common_ksampler ----------------
@pytest.mark.parametrize("mode", ["auto", *MODES])
def test_node_is_ksampler_without_cuda(flux_file, mode):
    """No CUDA here: the node says every mode is a no-op and gives KSampler's latent."""
    model = load(flux_file)
    ref = ksample(model)
    out, text = osample(model, mode)
    assert torch.equal(out, ref)
    assert "n/a" in text and "no-op" in text, text


@pytest.mark.parametrize("mode", MODES)
def test_node_offload_machinery_equals_ksampler(flux_file, forced, probe, mode):
    import comfy.model_management as mm
    from quantlora.memory import offload as off

    model = load(flux_file)
    dm = model.model.diffusion_model
    ref = ksample(model)
    mm.unload_all_models()
    probe.update(hooks=0, comfy_load=0)
    out, text = osample(model, mode, blocks_per_group=1)
    assert torch.equal(out, ref), f"{mode}: latent differs from KSampler"
    assert text.startswith(f"offload {mode}")
    st = off.offload_state(dm)
    if mode in ("block", "leaf"):
        assert st is not None and st.mode == mode
        # the hooks ran, and ComfyUI never loaded the weights itself (no double load)
        assert probe["hooks"] > 0 and probe["comfy_load"] == 0, probe
        # ComfyUI holds our clone as loaded with what is resident, not the whole model
        [ours] = loaded_entry(model.model)
        assert ours is not model and ours.loaded_size() == st.working_set == ours.model_size() < model.model_size()
        # the same settings again: the hooks stay (same state object), same latent
        out2, _ = osample(model, mode)
        assert torch.equal(out2, ref) and off.offload_state(dm) is st
        # the stock sampler on the input MODEL: ComfyUI unloads our clone, its callback takes the hooks off
        assert torch.equal(ksample(model), ref)
        assert off.offload_state(dm) is None and hooked(dm) == 0
        assert all(p is not ours for p in loaded_entry(model.model))
    else:
        assert st is None and hooked(dm) == 0
        if mode == "model":  # unloaded after sampling
            assert not loaded_entry(model.model)


@pytest.mark.parametrize("quantization", ["bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "quanto-int8"])
def test_quantized_variants_under_offload(flux_file, forced, probe, quantization):
    from quantlora.memory import offload as off

    model = load(flux_file, quantization)
    ref = ksample(model, steps=2)
    for mode in ("block", "leaf"):
        probe.update(hooks=0, comfy_load=0)
        out, _ = osample(model, mode, steps=2)
        assert probe["hooks"] > 0 and probe["comfy_load"] == 0, probe
        st = off.offload_state(model.model.diffusion_model)
        assert st.strategy == ("stream" if mode == "block" else
                               "diffusers" if quantization.startswith("torchao") else "moves")
        assert torch.equal(out, ref), f"{quantization} {mode}"
    assert torch.equal(ksample(model, steps=2), ref)


def test_prefetch_depth_and_auto_budget(flux_file, forced):
    from quantlora.memory import offload as off

    node = forced
    model = load(flux_file)
    ref = ksample(model)
    out, text = osample(model, "block", blocks_per_group=2)
    assert torch.equal(out, ref) and "prefetch 2" in text, text
    st = off.offload_state(model.model.diffusion_model)
    assert st.spec.blocks_per_group == 2 and st.strategy == "stream" and st.n_resident == 0  # no budget on the CPU
    sizes = off.tree_sizes(model.model.diffusion_model)
    reserve = node.sampling_reserve(model, LATENT, 1.5)
    # an explicit budget: the weights beside the reserve, a little less than all of them
    gb = (reserve + sizes.model - 4096) / 2 ** 30
    plan = node.plan_offload(model, "auto", 1, gb, LATENT, cfg=1.5)
    assert plan.mode == "block" and plan.budget == int(gb * 2 ** 30) - reserve
    assert plan.nonblock + plan.residency.working_set <= plan.budget
    if CFG["depth"] > 1:
        assert 0 < plan.residency.n_resident < plan.residency.n_blocks, plan.residency
    assert node.plan_offload(model, "auto", 1, 1e-6, LATENT).mode == "leaf"
    assert node.plan_offload(model, "auto", 1, 1000.0, LATENT).mode == "none"
    out, text = osample(model, "auto", budget=gb)
    assert torch.equal(out, ref) and text.startswith("offload block (auto)") and "resident" in text, text
    st = off.offload_state(model.model.diffusion_model)
    assert st.spec.budget == plan.budget
    # a bigger budget re-plans the same hooks in place, same latent
    out, text = osample(model, "auto", budget=(reserve + sizes.nonblock + 3 * sizes.block_max) / 2 ** 30)
    st2 = off.offload_state(model.model.diffusion_model)
    assert torch.equal(out, ref) and st2.streamer is st.streamer and st2.spec.budget != st.spec.budget


def test_compiled_blocks_under_block_offload(flux_file, forced):
    """The loader's regional compile under CPUOffloadSampler's block streaming (issue 13: the torchao
    fp8 cards need the compiled step): KSampler's latent on the same compiled model bit for bit, part
    of the blocks resident and the rest streamed; streaming compiles nothing (it runs around each
    block's compiled call, which it leaves as it is: a hook on the forward made dynamo compile a
    second graph per block kind, which once rounded differently on an H200); a second sampling and
    a re-plan compile nothing; taking the offload off restores the compiled calls."""
    import comfy.model_management as mm
    import torch._dynamo
    from torch._dynamo.utils import counters
    from quantlora.memory import offload as off
    from quantlora.speed.compile import compile_blocks, is_compiled

    node = forced
    model = load(flux_file)
    dm = model.model.diffusion_model
    # aot_eager: dynamo's graphs and guards, which the hooks could break, without inductor's C++ builds
    # on this CPU (48 s cold); inductor under offload runs in bench_offload's compiled cards on a GPU
    compile_blocks(dm, backend="aot_eager")
    graphs = lambda: int(counters["stats"]["unique_graphs"])  # noqa: E731
    g0 = graphs()
    ref = ksample(model, steps=2)  # compiles here
    kinds = graphs() - g0
    assert 1 <= kinds <= 4, kinds  # double and single blocks (their first call may split in two)
    mm.unload_all_models()
    sizes = off.tree_sizes(dm)
    reserve = node.sampling_reserve(model, LATENT, 1.5)
    gb = (reserve + sizes.nonblock + 3 * sizes.block_max) / 2 ** 30
    g1 = graphs()
    out, text = osample(model, "block", steps=2, budget=gb)
    st = off.offload_state(dm)
    assert torch.equal(out, ref), text
    resident = st.n_resident
    assert is_compiled(dm) and 0 < resident < st.n_blocks and st.strategy == "stream", text
    assert graphs() - g1 == 0, (graphs() - g1, kinds)
    torch._dynamo.config.error_on_recompile = True
    try:
        again, _ = osample(model, "block", steps=2, budget=gb)
        more, _ = osample(model, "block", steps=2, budget=(reserve + sizes.nonblock + 5 * sizes.block_max) / 2 ** 30)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert torch.equal(again, ref) and torch.equal(more, ref)
    assert off.offload_state(dm).n_resident > resident  # the re-plan really moved blocks
    wrapped = [b for b in off.flat_blocks(dm) if hasattr(b._compiled_call_impl, "quantlora_inner")]
    assert len(wrapped) == st.n_blocks
    off.remove_offload(dm)
    assert not any(hasattr(b._compiled_call_impl, "quantlora_inner") for b in off.flat_blocks(dm)) and is_compiled(dm)
    torch._dynamo.config.error_on_recompile = True
    try:
        assert torch.equal(ksample(model, steps=2), ref)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_stock_lora_patches_under_offload(flux_file, lora_files, forced):
    """ComfyUI's own LoRA (LoraLoader's weight patches) is baked into the host weights and undone."""
    import comfy.sd
    import comfy.utils
    import folder_paths

    model = load(flux_file)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_files[0]))
    patched = comfy.sd.load_lora_for_models(model, None, lora, 0.7, 0)[0]
    assert patched.patches
    ref = ksample(patched)
    assert not torch.equal(ref, ksample(model))
    out, _ = osample(patched, "block")
    assert torch.equal(out, ref)
    import comfy.model_management as mm

    mm.unload_all_models()
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "host weights must be restored"


def test_fp8_cast_lora_slots_hotswap_under_offload(flux_file, lora_files, forced):
    """FP8LayerwiseCast -> LoRAHotswap -> offloaded sampling; swapping the LoRA keeps the hooks
    (and their host buffers) and every latent equals KSampler's on the same MODEL."""
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.nodes.hotswap_node import LoRAHotswap
    from quantlora.nodes.runtime import hotswap_state
    from quantlora.memory import offload as off

    import inspect

    base, _ = cast_model(load(flux_file), "float8_e4m3fn", "auto")
    dm = base.model.diffusion_model
    # the slots (where LoRAHotswap has a mode input, its default may merge instead)
    kw = {"mode": "slots"} if "mode" in inspect.signature(LoRAHotswap.execute).parameters else {}
    m_a = LoRAHotswap.execute(base, lora_files[0], 0.8, 16, "blocks", **kw).args[0]
    m_b = LoRAHotswap.execute(base, lora_files[1], 1.0, 16, "blocks", **kw).args[0]
    slots = hotswap_state(dm).slots
    assert {s.down.dtype for s in slots.values()} == {torch.float32}  # the compute dtype, never fp8
    assert all(s.base.weight.dtype == torch.float8_e4m3fn for s in slots.values())
    refs = {k: ksample(m) for k, m in (("a", m_a), ("b", m_b), ("none", base))}
    assert not torch.equal(refs["a"], refs["b"])
    out, _ = osample(m_a, "block")
    assert torch.equal(out, refs["a"])
    st = off.offload_state(dm)
    for key, m in (("b", m_b), ("a", m_a), ("none", base), ("b", m_b)):
        out, _ = osample(m, "block")
        assert torch.equal(out, refs[key]), f"after swapping to {key}"
        assert off.offload_state(dm) is st, "a LoRA swap must not rebuild the offload hooks"
    out, _ = osample(m_a, "leaf")  # other settings: rebuilt, still exact
    assert torch.equal(out, refs["a"]) and off.offload_state(dm) is not st


@pytest.mark.parametrize("mode", ["none", "model", "block", "block-part", "leaf"])
def test_lora_merge_mode_under_offload(flux_file, lora_files, forced, monkeypatch, mode):
    """LoRAHotswap mode merge -> CPUOffloadSampler: the set is merged when sampling starts, every
    streamed block at rest (into its host copy), and each latent equals KSampler's on the same
    MODEL without offload, bit for bit; swapping to another LoRA / strength while offloaded, a
    re-plan in place with a merged set (block-part), and the bare MODEL afterwards likewise."""
    import inspect

    from quantlora.lora import merge as merge_mod
    from quantlora.nodes import runtime
    from quantlora.nodes.fp8_cast_run import cast_model
    from quantlora.nodes.hotswap_node import LoRAHotswap
    from quantlora.memory import offload as off

    if "mode" not in inspect.signature(LoRAHotswap.execute).parameters:
        pytest.skip("LoRAHotswap has no merge mode here")
    node = forced
    base, _ = cast_model(load(flux_file), "float8_e4m3fn", "auto")
    dm = base.model.diffusion_model
    models = {"a": LoRAHotswap.execute(base, lora_files[0], 0.8, 16, "blocks", mode="merge").args[0],
              "b": LoRAHotswap.execute(base, lora_files[1], 1.0, 16, "blocks", mode="merge").args[0],
              "a2": LoRAHotswap.execute(base, lora_files[0], -0.5, 16, "blocks", mode="merge").args[0],
              "none": base}
    assert runtime.hotswap_state(dm) is None and runtime.merge_state(dm) is not None
    refs = {k: ksample(m) for k, m in models.items()}
    assert len({tuple(r.flatten()[:64].tolist()) for r in refs.values()}) == 4
    gb, gb2 = 0.0, 0.0
    if mode == "block-part":  # part resident, part streamed; then a bigger budget re-plans in place
        sizes = off.tree_sizes(dm)
        reserve = node.sampling_reserve(base, LATENT, 1.5)
        gb = (reserve + sizes.nonblock + 3 * sizes.block_max) / 2 ** 30
        gb2 = (reserve + sizes.model - 4096) / 2 ** 30
    at_rest = []
    real = merge_mod.MergeState.activate

    def spy(self, key, loras):
        st = off.offload_state(dm)
        streamer = getattr(st, "streamer", None)
        at_rest.append(streamer is None or all(u.dev is None and not u.installed for u in streamer.units.values()))
        return real(self, key, loras)

    monkeypatch.setattr(merge_mod.MergeState, "activate", spy)
    osmode = "block" if mode == "block-part" else mode
    st0 = None
    # (the re-plan is asked for by the MODEL of the run before: another MODEL with another budget
    # would be another clone with other settings, which rebuilds the hooks)
    for i, key in enumerate(("a", "b", "a2", "a2", "none", "a", "b")):
        out, text = osample(models[key], osmode, budget=gb2 if (mode == "block-part" and i >= 3) else gb)
        assert torch.equal(out, refs[key]), f"{mode}: after swapping to {key}"
        st = off.offload_state(dm)
        if mode == "block-part":
            assert 0 < st.n_resident < st.n_blocks if i < 3 else st.n_resident > 0, st.residency
            if st0 is not None:
                assert st.streamer is st0.streamer, "a LoRA swap or a new budget must not rebuild the hooks"
            st0 = st
    assert at_rest and all(at_rest), "merged while a streamed block was on the device"
    merged = runtime.merge_state(dm)
    swaps = merged.swaps
    out, _ = osample(models["b"], osmode, budget=gb2 if mode == "block-part" else gb)
    assert torch.equal(out, refs["b"]) and merged.swaps == swaps, "the same set again: no new merge"
    assert torch.equal(ksample(base), refs["none"])  # the bare MODEL through the stock sampler


def test_clone_lives_as_long_as_the_input(flux_file, forced):
    import comfy.model_management as mm
    from quantlora.nodes import offload_run as node
    from quantlora.memory import offload as off

    model = load(flux_file)
    dm_ref = weakref.ref(model.model.diffusion_model)
    osample(model, "block")
    clone_ref = weakref.ref(node._CLONES[model][1])
    assert off.offload_state(dm_ref()) is not None
    del model
    gc.collect()
    mm.cleanup_models()
    assert clone_ref() is None and dm_ref() is None, "the clone and the model must be freed with the input MODEL"
    assert all(lm.model is not None for lm in mm.current_loaded_models)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="side streams and pinned memory need CUDA (bench/bench_offload.py checks them on a GPU)")
@torch.no_grad()
def test_streamed_block_offload_sees_lora_writes_on_cuda(flux_file):
    """On CUDA: a LoRA written into the slots after the streamed hooks were built reaches the GPU."""
    from quantlora.lora.hotswap import HotswapState, attach_slots
    from quantlora.memory import offload as off
    from test_fp8_cast import make_lora

    dm = load(flux_file).model.diffusion_model.eval()
    h = CFG["hidden_size"]
    state = HotswapState(attach_slots(dm, 8, "blocks", torch.float32, h, int(h * CFG["mlp_ratio"])))
    lora = make_lora(dm)
    inp = {k: (v.cuda() if v is not None else v) for k, v in flux_inputs(CFG, seed=4).items()}
    dm.cuda()
    state.activate(("a",), [(lora, 1.0)])
    ref = comfy_forward(dm, inp)
    state.deactivate()
    bare = comfy_forward(dm, inp)
    dm.cpu()
    st = off.apply_offload(dm, "block", "cuda", "cpu")
    assert st.spec.use_stream
    assert torch.equal(comfy_forward(dm, inp), bare)
    state.activate(("a",), [(lora, 1.0)])
    assert torch.equal(comfy_forward(dm, inp), ref)
    off.remove_offload(dm)
