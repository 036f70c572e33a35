"""A transformer block compiled ahead of time (AOTInductor), called in place of its torch.compile'd form
where the call is the one it was exported for (issue 12's restart; wired by speed/aot_store.py: on by
default on CUDA, QUANTLORA_AOT_BLOCKS=0 turns it off).

Why: a restart spends 3-5 s of host Python per block kind on torch.compile's start (inductor's imports,
dynamo's tracing, the cached graphs' loading; bench/aoti_probe.py on an H200). A package is a shared
library and its kernels: loaded, not traced.

How it stays correct without dynamo's guards:
- The weights are an input (`plain_weights`): every block of a kind shares one package, and the live
  tensors are read at each call, so a LoRA merged in place, or a weight ComfyUI swaps, is what runs.
  Tensor subclasses (torchao's fp8 weights) go in as their inner tensors and are rebuilt inside the
  exported graph (`rebuild`), the module itself untouched.
- `record_options` runs the block once eagerly with a transformer_options dict that records which keys
  the block reads; the package is exported with exactly those, and `AOTDispatch` takes the package only
  when a call's inputs have the exported shapes, dtypes, devices and strides, its other arguments the
  exported values, the recorded keys the recorded values, and no layer of the block carries ComfyUI's
  per-layer patch functions. Any other call goes to the fallback (the block's torch.compile'd call).
Plain torch; no ComfyUI import.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import platform
import threading
from typing import Any, Callable

import torch
from torch import nn

_MISSING = object()


# --- the weights as an input ---------------------------------------------------------------------
def _is_subclass(t) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def weight_layout(block: nn.Module) -> dict[str, tuple]:
    """name -> (tensor subclass, inner names, its flatten context, size, stride) for each subclass
    parameter or buffer; plain ones map to None. What `rebuild` needs, fixed at export."""
    layout = {}
    for name, t in _named_state(block):
        if _is_subclass(t):
            inner, ctx = t.__tensor_flatten__()
            if any(_is_subclass(getattr(t, n)) for n in inner):
                raise TypeError(f"{name}: nested tensor subclasses are not supported ({type(t).__name__})")
            layout[name] = (type(t), tuple(inner), ctx, tuple(t.shape), tuple(t.stride()))
        else:
            layout[name] = None
    return layout


def _named_state(block: nn.Module):
    yield from block.named_parameters(remove_duplicate=False)
    yield from block.named_buffers(remove_duplicate=False)


def plain_weights(block: nn.Module, layout: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The block's live parameters and buffers as plain tensors, in `layout`'s order: a subclass weight
    as its inner tensors under name.<inner> (the same storages: an in-place merge shows)."""
    state = dict(_named_state(block))
    out = {}
    for name, spec in layout.items():
        t = state[name]
        if spec is None:
            out[name] = t.detach() if isinstance(t, nn.Parameter) else t
        else:
            for inner in spec[1]:
                out[f"{name}.{inner}"] = getattr(t, inner)
    return out


