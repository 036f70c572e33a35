"""Budget-filling block streaming: the blocks that fit the VRAM budget stay on the GPU, the rest
live in pinned host memory and are copied in ahead of use on a side CUDA stream, for every weight
kind (plain / fp8-cast tensors, bitsandbytes NF4/int8 with their quantization state, torchao and
optimum-quanto tensor subclasses).

How one streamed block moves (a `_Unit`):
- At set-up every tensor the block's modules need is found (`_refs`): parameters and buffers
  (swapped through `.data`, so the objects others hold, e.g. LoRA slot buffers, stay the same);
  tensors hanging off bitsandbytes objects (Params4bit.quant_state.absmax/code/offset and the
  nested state2, Int8Params.CB/SCB, Linear8bitLt.state.CB/SCB) (swapped with setattr); tensor
  subclasses (torchao, quanto) are flattened through `__tensor_flatten__` into plain inner tensors
  and rebuilt with `__tensor_unflatten__` around the device copies. Tensors sharing storage
  (Int8Params.data and .CB) share one host copy and one device copy.
- The host copies ("leaves") are packed into pinned arena chunks (CUDA only; no per-tensor
  power-of-two rounding of torch's pinned allocator) and become the block's tensors at rest, so a
  write while offloaded (a LoRA swap into slot buffers) lands where the next copy reads.
- Onload: empty device tensors on the side stream, `copy_(non_blocking=True)` from the pinned
  leaves, an event; the compute stream waits on that event and `record_stream`s the copies.
  Offload: the references go back to the pinned leaves, the device copies are dropped (their
  memory is reused once the compute stream is past them) and a "done" event is recorded. Before a
  new prefetch allocates, the host waits until the compute stream is done with enough of the
  earlier streamed blocks that the copies in flight fit the plan's room: in block mode a window in
  bytes (lookahead + 1 of the largest streamed block), so where smaller blocks stream (Flux's single
  blocks in a plan that also streams double ones) more of them are copied ahead, up to ~2.4x as many
  (leaf mode: lookahead + 1 units). When copies are the bottleneck the copy stream still never
  idles (the next copy is queued before the current one ends); when compute is, the wait only trims
  how far the host runs ahead.
- Without CUDA (device cpu) the very same code runs: no pinning, no stream, no events (each guarded
  by `self.stream is not None`), and "device copies" are plain copies, so CPU tests go through
  every line that moves a tensor.

Prefetch order is the blocks' order in their lists (Flux: double then single blocks). Streamed
blocks are spread evenly over that order (`plan_residency`), so each copy has the compute of the
resident blocks before it to hide behind. A forward's first streamed block is prefetched when the
forward starts (never across forwards: the host copies may be rewritten between forwards). A
block reached out of the planned order is loaded on the spot.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("quantlora")

HOOK = "quantlora_stream"
ALIGN = 512
CHUNK = 1 << 30


# ---------------------------------------------------------------- residency planning
@dataclass(frozen=True)
class Residency:
    streamed: tuple        # indices (into the flat block order) of the blocks streamed each forward
    resident_bytes: int    # block weights kept on the device
    streamed_bytes: int    # block weights copied in per forward
    inflight_bytes: int    # device room the streamed copies need at once (lookahead + 1 blocks)
    n_blocks: int
    lookahead: int = 1     # streamed blocks copied ahead (the planner may raise the caller's)
    predicted_s: float | None = None  # one forward under memory/pipeline.py's schedule (with timing)

    @property
    def n_resident(self) -> int:
        return self.n_blocks - len(self.streamed)

    @property
    def working_set(self) -> int:  # block part only; add the non-block parts
        return self.resident_bytes + self.inflight_bytes


MAX_LOOKAHEAD = 8


def plan_residency(block_bytes: list[int], room: int | None, lookahead: int = 1,
                   timing: tuple[float, float] | None = None) -> Residency:
    """Which blocks to stream so that resident blocks + in-flight copies fit `room` bytes (the
    budget left after the non-block parts and the activations). room None: stream every block.
    The streamed blocks are spread evenly over the order (error diffusion on bytes), so copies
    overlap the compute of the resident blocks between them.

    Without timing, the plan that streams the fewest bytes wins. With timing = (bytes per second of
    a pinned copy, seconds of compute per block), candidate plans (each size class as the largest
    streamed block, each lookahead from the caller's up to MAX_LOOKAHEAD) are ranked by the
    forward time memory/pipeline.py predicts for them, then by bytes streamed."""
    from .pipeline import step_seconds

    n = len(block_bytes)
    total = sum(block_bytes)

    def build(streamed, la):
        s = tuple(sorted(streamed))
        sb = sum(block_bytes[i] for i in s)
        infl = min(la + 1, len(s)) * max((block_bytes[i] for i in s), default=0)
        t = None
        if timing is not None:
            bw, per_block = timing
            t = step_seconds([per_block] * n, [b / bw for b in block_bytes], s, la, block_bytes, infl)
        return Residency(s, total - sb, sb, infl, n, la, t)

    if room is None:
        return build(range(n), lookahead)
    if total <= room:
        return build((), lookahead)

    def key(r):  # a plan that does not fit ranks last
        return (r.working_set > room, r.predicted_s if r.predicted_s is not None else 0.0, r.streamed_bytes, r.lookahead)

    best = build(range(n), lookahead)
    for la in range(lookahead, (MAX_LOOKAHEAD if timing is not None else lookahead) + 1):
        # Streaming only the smaller blocks (Flux: the single blocks) keeps smaller copies in flight;
        # try each size class as the largest streamed one.
        for cap in sorted(set(block_bytes)):
            eligible = [i for i in range(n) if block_bytes[i] <= cap]
            mean = sum(block_bytes[i] for i in eligible) / len(eligible)
            # Two ways to spread the streamed blocks: even in bytes, or even in compute time (every
            # block earns the same credit: with timing, each block computes for about as long).
            # The second streams fewer large blocks where they sit, so the copies keep pace with
            # the compute; on Flux's 16 GiB bf16 card the schedule model ranks it 1.20x against
            # 1.27x for the bytes-even plan (bench/BENCHMARKS.md, issue 13).
            credits = [[block_bytes[i] for i in eligible]]
            if timing is not None:
                credits.append([mean] * len(eligible))
            for credit in credits:
                fit = _smallest_fitting(eligible, credit, block_bytes, lambda pick: build(pick, la), room)
                if fit is None:
                    r = build(eligible, la)
                    fit = r if r.working_set <= room else None
                if fit is not None and key(fit) < key(best):
                    best = fit
    return best


def _smallest_fitting(eligible: list, credit: list, block_bytes: list, build, room: int):
    """Error diffusion: each eligible block adds phi * its credit, a block is streamed when the
    account covers half its bytes; the smallest phi (bisection) whose plan fits room. None if
    none does."""
    lo, hi, fit = 0.0, 1.0, None
    for _ in range(30):
        phi = (lo + hi) / 2
        acc, pick = -0.5 * block_bytes[eligible[0]], []  # the first eligible block stays resident when it can
        for i, c in zip(eligible, credit):
            b = block_bytes[i]
            acc += phi * c
            if acc >= b / 2:
                pick.append(i)
                acc -= b
        r = build(pick)
        if r.working_set <= room:
            fit, hi = r, phi
        else:
            lo = phi
    return fit


# ---------------------------------------------------------------- finding every tensor a module needs
def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t.data) is torch.Tensor and (
        type(t) in (torch.Tensor, nn.Parameter) or isinstance(t, nn.Parameter))


def _is_bnb_obj(o) -> bool:
    mod = getattr(type(o), "__module__", "") or ""
    return mod.startswith("bitsandbytes") and not isinstance(o, (nn.Module, torch.Tensor))


def _flatten(t):
    """(plain leaves, rebuild(iterator of leaves) -> tensor) for a tensor subclass."""
    if _plain(t) or getattr(type(t), "__tensor_flatten__", None) is None:
        return [t.data if isinstance(t, nn.Parameter) else t], lambda it: next(it)
    names, ctx = t.__tensor_flatten__()
    parts = [_flatten(getattr(t, n)) for n in names]
    cls, size, stride = type(t), t.size(), t.stride()

    def rebuild(it):
        inner = {n: r(it) for n, (_, r) in zip(names, parts)}
        return cls.__tensor_unflatten__(inner, ctx, size, stride)

    return [leaf for ls, _ in parts for leaf in ls], rebuild


@dataclass
class _Ref:
    kind: str        # "data": target.data = x | "attr": setattr(target, name, x) | "wrap": module.<registry>[name] = rebuilt
    target: object
    name: str
    idx: tuple       # indices into the unit's leaves
    rebuild: object = None
    param: bool = False
    requires_grad: bool = False
    host_obj: object = None   # "wrap" whose device form differs: the tensor at rest (the original host tensor);
                              # None: the tensor at rest is rebuilt around the host leaves
    rest: tuple = None        # (host leaves list, the tensor rebuilt around them)
    inner: tuple = None       # "wrap" of one level (its inner tensors plain): their attribute names
    dev_obj: object = None    # that wrap's device-form tensor, made once, its inner tensors swapped in place


def _inner_names(t) -> tuple | None:
    """A tensor subclass's inner attribute names when each is a plain tensor (torchao's Float8Tensor
    and Int8Tensor, quanto's int8): it can then be re-pointed at new leaves by setattr; None for
    nested subclasses (rebuilt every time)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or _plain(t):
        return None
    names, _ = t.__tensor_flatten__()
    return tuple(names) if all(_plain(getattr(t, n)) for n in names) else None


def _key(t: torch.Tensor):
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)


