"""A file's bytes as page-locked host memory without a copy: its page-cache pages, registered.

The weight cache (quant/weight_cache.py) holds the quantized layers exactly as they go to the GPU.
Read with pread, a restart copied its 11 GiB twice on the host (page cache -> staging buffer -> GPU),
and the first LoRA merge then copied 8 GiB back from the GPU into a newly locked buffer for its
pristine copy (0.6-0.7 s of an H200 restart, BENCHMARKS.md issue 12). Mapped read-only and registered
with the CUDA driver (cudaHostRegister, read-only flag), the page-cache pages are themselves the
source of the GPU copies and the pristine copy of every cached layer: no host copy, no capture.

Registered in pieces, front to back, by background threads (the driver call drops the interpreter
lock), so the load's first copies wait for one piece only; the cache file is written in the load's
own order, each layer starting on a 64 KiB boundary, so each layer is one piece and no copy or view
ever spans two registrations. Where registering fails (a driver or file system that refuses), `copy_to` says so and the
caller reads the file as before. The pages stay locked until `unlock()` (or this object goes).
No ComfyUI import.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger("quantlora")
PIECE = 256 << 20  # bytes registered per driver call: the load's first copy waits for one
THREADS = 2
_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads (a read-only mapping can be locked)


def enabled() -> bool:
    """QUANTLORA_MAP_CACHE=0: the weight cache is read with pread as before (and a merge's pristine
    copy is taken from the GPU)."""
    return os.environ.get("QUANTLORA_MAP_CACHE", "1") != "0" and hasattr(mmap, "ACCESS_READ")


class PinnedFile:
    """`path` mapped read-only; with lock=True its pages are registered with CUDA in the background."""

    def __init__(self, path: str, lock: bool, bounds: list[tuple[int, int]] | None = None, threads: int = THREADS):
        """bounds: the pieces, (start, end) byte ranges in order, page-aligned starts, disjoint (default:
        PIECE-sized pieces over the whole file)."""
        self.path = path
        self.size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # from the disk: the kernel reads ahead while pieces lock
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: nothing here ever writes to it
            self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        if bounds is None:
            bounds = [(lo, min(lo + PIECE, self.size)) for lo in range(0, self.size, PIECE)]
        if any(lo % mmap.PAGESIZE or hi <= lo or hi > self.size for lo, hi in bounds) or \
                any(a[1] > b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{path}: pieces must be page-aligned, ordered and disjoint")
        self.bounds = list(bounds)
        self._starts = [lo for lo, _ in self.bounds]
        self._ok = [not lock] * len(self.bounds)
        self._done = [threading.Event() for _ in self.bounds]
        self._registered: list[int] = []
        self.failed: str | None = None
        self.locked = False
        self.stats = {"register_s": 0.0, "wait_s": 0.0, "copies": 0, "copy_bytes": 0, "refused": 0}
        weakref.finalize(self, _unregister, self._registered)
        self._pool = None
        if not lock:
            for ev in self._done:
                ev.set()
            return
        self.locked = True
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="quantlora-pin")
        base = self.bytes.data_ptr()
        for i, (lo, hi) in enumerate(self.bounds):
            self._pool.submit(self._register, i, base + lo, hi - lo)

    def _register(self, i: int, ptr: int, n: int) -> None:
        t0 = time.perf_counter()
        try:
            if self.failed is None:
                err = torch.cuda.cudart().cudaHostRegister(ptr, n, _READ_ONLY)
                code = int(getattr(err, "value", err))
                if code == 0:
                    self._registered.append(ptr)
                    self._ok[i] = True
                else:
                    self.failed = f"cudaHostRegister returned {err}"
        except Exception as e:  # no CUDA runtime here: the caller reads the file instead
            self.failed = f"{type(e).__name__}: {e}"[:200]
        finally:
            self.stats["register_s"] += time.perf_counter() - t0
            self._done[i].set()

    def _pieces(self, offset: int, nbytes: int) -> range | None:
        """The pieces covering [offset, offset + nbytes), or None where a byte of it is in none."""
        first = bisect.bisect_right(self._starts, offset) - 1
        if first < 0:
            return None
        at, end = offset, offset + nbytes
        for i in range(first, len(self.bounds)):
            lo, hi = self.bounds[i]
            if lo > at or hi <= at:
                return None  # a gap between pieces
            if hi >= end:
                return range(first, i + 1)
            at = hi
        return None

    def ready(self, offset: int, nbytes: int) -> bool:
        """Waits until the pieces holding [offset, offset + nbytes) are locked; False if one could not be."""
        pieces = self._pieces(offset, nbytes) if nbytes > 0 else None
        if pieces is None:
            return False
        t0 = time.perf_counter()
        for i in pieces:
            self._done[i].wait()
        self.stats["wait_s"] += time.perf_counter() - t0
        if not all(self._ok[i] for i in pieces):
            self.stats["refused"] += 1
            return False
        return True

    def copy_to(self, dst: torch.Tensor, offset: int) -> bool:
        """Queues the copy of the file's bytes at `offset` into `dst` (a flat uint8 tensor), one copy per
        locked piece (a copy never spans two registrations). False, nothing queued, where a piece is
        not locked: the caller reads the bytes its own way."""
        n = dst.numel()
        if not self.ready(offset, n):
            return False
        for i in self._pieces(offset, n):
            lo, hi = max(self.bounds[i][0], offset), min(self.bounds[i][1], offset + n)
            dst[lo - offset:hi - offset].copy_(self.bytes[lo:hi], non_blocking=dst.is_cuda)
        self.stats["copies"] += 1
        self.stats["copy_bytes"] += n
        return True

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor | None:
        """The file's bytes at `offset` as a host tensor (no copy), or None where they cannot be one
        (not locked, misaligned for the dtype)."""
        if not self.ready(offset, nbytes) or len(self._pieces(offset, nbytes)) > 1 and self.locked:
            return None  # a copy from a view spanning two registrations is not one DMA: take it the old way
        try:
            return self.bytes[offset:offset + nbytes].view(dtype).view(shape)
        except RuntimeError:
            return None

    def locked_bytes(self) -> int:
        return sum(hi - lo for (lo, hi), ok in zip(self.bounds, self._ok) if ok) if self.locked else 0

    def unlock(self) -> None:
        """Unregisters the pages (after the GPU has finished its copies from them). Views stay valid,
        as ordinary (pageable) memory."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._registered and torch.cuda.is_available():
            torch.cuda.synchronize()
        _unregister(self._registered)
        self._ok = [False] * len(self.bounds) if self.locked else self._ok

    def describe(self) -> dict:
        return dict(gib=round(self.size / 2**30, 3), pieces=len(self.bounds), locked_gib=round(self.locked_bytes() / 2**30, 3),
                    failed=self.failed, **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.stats.items()})


