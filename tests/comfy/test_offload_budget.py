"""Budget-filling block streaming (memory/streaming.py) on the CPU: the device is the CPU, so the
"device copies" are plain copies made by the same code the GPU runs (no pinning, no side stream).
Checks: which blocks stay resident for a budget (planning), every weight kind's forward equal to
no offload bit for bit (bf16-free fp32 tiny Flux; bnb NF4/int8, torchao, quanto: their
quantization state is swapped with the weights), a residency change in place, LoRA slot writes
while offloaded, and the node's auto plan from injected card numbers."""
import pytest
import torch

from conftest import write_tiny_flux
from test_oracle_diffusers import comfy_forward, flux_inputs

CFG = None
G = 2 ** 30


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    global CFG
    from quantlora.tools import demo_models as dm

    wide = dm.comfy_detects_width()  # v0.33: hidden 128; 0.3.75 builds Flux only at hidden 3072 (keep it small)
    CFG, path = write_tiny_flux(tmp_path_factory, "flux.safetensors", seed=11, depth=2 if wide else 1,
                                depth_single_blocks=6 if wide else 2,
                                **{k: v for k, v in dm.demo_flux_config().items() if k not in ("depth", "depth_single_blocks")})
    return path


@pytest.fixture(params=["shared", "copies"])
def copies(request, monkeypatch):
    """"copies": the engine copies every streamed tensor even with the CPU as the device (the GPU's
    code path). CPU matmuls can round differently on a fresh copy of the same weights (their
    kernels depend on the address: even `p.data = p.data.clone()` changes the last bit here), so
    with copies the output is compared with a tight tolerance and the copies themselves are
    checked equal; "shared" (the CPU default: the copy is the host tensor) must be bit-exact."""
    from quantlora.memory.streaming import BlockStreamer

    monkeypatch.setattr(BlockStreamer, "copy_on_cpu", request.param == "copies")
    return request.param == "copies"


def same(a, b, copies):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5) if copies else torch.equal(a, b)


def load(path, quantization="none"):
    from quantlora.nodes.bridge import load_flux_model_patcher

    return load_flux_model_patcher(path, quantization, "fp32")[0]


# ---------------- planning ----------------
def test_plan_residency_fills_the_room():
    from quantlora.memory.streaming import plan_residency

    sizes = [6] * 4 + [3] * 8  # bytes: four big blocks, eight small ones (Flux-like)
    assert plan_residency(sizes, None).streamed == tuple(range(12))
    assert plan_residency(sizes, 48).streamed == ()  # everything fits
    r = plan_residency(sizes, 40, lookahead=1)
    assert r.working_set <= 40 and 0 < len(r.streamed) < 12
    # the least streamed that fits: one block fewer streamed would not fit
    assert r.resident_bytes + r.inflight_bytes <= 40 and r.streamed_bytes <= 48 - 40 + r.inflight_bytes + 6
    # spread over the order, not one run at the end
    assert min(r.streamed) < 6 or len(r.streamed) <= 2
    more = plan_residency(sizes, 30)
    assert more.streamed_bytes >= r.streamed_bytes and more.working_set <= 30
    # nothing fits beside the in-flight copies: everything streams (the caller picks leaf then)
    assert plan_residency(sizes, 5).streamed == tuple(range(12))
    # deeper lookahead keeps more copies in flight
    assert plan_residency(sizes, 40, lookahead=3).inflight_bytes >= r.inflight_bytes
    # the first block stays resident where it can (its copy would have nothing to hide behind)
    assert 0 not in r.streamed


def test_pick_budget_reported_numbers():
    from quantlora.memory import streaming as s

    assert s.flux_tokens((1, 16, 128, 128)) == (4096, 512)
    assert s.predicted_ratio(10 * G, 50e9, 0.5) == pytest.approx(max(1, 10 * G / 50e9 / 0.5))
    assert s.predicted_ratio(0, 50e9, 0.2) == 1.0
    t = s.resident_step_seconds(11_900_000_000, 4608, 3072, 57, 1, 750e12)
    assert 0.1 < t < 0.3  # FLUX.1-dev at 1024x1024 on an H100/H200-class rate