class _Leaves:
    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.index: dict = {}

    def add(self, t: torch.Tensor) -> int:
        k = _key(t)
        if k not in self.index:
            self.index[k] = len(self.tensors)
            self.tensors.append(t)
        return self.index[k]


def _bnb_refs(obj, leaves: _Leaves, out: list, seen: set, depth: int = 0) -> None:
    if depth > 3 or id(obj) in seen:
        return
    seen.add(id(obj))
    for name, v in list(vars(obj).items()):
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and type(v) is torch.Tensor:
            out.append(_Ref("attr", obj, name, (leaves.add(v),)))
        elif _is_bnb_obj(v):
            _bnb_refs(v, leaves, out, seen, depth + 1)


def _refs(block: nn.Module, leaves: _Leaves, onload: torch.device, recurse: bool = True) -> list[_Ref]:
    out: list[_Ref] = []
    seen: set = set()
    done: set = set()
    for m in (block.modules() if recurse else [block]):
        for registry, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(registry.items()):
                if t is None:
                    continue
                if _plain(t):
                    if id(t) not in done:  # a tensor registered twice moves once
                        done.add(id(t))
                        out.append(_Ref("data", t, name, (leaves.add(t.data),)))
                    if is_param:  # bitsandbytes: quant_state, CB, SCB on the parameter
                        _bnb_refs_param(t, leaves, out, seen)
                else:
                    # A tensor subclass may change form on the device (quanto fp8 -> Marlin layout,
                    # int4 -> TinyGemm on CUDA): the leaves are the inner tensors of its device form,
                    # made once here by the same .to() a resident block gets, so a streamed block
                    # computes with exactly what a resident one holds. At rest the module keeps the
                    # original host tensor.
                    form = t.to(onload) if onload.type != "cpu" else t
                    flat, rebuild = _flatten(form)
                    host_flat, host_rebuild = _flatten(t)
                    if _same_form(t, form, flat, host_flat):
                        # the usual case (torchao, quanto int8): the leaves are the host tensor's own
                        # inner tensors and at rest the module holds the tensor rebuilt around the
                        # (pinned) leaves, so a write at rest (LoRA merge) lands where the next copy
                        # reads, on the GPU as on the CPU
                        flat, rebuild, host_obj = host_flat, host_rebuild, None
                    else:
                        host_obj = t  # another layout on the device: see BlockStreamer.refresh_forms
                    out.append(_Ref("wrap", m, name, tuple(leaves.add(x) for x in flat), rebuild, is_param,
                                    bool(getattr(t, "requires_grad", False)), host_obj,
                                    inner=_inner_names(form)))
                    del form
        for name, v in list(vars(m).items()):  # Linear8bitLt.state (MatmulLtState: CB, SCB)
            if _is_bnb_obj(v):
                _bnb_refs(v, leaves, out, seen)
        _bnb_int8_state_refs(m, leaves, out)
    return out


