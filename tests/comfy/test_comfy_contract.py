"""The pack's contract with ComfyUI internals (nodes/comfy_door.py), checked against the installed
ComfyUI (v0.33.0 by default; QUANTLORA_COMFYUI=.harness/ComfyUI-0.3.75 for the oldest supported).

Each check fails when a ComfyUI release changes something the pack relies on: an attribute or
entry point disappears, a wrapped function's or callback's signature changes, the call that hands
arguments to a wrapper changes, ModelPatcher gains or loses a field, or the bookkeeping the pack
writes stops meaning what it meant (ComfyUI would then load or evict under the pack). The failure
names what changed; comfy_door's tables say what each item is for.

Also here: the pack's wrappers and callbacks accept what ComfyUI passes (and **kwargs for what a
later release adds), a missing internal is a named ComfyUIIncompatible error, and the dynamic-VRAM
decisions (plain copies for the nodes that own placement) on stand-in dynamic patchers.
"""
import importlib
import inspect
import logging

import pytest
import torch
from torch import nn


def resolve(path):
    mod, _, rest = path.partition(":")
    obj = importlib.import_module(mod)
    for part in filter(None, rest.split(".")):
        obj = getattr(obj, part)
    return obj


def params(fn):
    return tuple(inspect.signature(fn).parameters)


@pytest.fixture(scope="module")
def door(comfy):
    from quantlora.nodes import comfy_door

    return comfy_door


def is_v033(door):
    return door.version_tuple() >= (0, 33, 0)


# ---------------- the tables against the installed ComfyUI ----------------
def test_every_contract_entry_exists(door):
    missing = []
    for path in door.CONTRACT:
        try:
            door._attr(path)
        except door.ComfyUIIncompatible as e:
            missing.append(f"{path} ({door.CONTRACT[path]}): {e}")
    assert not missing, "\n".join(missing)


def test_signatures_are_known(door):
    changed = []
    for path, known in door.SIGNATURES.items():
        got = params(resolve(path))
        if got not in [tuple(k) for k in known]:
            changed.append(f"{path}: ComfyUI {door.comfy_version()} has {got}; known: {known}")
    assert not changed, "\n".join(changed)


def test_call_sites_are_known(door):
    changed = []
    for path, known in door.CALL_SITES.items():
        src = " ".join(inspect.getsource(resolve(path)).split())
        if not any(" ".join(k.split()) in src for k in known):
            changed.append(f"{path}: none of {known} in ComfyUI {door.comfy_version()}'s source")
    assert not changed, "\n".join(changed)


def test_model_patcher_fields(door):
    import comfy.model_patcher as mp

    fields = frozenset(vars(mp.ModelPatcher(nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))))
    assert fields in door.PATCHER_FIELDS, (
        f"ComfyUI {door.comfy_version()}'s ModelPatcher fields changed: added "
        f"{sorted(fields - max(door.PATCHER_FIELDS, key=len))}, gone {sorted(max(door.PATCHER_FIELDS, key=len) - fields)}"
        " (see comfy_door.rebind)")
    assert set(door.PATCHER_FIELDS_WRITTEN) <= fields
    assert set(door.PATCHER_FIELDS_WRITTEN_OPTIONAL) <= fields or not is_v033(door)


def test_base_model_load_fields(door):
    """The BaseModel fields ModelPatcher keeps its load state in: set by ModelPatcher.__init__ (and
    BaseModel.__init__ for current_patcher), written by load/unpatch_model."""
    import comfy.model_base
    import comfy.model_patcher as mp

    m = nn.Linear(2, 2)
    mp.ModelPatcher(m, torch.device("cpu"), torch.device("cpu"))
    for f in door.BASE_MODEL_LOAD_FIELDS:
        if f == "current_patcher":
            assert "self.current_patcher" in inspect.getsource(comfy.model_base.BaseModel.__init__)
        else:
            assert hasattr(m, f), f"ModelPatcher no longer sets BaseModel.{f}"
    for method in ("load", "unpatch_model"):
        src = inspect.getsource(getattr(mp.ModelPatcher, method))
        for f in ("model_loaded_weight_memory", "current_weight_patches_uuid"):
            assert f"self.model.{f}" in src, f"ModelPatcher.{method} no longer keeps {f}"