# ---------------- the engine on every weight kind ----------------
@torch.no_grad()
@pytest.mark.parametrize("quantization", ["none", "bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "quanto-int8"])
def test_streamed_forward_equals_resident(flux_file, quantization, copies):
    from quantlora.memory import offload as off

    dm = load(flux_file, quantization).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=3)
    ref = comfy_forward(dm, inp)
    blocks = off.flat_blocks(dm)
    sizes = [off.module_bytes(b) for b in blocks]
    res, nonblock = off.plan_blocks(dm, None)
    # budgets: stream all, then a re-plan in place to part resident
    half = nonblock + int(sum(sizes) * 0.8)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=None)
    assert st.strategy == "stream" and st.n_resident == 0 and st.streamed_bytes == sum(sizes)
    assert same(comfy_forward(dm, inp), ref, copies)
    streamer = st.streamer
    assert streamer.stats["prefetched"] > 0
    st2 = off.apply_offload(dm, "block", "cpu", "cpu", budget=half)
    assert st2.streamer is streamer, "another budget re-plans in place"
    assert 0 < st2.n_resident < len(blocks) or len(blocks) <= 3, st2.residency
    assert st2.working_set <= half
    assert same(comfy_forward(dm, inp), ref, copies)
    assert same(comfy_forward(dm, inp), ref, copies)
    assert off.apply_offload(dm, "block", "cpu", "cpu", budget=half) is st2
    off.remove_offload(dm)
    assert same(comfy_forward(dm, inp), ref, copies)


@torch.no_grad()
@pytest.mark.parametrize("quantization", ["torchao-fp8-weight-only", "torchao-int8-weight-only", "quanto-int8"])
def test_subclass_weights_are_repointed_not_rebuilt(flux_file, quantization, monkeypatch):
    """A streamed block's tensor-subclass weights (torchao, quanto) get their device tensor made
    once, then re-pointed at each step's copies: rebuilding it and wrapping it as a Parameter cost
    ~0.5 ms of host time per Flux block, each streamed block, each step (a compiled fp8 step is
    partly host-bound). At rest that tensor points at the host leaves (no device copy kept alive)
    and the module holds the host tensor; the output stays the resident one's."""
    from quantlora.memory import offload as off
    from quantlora.memory import streaming as s

    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)  # real copies, as on the GPU
    dm = load(flux_file, quantization).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=4)
    ref = comfy_forward(dm, inp)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=None)
    units = list(st.streamer.units.values())
    wraps = [(u, r) for u in units for r in u.refs if r.kind == "wrap"]
    assert wraps and all(r.inner is not None for _, r in wraps), "every weight of this kind is one level deep"
    rebuilt = []
    for _, r in wraps:
        r.rebuild = (lambda f: lambda it: rebuilt.append(1) or f(it))(r.rebuild)
    assert same(comfy_forward(dm, inp), ref, True)
    first = len(rebuilt)
    dev_objs = [r.dev_obj for _, r in wraps]
    assert all(o is not None for o in dev_objs)
    for _ in range(2):
        assert same(comfy_forward(dm, inp), ref, True)
    assert len(rebuilt) == first, "later forwards re-point the device tensors instead of rebuilding them"
    assert [r.dev_obj for _, r in wraps] == dev_objs
    for u, r in wraps:  # at rest: the module holds the host tensor; the device one points at host leaves
        held = (r.target._parameters if r.param else r.target._buffers)[r.name]
        assert held is not r.dev_obj
        assert all(getattr(r.dev_obj, n) is u.host[i] for n, i in zip(r.inner, r.idx))
    off.remove_offload(dm)
    assert same(comfy_forward(dm, inp), ref, True)


@torch.no_grad()
def test_quant_state_is_swapped_with_the_weight(flux_file):
    """NF4: the streamed block's quant_state tensors are the copies while it runs, host at rest."""
    from quantlora.memory import offload as off
    from quantlora.memory.streaming import _Unit

    dm = load(flux_file, "bnb-nf4").model.diffusion_model.eval()
    blk = off.flat_blocks(dm)[0]
    u = _Unit(0, blk)
    kinds = {(r.kind, r.name) for r in u.refs}
    assert ("attr", "absmax") in kinds and ("data", "weight") in kinds, kinds
    lin = next(m for m in blk.modules() if hasattr(getattr(m, "weight", None), "quant_state"))
    host_absmax = lin.weight.quant_state.absmax
    copies = [t.clone() for t in u.host]
    u._install(copies, host=False)
    assert lin.weight.quant_state.absmax is not host_absmax
    u._install(u.host, host=True)
    assert lin.weight.quant_state.absmax is host_absmax