def _bnb_int8_state_refs(m: nn.Module, leaves: _Leaves, out: list) -> None:
    """Linear8bitLt's first forward moves weight.CB/SCB into layer.state (init_8bit_state). In a
    streamed block those are the device copies: the state would keep them after the block is
    offloaded (device memory never freed, and a stale SCB that LoRA merge's dequantization reads
    at rest). So where the state has no CB/SCB yet, it gets the weight's: the same leaf, the same
    device copy while the block runs, the host copy again at rest."""
    st, w = vars(m).get("state"), m._parameters.get("weight")
    if w is None or not _is_bnb_obj(st):
        return
    for name in ("CB", "SCB"):
        wt = vars(w).get(name)
        if getattr(st, name, "absent") is None and isinstance(wt, torch.Tensor) and type(wt) is torch.Tensor:
            out.append(_Ref("attr", st, name, (leaves.add(wt),)))


def _same_form(host, form, flat, host_flat) -> bool:
    """The device form of a tensor subclass is the host one moved: same class, same inner tensors'
    shapes, dtypes, strides and values (quanto turns fp8 into Marlin and int4 into TinyGemm layouts
    on CUDA)."""
    if form is host:
        return True
    if type(form) is not type(host) or len(flat) != len(host_flat):
        return False
    if not all(a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() for a, b in zip(flat, host_flat)):
        return False
    # and the same values (a layout change that keeps shapes would show here): once, at set-up
    return all(torch.equal(a.to(b.device), b) for a, b in zip(flat, host_flat))


