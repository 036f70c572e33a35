"""fp8 weight storage with a per-layer upcast to the compute dtype just before use.

Each selected Linear/Conv layer keeps its weight as float8_e4m3fn (or e5m2): half the bytes
of bf16/fp16. When the layer runs, the weight is cast to the input's dtype (the compute dtype)
and used in an ordinary matmul; the fp8 tensor is never modified. Biases, norms, embedders and
the final projection (by default) stay in high precision.

How the upcast happens, per layer:
- ComfyUI's op classes (anything with a `comfy_cast_weights` attribute, i.e. comfy.ops'
  CastWeightBiasOp: every layer of a ComfyUI model, including the ones our loader builds) get
  `comfy_cast_weights = True`: ComfyUI's own per-layer cast (the path its fp8 `weight_dtype`
  uses). It composes with its lowvram streaming, weight patches and torch.compile: regional
  compile of a cast Flux block is one graph, no breaks.
- Plain torch layers get a diffusers ModelHook subclass registered through its HookRegistry whose forward
  is `F.linear(x, weight.to(x.dtype), bias)`: also traceable by torch.compile.

Why not diffusers' `apply_layerwise_casting`: it works on ComfyUI's Flux modules (same numbers),
but its hooks call `module.to(dtype)` around every layer, which constructs Parameters inside
the forward: torch.compile breaks the graph at every cast layer (27 breaks and 21 graphs for one
double + one single block, measured with torch 2.13), and every forward writes the weight back
to fp8. Its skip patterns were regular expressions (re.search on the module's dotted name); here
they are globs with a bounded matcher (quant/name_patterns.py): a user's regex could hold the server.

Idempotent: the root module records the CastSpec it was cast with; applying the same spec again
does nothing, a different spec raises (re-quantizing fp8 weights to another fp8 format would
lose precision silently). No ComfyUI import.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantLoRAError
from . import name_patterns

STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Globs (quant/name_patterns.py) matched against each module's dotted name under the root passed in
# (the diffusion model: "img_in", "double_blocks.0.img_attn.qkv", ...) or any run of its parts.
DEFAULT_SKIP = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", "*norm*")
DEFAULT_SKIP_TEXT = "\n".join(DEFAULT_SKIP)
# The regex default saved in workflows made before the globs: read as the default it meant.
LEGACY_DEFAULT_SKIP_TEXT = r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(\.|$), norm"
SKIP_EXAMPLE = "`*norm*` (every norm layer), `final_layer`, `double_blocks.0.*` (all of block 0)"
_MARK = "_quantlora_fp8"
_HOOK = "quantlora_fp8_upcast"
_PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class CastSpec:
    storage: torch.dtype
    compute: torch.dtype
    skip: tuple[str, ...]


@dataclass
class CastReport:
    spec: CastSpec
    layers: int               # layers stored in fp8
    skipped: list[str]        # castable layers kept in high precision by the skip pattern
    already: bool = False     # the module was already cast with this spec (nothing done)


def parse_skip(text: str | None) -> tuple[str, ...]:
    """Globs, one per line or separated by commas (quant/name_patterns.py); None: the default."""
    if text is None or text.strip() == LEGACY_DEFAULT_SKIP_TEXT:
        return DEFAULT_SKIP
    return name_patterns.parse(text, "skip_pattern", SKIP_EXAMPLE)


def _plain(t: torch.Tensor | None) -> bool:
    return t is not None and type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor


def castable(module: nn.Module) -> bool:
    """A Linear/Conv layer whose weight is a plain high-precision float tensor (not bnb, torchao,
    quanto or already fp8) and whose upcast we know how to run."""
    if not isinstance(module, _PLAIN_LAYERS):
        return False
    w = module._parameters.get("weight")
    return _plain(w) and w.dtype.is_floating_point and w.element_size() >= 2


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def plan(root: nn.Module, skip=DEFAULT_SKIP) -> tuple[list[str], list[str]]:
    """(names of layers to store in fp8, names of castable layers the skip pattern keeps)."""
    skip = tuple(skip)
    cast, kept = [], []
    for name, m in root.named_modules():
        if not castable(m):
            continue
        (kept if name_patterns.matches(skip, name) else cast).append(name)
    return cast, kept


def to_fp8(t: torch.Tensor, storage: torch.dtype, device=None) -> torch.Tensor:
    """Round to nearest, saturating at the format's largest finite value (a plain .to() gives NaN)."""
    big = torch.finfo(storage).max
    return t.detach().to(device=device or t.device).clamp(-big, big).to(storage)