@torch.no_grad()
def test_lora_slots_swap_while_streamed(flux_file, copies):
    """Slot buffers of streamed blocks live in the host copies at rest: a swap between forwards
    reaches the next forward; resident blocks' buffers are written in place on the device."""
    from quantlora.lora.hotswap import HotswapState, attach_slots
    from quantlora.memory import offload as off
    from test_fp8_cast import make_lora

    dm = load(flux_file).model.diffusion_model.eval()
    h = CFG["hidden_size"]
    state = HotswapState(attach_slots(dm, 8, "blocks", torch.float32, h, int(h * CFG["mlp_ratio"])))
    state.buffers_placed_by_offload = True
    lora_a, lora_b = make_lora(dm, seed=1), make_lora(dm, seed=2)
    inp = flux_inputs(CFG, seed=4)
    refs = {}
    for k, lo in (("a", lora_a), ("b", lora_b)):
        state.activate((k,), [(lo, 1.0)])
        refs[k] = comfy_forward(dm, inp)
    state.deactivate()
    refs["none"] = comfy_forward(dm, inp)
    assert not torch.equal(refs["a"], refs["b"])
    sizes = [off.module_bytes(b) for b in off.flat_blocks(dm)]
    res, nonblock = off.plan_blocks(dm, None)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=nonblock + sum(sizes) // 2 + 3 * max(sizes))
    for k, lo in (("a", lora_a), ("none", None), ("b", lora_b), ("a", lora_a)):
        if lo is None:
            state.deactivate()
        else:
            state.activate((k,), [(lo, 1.0)])
        out = comfy_forward(dm, inp)
        assert same(out, refs[k], copies), k
        assert not same(out, refs["b" if k != "b" else "a"], copies)
    assert off.offload_state(dm) is st
    off.remove_offload(dm)


# ---------------- the node's auto plan from injected card numbers ----------------
def test_auto_plan_fills_an_injected_card(flux_file, comfy, monkeypatch):
    from quantlora.nodes import offload_run as node
    from quantlora.memory import offload as off

    monkeypatch.setattr(node, "FORCE_ON_CPU", True)
    model = load(flux_file)
    dm = model.model.diffusion_model
    total = off.module_bytes(dm)
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    reserve = node.sampling_reserve(model, latent)
    card = dict(free_bytes=reserve + total * 0.85, bandwidth=10e9, flops=1e12)
    plan = node.plan_offload(model, "auto", 1, 0.0, latent, card=card)
    assert plan.mode == "block" and 0 <= int(card["free_bytes"] - reserve) - plan.budget <= total // 64
    assert 0 < plan.residency.n_resident < plan.residency.n_blocks
    assert plan.predicted_ratio is not None and plan.predicted_ratio >= 1.0
    assert "resident" in plan.describe() and "predicted" in plan.describe()
    big = node.plan_offload(model, "auto", 1, 0.0, latent, card=dict(card, free_bytes=reserve + 2 * total))
    assert big.mode == "none"
    tiny = node.plan_offload(model, "auto", 1, 0.0, latent, card=dict(card, free_bytes=reserve + total * 0.01))
    assert tiny.mode == "leaf"
    # an explicit budget wins over the card's free memory
    fixed = node.plan_offload(model, "auto", 1, (reserve + total * 0.85) / G, latent, card=dict(card, free_bytes=10 * G))
    assert fixed.mode == "block"


# ---------------- the CUDA branches, with stand-ins for streams and events ----------------
class _FakeEvent:
    def __init__(self, *a, **k):
        self.recorded = 0

    def record(self, stream=None):
        self.recorded += 1

    def synchronize(self):
        pass


class _FakeStream:
    def __init__(self, *a, **k):
        self.waited = 0

    def wait_event(self, ev):
        assert isinstance(ev, _FakeEvent) and ev.recorded
        self.waited += 1

    def wait_stream(self, other):
        assert isinstance(other, _FakeStream)

    def synchronize(self):
        pass