def _bnb_refs_param(p, leaves, out, seen):
    if id(p) in seen:
        return
    seen.add(id(p))
    for name, v in list(vars(p).items()):
        if isinstance(v, torch.Tensor) and type(v) is torch.Tensor:
            out.append(_Ref("attr", p, name, (leaves.add(v),)))
        elif _is_bnb_obj(v):
            _bnb_refs(v, leaves, out, seen)


# ---------------------------------------------------------------- pinned host memory
class _PinnedArena:
    """Pinned host chunks that leaves are packed into (CUDA only)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk, self.bufs, self.cur, self.off = chunk, [], None, 0
        self.bytes = 0

    @staticmethod
    def alloc(n: int) -> torch.Tensor:  # tests replace this (no pinned memory without CUDA)
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if not t.is_contiguous() or n == 0:
            return t.pin_memory()
        if n > self.chunk // 4:
            buf = self.alloc(n)
            self.bufs.append(buf)
            self.bytes += n
            view = buf
        else:
            if self.cur is None or self.off + n > self.cur.numel():
                self.cur, self.off = self.alloc(self.chunk), 0
                self.bufs.append(self.cur)
                self.bytes += self.chunk
            view = self.cur[self.off:self.off + n]
            self.off += (n + ALIGN - 1) // ALIGN * ALIGN
        out = view.view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


# ---------------------------------------------------------------- one streamed block
class _Unit:
    def __init__(self, index: int, module: nn.Module, onload=torch.device("cpu"), recurse: bool = True):
        self.index, self.module = index, module
        leaves = _Leaves()
        self.refs = _refs(module, leaves, torch.device(onload), recurse)
        self.host = leaves.tensors
        self.dev: list[torch.Tensor] | None = None
        self.ready = None     # CUDA event: the copies are done
        self.installed = False
        self.bytes = sum(t.numel() * t.element_size() for t in self.host)

    def rehome(self, make) -> None:
        """Replace every host leaf with make(leaf) (pinning, or back to pageable memory) and point
        the module at the new leaves."""
        self.host = [make(t) for t in self.host]
        for r in self.refs:
            r.dev_obj = None  # it may hold the old host leaves
        self._install(self.host, host=True)

    def _install(self, leaves, host: bool) -> None:
        for r in self.refs:
            if r.kind == "data":
                r.target.data = leaves[r.idx[0]]
            elif r.kind == "attr":
                setattr(r.target, r.name, leaves[r.idx[0]])
            else:
                if r.dev_obj is not None:
                    # Rebuilding a subclass and wrapping it as a Parameter took ~0.1 ms of host time
                    # per weight (torchao: ~0.5 ms a Flux block on this CPU, each streamed block
                    # each step); the device tensor made the first time is re-pointed at the new
                    # copies instead. At rest it points at the host leaves: no device memory kept.
                    for n, i in zip(r.inner, r.idx):
                        setattr(r.dev_obj, n, leaves[i])
                    if not host:
                        self._set(r, r.dev_obj)
                        continue
                if host and r.host_obj is not None:
                    obj = r.host_obj
                elif host and r.rest is not None and r.rest[0] is leaves:
                    obj = r.rest[1]  # the same object at every rest (offload.tensor_ids stays put)
                else:
                    obj = r.rebuild(iter([leaves[i] for i in r.idx]))
                    if r.param and not isinstance(obj, nn.Parameter):
                        obj = nn.Parameter(obj, requires_grad=r.requires_grad)
                    if host:
                        r.rest = (leaves, obj)
                    elif r.inner is not None:
                        obj = r.dev_obj = self._set(r, obj)
                        continue
                self._set(r, obj)

    @staticmethod
    def _set(r: _Ref, obj):
        if r.param:
            if not isinstance(obj, nn.Parameter):
                obj = nn.Parameter(obj, requires_grad=r.requires_grad)
            r.target._parameters[r.name] = obj
        else:
            r.target._buffers[r.name] = obj
        return obj


class BlockStreamer:
    """Streams `units` (blocks in forward order, some resident) for one root module."""
    # With the CPU as the onload device the "device copy" of a host leaf is the leaf itself unless
    # this is set (tests set it, with one CPU thread: multi-threaded CPU matmuls can round
    # differently on freshly allocated copies of the same weights).
    copy_on_cpu = False

    def __init__(self, blocks: list[nn.Module], streamed: tuple, onload, lookahead: int = 1, pin: bool = True,
                 own_only: bool = False):
        """own_only: the units are single modules that each move only their own tensors (leaf
        mode: every module owning tensors, children being units of their own); all streamed."""
        self.own_only = own_only
        self.onload = torch.device(onload)
        self.lookahead = max(1, int(lookahead))
        cuda = self.onload.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=self.onload) if cuda else None
        self.arena = _PinnedArena() if (cuda and pin) else None
        self.blocks = blocks
        self.units: dict[int, _Unit] = {}
        self.order: list[int] = []
        self._done: collections.deque = collections.deque()  # (event, bytes) of released units
        self._live = 0  # units holding device copies
        self._live_bytes = 0
        self._done_bytes = 0
        # Block mode: the in-flight room in bytes (the plan's inflight_bytes, lookahead + 1 of the
        # largest streamed block); copies run further ahead than lookahead while they fit it (the
        # single blocks of a plan sized for double ones). None: lookahead + 1 units (leaf mode).
        self.window: int | None = None
        # host_s: seconds of host time inside the hooks (begin/enter/leave/end), what a short
        # compiled step cannot hide; the benchmark reports it per step
        # (wait_s: the part of it spent waiting for the compute stream; copies: host-to-device copies)
        self.stats = {"prefetched": 0, "on_the_spot": 0, "waits": 0, "host_s": 0.0, "wait_s": 0.0, "copies": 0}
        self.root_index: int | None = None  # leaf mode: the root's own tensors, moved by the root's hook
        # block index -> the pinned leaves it had when it was last streamed, kept while it is
        # resident: demoted again, it copies its weights back into them instead of pinning more
        # (pinned bytes stay at one host copy per block whatever the sequence of budgets)
        self._parked: dict[int, list[torch.Tensor]] = {}
        self.set_streamed(streamed)

    # ----- residency
    def set_streamed(self, streamed: tuple) -> None:
        """Make exactly `streamed` (block indices) streamed; the others resident on the device.

        Device memory never exceeds the larger of the old and the new plan's: first every
        streamed block's device copies (prefetched, or left by a failed forward) are dropped,
        then the blocks leaving the device go to pinned memory (their device memory freed), and
        only then are the blocks joining the device copied in (into what was just freed: the
        caching allocator reuses it). Promoting first would hold old resident + new resident
        blocks at once (an H200 emulating a 16 GiB card ran out after a 12 GiB plan that way)."""
        self.sync()
        for u in self.units.values():
            if u.installed or u.dev is not None:
                self._release(u)
        self._done.clear()
        self._live = self._live_bytes = self._done_bytes = 0
        want = set(streamed)
        for i in sorted(want - set(self.units)):  # resident -> streamed (frees device memory)
            self._demote(i)
        for i in sorted(i for i in self.units if i not in want):  # streamed -> resident
            self._promote(i)
        for i, b in enumerate(self.blocks):  # a block moved only in part (an earlier failure) or never placed
            if i not in self.units:
                self._place(b)
        self.order = sorted(self.units)

    def _place(self, b: nn.Module) -> None:
        if self.own_only:
            b._apply(lambda t: t.to(self.onload), recurse=False)
        else:
            b.to(self.onload)

    def _demote(self, i: int) -> None:
        b = self.blocks[i]
        if self.own_only:
            b._apply(lambda t: t.to("cpu"), recurse=False)
        else:
            b.to("cpu")
        u = _Unit(i, b, self.onload, recurse=not self.own_only)
        parked = self._parked.pop(i, None)
        u.rehome(self._pin if parked is None else self._repin(parked))
        self.units[i] = u

    def _repin(self, parked: list[torch.Tensor]):
        """make() for a block demoted again: each leaf is copied into the pinned leaf of the same
        dtype, shape and stride it had before (in order), so its current values (a LoRA merge may
        have changed the resident weights in place) land in the old buffers; only a leaf without
        one (the block gained tensors meanwhile, e.g. LoRA slots) is pinned anew."""
        spare: dict = {}
        for h in parked:
            spare.setdefault(_layout(h), collections.deque()).append(h)

        def make(t: torch.Tensor) -> torch.Tensor:
            left = spare.get(_layout(t))
            if not left:
                return self._pin(t)
            h = left.popleft()
            if h is not t:
                with torch.no_grad():
                    h.copy_(t)
            return h

        return make

    def _promote(self, i: int) -> None:
        u = self.units[i]
        pinned = list(u.host)
        u.rehome(self._to_device)
        del self.units[i]  # only once it is all on the device (an OOM half way leaves it streamed)
        if self.arena is not None:
            self._parked[i] = pinned  # its pinned leaves wait for the block's next demotion
        self._place(u.module)  # tensor subclasses whose device form differs: the module's own .to()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.onload and self.onload.type == "cpu" and self.copy_on_cpu:
            return torch.empty_like(t).copy_(t)  # tests: a fresh "device" tensor, as on the GPU
        return t.to(self.onload)

    def refresh_forms(self) -> int:
        """Tensor subclasses whose device form differs from the host one (quanto fp8 -> Marlin,
        int4 -> TinyGemm on CUDA) stream pinned leaves of the device form, made from the host
        tensor the module holds at rest: after a write into that host tensor (a LoRA merge) the
        leaves are made again from it. Returns how many tensors were refreshed."""
        self.sync()
        n = 0
        for u in self.units.values():
            for r in u.refs:
                if r.kind != "wrap" or r.host_obj is None:
                    continue
                form = r.host_obj.to(self.onload) if self.onload.type != "cpu" else r.host_obj
                flat, _ = _flatten(form)
                with torch.no_grad():
                    for i, x in zip(r.idx, flat):
                        if u.host[i] is not x:
                            u.host[i].copy_(x)
                n += 1
                del form, flat
        return n

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            t = t.cpu()
        if self.arena is not None:
            return self.arena.place(t)
        return t

    @property
    def pinned_bytes(self) -> int:
        return self.arena.bytes if self.arena is not None else 0

    # ----- moving
    def _full(self, need: int) -> bool:
        """Would one more copy of `need` bytes overrun the room, counting the released units whose
        memory the compute stream may still be using?"""
        if self.window is None:
            return self._live + len(self._done) >= self.lookahead + 1
        return self._live_bytes + self._done_bytes + need > self.window

    def _prefetch(self, u: _Unit) -> None:
        if u.dev is not None:
            return
        while self._done and self._full(u.bytes):
            ev, nbytes = self._done.popleft()
            self._done_bytes -= nbytes
            if ev is not None:
                t0 = time.perf_counter()
                ev.synchronize()
                self.stats["wait_s"] += time.perf_counter() - t0
                self.stats["waits"] += 1
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            dev = []
            same = self.onload.type == "cpu" and not self.copy_on_cpu
            for h in u.host:
                if same and h.device.type == "cpu":
                    dev.append(h)
                    continue
                d = torch.empty_like(h, device=self.onload)
                d.copy_(h, non_blocking=self.stream is not None)
                dev.append(d)
                self.stats["copies"] += 1
            u.dev = dev
            self._live += 1
            self._live_bytes += u.bytes
            if self.stream is not None:
                u.ready = torch.cuda.Event()
                u.ready.record(self.stream)

    def _install(self, u: _Unit) -> None:
        if u.dev is None:
            self.stats["on_the_spot"] += 1
            self._prefetch(u)
        else:
            self.stats["prefetched"] += 1
        if self.stream is not None:
            cur = torch.cuda.current_stream(self.onload)
            if u.ready is not None:
                cur.wait_event(u.ready)
            for d in u.dev:
                d.record_stream(cur)
        u._install(u.dev, host=False)
        u.installed = True

    def _release(self, u: _Unit) -> None:
        if u.installed:
            u._install(u.host, host=True)
            u.installed = False
        held = u.dev is not None
        if held:
            self._live -= 1
            self._live_bytes -= u.bytes
        u.dev, u.ready = None, None
        ev = None
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.onload))
        self._done.append((ev, u.bytes if held else 0))
        self._done_bytes += u.bytes if held else 0
        if self.stream is None:
            while len(self._done) > self.lookahead + 1:
                self._done_bytes -= self._done.popleft()[1]

    def _next_streamed(self, after: int, k: int) -> list[_Unit]:
        at = bisect.bisect_right(self.order, after)
        return [self.units[i] for i in self.order[at:at + k]]

    def _prefetch_ahead(self, after: int) -> None:
        """Copy in the next `lookahead` streamed units after block `after`; with a byte window, then
        the ones after them, in order, while their copies fit beside the units holding copies now."""
        ahead = self._next_streamed(after, self.lookahead if self.window is None else len(self.order))
        for n, u in enumerate(ahead):
            if u.dev is None and n >= self.lookahead and self._live_bytes + u.bytes > self.window:
                break  # copies stay in order: the next one waits for room
            self._prefetch(u)

    # ----- hook entry points
    def begin(self) -> None:
        """A forward starts: nothing of a previous (maybe failed) forward stays on the device; the
        side stream starts after whatever the compute stream did so far (e.g. LoRA writes into the
        host copies); the first streamed blocks are prefetched."""
        for u in self.units.values():
            if u.installed or u.dev is not None:
                self._release(u)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.onload))
        self._prefetch_ahead(-1)
        if self.root_index is not None:
            self.enter(self.root_index)

    def enter(self, index: int) -> None:
        u = self.units.get(index)
        if u is None:
            return
        self._install(u)
        self._prefetch_ahead(index)

    def leave(self, index: int) -> None:
        u = self.units.get(index)
        if u is not None:
            self._release(u)

    def end(self) -> None:
        if self.root_index is not None:
            self.leave(self.root_index)

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.current_stream(self.onload).synchronize()
        self._done.clear()
        self._done_bytes = 0

    def to_pageable(self, release: bool = True) -> None:
        """Every streamed block back into ordinary host memory; the pinned arena is given up (and
        with release, torch's cache of pinned blocks goes back to the OS)."""
        self.sync()
        for u in self.units.values():
            if u.installed or u.dev is not None:
                self._release(u)
            u.rehome(_pageable)
        self._done.clear()
        self._parked.clear()
        if self.arena is not None:
            self.arena.bufs.clear()
            self.arena.cur = None
            empty = getattr(torch._C, "_host_emptyCache", None)
            if release and empty is not None:
                empty()


def _layout(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), tuple(t.stride())


def _pageable(t: torch.Tensor) -> torch.Tensor:
    if not _pinned(t):
        return t
    if t.is_contiguous():
        return torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)


