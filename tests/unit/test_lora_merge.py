"""Layer 1: the LoRA merge mode (lora/merge.py, quant/weight_codecs.py) on plain torch modules, every
backend that runs on a CPU. No ComfyUI.

References, independent of the merge code:
- weights: the hand-merged matrix (the layer's dequantized weight + s * up @ down, in fp32) made
  into a layer by the *load* path of the same backend (quant/backends.py quantize_linear, or
  FP8LayerwiseCast's rounding): a merge must give exactly those tensors, bit for bit;
- the bare base: the tensors as loaded, bit for bit, after any sequence of swaps;
- the LoRA's effect: the same layer with the LoRA as a separate high-precision term (what slots
  compute). Merging into a quantized weight rounds base + delta together; the test bounds that
  error per weight kind and prints it (the GPU figures are in BENCHMARKS.md).
"""
import pytest
import torch
from torch import nn

from quantlora.errors import QuantLoRAError
from quantlora.lora.formats import LoRATarget, ParsedLoRA

IN, HID = 128, 256

# Backends that run on a CPU, and the bound on the relative error of the LoRA's effect after a
# merge (rounding the merged weight), for a delta of ~5% of the weight (a typical rank-16 LoRA at
# strength 1). Rounding W + delta costs the effect ~10% in bf16, ~30% in int8, ~65% in fp8; 4-bit
# rounding noise is larger than the effect itself, which is why `auto` keeps slots there.
EFFECT_BOUND = {
    "none": 0.15,                       # measured 0.10: bf16 rounding of W + delta (ComfyUI's merge does the same)
    "torchao-fp8-weight-only": 0.9,     # 0.68: e4m3's 3 mantissa bits round away part of each delta
    "torchao-int8-weight-only": 0.4,    # 0.29
    "torchao-int8-dynamic": 0.4,        # 0.29
    "quanto-int8": 0.4,                 # 0.28
    "quanto-fp8": 0.9,                  # 0.68
    "quanto-int4": 2.0,                 # 1.28: the effect is lost in the noise: auto keeps slots
    "bnb-nf4": 2.0,                     # 1.08: idem
    "bnb-int8": 0.4,
    "fp8-cast": 0.9,                    # 0.64
}


def tree(seed=0):
    """Flux-shaped names: an embedder, a fused qkv, a projection, a single block's linear1."""
    torch.manual_seed(seed)
    root = nn.Module()
    root.img_in = nn.Linear(64, IN)
    root.double_blocks = nn.ModuleList([nn.Module()])
    root.double_blocks[0].qkv = nn.Linear(IN, 3 * IN)
    root.double_blocks[0].proj = nn.Linear(IN, IN)
    root.single_blocks = nn.ModuleList([nn.Module()])
    root.single_blocks[0].linear1 = nn.Linear(IN, HID)
    for m in root.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return root.to(torch.bfloat16).eval()


def quantize(root, backend):
    from quantlora.quant.backends import BACKENDS, quantize_linear, unavailable_reason
    from quantlora.quant.fp8_cast import apply_fp8_cast

    if backend == "fp8-cast":
        apply_fp8_cast(root, torch.float8_e4m3fn, torch.bfloat16, skip=())
        return root
    why = unavailable_reason(backend, torch.device("cpu"))
    if why:
        pytest.skip(why)
    if backend != "none":
        for name, m in list(root.named_modules()):
            if isinstance(m, nn.Linear):
                quantize_linear(BACKENDS[backend], m, torch.bfloat16, torch.device("cpu"))
    return root


def lora(seed, rank=8, strength_scale=1.0, name=None):
    """A LoRA on the embedder, q of the fused qkv (rows 0..IN), proj and linear1, |delta| ~ 5% of |W|."""
    g = torch.Generator().manual_seed(seed)

    def piece(module, offset, rows, fan_in):
        down = torch.randn(rank, fan_in, generator=g) * fan_in ** -0.5
        up = torch.randn(rows, rank, generator=g) * 0.05 * fan_in ** -0.5 * strength_scale
        return LoRATarget(module, offset, rows, down.to(torch.bfloat16), up.to(torch.bfloat16), 16 / rank)

    targets = [piece("img_in", 0, IN, 64), piece("double_blocks.0.qkv", 0, IN, IN),
               piece("double_blocks.0.proj", 0, IN, IN), piece("single_blocks.0.linear1", 0, HID, IN)]
    return ParsedLoRA(name or f"lora-{seed}", "test", targets)