@torch.no_grad()
@pytest.mark.parametrize("quantization", ["none", "bnb-nf4"])
def test_cuda_branches_with_stand_ins(flux_file, monkeypatch, quantization):
    """Every line guarded by `stream is not None` (side stream, events, record_stream, the host
    throttle, the pinned arena) runs here with stand-ins, so a GPU run cannot meet a typo there."""
    import contextlib

    from quantlora.memory import offload as off
    from quantlora.memory import streaming as s

    compute = _FakeStream()
    recorded = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda st: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, st: recorded.append(st), raising=False)
    monkeypatch.setattr(s._PinnedArena, "alloc", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)
    real_init = s.BlockStreamer.__init__

    def init(self, blocks, streamed, onload, lookahead=1, pin=True):
        real_init(self, [], (), onload, lookahead, pin)  # set up empty, then as on CUDA
        self.stream, self.arena, self.blocks = _FakeStream(), s._PinnedArena(chunk=1 << 20), blocks
        self.set_streamed(streamed)

    monkeypatch.setattr(s.BlockStreamer, "__init__", init)
    dm = load(flux_file, quantization).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=5)
    ref = comfy_forward(dm, inp)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=None)
    streamer = st.streamer
    assert streamer.arena.bytes > 0 and streamer.pinned_bytes == streamer.arena.bytes
    out = comfy_forward(dm, inp)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    n = len(off.flat_blocks(dm))
    assert compute.waited == n and recorded and all(r is compute for r in recorded)
    # the throttle popped the old "done" events (block mode counts the room in bytes)
    assert streamer.window is not None and streamer._done_bytes == sum(b for _, b in streamer._done)
    assert streamer._live == 0 and all(u.dev is None and not u.installed for u in streamer.units.values())
    assert streamer.stats["waits"] > 0
    off.remove_offload(dm)
    assert torch.allclose(comfy_forward(dm, inp), ref, rtol=1e-4, atol=1e-5)


def test_linear_params_counts_each_weight_once(flux_file):
    from quantlora.lora.hotswap import attach_slots
    from quantlora.memory.streaming import linear_params

    dm = load(flux_file).model.diffusion_model
    n = linear_params(dm)
    assert n > 0
    h = CFG["hidden_size"]
    attach_slots(dm, 4, "blocks", torch.float32, h, int(h * CFG["mlp_ratio"]))
    assert linear_params(dm) == n  # the slot wrappers add no FLOPs of their own here


@torch.no_grad()
@pytest.mark.parametrize("quantization", ["bnb-nf4", "bnb-int8", "quanto-int8"])
def test_leaf_streaming_of_quantized_weights(flux_file, quantization, copies):
    """Leaf mode on CUDA streams bnb/quanto weights module by module through the same engine (own
    tensors only, several copied ahead); here with the CPU as the device."""
    from quantlora.memory import offload as off

    dm = load(flux_file, quantization).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=6)
    ref = comfy_forward(dm, inp)
    spec = off.make_spec("leaf", "cpu", "cpu")
    dm.to("cpu")
    st = off._apply_leaf_stream(dm, spec, off.tree_sizes(dm))
    assert st.strategy == "stream" and st.mode == "leaf" and st.residency is None
    assert same(comfy_forward(dm, inp), ref, copies)
    assert same(comfy_forward(dm, inp), ref, copies)
    assert st.streamer.stats["prefetched"] > 0
    assert off.remove_offload(dm) and off.offload_state(dm) is None
    assert same(comfy_forward(dm, inp), ref, copies)


@torch.no_grad()
def test_leaf_streaming_root_with_own_tensors(copies):
    """A root owning tensors itself: its unit goes in when the forward starts, out when it ends."""
    from quantlora.memory import offload as off

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.randn(8))
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(5))

        def forward(self, x):
            for b in self.blocks:
                x = b(x) * self.scale
            return x

    torch.manual_seed(0)
    m, x = Root().eval(), torch.randn(3, 8)
    ref = m(x)
    st = off._apply_leaf_stream(m, off.make_spec("leaf", "cpu", "cpu"), off.tree_sizes(m))
    assert st.streamer.root_index is not None
    assert same(m(x), ref, copies) and same(m(x), ref, copies)
    off.remove_offload(m)
    assert same(m(x), ref, copies)


