"""Host copies of tensors in page-locked memory of exactly the size they need.

torch's pinned allocator (`pin_memory=True`, `.pin_memory()`) rounds every block up to a power of
two: a 151 MB layer takes 256 MB, and a pristine copy of FLUX.1's bf16 blocks (22 GiB) could take up
to twice that in locked RAM. Here one pageable buffer holds a whole batch of copies back to back and
is page-locked in place with cudaHostRegister (what torch's own tests use); the copies are views of
it, so host-to-device copies from them run asynchronously at full bandwidth. Where registering
fails (no CUDA, a driver limit), the buffer stays pageable and the copies still work, synchronously.
No ComfyUI import.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
import weakref

import torch

log = logging.getLogger("quantlora")
_ALIGN = 256
_HUGE_MIN = 64 << 20
_FAST = os.environ.get("QUANTLORA_PIN_METHOD", "fast") != "plain"  # plain: torch.empty, registered as it is


class HostArena:
    """Owns page-locked buffers; unregisters them when the arena goes away."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []
        self._registered: list[int] = []
        self.nbytes = 0
        self.locked = 0
        self.last_lock: dict | None = None
        weakref.finalize(self, _unregister, self._registered)

    def copies(self, tensors: list[torch.Tensor], lock: bool) -> list[torch.Tensor]:
        """Host copies of `tensors` (same shapes and dtypes), in one new buffer, filled now."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        t0 = time.perf_counter()
        buf, keep = _allocate(total, lock)
        t1 = time.perf_counter()
        if lock and total and _register(buf):
            self._registered.append(buf.data_ptr())
            self.locked += total
        self.last_lock = dict(gib=round(total / 2**30, 3), method="huge" if keep is not None else "plain",
                              alloc_touch_s=round(t1 - t0, 3), register_s=round(time.perf_counter() - t1, 3))
        self._buffers.append(buf)
        if keep is not None:
            self._buffers.append(keep)  # the mapping outlives the tensor view (unregistered first)
        self.nbytes += total
        out = []
        for t, off, n in zip(tensors, offsets, sizes):
            view = buf[off:off + n].view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
            view.copy_(t)
            out.append(view)
        return out


def _allocate(total: int, lock: bool):
    """A host buffer of `total` bytes, and the mapping behind it (None: torch's allocator).
    To be locked: an anonymous mapping asking for 2 MiB pages, its pages faulted in by torch's
    threaded fill. cudaHostRegister faults untouched pages in one thread, 4 KiB at a time: that,
    not the locking, made the first merge's 8 GiB copy take ~4 s (bench/pin_probe.py)."""
    if not (lock and total >= _HUGE_MIN and _FAST and hasattr(mmap, "MAP_ANONYMOUS")):
        return torch.empty(max(total, 1), dtype=torch.uint8), None
    try:
        mapping = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(mapping, dtype=torch.uint8)
        buf.zero_()
        return buf, mapping
    except (OSError, ValueError) as e:  # no such mapping here: torch's allocator
        log.debug("QuantLoRA: anonymous mapping of %d bytes failed (%s)", total, e)
        return torch.empty(max(total, 1), dtype=torch.uint8), None


def _register(buf: torch.Tensor) -> bool:
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        ok = int(getattr(err, "value", err)) == 0
    except Exception as e:  # no CUDA runtime: pageable copies
        log.debug("QuantLoRA: cudaHostRegister unavailable (%s); host copies stay pageable", e)
        return False
    if not ok:
        log.warning("QuantLoRA: could not page-lock %.2f GiB of host memory (%s); host copies stay pageable "
                    "(slower swaps)", buf.numel() / 2**30, err)
    return ok


def _unregister(ptrs: list[int]) -> None:
    try:
        cudart = torch.cuda.cudart()
        for p in ptrs:
            cudart.cudaHostUnregister(p)
    except Exception:
        pass