def test_dynamic_vram_entries_where_present(door):
    import comfy.model_patcher as mp

    if not is_v033(door):
        assert not hasattr(mp, "ModelPatcherDynamic")
        return
    for path in door.DYNAMIC_CONTRACT:
        door._attr(path)
    assert "disable_dynamic" in params(mp.ModelPatcher.clone) and "model_override" in params(mp.ModelPatcher.clone)


def test_rope_entries_where_present(door):
    """QUANTLORA_FUSE_ROPE's two pairs (v0.33+): the custom ops and ComfyUI's pure-torch RoPE with the
    same parameters (torch's substitute_in_graph checks them too)."""
    if not is_v033(door):
        return
    for path in door.ROPE_CONTRACT:
        door._attr(path)
    for custom, plain in (("apply_rope", "_apply_rope"), ("apply_rope1", "_apply_rope1")):
        assert params(door._attr(f"comfy.quant_ops:ck.{custom}")) == params(door._attr(f"comfy.ldm.flux.math:{plain}"))


def test_missing_internal_is_a_named_pack_error(door):
    with pytest.raises(door.ComfyUIIncompatible) as e:
        door._attr("comfy.model_patcher:ModelPatcher.no_such_method")
    msg = str(e.value)
    assert door.comfy_version() in msg and "ModelPatcher.no_such_method" in msg and "damaged" not in msg
    with pytest.raises(door.ComfyUIIncompatible, match="cannot be imported"):
        door._attr("comfy.no_such_module:x")


# ---------------- the pack's wrappers and callbacks accept what ComfyUI passes ----------------
def wrappers():
    from quantlora.nodes import offload_run as osn
    from quantlora.nodes import runtime

    plan = osn.Plan("block", 1, True, False)
    return {
        "DIFFUSION_MODEL": (runtime._diffusion_model_wrapper, "comfy.ldm.flux.model:Flux._forward"),
        "OUTER_SAMPLE": (runtime._outer_sample_wrapper, "comfy.samplers:CFGGuider.outer_sample"),
        "PREPARE_SAMPLING (block/leaf)": (osn._offload_wrapper(plan), "comfy.sampler_helpers:_prepare_sampling"),
        "PREPARE_SAMPLING (model)": (osn._full_load_wrapper, "comfy.sampler_helpers:_prepare_sampling"),
    }


@pytest.mark.parametrize("name", ["DIFFUSION_MODEL", "OUTER_SAMPLE", "PREPARE_SAMPLING (block/leaf)",
                                  "PREPARE_SAMPLING (model)"])
def test_wrappers_accept_what_comfy_passes(door, name):
    fn, wrapped = wrappers()[name]
    sig = inspect.signature(fn)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds, \
        f"{name} wrapper must take *args and **kwargs: ComfyUI adds arguments between releases"
    names = [p for p in params(resolve(wrapped)) if p not in ("self", "kwargs")]
    sig.bind(object(), *names)                                  # all positional
    sig.bind(object(), names[0], **{n: None for n in names[1:]})  # the rest by keyword
    sig.bind(object(), *names, some_future_argument=True)       # what a later release may add


def test_attention_override_accepts_what_comfy_passes(door):
    from quantlora.speed.attention import sdpa_override

    sig = inspect.signature(sdpa_override)
    sig.bind(object(), "q", "k", "v", 1, mask=None, skip_reshape=True, transformer_options={},
             _inside_attn_wrapper=True, some_future_argument=1)


def test_detach_callback_accepts_what_comfy_passes(door):
    from quantlora.nodes.offload_run import _on_detach

    sig = inspect.signature(_on_detach)
    sig.bind(object(), True)  # callback(self, unpatch_all)
    sig.bind(object(), unpatch_all=False)
    sig.bind(object(), True, "later", extra=1)