@functools.cache
def _upcast_hook_class():
    """A diffusers ModelHook (made on first use, not at module import: diffusers is heavy; once, so
    every layer's hook is one class and compiled blocks share their guards) whose forward is the
    layer's own op on its weight cast to the input's dtype."""
    from diffusers.hooks import ModelHook

    class UpcastHook(ModelHook):
        _is_stateful = False

        def __init__(self, compute: torch.dtype):
            super().__init__()
            self.compute = compute

        def new_forward(self, module, x, *args, **kwargs):
            dt = x.dtype if x.is_floating_point() else self.compute
            w = module.weight.to(dt)
            b = module.bias.to(dt) if module.bias is not None else None
            if isinstance(module, nn.Linear):
                return F.linear(x, w, b)
            return module._conv_forward(x, w, b)

    return UpcastHook


def _upcast_hook(compute: torch.dtype):
    return _upcast_hook_class()(compute)


def _set_upcast(module: nn.Module, compute: torch.dtype) -> None:
    if hasattr(module, "comfy_cast_weights"):
        module.comfy_cast_weights = True  # ComfyUI's op casts weight/bias to the input dtype per call
        return
    from diffusers.hooks import HookRegistry

    reg = HookRegistry.check_if_exists_or_initialize(module)
    if reg.get_hook(_HOOK) is None:
        reg.register_hook(_upcast_hook(compute), _HOOK)


def cast_spec(root: nn.Module) -> CastSpec | None:
    return getattr(root, _MARK, None)


def _check_again(root: nn.Module, spec: CastSpec) -> bool:
    old = cast_spec(root)
    if old is None:
        return False
    if old != spec:
        raise QuantLoRAError(
            f"this model was already cast to {str(old.storage).replace('torch.', '')} (compute "
            f"{str(old.compute).replace('torch.', '')}, skip {', '.join(old.skip)}); casting it again with other settings "
            "would round fp8 weights twice. Connect FP8LayerwiseCast to the original (uncast) model instead."
        )
    return True


@torch.no_grad()
def apply_fp8_cast(root: nn.Module, storage: torch.dtype = torch.float8_e4m3fn, compute: torch.dtype = torch.bfloat16,
                   skip=DEFAULT_SKIP, names: list[str] | None = None, convert_rest: bool = True) -> CastReport:
    """Cast in place: selected layers' weights become fp8 (new Parameters), other floating
    parameters move to the compute dtype if they differ (unless convert_rest is False: layers that
    cast their weights per call themselves, as ComfyUI's manual-cast ops do, keep their storage
    dtype). Idempotent for the same spec."""
    if storage not in STORAGE_DTYPES.values():
        raise QuantLoRAError(f"storage dtype {storage}: choose float8_e4m3fn or float8_e5m2.")
    spec = CastSpec(storage, compute, tuple(skip))
    if _check_again(root, spec):
        return CastReport(spec, sum(1 for m in root.modules() if _is_cast_layer(m)), [], already=True)
    cast, kept = plan(root, skip) if names is None else (names, [])
    chosen = set(cast)
    for name in cast:
        m = root.get_submodule(name)
        w = m._parameters["weight"]
        if not is_fp8(w):
            m._parameters["weight"] = nn.Parameter(to_fp8(w, storage), requires_grad=False)
        _set_upcast(m, compute)
        m._quantlora_fp8_layer = True
    # Everything else that is a plain float in another high-precision dtype follows the compute dtype.
    for mname, m in (root.named_modules() if convert_rest else ()):
        for pname, p in list(m._parameters.items()):
            if p is None or (mname in chosen and pname == "weight") or not _plain(p):
                continue
            if p.dtype.is_floating_point and p.element_size() >= 2 and p.dtype != compute:
                m._parameters[pname] = nn.Parameter(p.detach().to(compute), requires_grad=False)
    setattr(root, _MARK, spec)
    return CastReport(spec, len(cast), kept)