def _pinned(t: torch.Tensor) -> bool:
    try:
        return t.device.type == "cpu" and t.is_pinned()
    except RuntimeError:
        return False


@functools.cache
def _stream_hook_class():
    """The streamer's diffusers ModelHook, one per block (and one on the root: begin/end of a
    forward). Made on first use, not at module import (diffusers is heavy), and once: every block's
    hook is one class (compiled blocks share their guards). Also reachable as `_StreamHook`."""
    from diffusers.hooks import ModelHook

    class _StreamHook(ModelHook):
        _is_stateful = False

        def __init__(self, streamer: BlockStreamer, index: int | None):
            super().__init__()
            self.streamer, self.index = streamer, index

        @torch.compiler.disable()
        def pre_forward(self, module, *args, **kwargs):
            t0 = time.perf_counter()
            if self.index is None:
                self.streamer.begin()
            else:
                self.streamer.enter(self.index)
            self.streamer.stats["host_s"] += time.perf_counter() - t0
            return args, kwargs

        @torch.compiler.disable()
        def post_forward(self, module, output):
            t0 = time.perf_counter()
            if self.index is None:
                self.streamer.end()
            else:
                self.streamer.leave(self.index)
            self.streamer.stats["host_s"] += time.perf_counter() - t0
            return output

    return _StreamHook