def test_prepare_wrapper_passes_every_argument_through(door):
    """The block/leaf wrapper hands ComfyUI's arguments to the executor unchanged (v0.33's
    force_full_load / force_offload included)."""
    from quantlora.nodes import offload_run as osn

    seen = {}
    orig_install, orig_sync = osn._install, osn._sync_lora
    osn._install, osn._sync_lora = (lambda m, p: None), (lambda m, o: None)
    try:
        def executor(*a, **k):
            seen["args"], seen["kwargs"] = a, k
            return "done"
        w = osn._offload_wrapper(osn.Plan("block", 1, True, False))
        model = object.__new__(type("P", (), {}))
        assert w(executor, model, (1, 16, 8, 8), {}, model_options={"x": 1}, force_full_load=True,
                 force_offload=False) == "done"
        assert seen["args"] == (model, (1, 16, 8, 8), {})
        assert seen["kwargs"] == {"model_options": {"x": 1}, "force_full_load": True, "force_offload": False}
    finally:
        osn._install, osn._sync_lora = orig_install, orig_sync


# ---------------- the bookkeeping the pack writes means what it meant ----------------
def tiny_patcher():
    import comfy.model_patcher as mp

    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    return mp.ModelPatcher(m, torch.device("cpu"), torch.device("cpu"))


def test_mark_resident_is_what_comfy_calls_loaded(door, monkeypatch):
    """After mark_resident ComfyUI counts the working set as resident, needs no more memory for
    it, and its partial load does not load the weights again (no double load)."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    p = tiny_patcher()
    door.mark_resident(p, 123)
    assert p.loaded_size() == 123 and p.model_size() == 123
    lm = mm.LoadedModel(p)
    assert lm.model_memory_required(p.load_device) == 0
    loads = []
    monkeypatch.setattr(mp.ModelPatcher, "load", lambda self, *a, **k: loads.append(a))
    p.partially_load(p.load_device, 1e32)
    assert not loads, "ComfyUI would load a model the pack marked resident"
    assert door.weights_patched_for(p) and not door.loaded_partially(p)
    # and unpatch_model clears it again
    p.unpatch_model(p.offload_device, unpatch_weights=True)
    assert p.loaded_size() == 0 and not door.weights_patched_for(p)


def test_unload_helpers_go_through_loaded_models(door):
    import comfy.model_management as mm

    a = tiny_patcher()
    b = a.clone()
    door.mark_resident(a, 10)
    mm.load_models_gpu([a])  # CPU: recorded as loaded
    assert any(p is a for p in door.loaded_patchers())
    assert door.unload_clones_of(b) == 1  # a is a clone of b's weights
    assert not any(p is a for p in door.loaded_patchers())
    mm.load_models_gpu([a])
    door.unload(a)
    assert not any(p is a for p in door.loaded_patchers())


def test_rebind_gives_own_plain_bookkeeping(door):
    import comfy.model_patcher as mp

    src = tiny_patcher()
    src.add_object_patch("0.weight", nn.Parameter(torch.zeros(8, 8)))
    src.model_options["transformer_options"]["quantlora"] = {"k": 1}
    door.mark_resident(src, 7)
    new = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    out = door.rebind(src, new)
    assert type(out) is mp.ModelPatcher and out.model is new and not out.is_clone(src) and out.parent is None
    assert out.loaded_size() == 0 and out.model_size() == sum(t.numel() * 4 for t in new.state_dict().values())
    assert out.backup == {} and out.object_patches_backup == {} and out.pinned == set()
    assert out.backup is not src.backup and out.pinned is not src.pinned
    assert "0.weight" in out.object_patches and out.model_options["transformer_options"]["quantlora"] == {"k": 1}
    assert getattr(out, "cached_patcher_init", None) is None
    if hasattr(out, "clone_base_uuid"):
        assert out.clone_base_uuid != src.clone_base_uuid
    assert src.loaded_size() == 7  # the source is untouched


def test_copy_memo_copies_a_config_that_answers_none(door):
    import copy

    class Config:  # what v0.33's model configs do
        def __init__(self):
            self.unet_config = {"hidden": 128}

        def __getattr__(self, name):
            return None

    base = nn.Linear(2, 2)
    base.model_config = Config()
    with pytest.raises(TypeError):
        copy.deepcopy(base)
    new = copy.deepcopy(base, door.copy_memo(base))
    assert type(new.model_config) is Config and new.model_config is not base.model_config
    assert new.model_config.unet_config == {"hidden": 128}
    assert new.model_config.unet_config is not base.model_config.unet_config


# ---------------- dynamic VRAM decisions, on stand-in dynamic patchers ----------------
class FakeBase(nn.Module):
    """Enough of a BaseModel for the nodes: a diffusion_model tree and get_dtype()."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.diffusion_model = nn.Module()
        self.diffusion_model.img_in = nn.Linear(8, 16)
        self.diffusion_model.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.diffusion_model.final_layer = nn.Linear(16, 4)
        self.manual_cast_dtype = None

    def get_dtype(self):
        return torch.float32


