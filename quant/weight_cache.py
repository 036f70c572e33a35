"""Quantized weights kept on disk between starts (QuantizedFluxLoader's `weight_cache`).

A restart of the fastest path read FLUX.1's 22 GiB of bf16 weights, copied them to the GPU and
quantized them again, to get the same 11 GiB of fp8 it had the time before (the loader's
quantization is deterministic: the bench checks the loaded weights bit for bit against the file's
quantized again). With the cache on, the first load also writes each quantized layer's inner
tensors (torchao: qdata and scale) to one safetensors file; a later load of the same file with the
same quantization reads those instead: half the bytes to read and to copy, no quantization kernels.

What a cached layer becomes is built by the quantization library itself: the first layer of each
shape is quantized from an uninitialised tensor (torchao's own `quantize_`, so the module gets
everything the library gives it), and every layer's tensor is then the library's tensor subclass
rebuilt from that template's flattening context with the cached inner tensors
(`__tensor_flatten__` / `__tensor_unflatten__`, the protocol torch.compile itself uses). Only
quantizations whose weights are such subclasses of plain tensors (torchao's; optimum-quanto's int8 and fp8)
are cached; the others (bitsandbytes, quanto's packed int4) load as before.

The file's name carries a hash of what its contents depend on: the checkpoint files (path, size,
modification time, header bytes), the quantization, the compute dtype, torch's and torchao's
versions and this format's number. Anything else is a different file; older files of the same
checkpoint and quantization are deleted when a new one is written, and the folder is kept under a size
limit, least recently used files first. Written to a temporary name and
renamed when complete, so a crash never leaves a file that looks whole. Plain torch: no ComfyUI import.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time

import torch

from ..checkpoint.safetensors_io import _DTYPES, read_header
from ..errors import QuantLoRAError

log = logging.getLogger("quantlora")
FORMAT = "2"  # 2: each layer starts on an ALIGN boundary of the file (memory/pinned_file.py locks it per layer)
CHOICES = ["off", "on"]
ENV_DIR = "QUANTLORA_WEIGHT_CACHE_DIR"
FREE_MARGIN = 2 << 30  # bytes of disk left free after writing a cache file
MAX_GIB = 64.0  # the cache folder's size limit (QUANTLORA_WEIGHT_CACHE_MAX_GIB)
_NAMES = {v: k for k, v in _DTYPES.items()}
ALIGN = 64 << 10  # a page on every platform (4 KiB x86, up to 64 KiB arm64)
PAD = "quantlora_pad."  # zero bytes before a layer that must start on the boundary (a valid safetensors file has no gaps)
BIAS = "quantlora_bias"  # a layer's bias in the file: <prefix>quantlora_bias (no inner tensor has that name)


def cacheable(weight) -> bool:
    """A quantized weight this cache can rebuild: a tensor subclass that flattens into plain tensors."""
    flatten = getattr(type(weight), "__tensor_flatten__", None)
    if flatten is None or type(weight) in (torch.Tensor, torch.nn.Parameter):
        return False
    names, _ = weight.__tensor_flatten__()
    return all(type(getattr(weight, n, None)) is torch.Tensor and getattr(weight, n).dtype in _NAMES for n in names)


def _versions() -> dict:
    try:
        import torchao
        ao = getattr(torchao, "__version__", "unknown")
    except ImportError:
        ao = "absent"
    return {"torch": torch.__version__, "torchao": ao, "format": FORMAT}


def identity(sources: list[str], quantization: str, dtype: torch.dtype) -> dict:
    """What a cache file's contents depend on (its name hashes this; its metadata holds it)."""
    files = []
    for p in sources:
        st = os.stat(p)
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest = hashlib.sha256(head + f.read(min(n, 256 << 20))).hexdigest()
        files.append({"path": os.path.realpath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": digest})
    return {"files": files, "quantization": quantization, "dtype": str(dtype).replace("torch.", ""), **_versions()}


def cache_path(cache_dir: str, sources: list[str], quantization: str, dtype: torch.dtype) -> tuple[str, dict]:
    ident = identity(sources, quantization, dtype)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    # the checkpoint's own path in the name too: two files of one name in two folders keep a cache each
    where = hashlib.sha256("\n".join(f["path"] for f in ident["files"]).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{_stem(sources)}-{where}-{quantization}-{digest}.safetensors"), ident


def _stem(sources: list[str]) -> str:
    base = os.path.basename(os.path.normpath(sources[0]))
    if len(sources) > 1:  # a diffusers folder's shards: name it by its folder
        base = os.path.basename(os.path.dirname(os.path.realpath(sources[0])))
    stem = os.path.splitext(base)[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]


class CachedWeights:
    """A cache file found for this load: which layers it holds; the loader reads them through its
    DirectReader (checkpoint/direct_read.py: page-locked staging, read-ahead)."""

    def __init__(self, path: str, ident: dict):
        self.path = path
        header = read_header(path, kind="QuantLoRA weight cache")
        held = json.loads(header.metadata.get("quantlora_identity", "null") or "null")
        if held != ident:
            raise QuantLoRAError(f"{os.path.basename(path)}: a weight cache for other files or versions")
        self.header = header
        self.layers: dict[str, list[str]] = json.loads(header.metadata.get("quantlora_layers", "{}"))
        self._templates: dict[tuple, tuple] = {}
        self.hits = 0

    @staticmethod
    def find(path: str, ident: dict) -> CachedWeights | None:
        if not os.path.isfile(path):
            return None
        try:
            found = CachedWeights(path, ident)
            os.utime(path)  # last used now: the size limit drops the least recently used files first
            return found
        except (QuantLoRAError, ValueError, OSError) as e:  # damaged or foreign: loaded as if absent, rewritten
            log.warning("QuantLoRA: ignoring the weight cache %s (%s); it will be written again", path, e)
            return None

    def pieces(self, page: int) -> list[tuple[int, int]]:
        """Each layer's byte range in the file (its tensors and bias, to the end of their last page), in
        file order: what memory/pinned_file.py locks, one range per layer. A layer not on a page
        boundary has none (it is read as before)."""
        out = []
        start, size = self.header.data_start, os.path.getsize(self.path)
        for prefix, names in self.layers.items():
            keys = [prefix + n for n in names] + [prefix + BIAS]
            infos = [self.header.tensors[k] for k in keys if k in self.header.tensors]
            if not infos:
                continue
            lo = start + min(i.start for i in infos)
            hi = min(-(-(start + max(i.end for i in infos)) // page) * page, size)
            if lo % page == 0:
                out.append((lo, hi))
        out.sort()
        return [r for i, r in enumerate(out) if i + 1 == len(out) or r[1] <= out[i + 1][0]]

    def holds(self, prefix: str) -> bool:
        return prefix in self.layers

    def bias_key(self, prefix: str) -> str | None:
        """The layer's bias in the file (kept beside its weight, so a load from the disk does not seek
        through the checkpoint for 300 small tensors), or None."""
        return prefix + BIAS if prefix + BIAS in self.header.tensors else None

    def template_key(self, module) -> tuple:
        return (module.out_features, module.in_features)

    def template(self, module) -> tuple | None:
        return self._templates.get(self.template_key(module))

    def remember_template(self, module) -> None:
        w = module.weight
        names, ctx = w.__tensor_flatten__()
        self._templates[self.template_key(module)] = (type(w), list(names), ctx, tuple(w.shape), tuple(w.stride()))

    def rebuild(self, module, prefix: str, read) -> torch.Tensor:
        """The layer's quantized weight from its cached inner tensors (read(key) -> tensor on the device)."""
        cls, names, ctx, shape, stride = self.template(module)
        if sorted(names) != sorted(self.layers[prefix]):
            raise QuantLoRAError(f"{os.path.basename(self.path)}: layer {prefix.rstrip('.')} holds {self.layers[prefix]}, "
                                 f"the quantization makes {names}")
        inner = {}
        for n in names:
            t = read(prefix + n)
            ref = self.header.tensors[prefix + n]
            inner[n] = t
            if tuple(t.shape) != tuple(ref.shape):
                raise QuantLoRAError(f"{os.path.basename(self.path)}: {prefix}{n} has shape {tuple(t.shape)}")
        self.hits += 1
        return cls.__tensor_unflatten__(inner, copy.copy(ctx), torch.Size(shape), stride)


class CacheWriter:
    """Collects the quantized layers of a load that found no cache, and writes them when it is done."""

    def __init__(self, path: str, ident: dict):
        self.path, self.ident = path, ident
        self.layers: dict[str, object] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.written_s = 0.0

    def add(self, prefix: str, weight, bias=None) -> None:
        if cacheable(weight):
            self.layers[prefix] = weight
            if type(bias) in (torch.Tensor, torch.nn.Parameter) and bias.dtype in _NAMES:
                self.biases[prefix] = bias

    def write(self) -> bool:
        """Writes the cache (before anything else can change the weights, e.g. a LoRA merge). False
        (and a warning) where the disk lacks room or the write fails: the load itself stands."""
        if not self.layers:
            return False
        t0 = time.perf_counter()
        entries, tensors, offset = {}, [], 0
        for prefix, w in self.layers.items():
            if offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                entries[f"{PAD}{len(entries)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
                tensors.append(torch.zeros(pad, dtype=torch.uint8))
                offset += pad
            names, _ = w.__tensor_flatten__()
            inner = [(n, getattr(w, n)) for n in names]
            if prefix in self.biases:
                inner.append((BIAS, self.biases[prefix].detach()))
            for n, t in inner:
                nbytes = t.numel() * t.element_size()
                entries[prefix + n] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
                tensors.append(t)
                offset += nbytes
        entries["__metadata__"] = {"quantlora_identity": json.dumps(self.ident, sort_keys=True),
                                   "quantlora_layers": json.dumps({p: list(w.__tensor_flatten__()[0]) for p, w in self.layers.items()})}
        head = json.dumps(entries, separators=(",", ":")).encode()
        head += b" " * (-(8 + len(head)) % ALIGN)  # the data starts on the boundary too
        d = os.path.dirname(self.path)
        try:
            os.makedirs(d, exist_ok=True)
            free = shutil.disk_usage(d).free
            if free < offset + len(head) + FREE_MARGIN:
                log.warning("QuantLoRA: weight cache not written: %s has %.1f GiB free, the cache needs %.1f GiB",
                            d, free / 2**30, offset / 2**30)
                return False
            tmp = f"{self.path}.{os.getpid()}.partial"
            with open(tmp, "wb") as f:
                f.write(len(head).to_bytes(8, "little"))
                f.write(head)
                _write_tensors(f, tensors)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("QuantLoRA: weight cache not written to %s: %s", d, e)
            try:
                os.remove(tmp)
            except (OSError, UnboundLocalError):
                pass
            return False
        _remove_older(self.path)
        _keep_under_limit(self.path)
        self.written_s = time.perf_counter() - t0
        log.info("QuantLoRA: wrote the weight cache %s (%.2f GiB, %.1f s)", self.path, offset / 2**30, self.written_s)
        return True


def _write_tensors(f, tensors: list[torch.Tensor]) -> None:
    """Each tensor's bytes in order, through one page-locked buffer on a GPU (a copy from the device
    to pageable memory is staged by the driver anyway)."""
    cuda = any(t.is_cuda for t in tensors)
    largest = max(t.numel() * t.element_size() for t in tensors)
    buf = torch.empty(largest, dtype=torch.uint8, pin_memory=cuda and torch.cuda.is_available())
    for t in tensors:
        n = t.numel() * t.element_size()
        if n == 0:
            continue
        buf[:n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        f.write(memoryview(buf[:n].numpy()))


def _is_cache_file(path: str) -> bool:
    """A file this module wrote (its metadata says so): nothing else in the folder is ever deleted, even
    where $QUANTLORA_WEIGHT_CACHE_DIR points at a folder of models."""
    try:
        return os.path.isfile(path) and "quantlora_identity" in read_header(path, kind="QuantLoRA weight cache").metadata
    except (QuantLoRAError, OSError, ValueError):
        return False


def limit_bytes() -> int:
    """$QUANTLORA_WEIGHT_CACHE_MAX_GIB (default 64): the cache folder's files beyond it go, least recently
    used first (a checkpoint moved or copied elsewhere leaves its old cache file behind)."""
    try:
        gib = float(os.environ.get("QUANTLORA_WEIGHT_CACHE_MAX_GIB", "") or MAX_GIB)
    except ValueError:
        gib = MAX_GIB
    return int(max(gib, 0) * 2**30)


def _keep_under_limit(just_written: str) -> None:
    d = os.path.dirname(just_written)
    files = []
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if name.endswith(".safetensors") and p != just_written and _is_cache_file(p):
            st = os.stat(p)
            files.append((st.st_mtime, st.st_size, p))
    total = os.path.getsize(just_written) + sum(size for _, size, _ in files)
    for _, size, p in sorted(files):  # oldest use first; the file just written always stays
        if total <= limit_bytes():
            break
        try:
            os.remove(p)
            total -= size
            log.info("QuantLoRA: removed the weight cache %s (the folder holds more than %.0f GiB)", p, limit_bytes() / 2**30)
        except OSError:
            pass


def _remove_older(path: str) -> None:
    """Other cache files of the same checkpoint and quantization (an edited file, a new torch): stale."""
    d, name = os.path.split(path)
    prefix = name.rsplit("-", 1)[0] + "-"
    for other in os.listdir(d):
        stale = other.endswith(".partial") or other.endswith(".safetensors") and _is_cache_file(os.path.join(d, other))
        if other != name and other.startswith(prefix) and stale:
            try:
                os.remove(os.path.join(d, other))
            except OSError:
                pass