def rebuild(plain: dict[str, torch.Tensor], layout: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """plain_weights' inverse, traceable: the state for torch.func.functional_call."""
    state = {}
    for name, spec in layout.items():
        if spec is None:
            state[name] = plain[name]
        else:
            cls, inner, ctx, size, stride = spec
            state[name] = cls.__tensor_unflatten__({n: plain[f"{name}.{n}"] for n in inner}, ctx, size, stride)
    return state


# --- which transformer_options the block reads ---------------------------------------------------
class RecordingOptions(dict):
    """A transformer_options dict that records the keys read (get, [], in) and whether anything was
    written; copy() gives a plain dict (ComfyUI's blocks copy it for their patches' extra_options)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: set = set()
        self.written = False

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def __setitem__(self, key, value):
        self.written = True
        super().__setitem__(key, value)

    def copy(self):
        return dict(self)


_SIMPLE = (type(None), bool, int, float, str)


def _comparable(v) -> bool:
    """Values a call can be checked against with ==, without tensors inside (a tensor's == is a tensor)."""
    if isinstance(v, _SIMPLE) or callable(v) and not isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return all(_comparable(x) for x in v)
    if isinstance(v, dict):
        return all(_comparable(k) and _comparable(x) for k, x in v.items())
    return False


def _same(a, b) -> bool:
    return a is b or (a is not _MISSING and b is not _MISSING and _comparable(a) and _comparable(b) and a == b)


def _same_as_recorded(a, b) -> bool:
    """A call's value against one read back from a record (its JSON form: functions by name, tuples as lists)."""
    if a is _MISSING or b is _MISSING:
        return a is b
    try:
        return _to_json(a) == b
    except TypeError:
        return False


def _callable_name(f) -> str | None:
    """module:qualname of a module-level function or class (the same object in every process), else None."""
    mod, qual = getattr(f, "__module__", None), getattr(f, "__qualname__", None)
    if not mod or not qual or "<" in qual:
        return None
    return f"{mod}:{qual}"


def _to_json(v):
    """A recorded value in JSON form: module-level functions by name; raises TypeError for other objects."""
    if callable(v) and not isinstance(v, (type(None), bool, int, float, str, list, tuple, dict)):
        name = _callable_name(v)
        if name is None:
            raise TypeError(f"{v!r} has no name another process can find")
        return {"__callable__": name}
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"a dict with non-string keys: {list(v)[:4]}")
        return {k: _to_json(x) for k, x in v.items()}
    json.dumps(v)
    return v


def record_options(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Runs the block once eagerly (on copies of its tensor inputs: FLUX's blocks add into theirs) with a
    recording transformer_options; returns the keys it read with their values (absent keys as _MISSING).
    Raises ValueError where the block writes into the options or reads one it cannot be checked on."""
    opts = RecordingOptions(kwargs.get("transformer_options") or {})
    copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kw["transformer_options"] = opts
    with torch.no_grad():
        block(*copies, **kw)
    if opts.written:
        raise ValueError("the block writes into transformer_options: its Python side effects cannot be compiled ahead of time")
    read = {k: dict.get(opts, k, _MISSING) for k in opts.read}
    bad = [k for k, v in read.items() if v is not _MISSING and not _comparable(v)]
    if bad:
        raise ValueError(f"the block reads transformer_options {bad} holding tensors or objects a call cannot be checked on")
    return read


# --- export and the call ---------------------------------------------------------------------------
class CallSignature:
    """How a block is called: its tensor inputs (by name, in the package's order) with their shapes,
    dtypes, devices and strides, its other arguments' values, and the options the block reads."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict, options_read: dict):
        params = list(inspect.signature(type(block).forward).parameters)[1:]
        self.names = params
        bound = dict(zip(params, args))
        bound.update(kwargs)
        unknown = set(bound) - set(params)
        if unknown:
            raise TypeError(f"{type(block).__name__}.forward has no parameters {sorted(unknown)}")
        self.tensors = [n for n in params if isinstance(bound.get(n), torch.Tensor)]
        self.meta = [_tensor_meta(bound[n]) for n in self.tensors]
        self.others = {n: bound[n] for n in params if n in bound and n not in self.tensors and n != "transformer_options"}
        if not all(_comparable(v) for v in self.others.values()):
            raise ValueError(f"arguments {sorted(self.others)} cannot be checked on")
        self.options = options_read
        self.restored = False

    def tensors_of(self, args: tuple, kwargs: dict) -> list | None:
        """The call's tensor inputs in the package's order, or None where the call differs."""
        bound = dict(zip(self.names, args))
        if kwargs:
            bound.update(kwargs)
        same = _same_as_recorded if self.restored else _same
        for n, v in self.others.items():
            if not same(bound.get(n, _MISSING), v):
                return None
        if len(bound) != len(self.tensors) + len(self.others) + ("transformer_options" in bound):
            return None  # an argument given here that the export did not have
        opts = bound.get("transformer_options") or {}
        for k, v in self.options.items():
            if not same(dict.get(opts, k, _MISSING), v):
                return None
        out = []
        for n, meta in zip(self.tensors, self.meta):
            t = bound.get(n)
            if not isinstance(t, torch.Tensor) or _tensor_meta(t) != meta:
                return None
            out.append(t)
        return out

    # -- kept beside the package (JSON), read back at a restart --
    def record(self) -> dict:
        """JSON-able; raises ValueError where a value has no JSON form (a callable among the options)."""
        try:
            return {"names": self.names, "tensors": self.tensors,
                    "meta": [[list(sh), str(dt).removeprefix("torch."), str(dev), list(st)] for sh, dt, dev, st in self.meta],
                    "others": {k: _to_json(v) for k, v in self.others.items()},
                    "options": {k: _to_json(v) for k, v in self.options.items() if v is not _MISSING},
                    "options_absent": sorted(k for k, v in self.options.items() if v is _MISSING)}
        except TypeError as e:
            raise ValueError(f"the call cannot be kept for a restart: {e}") from None

    @classmethod
    def from_record(cls, rec: dict) -> "CallSignature":
        sig = cls.__new__(cls)
        sig.names, sig.tensors = list(rec["names"]), list(rec["tensors"])
        sig.meta = [(tuple(sh), getattr(torch, dt), torch.device(dev), tuple(st)) for sh, dt, dev, st in rec["meta"]]
        sig.others = dict(rec["others"])
        sig.options = {**rec["options"], **{k: _MISSING for k in rec["options_absent"]}}
        sig.restored = True
        return sig


def _tensor_meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device, tuple(t.stride()))


@functools.lru_cache(maxsize=64)
def _source_hash(cls: type) -> str:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    """The machine and its CPU's feature flags (a package's host code is compiled for this CPU; it
    stands in for torch's own ISA check at load, see load_package)."""
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def block_fingerprint(block: nn.Module, layout: dict) -> str:
    """What a package was exported from: the block's class and source (a ComfyUI update that changes it
    makes another package), torch's version, and each weight's kind, shape, dtype and layout (a
    tensor subclass's flatten context included: torchao's quantization settings are baked in)."""
    cls = type(block)
    state = dict(_named_state(block))
    parts = [f"{cls.__module__}.{cls.__qualname__}", _source_hash(cls), torch.__version__, host_cpu()]
    for name, m in block.named_modules():  # the forward as prepared (speed/compile.prepare_block's switches)
        own = m.__dict__.get("forward")
        parts.append(f"{name}:{type(m).__module__}.{type(m).__qualname__}:"
                     f"{getattr(getattr(own, '__func__', own), '__qualname__', own) if own is not None else ''}")
    for name, spec in layout.items():
        t = state[name]
        if spec is None:
            parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{tuple(t.stride())}")
        else:
            inner = [(n, tuple(getattr(t, n).shape), str(getattr(t, n).dtype)) for n in spec[1]]
            parts.append(f"{name}:{spec[0].__module__}.{spec[0].__qualname__}:{inner}:{spec[2]!r}:{spec[3]}:{spec[4]}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def save_record(path: str, block: nn.Module, sig: CallSignature, layout: dict) -> None:
    """The package's call and the block's fingerprint, beside the package (path: a .json)."""
    with open(path, "w") as f:
        json.dump({"fingerprint": block_fingerprint(block, layout), "call": sig.record()}, f)


def load_record(path: str, block: nn.Module) -> tuple[CallSignature, dict] | None:
    """(signature, layout) for this block from a record save_record wrote, or None where the block is
    not what the package was exported from (or the record is unreadable)."""
    layout = weight_layout(block)
    try:
        with open(path) as f:
            rec = json.load(f)
        if rec.get("fingerprint") != block_fingerprint(block, layout):
            return None
        return CallSignature.from_record(rec["call"]), layout
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class _WeightsAsInput(nn.Module):
    """forward(weights, *tensors): the block through functional_call, its weights rebuilt from plain
    tensors, its other arguments and options as exported. Not a submodule: its weights are no constants."""

    def __init__(self, block: nn.Module, sig: CallSignature, layout: dict):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self._sig, self._layout = sig, layout

    def forward(self, weights, *tensors):
        kwargs = dict(zip(self._sig.tensors, tensors))
        kwargs.update(self._sig.others)
        kwargs["transformer_options"] = {k: v for k, v in self._sig.options.items() if v is not _MISSING}
        return torch.func.functional_call(self._block, rebuild(weights, self._layout), (), kwargs)


@contextlib.contextmanager
def _own_forward(block: nn.Module):
    """The block's own forward while it is recorded and exported: not its compiled call, nor a dispatch."""
    compiled = block.__dict__.get("_compiled_call_impl")
    block._compiled_call_impl = None
    try:
        yield
    finally:
        block._compiled_call_impl = compiled


def export_block(block: nn.Module, args: tuple, kwargs: dict):
    """torch.export of the block for this call (see the module's docstring): (program, signature, layout)."""
    with _own_forward(block):
        sig = CallSignature(block, args, kwargs, record_options(block, args, kwargs))
        layout = weight_layout(block)
        inputs = sig.tensors_of(args, kwargs)
        with torch.no_grad():
            program = torch.export.export(_WeightsAsInput(block, sig, layout),
                                          (plain_weights(block, layout), *[t.clone() for t in inputs]))
    return program, sig, layout


def build_package(block: nn.Module, args: tuple, kwargs: dict, path: str):
    """Exports the block for this call and compiles it ahead of time into `path` (.pt2). Returns
    (signature, layout) for AOTDispatch."""
    program, sig, layout = export_block(block, args, kwargs)
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return sig, layout


def structure_token(block: nn.Module) -> tuple:
    """Each layer's class, per-instance forward and hook counts (cheap enough for every call)."""
    return tuple((type(m), m.__dict__.get("forward"), len(m._forward_pre_hooks), len(m._forward_hooks))
                 for m in block.modules())


def _weight_meta(weights: dict) -> list:
    return [(w.dtype, w.shape) for w in weights.values()]


def patched_layers(block: nn.Module) -> bool:
    """Whether a layer of the block carries ComfyUI's per-layer patch functions or casts its weights at
    each call (the exported graph has neither)."""
    return any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
               or getattr(m, "comfy_cast_weights", False) for m in block.modules())


class KindPackages:
    """The packages of one block kind, shared by its blocks: [(signature, runner)], and, optionally, how to
    build one for a call none of them takes (build(block, args, kwargs) -> (signature, runner) or None)."""

    def __init__(self, entries=(), build: Callable | None = None):
        self.entries = list(entries)
        self.build = build
        self._tried: set = set()

    def find(self, args: tuple, kwargs: dict):
        for sig, runner in self.entries:
            tensors = sig.tensors_of(args, kwargs)
            if tensors is not None:
                return runner, tensors
        return None, None

    def build_for(self, block: nn.Module, args: tuple, kwargs: dict):
        """Once per call shape: a package for this call (the fallback runs the call where that fails)."""
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor))
        key += tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
        if self.build is None or key in self._tried:
            return None, None
        self._tried.add(key)
        built = self.build(block, args, kwargs)
        if built is None:
            return None, None
        self.entries.append(built)
        return self.find(args, kwargs)


class AOTDispatch:
    """Set as a block's `_compiled_call_impl` (what nn.Module calls instead of its own call once set): a
    call one of its kind's packages was exported for runs that package, any other the fallback:
    `fallback` (the block's torch.compile'd call) or, where none is given, torch.compile of the block's
    call made at the first such call (so a restart whose calls all fit traces nothing)."""

    def __init__(self, block: nn.Module, kind: KindPackages, layout: dict, fallback: Callable | None = None,
                 compile_kwargs: dict | None = None):
        self.block, self.kind, self.layout = block, kind, layout
        self.compile_kwargs = dict(compile_kwargs or {})
        self._fallback = fallback
        self.calls = {"package": 0, "fallback": 0}
        # what the packages were exported or fingerprinted with: a hook or forward set on a layer later
        # (another node's casting, offload) or a weight of another dtype or shape sends calls to the fallback
        self.structure = structure_token(block)
        self.weight_meta = _weight_meta(plain_weights(block, layout))

    @property
    def fallback(self) -> Callable:
        if self._fallback is None:
            self._fallback = torch.compile(self.block._call_impl, **self.compile_kwargs)  # what block.compile() makes
        return self._fallback

    def __call__(self, *args: Any, **kwargs: Any):
        if not patched_layers(self.block) and structure_token(self.block) == self.structure:
            runner, tensors = self.kind.find(args, kwargs)
            if runner is None:
                runner, tensors = self.kind.build_for(self.block, args, kwargs)
            if runner is not None:
                weights = plain_weights(self.block, self.layout)
                device = tensors[0].device
                # weights streamed elsewhere (offload), or replaced by others: not for the package
                if all(w.device == device for w in weights.values()) and _weight_meta(weights) == self.weight_meta:
                    self.calls["package"] += 1
                    out = runner(weights, *tensors)
                    return tuple(out) if isinstance(out, list) else out
        self.calls["fallback"] += 1
        return self.fallback(*args, **kwargs)


_LOAD_LOCK = threading.Lock()


def load_package(path: str):
    """The package's runner (torch._inductor.aoti_load_package), without torch's host-CPU probe.

    Before loading, torch compares the package's recorded device information with this machine's, and
    for the CPU's vector ISA it compiles test programs and starts a Python that imports torch once per
    ISA (torch/_inductor/cpu_vec_isa.py): 15-25 s in each new process (H200 image, this CPU), only to log
    a warning on a mismatch. The packages here are built on the machine that loads them, and the host
    CPU's flags are part of their fingerprint (block_fingerprint), so that comparison is skipped."""
    loader = torch._inductor.aoti_load_package
    try:  # torch's loader imports it too
        codecache = importlib.import_module("torch._inductor.codecache")
    except ImportError:
        codecache = None
    if codecache is None or not callable(getattr(codecache, "get_device_information", None)):
        return loader(path)
    with _LOAD_LOCK:
        probe = codecache.get_device_information
        codecache.get_device_information = lambda device_type: {}
        try:
            return loader(path)
        finally:
            codecache.get_device_information = probe


def use_package(block: nn.Module, runner: Callable, sig: CallSignature, layout: dict,
                compile_kwargs: dict | None = None) -> AOTDispatch:
    """Routes the block's calls through one package (see AOTDispatch); compile_kwargs: torch.compile's,
    for the fallback (as speed/compile.py compiles the blocks)."""
    dispatch = AOTDispatch(block, KindPackages([(sig, runner)]), layout, compile_kwargs=compile_kwargs)
    block._compiled_call_impl = dispatch
    return dispatch
