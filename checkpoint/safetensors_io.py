"""Safe, checked access to safetensors files: never unpickles, names the file on any error."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import QuantLoRAError

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 256 * 1024 * 1024
# A FLUX.1 checkpoint has ~800 tensors and a LoRA on every layer of it ~2,500; the bounds leave room
# for any real file while a hostile header cannot hold the server for long or take much memory.
_MAX_ENTRIES = 100_000
LORA_MAX_HEADER = 16 * 1024 * 1024
LORA_MAX_ENTRIES = 20_000

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple
    start: int = -1  # byte offsets of its data, from the start of the data section
    end: int = -1


@dataclass
class SafetensorsHeader:
    path: str
    tensors: dict  # name -> TensorInfo
    metadata: dict
    data_start: int = 0  # file offset of the data section (8 + header length)


def _refuse_pickle(path: str, head: bytes, by_content: bool = True) -> None:
    looks_pickle = path.lower().endswith(PICKLE_EXTENSIONS) or (by_content and (head[:2] == b"PK" or head[:1] == b"\x80"))
    if looks_pickle:
        raise QuantLoRAError(
            f"{os.path.basename(path)}: this is a PyTorch pickle checkpoint, not safetensors. "
            "QuantLoRA never unpickles files (a pickle can run arbitrary code). "
            "Convert it to .safetensors (e.g. with safetensors.torch.save_file) or download the safetensors release."
        )


def _refuse_constant(name: str):
    def parse_constant(c):
        raise QuantLoRAError(f"{name}: the safetensors header holds {c}, which no valid file has; the file is corrupt. "
                             "Re-download it.")
    return parse_constant


def read_header(path: str, max_header: int = _MAX_HEADER, max_entries: int = _MAX_ENTRIES,
                kind: str = "file") -> SafetensorsHeader:
    """Parse and validate a safetensors header; detects truncation without reading tensor data.
    max_header / max_entries bound the time and memory one file can take before it is refused."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise QuantLoRAError(f"{path}: file not found. Put it in the models folder ComfyUI lists and refresh the node.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        # A safetensors file starts with its header length (u64 LE), then "{": its first byte can be
        # 0x80 or "PK" like a pickle's, so sniff for a pickle only where it is not safetensors-shaped.
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        _refuse_pickle(path, head, by_content=not (head[8:9] == b"{" and 0 < n <= size - 8))
        if len(head) < 8:
            raise QuantLoRAError(f"{name}: only {size} bytes; not a safetensors file (truncated or empty). Re-download it.")
        f.seek(8)
        if n == 0 or n > size - 8:
            raise QuantLoRAError(
                f"{name}: not a valid safetensors file (header length {n} does not fit a {size}-byte file). "
                "It is corrupt, truncated or another format; re-download it."
            )
        if n > max_header:
            raise QuantLoRAError(
                f"{name}: its safetensors header is {n / 2**20:.1f} MiB; a {kind} of this kind has at most "
                f"{max_header / 2**20:.0f} MiB of header. Refused without reading it: the file is not a real {kind} "
                "(damaged or made to stall the server).")
        raw = f.read(n)
    if raw.count(b'"data_offsets"') > max_entries:
        raise QuantLoRAError(f"{name}: its header lists more than {max_entries:,} tensors; a real {kind} has far fewer. "
                             "Refused before reading any tensor: the file is damaged or not a Flux model file.")
    try:
        header = json.loads(raw, parse_constant=_refuse_constant(name))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, QuantLoRAError):
            raise
        raise QuantLoRAError(f"{name}: safetensors header is not valid JSON ({e}); the file is corrupt. Re-download it.") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors, data_end = {}, 0
    for key, info in header.items():
        try:
            start, end = (int(o) for o in info["data_offsets"])
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            if not isinstance(dtype, str) or min(shape, default=0) < 0 or not 0 <= start <= end:
                raise ValueError(key)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise QuantLoRAError(f"{name}: tensor entry {key!r} is malformed; the file is corrupt. Re-download it.") from None
        data_end = max(data_end, int(end))
        tensors[key] = TensorInfo(dtype, shape, start, end)
    expected = 8 + n + data_end
    if size < expected:
        raise QuantLoRAError(
            f"{name}: truncated: the header promises {expected} bytes but the file has {size} "
            f"({100 * size / max(expected, 1):.1f}%). The download or copy did not finish; re-download it."
        )
    return SafetensorsHeader(path, tensors, metadata, 8 + n)


class TensorReader:
    """Reads tensors one at a time from one or more safetensors files (memory-mapped, streamed)."""

    def __init__(self, headers: list[SafetensorsHeader]):
        from safetensors import safe_open

        self._where = {}
        self._handles = {}
        for h in headers:
            try:
                self._handles[h.path] = safe_open(h.path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise QuantLoRAError(f"{os.path.basename(h.path)}: cannot open as safetensors ({e}). Re-download it.") from None
            for k in h.tensors:
                self._where[k] = h.path

    def keys(self):
        return self._where.keys()

    def path_of(self, key: str) -> str:
        return self._where[key]

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise QuantLoRAError(f"{os.path.basename(path)}: tensor {key!r} cannot be read ({e}); the file is corrupt.") from None

    def close(self):
        self._handles.clear()


def load_state_dict(path: str, max_header: int = LORA_MAX_HEADER, max_entries: int = LORA_MAX_ENTRIES,
                    kind: str = "LoRA") -> tuple[dict, dict]:
    """Whole small file (a LoRA) into memory, after validation. Returns (tensors, metadata)."""
    header = read_header(path, max_header, max_entries, kind)
    reader = TensorReader([header])
    try:
        return {k: reader.get(k) for k in header.tensors}, header.metadata
    finally:
        reader.close()