def dynamic_patcher(door):
    """A patcher that says it is dynamic, with a loader recipe (cached_patcher_init) as UNETLoader
    sets one: ComfyUI's own clone(disable_dynamic=True) / delegate code then runs unchanged."""
    import comfy.model_patcher as mp

    if not is_v033(door):
        pytest.skip("dynamic VRAM is ComfyUI v0.33+")
    loads = []

    def loader(disable_dynamic=False):
        loads.append(disable_dynamic)
        return mp.ModelPatcher(FakeBase(), torch.device("cpu"), torch.device("cpu"))

    class Dynamic(mp.ModelPatcher):
        non_dynamic_delegate_model = None

        def is_dynamic(self):
            return True

        get_non_dynamic_delegate = mp.ModelPatcherDynamic.get_non_dynamic_delegate

    p = Dynamic(FakeBase(), torch.device("cpu"), torch.device("cpu"))
    p.cached_patcher_init = (loader, ())
    return p, loads


def test_plain_patchers_pass_unchanged(door):
    p = tiny_patcher()
    assert not door.is_dynamic(p)
    assert door.non_dynamic(p, "X", "why") is p and door.fresh_non_dynamic_copy(p, "X", "why") is None


def test_non_dynamic_delegate_loaded_once_and_said_once(door, caplog):
    p, loads = dynamic_patcher(door)
    with caplog.at_level(logging.INFO, logger="quantlora"):
        a = door.non_dynamic(p, "LoRAHotswap", "slots")
        b = door.non_dynamic(p, "LoRAHotswap", "slots")
    assert not door.is_dynamic(a) and a.model is b.model is not p.model and loads == [True]
    assert sum("dynamic VRAM" in r.message for r in caplog.records) == 1


def test_dynamic_without_reload_recipe_is_a_named_error(door):
    from quantlora.errors import QuantLoRAError

    p, _ = dynamic_patcher(door)
    p.cached_patcher_init = None
    with pytest.raises(QuantLoRAError, match="--disable-dynamic-vram"):
        door.non_dynamic(p, "CPUOffloadSampler", "why")


def test_fp8_cast_of_a_dynamic_model_is_a_plain_own_copy(door):
    from quantlora.nodes.fp8_cast_run import cast_model

    p, loads = dynamic_patcher(door)
    w0 = p.model.diffusion_model.blocks[0].weight.clone()
    out, msg = cast_model(p, "float8_e4m3fn", "auto", "img_in, final_layer")
    assert loads == [True] and not door.is_dynamic(out) and out.model is not p.model
    assert out.model.diffusion_model.blocks[0].weight.dtype == torch.float8_e4m3fn
    assert p.model.diffusion_model.blocks[0].weight.dtype == torch.float32
    assert torch.equal(p.model.diffusion_model.blocks[0].weight, w0)
    assert out.cached_patcher_init is None and "2 layers stored as float8_e4m3fn" in msg
    assert cast_model(out, "float8_e4m3fn", "auto", "img_in, final_layer")[0] is out  # idempotent


def test_offload_sampler_on_a_dynamic_model(door, monkeypatch):
    from quantlora.nodes import offload_run as osn

    p, loads = dynamic_patcher(door)
    monkeypatch.setattr(osn, "FORCE_ON_CPU", True)
    plan = osn.plan_offload(p, "auto", 1, 0.0)
    assert plan.mode == "none" and "dynamic VRAM" in plan.reason  # auto: dynamic VRAM places it
    assert osn.offload_patcher(p, plan) is p
    block = osn.offload_patcher(p, osn.Plan("block", 1, True, False))
    assert not door.is_dynamic(block) and block.model is not p.model and loads == [True]
    assert osn.offload_patcher(p, osn.Plan("block", 1, True, False)) is block  # cached while settings hold
    model = osn.offload_patcher(p, osn.Plan("model", 1, True, False))
    assert not door.is_dynamic(model) and model.model is block.model  # ComfyUI's one delegate model