def hand_merged(pristine_tree, loras):
    """Dequantized weights + s * up @ down, fp32, per layer name."""
    from quantlora.quant import weight_codecs as codecs

    out = {}
    for lo, strength in loras:
        for t in lo.targets:
            if t.module not in out:
                out[t.module] = codecs.dequantize(pristine_tree.get_submodule(t.module))
            out[t.module][t.offset:t.offset + t.rows] += strength * t.scale * (t.up.float() @ t.down.float())
    return out


def load_path_tensors(backend, layer_like, full):
    """The merged matrix made into a layer the way the loader (or FP8LayerwiseCast) makes one."""
    from quantlora.quant import weight_codecs as codecs
    from quantlora.quant.fp8_cast import to_fp8

    if backend == "fp8-cast":
        return [to_fp8(full, torch.float8_e4m3fn)]
    lin = nn.Linear(full.shape[1], full.shape[0]).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(full.to(torch.bfloat16))
    quantize(_holder(lin), backend)
    return codecs.storage(lin)


def _holder(lin):
    h = nn.Module()
    h.layer = lin
    return h


def storage_of(root):
    from quantlora.quant import weight_codecs as codecs

    return {n: [t.clone() for t in codecs.storage(m)] for n, m in root.named_modules() if hasattr(m, "weight")
            and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() == 2}


def same(a, b):
    return all(len(a[n]) == len(b[n]) and all(torch.equal(x.view(torch.uint8) if x.dtype.itemsize == 1 else x,
                                                          y.view(torch.uint8) if y.dtype.itemsize == 1 else y)
                                              for x, y in zip(a[n], b[n])) for n in a)


def forward_all(root, x64, xin):
    with torch.no_grad():
        return [root.img_in(x64), root.double_blocks[0].qkv(xin), root.double_blocks[0].proj(xin),
                root.single_blocks[0].linear1(xin)]


def with_lora_terms(root, loras, x64, xin):
    """The base layers' outputs plus each LoRA as a separate high-precision term (what slots compute)."""
    outs = forward_all(root, x64, xin)
    xs = {"img_in": x64, "double_blocks.0.qkv": xin, "double_blocks.0.proj": xin, "single_blocks.0.linear1": xin}
    order = ["img_in", "double_blocks.0.qkv", "double_blocks.0.proj", "single_blocks.0.linear1"]
    outs = [o.float() for o in outs]
    for lo, strength in loras:
        for t in lo.targets:
            i = order.index(t.module)
            outs[i][:, t.offset:t.offset + t.rows] += strength * t.scale * (xs[t.module].float() @ t.down.float().T @ t.up.float().T)
    return outs


@pytest.mark.parametrize("backend", list(EFFECT_BOUND))
def test_merge_equals_load_path_and_restores_bit_exact(backend):
    from quantlora.lora.merge import MergeState

    root = quantize(tree(), backend)
    pristine = quantize(tree(), backend)  # the same seed: the same layers (quanto tensors cannot deepcopy)
    loaded = storage_of(root)
    a, b = lora(1), lora(2)
    state = MergeState(root)

    # A at strength 1: every touched layer equals the hand-merged matrix made by the load path
    assert state.activate(("a", 1.0), [(a, 1.0)])
    want = hand_merged(pristine, [(a, 1.0)])
    for name, full in want.items():
        got = storage_of(root)[name]
        ref = load_path_tensors(backend, root.get_submodule(name), full)
        assert same({name: got}, {name: [r.clone() for r in ref]}), (backend, name)
    # same key: nothing written
    assert not state.activate(("a", 1.0), [(a, 1.0)])
    # A + B stacked, then A at another strength, then off: the bare base, bit for bit
    state.activate(("a+b",), [(a, 1.0), (b, -0.5)])
    want = hand_merged(pristine, [(a, 1.0), (b, -0.5)])
    for name, full in want.items():
        ref = load_path_tensors(backend, root.get_submodule(name), full)
        assert same({name: storage_of(root)[name]}, {name: ref}), (backend, name)
    state.activate(("a", 0.5), [(a, 0.5)])
    assert state.deactivate()
    assert same(storage_of(root), loaded)
    assert state.report.pristine_bytes > 0 and state.swaps == 4
    # the pristine copy is one host buffer of its own size (torch's pinned allocator would round
    # every tensor up to a power of two)
    n_tensors = sum(len(v) for v in state._pristine.values())
    assert state.report.pristine_bytes <= state._arena.nbytes <= state.report.pristine_bytes + 256 * n_tensors


