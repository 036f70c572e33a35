"""The one bootstrap: make the repository importable as the package `quantlora` (as ComfyUI imports it
from custom_nodes) and put ComfyUI's tree and the harness stand-ins on sys.path.

Used by tests/conftest.py, bench/_env.py, tools/serve.py and tools/main_job.py. Standard library only
at import (the bench must not import torch before comfy-aimdo's init), and importable before the pack
is registered: inside the package as `.bootstrap` (tools.serve, tools.main_job), from outside it by
file path (tests/conftest.py and bench/_env.py load it as the module `_quantlora_bootstrap`).

What stays with the callers: how each one sets ComfyUI's options (cpu, attention) after importing it,
and bench/_env.py's device-specific stand-ins (PyAV), forcing and import log.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUBS = os.path.join(ROOT, "tests", "harness", "stubs")  # import-only torchvision/torchaudio stand-ins
DEFAULT_COMFY = os.path.join(ROOT, ".harness", "ComfyUI")
COMFY = os.environ.get("QUANTLORA_COMFYUI", DEFAULT_COMFY)  # the ComfyUI tree: $QUANTLORA_COMFYUI or the harness's


def register_pack(root: str = ROOT):
    """The repository as the package `quantlora` (registered once; the same module afterwards)."""
    if "quantlora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quantlora", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quantlora"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["quantlora"]


def add_to_path(path: str, index: int | None = 0) -> None:
    """Puts `path` on sys.path at `index` (None: at the end) unless it is there already."""
    if path in sys.path:
        return
    if index is None:
        sys.path.append(path)
    else:
        sys.path.insert(index, path)


def settle_optional_imports(diffusers: bool = True):
    """Imports diffusers' and transformers' import_utils, which record at import which optional
    packages exist (torchvision, PyAV): done before any stand-in goes on the path, so they see the
    real state. Returns transformers.utils.import_utils. diffusers=False leaves diffusers to be
    imported where it is used (1-2 s of a process start that ComfyUI's own start does not have): it
    sees an import-only stand-in as absent anyway (it asks for the distribution's version)."""
    if diffusers:
        import diffusers.utils.import_utils  # noqa: F401
    import transformers.utils.import_utils as t

    return t


def needs_stubs() -> bool:
    """True where torchvision is not installed (no CPU build on PyPI): use the harness stand-ins."""
    spec = importlib.util.find_spec("torchvision")
    return spec is None or os.path.abspath(spec.origin or "").startswith(STUBS + os.sep)