def _unregister(ptrs: list[int]) -> None:
    try:
        cudart = torch.cuda.cudart()
        while ptrs:
            cudart.cudaHostUnregister(ptrs.pop())
    except Exception:
        pass


ATTR = "_quantlora_file_copy"  # on a loaded model: its FileCopy, read by lora/merge.py


class FileCopy:
    """The host copy a model's cached layers came from: layer name -> its storage tensors' bytes in the
    mapped cache file (quant/loader.py `file_views`), and the PinnedFile holding them. LoRA merge mode
    takes these as its pristine copy instead of copying the layers back from the GPU."""

    def __init__(self, pinned: PinnedFile, views: dict[str, list[torch.Tensor]]):
        self.pinned, self.views = pinned, views

    def views_for(self, name: str, like: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """`name`'s views if they match its storage tensors now (count, shapes, dtypes) and are still
        locked (or no lock was asked for: a CPU model), else None."""
        views = self.views.get(name)
        if views is None or len(views) != len(like) or (self.pinned.locked and not self.pinned.locked_bytes()):
            return None
        if any(v.shape != t.shape or v.dtype != t.dtype for v, t in zip(views, like)):
            return None
        return views

    def release(self) -> None:
        """The pages unlocked (nothing will take them as a pristine copy): the OS may reclaim them."""
        self.views = {}
        self.pinned.unlock()


def attach(model, copy: FileCopy | None) -> None:
    if copy is not None and copy.views:
        setattr(model, ATTR, copy)
    elif copy is not None:
        copy.release()


def of(model) -> FileCopy | None:
    return getattr(model, ATTR, None)


def release(model) -> None:
    """Unlocks and forgets the model's file copy (no merge will use it)."""
    copy = getattr(model, ATTR, None)
    if copy is not None:
        copy.release()
        delattr(model, ATTR)