def __getattr__(name: str):
    if name == "_StreamHook":  # the hook class, made on first use (diffusers is imported then)
        return _stream_hook_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ROOT_HOOK = "quantlora_stream_root"


def install_hooks(root: nn.Module, blocks: list[nn.Module], streamer: BlockStreamer) -> None:
    from diffusers.hooks import HookRegistry

    hook = _stream_hook_class()
    HookRegistry.check_if_exists_or_initialize(root).register_hook(hook(streamer, None), ROOT_HOOK)
    for i, b in enumerate(blocks):
        if b is root:  # one hook per module: the root's own tensors go in with begin(), out with end()
            streamer.root_index = i
            continue
        if getattr(b, "_compiled_call_impl", None) is not None:
            _wrap_compiled_call(b, streamer, i)
            continue
        HookRegistry.check_if_exists_or_initialize(b).register_hook(hook(streamer, i), HOOK)


def _wrap_compiled_call(block: nn.Module, streamer: BlockStreamer, index: int) -> None:
    """A block compiled in place (nn.Module.compile: its __call__ runs _compiled_call_impl) gets the
    streaming around that call, not a diffusers hook on its forward: a hook replaces the forward the
    compiled code traced, so dynamo compiled a second graph per block kind, whose kernels once
    rounded differently from the first (H200, BENCHMARKS.md issue 13), and took seconds on the first
    offloaded step. Around the call, the compiled code and its graphs stay the same."""
    inner = block._compiled_call_impl

    def streamed_call(*args, **kwargs):
        t0 = time.perf_counter()
        streamer.enter(index)
        streamer.stats["host_s"] += time.perf_counter() - t0
        out = inner(*args, **kwargs)
        t0 = time.perf_counter()
        streamer.leave(index)
        streamer.stats["host_s"] += time.perf_counter() - t0
        return out

    streamed_call.quantlora_inner = inner
    block._compiled_call_impl = streamed_call


