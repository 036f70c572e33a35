"""First-use work of the compiler and the merge kernels, done while the load waits on its reads.

A restart's first LoRA merge (or, without one, its first compiled step) hashes Triton's own files
and its 400 MB library once per process (`triton_key`, the key of every Triton and inductor cache
entry): 0.37 s on an H200 host, on the main thread, after the load (BENCHMARKS.md issue 12). Reading
files and hashing release the interpreter lock, so a thread started as the load begins does it while
the main thread mostly waits for the checkpoint's reads and copies. QUANTLORA_WARMUP=0 turns it off.
Plain Python; nothing here changes what is computed, only when.
"""
from __future__ import annotations

import os
import threading
import time

stats: dict = {}
_thread: threading.Thread | None = None


def enabled() -> bool:
    return os.environ.get("QUANTLORA_WARMUP", "1") != "0"


def _triton_key():
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        try:
            from triton.compiler.compiler import triton_key
        except ImportError:
            return None
    return triton_key


def start(device) -> bool:
    """Starts the background work once per process, for a CUDA load; True if it was started now."""
    global _thread
    if _thread is not None or not enabled() or getattr(device, "type", str(device)) != "cuda":
        return False
    key = _triton_key()  # imported here: an import in the thread would hold the lock
    if key is None:
        return False

    def run():
        t0 = time.perf_counter()
        try:
            key()  # functools.lru_cache: the callers later get the value
            stats["triton_key_s"] = round(time.perf_counter() - t0, 3)
        except Exception as e:  # the callers compute it themselves, as without this
            stats["error"] = f"{type(e).__name__}: {e}"[:200]

    _thread = threading.Thread(target=run, name="quantlora-warmup", daemon=True)
    _thread.start()
    return True


# What a restart's first compiled call imports (torch imports inductor lazily, at the first compile):
# ~1-2 s of module bodies on the sampler's first step (cProfile of a restart on an H200, BENCHMARKS.md
# issue 12). Imported where the load runs beside ComfyUI's text encoders (nodes/load_overlap.py), they
# are no longer on the path to the first step. Any that is missing or fails is left to torch.
COMPILER_MODULES = (
    "torch._functorch.aot_autograd",
    "torch._inductor.compile_fx",
    "torch._inductor.fx_passes.post_grad",
    "torch._inductor.select_algorithm",
    "torch._inductor.codecache",
)
CUDA_COMPILER_MODULES = ("torch._inductor.runtime.triton_heuristics", "torch._inductor.codegen.triton")


def warm_compiler(device) -> float:
    """Imports COMPILER_MODULES (and the Triton side for a CUDA device) and computes inductor's cache key
    of torch's own files; seconds spent (stats['compiler_s']). QUANTLORA_WARMUP=0: nothing."""
    if not enabled():
        return 0.0
    import importlib

    t0 = time.perf_counter()
    names = COMPILER_MODULES + (CUDA_COMPILER_MODULES if getattr(device, "type", str(device)) == "cuda" else ())
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - torch imports it itself when it needs it
            failed.append(f"{name}: {type(e).__name__}")
    try:
        from torch._inductor.codecache import torch_key

        torch_key()  # lru-cached: hashes torch's sources once per process
    except Exception as e:  # noqa: BLE001
        failed.append(f"torch_key: {type(e).__name__}")
    stats["compiler_s"] = round(time.perf_counter() - t0, 3)
    if failed:
        stats["compiler_failed"] = failed[:6]
    return stats["compiler_s"]
