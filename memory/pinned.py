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
import weakref

import torch

log = logging.getLogger("quantlora")
_ALIGN = 256


class HostArena:
    """Owns page-locked buffers; unregisters them when the arena goes away."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []
        self._registered: list[int] = []
        self.nbytes = 0
        self.locked = 0
        weakref.finalize(self, _unregister, self._registered)

    def copies(self, tensors: list[torch.Tensor], lock: bool) -> list[torch.Tensor]:
        """Host copies of `tensors` (same shapes and dtypes), in one new buffer, filled now."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        buf = torch.empty(max(total, 1), dtype=torch.uint8)
        if lock and total and _register(buf):
            self._registered.append(buf.data_ptr())
            self.locked += total
        self._buffers.append(buf)
        self.nbytes += total
        out = []
        for t, off, n in zip(tensors, offsets, sizes):
            view = buf[off:off + n].view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
            view.copy_(t)
            out.append(view)
        return out


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
