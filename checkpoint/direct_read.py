"""Checkpoint tensors read with pread into page-locked staging buffers, then copied to the GPU
asynchronously: what the loader does with the transformer blocks' weights it quantizes on the GPU.

ComfyUI's loading walks a memory-mapped state dict; a weight moved to the GPU from the mapping is
read by page faults, 4 KiB at a time on one thread (1.6 GB/s on this CI machine against 5-6 GB/s
for pread of the same bytes from the page cache), and then staged again by the CUDA driver because
the mapping is not page-locked. FLUX.1's 22 GB took ~7 s to load on an H200 host that way, a third
of a ComfyUI restart to the first step. Here each weight is read by a few threads straight into one
of two pinned buffers and copied to the GPU from there while the next one is read.

Read-ahead: ComfyUI visits the layers in its modules' order, which is not the file's (sorted by name:
block 10 before block 2), so the reader learns the order as it goes: which weight of a block follows
which, and which starts the next block. From the second block on, as soon as a weight's copy is queued
the next one is read into the other buffer in the background, while the caller quantizes the last one
(on an H200 the load's reads, 1.4 s, and its copy and quantization, 1.0-1.4 s, ran one after another). A
wrong guess costs one read; the bytes used are always those of the weight asked for.

The state dict keeps the mapped tensors (ComfyUI reads their shapes to detect the model and may
convert some); a weight is read directly only when it is one of those tensors, untouched (same
address, size and dtype as its file entry). Anything else takes the ordinary `.to()`. Plain torch.
"""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import QuantLoRAError
from .safetensors_io import _DTYPES, SafetensorsHeader

# bytes one thread reads at a time (QUANTLORA_READ_CHUNK_MIB overrides): a FLUX weight is 19-132 MB, and
# pieces of 16 MiB kept only 2-8 of the 8 readers busy (H200 restart: the loader 2.9 -> 2.6 s with 4 MiB)
CHUNK = 4 << 20


def read_chunk() -> int:
    """Bytes one reader thread reads at a time: $QUANTLORA_READ_CHUNK_MIB (1-256) or CHUNK."""
    try:
        mib = int(os.environ.get("QUANTLORA_READ_CHUNK_MIB", "") or 0)
    except ValueError:
        mib = 0
    return min(max(mib, 1), 256) << 20 if mib else CHUNK