def remove_compiled_wrappers(root: nn.Module) -> int:
    """Undo _wrap_compiled_call everywhere under root. Returns how many."""
    n = 0
    for m in root.modules():
        call = m.__dict__.get("_compiled_call_impl")
        inner = getattr(call, "quantlora_inner", None)
        if inner is not None:
            m._compiled_call_impl = inner
            n += 1
    return n


# ---------------------------------------------------------------- what sampling needs, what it will cost
def flux_tokens(latent_shape, patch: int = 2, txt_tokens: int = 512) -> tuple[int, int]:
    """(image tokens, text tokens) of a Flux forward on a latent of shape (B, C, H, W)."""
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    return math.ceil(h / patch) * math.ceil(w / patch), txt_tokens


def flux_activation_bytes(tokens: int, hidden: int, batch: int, act_bytes: int = 2) -> int:
    """Peak activation memory of one Flux forward beyond its weights: about 24 values of
    `act_bytes` per token and hidden unit (a single block's linear1 output, GELU, q/k/v with rope,
    the concat, residual and output; FLUX.1-dev at 1024x1024, batch 1, measured 0.47 GiB on an
    H200, this gives 0.63 GiB). ComfyUI's minimum inference memory comes on top (the caller)."""
    return int(batch * tokens * hidden * act_bytes * 24)


