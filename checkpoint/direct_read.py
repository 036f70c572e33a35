"""Checkpoint tensors read with pread into page-locked staging buffers, then copied to the GPU
asynchronously: what the loader does with the transformer blocks' weights it quantizes on the GPU.

ComfyUI's loading walks a memory-mapped state dict; a weight moved to the GPU from the mapping is
read by page faults, 4 KiB at a time on one thread (1.6 GB/s on this CI machine against 5-6 GB/s
for pread of the same bytes from the page cache), and then staged again by the CUDA driver because
the mapping is not page-locked. FLUX.1's 22 GB took ~7 s to load on an H200 host that way, a third
of a ComfyUI restart to the first step. Here each weight is read by a few threads straight into one
of two pinned buffers and copied to the GPU from there while the next one is read.

The state dict keeps the mapped tensors (ComfyUI reads their shapes to detect the model and may
convert some); a weight is read directly only when it is one of those tensors, untouched (same
address, size and dtype as its file entry). Anything else takes the ordinary `.to()`. Plain torch.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import QuantLoRAError
from .safetensors_io import _DTYPES, SafetensorsHeader

CHUNK = 16 << 20  # bytes one thread reads at a time
THREADS = 8  # readers per weight (H200 restart: 8 read in 1.3-1.4 s what 4 read in 1.8-2.0 s); QUANTLORA_READ_THREADS overrides


def read_threads() -> int:
    """The reader threads a load uses: $QUANTLORA_READ_THREADS (1-64) or THREADS."""
    raw = os.environ.get("QUANTLORA_READ_THREADS", "")
    try:
        n = int(raw) if raw else THREADS
    except ValueError:
        n = THREADS
    return min(max(n, 1), 64)


class DirectReader:
    # With a CPU as the device nothing is page-locked or copied asynchronously; tests set this to
    # run the same reads into ordinary memory.
    on_cpu = False

    def __init__(self, headers: list[SafetensorsHeader], threads: int | None = None):
        self.threads = max(1, threads if threads is not None else read_threads())
        self._entries: dict[int, tuple] = {}
        self._files: dict[str, int] = {}
        self._headers = headers
        self._staging: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0
        self._pool: ThreadPoolExecutor | None = None
        # read_s: host time in pread; wait_s: host time waiting for a staging buffer's last copy
        self.stats = {"direct": 0, "direct_bytes": 0, "fallback": 0, "read_s": 0.0, "wait_s": 0.0}

    def register(self, path: str, key: str, t: torch.Tensor) -> None:
        """t: the mapped tensor the state dict holds for `key` of file `path`."""
        h = next(h for h in self._headers if h.path == path)
        info = h.tensors.get(key)
        if info is None or info.start < 0 or t.numel() == 0:
            return
        self._entries[t.data_ptr()] = (path, h.data_start + info.start, info.end - info.start,
                                       _DTYPES.get(info.dtype), tuple(info.shape))

    def _entry(self, t: torch.Tensor):
        e = self._entries.get(t.data_ptr()) if t.device.type == "cpu" and t.numel() else None
        if e is None:
            return None
        _, _, nbytes, dtype, shape = e
        ok = t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous() and t.numel() * t.element_size() == nbytes
        return e if ok else None

    def to(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """t.to(device, dtype), reading t's bytes from its file when it is a registered weight."""
        device = torch.device(device)
        e = self._entry(t)
        cuda = device.type == "cuda" and torch.cuda.is_available()
        if e is None or not (cuda or (device.type == "cpu" and self.on_cpu)) or not hasattr(os, "preadv"):
            self.stats["fallback"] += 1
            return t.to(device=device, dtype=dtype)
        path, offset, nbytes, file_dtype, shape = e
        t0 = time.perf_counter()
        buf = self._stage(nbytes, cuda)
        t1 = time.perf_counter()
        self._read(path, offset, nbytes, buf)
        self.stats["wait_s"] += t1 - t0
        self.stats["read_s"] += time.perf_counter() - t1
        out = torch.empty(shape, dtype=file_dtype, device=device)
        out.view(-1).view(torch.uint8).copy_(buf[:nbytes], non_blocking=cuda)
        if cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            self._events[self._turn] = ev
        self.stats["direct"] += 1
        self.stats["direct_bytes"] += nbytes
        return out if out.dtype == dtype else out.to(dtype)

    def _stage(self, nbytes: int, cuda: bool) -> torch.Tensor:
        """One of two staging buffers, alternately: the one whose last copy has finished."""
        if not self._staging:
            self._staging, self._events = [None, None], [None, None]
        self._turn ^= 1
        ev = self._events[self._turn]
        if ev is not None:
            ev.synchronize()  # its previous copy to the GPU has been read out
            self._events[self._turn] = None
        buf = self._staging[self._turn]
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, 64 << 20)
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
            self._staging[self._turn] = buf
        return buf

    def _fd(self, path: str) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def _read(self, path: str, offset: int, nbytes: int, buf: torch.Tensor) -> None:
        fd = self._fd(path)
        view = memoryview(buf.numpy())

        def part(lo: int) -> int:
            hi = min(lo + CHUNK, nbytes)
            got = 0
            while lo + got < hi:
                n = os.preadv(fd, [view[lo + got:hi]], offset + lo + got)
                if n <= 0:
                    return -1
                got += n
            return got

        starts = range(0, nbytes, CHUNK)
        if len(starts) == 1 or self.threads == 1:
            results = [part(lo) for lo in starts]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="quantlora-read")
            results = list(self._pool.map(part, starts))
        if any(r < 0 for r in results):
            raise QuantLoRAError(f"{os.path.basename(path)}: ended early while reading a weight at byte {offset}; "
                                 "the file changed or is truncated. Re-download it.")

    def close(self) -> None:
        for ev in self._events:
            if ev is not None:
                ev.synchronize()
        pinned = any(b is not None and b.is_pinned() for b in self._staging)
        self._staging, self._events = [], []
        if pinned:  # the staging buffers go back to the OS, not to torch's cache of pinned blocks
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._files.clear()
        self._entries.clear()
