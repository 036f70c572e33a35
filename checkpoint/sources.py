"""Where a Flux checkpoint's tensors are: a single BFL file or a diffusers transformer folder."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import QuantLoRAError
from .safetensors_io import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, SafetensorsHeader, read_header

_SHARD = re.compile(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors$")


@dataclass
class CheckpointSource:
    path: str                 # what the user picked (file or folder)
    files: list[str]
    headers: list[SafetensorsHeader]

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    def shapes(self) -> dict:
        return {k: i.shape for h in self.headers for k, i in h.tensors.items()}

    def dtypes(self) -> dict:
        return {k: i.dtype for h in self.headers for k, i in h.tensors.items()}

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def diffusers_folder_of(path: str) -> str | None:
    """The diffusers transformer folder a path is or lies in, else None."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "transformer")):
        d = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json")) or \
            os.path.isfile(os.path.join(d, "diffusion_pytorch_model.safetensors")):
        if os.path.isdir(path) or _SHARD.search(os.path.basename(path)):
            return d
    return None


def open_source(path: str) -> CheckpointSource:
    folder = diffusers_folder_of(path)
    if folder:
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise QuantLoRAError(f"{index}: unreadable shard index ({e}); re-download the folder.") from None
            files = [os.path.join(folder, s) for s in shards]
            missing = [s for s, f in zip(shards, files) if not os.path.isfile(f)]
            if missing:
                raise QuantLoRAError(
                    f"{folder}: {len(missing)} of {len(shards)} shards listed in its index are missing "
                    f"({', '.join(missing)}). The download did not finish; re-download the folder.")
        else:
            files = [os.path.join(folder, "diffusion_pytorch_model.safetensors")]
        return CheckpointSource(folder, files, [read_header(f) for f in files])
    if os.path.isdir(path):
        raise QuantLoRAError(f"{path}: a folder without diffusion_pytorch_model*.safetensors; pick a diffusers transformer folder or a single .safetensors file.")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        read_header(path)  # raises the pickle refusal
    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        raise QuantLoRAError(f"{os.path.basename(path)}: not a .safetensors file; QuantLoRA loads weights only from safetensors.")
    return CheckpointSource(path, [path], [read_header(path)])


def list_checkpoints(roots: list[str]) -> list[str]:
    """Names (relative to a root) of single-file checkpoints and diffusers folders under roots."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if diffusers_folder_of(dirpath) == dirpath:
                found.add((rel if rel != "." else os.path.basename(root)) + "/")
                dirnames[:] = []
                continue
            for f in filenames:
                if f.lower().endswith(SAFETENSORS_EXTENSIONS):
                    found.add(os.path.normpath(os.path.join(rel, f)))
    return sorted(found)


def resolve_checkpoint(name: str, roots: list[str]) -> str:
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise QuantLoRAError(f"{name!r}: give a name from the model list, not a path.")
    for root in roots:
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    raise QuantLoRAError(f"{name!r}: not found in {', '.join(roots) or 'any models folder'}. Put the file there and refresh the node list.")