def linear_params(module: nn.Module) -> int:
    n = 0
    for m in module.modules():  # the modules owning the weight (a LoRA wrapper's base, not the wrapper too)
        i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if isinstance(i, int) and isinstance(o, int) and m._parameters.get("weight") is not None:
            n += i * o
    return n


def fp8_compute_params(module: nn.Module) -> int:
    """Of linear_params, those whose GEMM runs in fp8: torchao Float8Tensor weights that quantize
    their activations too (the loader's torchao fp8 dynamic). FP8LayerwiseCast and fp8 storage
    compute in bf16 and do not count."""
    n = 0
    for m in module.modules():
        i, o = getattr(m, "in_features", None), getattr(m, "out_features", None)
        w = m._parameters.get("weight")
        if isinstance(i, int) and isinstance(o, int) and type(w).__name__ == "Float8Tensor" \
                and getattr(w, "act_quant_kwargs", None) is not None:
            n += i * o
    return n


def resident_step_seconds(n_linear_params: int, tokens: int, hidden: int, n_blocks: int, batch: int,
                          flops_per_s: float, fp8_params: int = 0, fp8_flops_per_s: float | None = None) -> float:
    """A forward's time with everything resident, from its FLOPs (linears over every token, plus
    attention) at a measured matmul rate; fp8_params of the linears at the measured fp8 rate when
    given (torchao fp8 dynamic with compiled blocks ran 0.71x the bf16 step on an H200, which the
    bf16 rate alone predicted as 1.0x: the planner then ranked plans against the wrong step)."""
    rate = max(flops_per_s, 1.0)
    fp8 = min(max(fp8_params, 0), n_linear_params) if fp8_flops_per_s else 0
    linear = 2 * tokens * ((n_linear_params - fp8) / rate + (fp8 / fp8_flops_per_s if fp8 else 0.0))
    attention = 4 * tokens * tokens * hidden * n_blocks / rate
    return batch * (linear + attention)


def predicted_ratio(streamed_bytes: int, bandwidth: float, resident_s: float) -> float:
    """The transfer floor: a step cannot take less than its copies or its compute."""
    if resident_s <= 0:
        return float("nan")
    return max(1.0, streamed_bytes / max(bandwidth, 1.0) / resident_s)


_MEASURED: dict = {}


def pinned_bandwidth(device, nbytes: int = 256 << 20, repeats: int = 4) -> float | None:
    """Pinned host-to-device copy rate (bytes/s), measured once per device. None without CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    key = ("bw", str(dev))
    if key not in _MEASURED:
        h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        d.copy_(h, non_blocking=True)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            d.copy_(h, non_blocking=True)
        torch.cuda.synchronize(dev)
        _MEASURED[key] = nbytes * repeats / (time.perf_counter() - t0)
        del h, d
    return _MEASURED[key]


def fp8_matmul_rate(device, n: int = 4096, repeats: int = 5) -> float | None:
    """Row-scaled e4m3 GEMM FLOP/s (torch._scaled_mm, what torchao's fp8 dynamic linears run),
    measured once. None without CUDA or where the device has no fp8 GEMM."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    key = ("fp8mm", str(dev))
    if key not in _MEASURED:
        try:
            a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
            sa = torch.ones(n, 1, device=dev)
            sb = torch.ones(1, n, device=dev)

            def mm():
                return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

            mm()
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                mm()
            torch.cuda.synchronize(dev)
            _MEASURED[key] = 2 * n ** 3 * repeats / (time.perf_counter() - t0)
        except Exception as e:  # no fp8 GEMM on this device (pre-Ada) or in this torch build
            log.debug("no fp8 matmul rate: %s", e)
            _MEASURED[key] = None
    return _MEASURED[key]


def matmul_rate(device, dtype=torch.bfloat16, n: int = 4096, repeats: int = 5) -> float | None:
    """Dense matmul FLOP/s on the device, measured once. None without CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    key = ("mm", str(dev), dtype)
    if key not in _MEASURED:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize(dev)
        _MEASURED[key] = 2 * n ** 3 * repeats / (time.perf_counter() - t0)
        del a, b
    return _MEASURED[key]