check_again = _check_again  # public name: the node checks before it copies anything


def storage_dtype_of(name: str) -> torch.dtype:
    """The fp8 dtype a storage_dtype name stands for."""
    if name not in STORAGE_DTYPES:
        raise QuantLoRAError(f"storage_dtype {name!r}: choose one of {', '.join(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[name]


def usable_compute_dtype(dt) -> torch.dtype:
    """A model's current dtype as the compute dtype: a floating dtype of 16 bits or more, else bf16."""
    if isinstance(dt, torch.dtype) and dt.is_floating_point and torch.finfo(dt).bits >= 16:
        return dt
    return torch.bfloat16


def unchanged_reason(root: nn.Module, spec: CastSpec) -> str | None:
    """Why casting `root` with `spec` leaves it as it is (already cast so; nothing castable), or
    None: it is to be cast. Raises if it was cast with other settings (check_again)."""
    old = cast_spec(root)
    if old == spec:
        return "already cast with these settings: unchanged"
    names, _ = plan(root, spec.skip)
    if not names and old is None:
        return "nothing to cast (no high-precision Linear/Conv layer outside the skip pattern): unchanged"
    if old is not None:
        check_again(root, spec)  # raises: other settings than the ones it was cast with
    return None


def cast_message(report: CastReport, storage_name: str, compute: torch.dtype, before: int, after: int) -> str:
    """The node's log line for a cast: layers cast and kept, weight bytes before and after."""
    return (f"{report.layers} layers stored as {storage_name}, compute {str(compute).replace('torch.', '')}, "
            f"{len(report.skipped)} kept in high precision; weights {before / 2**30:.3f} -> {after / 2**30:.3f} GiB")


def _is_cast_layer(m: nn.Module) -> bool:
    return getattr(m, "_quantlora_fp8_layer", False)


@torch.no_grad()
def cast_copy(root: nn.Module, storage: torch.dtype = torch.float8_e4m3fn, compute: torch.dtype = torch.bfloat16,
              skip=DEFAULT_SKIP, device=None, under: str = "", share: dict | None = None,
              convert_rest: bool = True) -> tuple[nn.Module, CastReport]:
    """A cast copy of `root` (which is not touched); the cast applies to root.get_submodule(under)
    and skip patterns see names relative to it. Selected weights go straight to fp8 (no second
    high-precision copy: the extra memory is the fp8 weights plus the small uncast parts); the rest
    of the tree (modules, uncast parameters, buffers, attributes) is deep-copied; `share` maps
    id(obj) -> what the copy uses instead (e.g. a back-reference that must not be copied)."""
    spec = CastSpec(storage, compute, tuple(skip))
    target = root.get_submodule(under) if under else root
    if _check_again(target, spec):
        return root, CastReport(spec, sum(1 for m in target.modules() if _is_cast_layer(m)), [], already=True)
    cast, kept = plan(target, skip)
    memo = dict(share or {})
    for name in cast:
        w = target.get_submodule(name)._parameters["weight"]
        memo[id(w)] = nn.Parameter(to_fp8(w, storage, device), requires_grad=False)
    new = copy.deepcopy(root, memo)
    report = apply_fp8_cast(new.get_submodule(under) if under else new, storage, compute, skip, names=cast,
                            convert_rest=convert_rest)
    report.skipped = kept
    return new, report