_INDEXED = re.compile(r"^(.*?)(\d+)\.(.+)$")  # "double_blocks." 5 "img_attn.qkv.weight"
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
        self.chunk = read_chunk()
        self._entries: dict[int, tuple] = {}
        self._files: dict[str, int] = {}
        self._headers = list(headers)  # add_file must not add the cache file to the checkpoint's own list (the state dict ComfyUI gets)
        self._staging: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0
        self._pool: ThreadPoolExecutor | None = None
        self._keys: dict[str, tuple] = {}  # file key -> entry, for the read-ahead
        self._mapped: dict[str, object] = {}  # path -> PinnedFile (add_file)
        self._largest = 0
        self._after: dict[tuple, tuple] = {}  # (group, suffix) -> (0: same block / 1: next block, suffix)
        self._last: tuple | None = None
        self._ahead = None  # (key, staging index, future) of the read running in the background
        self._ahead_pool: ThreadPoolExecutor | None = None
        # read_s: host time in pread; wait_s: host time waiting for a staging buffer's last copy;
        # ahead_*: weights read in the background before they were asked for (hits), guesses not
        # asked for next (misses), host time waiting for a background read to finish
        self.stats = {"direct": 0, "direct_bytes": 0, "fallback": 0, "read_s": 0.0, "wait_s": 0.0,
                      "ahead_hits": 0, "ahead_misses": 0, "ahead_wait_s": 0.0, "mapped": 0, "mapped_bytes": 0}

    def register(self, path: str, key: str, t: torch.Tensor) -> None:
        """t: the mapped tensor the state dict holds for `key` of file `path`."""
        h = next(h for h in self._headers if h.path == path)
        info = h.tensors.get(key)
        if info is None or info.start < 0 or t.numel() == 0:
            return
        entry = (path, h.data_start + info.start, info.end - info.start, _DTYPES.get(info.dtype), tuple(info.shape), key)
        self._entries[t.data_ptr()] = entry
        self._keys[key] = entry
        self._largest = max(self._largest, entry[2])

    def add_file(self, header: SafetensorsHeader, mapped=None) -> None:
        """Every tensor of another file (the quantized-weight cache, quant/weight_cache.py), readable by
        name with `read`; its entries join the read-ahead like the checkpoint's. mapped: the file as
        memory/pinned_file.PinnedFile: `read` copies from its locked pages (no read, no staging) where
        it can, and `host_view` gives the bytes without a copy."""
        if mapped is not None:
            self._mapped[header.path] = mapped
        if header not in self._headers:
            self._headers.append(header)
        for key, info in header.tensors.items():
            if info.start < 0:
                continue
            entry = (header.path, header.data_start + info.start, info.end - info.start, _DTYPES.get(info.dtype),
                     tuple(info.shape), key)
            self._keys[key] = entry
            self._largest = max(self._largest, entry[2])

    def read(self, key: str, device: torch.device) -> torch.Tensor:
        """The tensor `key` of a file given to `add_file`, on `device`, in the file's dtype."""
        e = self._keys.get(key)
        device = torch.device(device)
        cuda = device.type == "cuda" and torch.cuda.is_available()
        if e is None or e[3] is None:
            raise QuantLoRAError(f"no readable tensor {key!r} in the files given to the reader")
        mapped = self._mapped.get(e[0])
        if mapped is not None and (cuda or device.type == "cpu"):
            out = torch.empty(e[4], dtype=e[3], device=device)
            if mapped.copy_to(out.view(-1).view(torch.uint8), e[1]):
                self.stats["mapped"] += 1
                self.stats["mapped_bytes"] += e[2]
                return out
        if not (cuda or (device.type == "cpu" and self.on_cpu)) or not hasattr(os, "preadv"):
            path, offset, nbytes, file_dtype, shape, _ = e
            out = torch.empty(shape, dtype=file_dtype)
            self._read(path, offset, nbytes, out.view(-1).view(torch.uint8))
            return out.to(device)
        return self._load(e, device, cuda)

    def host_view(self, key: str) -> torch.Tensor | None:
        """The tensor `key` of a mapped file as host memory (its locked pages, no copy), or None."""
        e = self._keys.get(key)
        mapped = self._mapped.get(e[0]) if e is not None and e[3] is not None else None
        return mapped.view(e[1], e[2], e[3], e[4]) if mapped is not None else None

    def _entry(self, t: torch.Tensor):
        e = self._entries.get(t.data_ptr()) if t.device.type == "cpu" and t.numel() else None
        if e is None:
            return None
        _, _, nbytes, dtype, shape, _ = e
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
        out = self._load(e, device, cuda)
        return out if out.dtype == dtype else out.to(dtype)

    def _load(self, e: tuple, device: torch.device, cuda: bool) -> torch.Tensor:
        path, offset, nbytes, file_dtype, shape, key = e
        t0 = time.perf_counter()
        i = self._take_ahead(key)
        if i is not None:
            self.stats["ahead_wait_s"] += time.perf_counter() - t0
        else:
            i = self._stage(nbytes, cuda)
            t1 = time.perf_counter()
            self._read(path, offset, nbytes, self._staging[i])
            self.stats["wait_s"] += t1 - t0
            self.stats["read_s"] += time.perf_counter() - t1
        buf = self._staging[i]
        out = torch.empty(shape, dtype=file_dtype, device=device)
        out.view(-1).view(torch.uint8).copy_(buf[:nbytes], non_blocking=cuda)
        if cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            self._events[i] = ev
        self.stats["direct"] += 1
        self.stats["direct_bytes"] += nbytes
        self._read_ahead(key)
        return out

    def _stage(self, nbytes: int, cuda: bool) -> int:
        """The index of one of the two staging buffers, alternately: the one whose last copy has
        finished. Both are made once, as large as the largest registered tensor (growing them as the
        weights grew took 7 page-locked allocations and frees, ~0.35 s of an H200 load)."""
        if not self._staging:
            size = max(self._largest, nbytes, 1 << 20)
            self._staging = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
            self._events = [None, None]
        self._turn ^= 1
        ev = self._events[self._turn]
        if ev is not None:
            ev.synchronize()  # its previous copy to the GPU has been read out
            self._events[self._turn] = None
        if self._staging[self._turn].numel() < nbytes:  # a tensor registered after the buffers were made
            self._staging[self._turn] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        return self._turn

    # ---- read-ahead
    def _read_ahead(self, key: str) -> None:
        """Learns where `key` came in the order, then starts reading the weight expected next into
        the other staging buffer, once that buffer's last copy to the GPU is done."""
        guess = self._learn_and_guess(key)
        e = self._keys.get(guess) if guess is not None else None
        if e is None or e[0] in self._mapped or e[2] > self._staging[self._turn ^ 1].numel():
            return
        i = self._turn ^ 1
        ev, self._events[i] = self._events[i], None
        path, offset, nbytes = e[0], e[1], e[2]
        buf = self._staging[i]

        def read() -> None:
            if ev is not None:
                ev.synchronize()
            self._read(path, offset, nbytes, buf)

        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="quantlora-readahead")
        self._ahead = (guess, i, self._ahead_pool.submit(read))

    def _take_ahead(self, key: str) -> int | None:
        """The staging buffer holding `key`'s bytes if the background read guessed it; otherwise None,
        once that read has finished (its buffer is then free)."""
        if self._ahead is None:
            return None
        guess, i, future = self._ahead
        self._ahead = None
        try:
            future.result()
        except Exception:
            if guess == key:
                raise
            self.stats["ahead_misses"] += 1
            return None
        if guess != key:
            self.stats["ahead_misses"] += 1
            return None
        self.stats["ahead_hits"] += 1
        self._turn = i
        return i

    def _learn_and_guess(self, key: str) -> str | None:
        m = _INDEXED.match(key)
        if m is None:
            self._last = None
            return None
        group, index, suffix = m.group(1), int(m.group(2)), m.group(3)
        if self._last is not None and self._last[0] == group and index - self._last[1] in (0, 1):
            self._after[(group, self._last[2])] = (index - self._last[1], suffix)
        self._last = (group, index, suffix)
        step = self._after.get((group, suffix))
        return None if step is None else f"{group}{index + step[0]}.{step[1]}"

    def _fd(self, path: str) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def _read(self, path: str, offset: int, nbytes: int, buf: torch.Tensor) -> None:
        fd = self._fd(path)
        view = memoryview(buf.numpy())
        chunk = self.chunk

        def part(lo: int) -> int:
            hi = min(lo + chunk, nbytes)
            got = 0
            while lo + got < hi:
                n = os.preadv(fd, [view[lo + got:hi]], offset + lo + got)
                if n <= 0:
                    return -1
                got += n
            return got

        starts = range(0, nbytes, chunk)
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
        if self._ahead is not None:  # a guess nobody asked for: let it finish before its buffer goes
            try:
                self._ahead[2].result()
            except Exception:
                pass
            self._ahead = None
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)
            self._ahead_pool = None
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
        self._keys.clear()
        self._mapped.clear()  # the mapped files belong to the caller (the loaded model keeps them)