def test_card_counts_what_comfy_would_unload(flux_file, comfy, monkeypatch):
    """The free-memory budget: ComfyUI's free memory, plus other loaded models' (ComfyUI unloads
    them for this one), plus what our offload of this model keeps resident; our own clone's
    listing is not counted twice."""
    import comfy.model_management as mm
    from quantlora.nodes import offload_run as node
    from quantlora.memory import offload as off

    model = load(flux_file)
    dev = torch.device(model.load_device)

    class Other:
        load_device = dev

        def loaded_size(self):
            return 5 * G

    class Entry:
        def __init__(self, m):
            self.model = m

    monkeypatch.setattr(mm, "get_free_memory", lambda d=None, torch_free_too=False: 3 * G)
    monkeypatch.setattr(mm, "current_loaded_models", [Entry(Other())])
    card = node._card(dev, model)
    assert card["free_bytes"] == 8 * G and card["bandwidth"] is None and card["flops"] is None
    dm = model.model.diffusion_model
    sizes = [off.module_bytes(b) for b in off.flat_blocks(dm)]
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=off.tree_sizes(dm).model - min(sizes))
    try:
        assert node._card(dev, model)["free_bytes"] == 8 * G + st.nonblock + st.residency.resident_bytes
    finally:
        off.remove_offload(dm)


# ---------------- a re-plan never needs more device memory than the larger plan ----------------
@torch.no_grad()
@pytest.mark.parametrize("quantization", ["none", "bnb-nf4"])
def test_replan_frees_before_it_promotes(flux_file, monkeypatch, quantization):
    """Device-memory ledger over a re-plan in place (the H200 OOM going from a 12 GiB to a 16 GiB
    plan: promotions ran before demotions, so old + new resident blocks were on the card at once).
    "Device" here = every block tensor outside the pinned arena (host leaves live there, stand-in
    arena), plus streamed copies still held (a prefetch left by an interrupted forward). After
    every block move the ledger stays within max(old plan, new plan); every demotion comes first."""
    from quantlora.memory import offload as off
    from quantlora.memory import streaming as s

    monkeypatch.setattr(s._PinnedArena, "alloc", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)
    real_init = s.BlockStreamer.__init__

    def init(self, blocks, streamed, onload, lookahead=1, pin=True, own_only=False):
        real_init(self, [], (), onload, lookahead, pin, own_only)
        self.arena, self.blocks = s._PinnedArena(chunk=1 << 20), blocks
        self.set_streamed(streamed)

    monkeypatch.setattr(s.BlockStreamer, "__init__", init)
    dm = load(flux_file, quantization).model.diffusion_model.eval()
    inp = flux_inputs(CFG, seed=7)
    ref = comfy_forward(dm, inp)
    blocks = off.flat_blocks(dm)
    n = len(blocks)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=None)
    streamer = st.streamer

    def in_arena(t):
        p = t.untyped_storage().data_ptr()
        return any(b.data_ptr() <= p < b.data_ptr() + b.numel() for b in streamer.arena.bufs)

    def ledger():
        seen, total = set(), 0
        for b in blocks:
            for m in b.modules():
                ts = [*m._parameters.values(), *m._buffers.values()]
                qs = [getattr(t, "quant_state", None) for t in ts if t is not None]
                ts += [q.absmax for q in qs if q is not None]
                for t in ts:
                    if t is None or in_arena(t):
                        continue
                    k = t.untyped_storage().data_ptr()
                    if k not in seen:
                        seen.add(k)
                        total += t.untyped_storage().nbytes()
        for u in streamer.units.values():
            for d in (u.dev or []) if not u.installed else []:
                total += d.untyped_storage().nbytes()
        return total

    moves = []
    for name in ("_demote", "_promote"):
        real = getattr(s.BlockStreamer, name)

        def wrapped(self, i, _real=real, _name=name):
            _real(self, i)
            moves.append((_name, i, ledger()))
        monkeypatch.setattr(s.BlockStreamer, name, wrapped)

    old = tuple(range(1, n, 2))
    new = tuple(range(2, n, 3))
    assert set(old) - set(new) and set(new) - set(old), "the test needs promotions and demotions"
    streamer.set_streamed(old)
    before = ledger()
    streamer.begin()  # a forward that never finished: the first streamed block's copy is held
    assert any(u.dev is not None for u in streamer.units.values())
    moves.clear()
    streamer.set_streamed(new)
    after = ledger()
    kinds = [k for k, _, _ in moves]
    assert kinds == sorted(kinds), moves  # "_demote" < "_promote": every demotion first
    assert {i for k, i, _ in moves if k == "_promote"} == set(old) - set(new)
    assert max(b for _, _, b in moves) <= max(before, after), (before, after, moves)
    assert after > before  # the new plan keeps more resident (the ledger sees promotions)
    assert streamer._live == 0 and all(u.dev is None for u in streamer.units.values())
    assert torch.allclose(comfy_forward(dm, inp), ref, rtol=1e-4, atol=1e-5)
    # and the same through apply_offload's re-plan (the bench's and the node's way in)
    sizes = [off.module_bytes(b) for b in blocks]
    st2 = off.apply_offload(dm, "block", "cpu", "cpu", budget=st.nonblock + sum(sizes))
    assert st2.streamer is streamer and st2.n_resident == n and streamer.units == {}
    assert torch.allclose(comfy_forward(dm, inp), ref, rtol=1e-4, atol=1e-5)
    off.remove_offload(dm)