@pytest.mark.parametrize("backend", list(EFFECT_BOUND))
def test_lora_effect_after_merge(backend):
    """|(y_q,merged - y_q,base) - lora term| / |lora term| on random inputs: the LoRA's fidelity."""
    from quantlora.lora.merge import MergeState

    root = quantize(tree(), backend)
    a = lora(3)
    g = torch.Generator().manual_seed(9)
    x64, xin = torch.randn(32, 64, generator=g).to(torch.bfloat16), torch.randn(32, IN, generator=g).to(torch.bfloat16)
    base = [o.float() for o in forward_all(root, x64, xin)]
    ideal = with_lora_terms(root, [(a, 1.0)], x64, xin)
    state = MergeState(root)
    state.activate(("a",), [(a, 1.0)])
    merged = [o.float() for o in forward_all(root, x64, xin)]
    num = sum(((m - b) - (i - b)).norm() ** 2 for m, b, i in zip(merged, base, ideal)) ** 0.5
    den = sum((i - b).norm() ** 2 for b, i in zip(base, ideal)) ** 0.5
    err = float(num / den)
    print(f"{backend}: LoRA effect error after merge {err:.4f}")
    assert err < EFFECT_BOUND[backend], (backend, err)


def test_layers_behind_slots_and_unknown_weights():
    """A model that also has slots merges into the slots' base layers; a weight the merge does not
    know is refused naming the layer, at check() time (the node shows it, nothing half-merged)."""
    from quantlora.lora.hotswap import attach_slots
    from quantlora.lora.merge import MergeState

    root = tree()
    attach_slots(root, 4, "all", torch.bfloat16)
    pristine = tree()
    a = lora(4)
    state = MergeState(root)
    state.check([(a, 1.0)])
    state.activate(("a",), [(a, 1.0)])
    want = hand_merged(pristine, [(a, 1.0)])
    got = root.single_blocks[0].linear1.base.weight.float()
    assert torch.equal(got, want["single_blocks.0.linear1"].to(torch.bfloat16).float())

    odd = tree()
    odd.double_blocks[0].proj = nn.Conv1d(IN, IN, 1)
    with pytest.raises(QuantLoRAError, match=r"double_blocks\.0\.proj.*slots"):
        MergeState(odd).check([(lora(5), 1.0)])
    bad = ParsedLoRA("wide", "test", [LoRATarget("double_blocks.0.proj", 0, IN, torch.zeros(2, IN + 1), torch.zeros(IN, 2), 1.0)])
    with pytest.raises(QuantLoRAError, match="does not fit the layer"):
        MergeState(tree()).check([(bad, 1.0)])


def test_writes_by_others_are_noticed():
    """ComfyUI's weight patching or a reload writing into a merged layer: verify() sees the versions
    move and the next activation merges again from the pristine copy."""
    from quantlora.lora.merge import MergeState

    root = tree()
    loaded = storage_of(root)
    a = lora(6)
    state = MergeState(root)
    state.activate(("a",), [(a, 1.0)])
    merged = storage_of(root)
    assert state.verify()
    with torch.no_grad():
        root.double_blocks[0].proj.weight.mul_(2)  # someone else
    assert not state.verify()
    assert state.activate(("a",), [(a, 1.0)])
    assert same(storage_of(root), merged)
    state.deactivate()
    assert same(storage_of(root), loaded)