# ---------------- LoRA merge mode into streamed blocks ----------------
def _lora_on_every_block(dm, seed, rank=4):
    """A LoRA on every block linear (resident and streamed blocks alike)."""
    from quantlora.lora.formats import LoRATarget, ParsedLoRA

    g = torch.Generator().manual_seed(seed)
    targets = []
    for name, m in dm.named_modules():
        if not name.startswith(("double_blocks.", "single_blocks.")) or type(m).__name__ == "LoRASlots":
            continue
        i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if isinstance(i, int) and isinstance(o, int) and m._parameters.get("weight") is not None:
            targets.append(LoRATarget(name, 0, o, torch.randn(rank, i, generator=g) * 0.2,
                                      torch.randn(o, rank, generator=g) * 0.2, 0.5))
    return ParsedLoRA(f"every-block-{seed}", "bfl", targets)


def _merge_model(path, quantization):
    if quantization == "fp8-cast":
        from quantlora.nodes.fp8_cast_run import cast_model

        return cast_model(load(path), "float8_e4m3fn", "auto")[0].model.diffusion_model.eval()
    dm = load(path, quantization).model.diffusion_model.eval()
    for m in dm.modules():  # bitsandbytes on an AVX512-bf16 CPU repacks NF4 weights at their first
        if hasattr(m, "support_avx512bf16_for_cpu"):  # forward (another layout): CPU only, not what a GPU runs
            m.support_avx512bf16_for_cpu = False
    return dm


@torch.no_grad()
@pytest.mark.parametrize("quantization,layout", [
    ("none", "same"), ("fp8-cast", "same"), ("bnb-nf4", "same"), ("bnb-int8", "same"),
    ("torchao-int8-weight-only", "same"), ("quanto-int8", "same"), ("quanto-int8", "other")])