def test_pristine_on_the_device_and_back():
    from quantlora.lora.merge import MergeState

    root = tree()
    loaded = storage_of(root)
    state = MergeState(root, pristine="device")
    state.activate(("a",), [(lora(7), 1.0)])
    state.move_pristine("host")
    state.activate(("b",), [(lora(8), 1.0)])
    state.deactivate()
    assert same(storage_of(root), loaded) and state.place == "host"
    with pytest.raises(QuantLoRAError, match="pristine copy place"):
        MergeState(root, pristine="disk")


@pytest.mark.parametrize("backend", ["none", "fp8-cast", "torchao-int8-weight-only", "torchao-fp8-weight-only"])
def test_compiled_swaps_never_recompile(backend):
    """The merge writes into the tensors a compiled graph captured: swaps and strength changes run
    the same graph (error_on_recompile), follow the eager layer (bit for bit where inductor keeps
    eager's arithmetic: plain and fp8-cast weights; within rounding for torchao, whose compiled
    dequantize-matmul rounds differently), and the bare base gives the first compiled output again."""
    import torch._dynamo

    from quantlora.lora.merge import MergeState

    root, eager = quantize(tree(), backend), quantize(tree(), backend)
    layer = root.single_blocks[0].linear1
    compiled = torch.compile(layer, dynamic=False)
    state, ref = MergeState(root), MergeState(eager)
    x = torch.randn(4, IN).to(torch.bfloat16)
    torch._dynamo.reset()
    exact = backend in ("none", "fp8-cast")
    with torch.no_grad():
        bare = compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for key, loras in [(("a",), [(lora(1), 1.0)]), (("b",), [(lora(2), 0.7)]), (("a", 0.3), [(lora(1), 0.3)]), ((), [])]:
                state.activate(key, loras)
                ref.activate(key, loras)
                got, want = compiled(x), eager.single_blocks[0].linear1(x)
                if exact:
                    assert torch.equal(got, want), key
                else:
                    assert rel(got, want) < 0.01 and rel(got, bare) > 2 * rel(got, want) if key else True, (key, rel(got, want))
        assert torch.equal(compiled(x), bare)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_auto_choice():
    """auto merges 8-bit and wider weights; keeps slots for 4-bit ones (their rounding noise is larger
    than the LoRA's effect: test_lora_effect_after_merge), where the model already has slots, where
    ComfyUI's own weight patches are on the MODEL and where the pristine copy would not fit in RAM.
    Explicit merge refuses what it cannot do right, naming it."""
    from quantlora.lora.merge import choose

    a = [(lora(1), 1.0)]
    assert choose("auto", tree(), a, False, 0, None)[0] == "merge"
    assert choose("auto", quantize(tree(), "torchao-int8-weight-only"), a, False, 0, None)[0] == "merge"
    mode, why = choose("auto", quantize(tree(), "bnb-nf4"), a, False, 0, None)
    assert mode == "slots" and "4-bit" in why
    mode, why = choose("merge", quantize(tree(), "bnb-nf4"), a, False, 0, None)
    assert mode == "merge" and "lose much of the LoRA's effect" in why
    assert choose("auto", tree(), a, True, 0, None) == ("slots", choose("auto", tree(), a, True, 0, None)[1])
    assert "already has LoRA slots" in choose("auto", tree(), a, True, 0, None)[1]
    assert choose("merge", tree(), a, True, 0, None)[0] == "merge"  # merges into the slots' base layers
    mode, why = choose("auto", tree(), a, False, 3, None)
    assert mode == "slots" and "ComfyUI weight patches" in why
    with pytest.raises(QuantLoRAError, match="3 ComfyUI weight patches.*mode 'slots'"):
        choose("merge", tree(), a, False, 3, None)
    mode, why = choose("auto", tree(), a, False, 0, 1000)
    assert mode == "slots" and "would not fit in free host memory" in why
    assert choose("slots", tree(), a, False, 0, None)[0] == "slots"
    odd = tree()
    odd.double_blocks[0].proj = nn.Conv1d(IN, IN, 1)
    assert choose("auto", odd, a, False, 0, None)[0] == "slots"
    with pytest.raises(QuantLoRAError, match="double_blocks.0.proj"):
        choose("merge", odd, a, False, 0, None)