def test_lora_merge_into_streamed_blocks(flux_file, monkeypatch, quantization, layout):
    """MergeState (lora/merge.py) writes through quant/weight_codecs.storage(layer); for a streamed
    block at rest those tensors must be the host copies the streamer copies from. Here the host
    copies are distinct tensors (stand-in pinned arena, copies made as on the GPU), the model is
    part resident, part streamed, and a set of LoRAs is merged, swapped (another LoRA, another
    strength) and taken off while offloaded: after each, every merged layer's storage is bit for
    bit the un-offloaded model's, and the forward matches. layout "other": a tensor subclass whose
    device form differs (quanto fp8 / int4 on CUDA) streams leaves of that form, made again from the
    host tensor after a merge (BlockStreamer.refresh_forms, what CPUOffloadSampler calls)."""
    from quantlora.lora.merge import MergeState, base_layer
    from quantlora.memory import offload as off
    from quantlora.memory import streaming as s
    from quantlora.quant import weight_codecs as codecs

    ref_dm = _merge_model(flux_file, quantization)
    loras = {"a": (_lora_on_every_block(ref_dm, 1), 1.0), "b": (_lora_on_every_block(ref_dm, 2), 0.6),
             "a2": (_lora_on_every_block(ref_dm, 1), -0.4)}
    inp = flux_inputs(CFG, seed=8)
    ref_state = MergeState(ref_dm)
    refs, weights = {}, {}
    names = [t.module for t in loras["a"][0].targets]
    for k in ("a", "b", "a2", "none"):
        ref_state.activate((k,) if k != "none" else (), [loras[k]] if k != "none" else [])
        refs[k] = comfy_forward(ref_dm, inp)
        weights[k] = {n: [t.clone() for t in codecs.storage(base_layer(ref_dm, n))] for n in names}
    assert not torch.equal(refs["a"], refs["none"]) and not torch.equal(refs["a"], refs["b"])

    monkeypatch.setattr(s._PinnedArena, "alloc", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    monkeypatch.setattr(s.BlockStreamer, "copy_on_cpu", True)
    if layout == "other":
        monkeypatch.setattr(s, "_same_form", lambda *a: False)
    real_init = s.BlockStreamer.__init__

    def init(self, blocks, streamed, onload, lookahead=1, pin=True, own_only=False):
        real_init(self, [], (), onload, lookahead, pin, own_only)
        self.arena, self.blocks = s._PinnedArena(chunk=1 << 20), blocks
        self.set_streamed(streamed)

    monkeypatch.setattr(s.BlockStreamer, "__init__", init)
    dm = _merge_model(flux_file, quantization)
    sizes = [off.module_bytes(b) for b in off.flat_blocks(dm)]
    _, nonblock = off.plan_blocks(dm, None)
    st = off.apply_offload(dm, "block", "cpu", "cpu", budget=nonblock + sum(sizes) // 2 + 2 * max(sizes))
    assert 0 < st.n_resident < st.n_blocks, st.residency
    bare = comfy_forward(dm, inp)
    assert torch.allclose(bare, refs["none"], rtol=1e-4, atol=1e-5)
    state = MergeState(dm)
    for k in ("a", "b", "a2", "none", "a"):
        state.verify()
        state.activate((k,) if k != "none" else (), [loras[k]] if k != "none" else [])
        if layout == "other":
            assert st.streamer.refresh_forms() > 0
        for n in names:
            got = codecs.storage(base_layer(dm, n))
            assert all(torch.equal(a, b) for a, b in zip(got, weights[k][n])), (k, n)
        out = comfy_forward(dm, inp)
        assert torch.allclose(out, refs[k], rtol=1e-4, atol=1e-5), (k, (out - refs[k]).abs().max())
        for u in st.streamer.units.values():  # nothing keeps a streamed copy past the block (bnb int8's state)
            host = {h.data_ptr() for h in u.host}
            for m in u.module.modules():
                ms = vars(m).get("state")
                for t in (getattr(ms, "CB", None), getattr(ms, "SCB", None)):
                    assert not isinstance(t, torch.Tensor) or t.data_ptr() in host, (k, m)
        swaps = state.swaps
        assert state.verify(), "a forward under offload must not look like a foreign write"
        state.activate((k,) if k != "none" else (), [loras[k]] if k != "none" else [])
        assert state.swaps == swaps
    off.remove_offload(dm)
    state.verify()  # the weights moved back to pageable memory: merged again from the pristine copy
    state.activate((), [])
    assert torch.allclose(comfy_forward(dm, inp), refs["none"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_same_form_compares_layout_and_values(flux_file):
    """A tensor subclass streams its host inner tensors only if its device form is the host one
    moved (class, shapes, strides, values); else the device form's leaves, refreshed after writes."""
    from quantlora.memory import offload as off
    from quantlora.memory.streaming import _flatten, _same_form

    dm = load(flux_file, "torchao-int8-weight-only").model.diffusion_model
    w = next(m.weight for m in off.flat_blocks(dm)[0].modules() if type(getattr(m, "weight", None)).__name__ == "Int8Tensor")
    host, rebuild = _flatten(w)
    form = rebuild(iter([h.clone() for h in host]))  # what a device copy of the same layout is
    flat, _ = _flatten(form)
    assert all(a is not b for a, b in zip(flat, host)) and _same_form(w, form, flat, host)
    flat[0].view(-1)[0] += 1  # same class and shapes, other values: not the host tensor moved
    assert not _same_form(w, form, flat, host)