def test_nf4_repacked_for_cpu_is_refused_by_merge_and_auto_keeps_slots():
    """bitsandbytes repacks NF4 weights for its CPU kernels on their first forward (CPUs with
    AVX512-bf16): merge cannot requantize that layout, so it refuses, naming the layer; auto keeps slots."""
    from quantlora.lora.merge import MergeState, choose

    root = quantize(tree(), "bnb-nf4")
    layer = root.double_blocks[0].proj
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's _convert_weight_packed_for_cpu sets
    with pytest.raises(QuantLoRAError, match=r"double_blocks\.0\.proj.*repacked.*'slots'"):
        MergeState(root).check([(lora(1), 1.0)])
    assert choose("auto", root, [(lora(1), 1.0)], False, 0, None)[0] == "slots"


@pytest.mark.parametrize("backend", ["none", "fp8-cast", "torchao-int8-weight-only", "torchao-fp8-weight-only",
                                     "quanto-int8", "bnb-int8"])
def test_host_layers_merged_on_a_compute_device_equal_in_place(backend):
    """Under offload, streamed layers live on the host and are merged on the GPU the model runs on
    (a copy of the weight, merged there, written back). Forced here on the CPU as the 'compute
    device': the result must equal the in-place merge bit for bit for every weight kind that moves
    (float, fp8 storage, torchao), and kinds that do not move (quanto, bitsandbytes) stay in place;
    restores stay bit-exact."""
    from quantlora.lora.merge import MergeState

    a, b = quantize(tree(), backend), quantize(tree(), backend)
    bare = storage_of(a)
    lo1, lo2 = lora(1), lora(2, rank=4)
    here, away = MergeState(a), MergeState(b)
    away.compute_device = torch.device("cpu")
    for key, loras in [(("a",), [(lo1, 1.0)]), (("b",), [(lo2, 0.5), (lo1, 1.0)]), (("c",), [(lo2, 1.0)])]:
        here.activate(key, loras)
        away.activate(key, loras)
        assert same(storage_of(a), storage_of(b)), key
    away.deactivate()
    assert same(storage_of(b), bare)



def test_pristine_buffer_to_be_locked_is_mapped_and_faulted_in(monkeypatch):
    """The first merge's pristine copy (issue 12, restart): a buffer that will be page-locked comes
    from an anonymous mapping asking for huge pages and is faulted in by torch's threads before
    cudaHostRegister (which faults pages one by one: 2.8 s of 8 GiB on the H200, 0.45 s this way).
    The copies are exact either way; QUANTLORA_PIN_METHOD=plain keeps torch's allocator."""
    from quantlora.memory import pinned

    src = [torch.randn(300, 70), torch.arange(5000, dtype=torch.int16), torch.randn(0, 3)]
    for fast in (True, False):
        monkeypatch.setattr(pinned, "_FAST", fast)
        monkeypatch.setattr(pinned, "_HUGE_MIN", 1 << 10)
        arena = pinned.HostArena()
        copies = arena.copies(src, lock=True)  # no CUDA here: registering fails, the copies stay pageable
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(copies, src))
        assert arena.last_lock["method"] == ("huge" if fast else "plain")
        assert arena.nbytes >= sum(t.numel() * t.element_size() for t in src)
    monkeypatch.setattr(pinned, "_FAST", True)
    buf, mapping = pinned._allocate(1 << 20, lock=True)
    assert mapping is not None and buf.numel() == 1 << 20 and int(buf.max()) == 0
    buf2, mapping2 = pinned._allocate(1 << 20, lock=False)  # nothing to lock: torch's allocator
    assert mapping2 is None
