"""Where the blocks' ahead-of-time packages (speed/aot_blocks.py) live, how a load finds them and the first
sampling of a call shape builds them, and whether this machine can load a package at all.
QUANTLORA_AOT_BLOCKS=1 turns it on (experimental: one block measured on an H200, not yet the server;
BENCHMARKS.md issue 12, eighteenth round).

Layout: <root>/<block fingerprint>/<call hash>.pt2 and .pt2.json (the call's record). A block whose
fingerprint (class and source, torch, its weights' kinds and layouts) has packages is served by them at
the next load without torch.compile's start; a call no package takes builds one (export, then inductor
ahead of time: tens of seconds on the prompt that first samples that shape) and goes on compiled.
Plain torch; no ComfyUI import (the caller passes the export context: ComfyUI's pure-torch RoPE).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn

from . import aot_blocks

ENV = "QUANTLORA_AOT_BLOCKS"
log = logging.getLogger("quantlora")


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def device_tag(device: torch.device) -> str:
    """The folder a device's packages live in: a package's kernels are built for one GPU architecture and
    CUDA version (a cache moved to another GPU starts empty instead of loading kernels it cannot run)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}-cu{torch.version.cuda}"
    return device.type


class AOTStore:
    def __init__(self, root: str, export_context=None, cxx: str = ""):
        self.root = root
        self.export_context = export_context or contextlib.nullcontext
        self.cxx = cxx  # the C++ compiler packages are built with ("": inductor's own choice, $CXX)
        self.kinds: dict[str, aot_blocks.KindPackages] = {}
        self.stats = {"loaded": 0, "built": 0, "load_s": 0.0, "build_s": 0.0, "failed": []}

    def kind_for(self, block: nn.Module):
        layout = aot_blocks.weight_layout(block)
        fingerprint = aot_blocks.block_fingerprint(block, layout)
        kind = self.kinds.get(fingerprint)
        if kind is None:
            kind = aot_blocks.KindPackages(self._load_all(fingerprint), build=functools.partial(self._build, fingerprint))
            self.kinds[fingerprint] = kind
        return kind, layout

    def has_packages(self, block: nn.Module) -> bool:
        return bool(self.kind_for(block)[0].entries)

    def attach(self, block: nn.Module, fallback=None, compile_kwargs: dict | None = None) -> aot_blocks.AOTDispatch:
        """The block's calls through its kind's packages (fallback: its torch.compile'd call, else made
        at the first call no package takes)."""
        kind, layout = self.kind_for(block)
        dispatch = aot_blocks.AOTDispatch(block, kind, layout, fallback=fallback, compile_kwargs=compile_kwargs)
        block._compiled_call_impl = dispatch
        return dispatch

    def _dir(self, fingerprint: str) -> str:
        return os.path.join(self.root, fingerprint)

    def _load_all(self, fingerprint: str) -> list:
        entries, folder = [], self._dir(fingerprint)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if not name.endswith(".pt2.json"):
                continue
            path = os.path.join(folder, name[:-len(".json")])
            try:
                with open(path + ".json") as f:
                    rec = json.load(f)
                if rec.get("fingerprint") != fingerprint or not os.path.isfile(path):
                    continue
                t0 = time.perf_counter()
                entries.append((aot_blocks.CallSignature.from_record(rec["call"]), aot_blocks.load_package(path)))
                self.stats["load_s"] += time.perf_counter() - t0
                self.stats["loaded"] += 1
            except Exception as e:  # noqa: BLE001 - a package that does not load is compiled instead
                self.stats["failed"].append(f"{name}: {type(e).__name__}: {e}"[:300])
        return entries

    def _build(self, fingerprint: str, block: nn.Module, args: tuple, kwargs: dict):
        t0 = time.perf_counter()
        try:
            with self.export_context():
                program, sig, layout = aot_blocks.export_block(block, args, kwargs)
            record = {"fingerprint": fingerprint, "call": sig.record()}
            folder = self._dir(fingerprint)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, hashlib.sha256(json.dumps(record["call"], sort_keys=True).encode()).hexdigest()[:16] + ".pt2")
            tmp = path[:-4] + f".tmp{os.getpid()}.pt2"  # inductor wants the .pt2 suffix
            with compiler_context(self.cxx):
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
            with open(path + ".json.tmp", "w") as f:
                json.dump(record, f)
            os.replace(path + ".json.tmp", path + ".json")
            runner = aot_blocks.load_package(path)
        except Exception as e:  # noqa: BLE001 - the call goes on compiled
            self.stats["failed"].append(f"{type(block).__name__}: {type(e).__name__}: {e}"[:300])
            log.warning("QuantLoRA: %s compiled ahead of time failed (%s: %s); it runs torch.compile'd",
                        type(block).__name__, type(e).__name__, str(e)[:300])
            return None
        seconds = time.perf_counter() - t0
        self.stats["built"] += 1
        self.stats["build_s"] += seconds
        log.info("QuantLoRA: %s compiled ahead of time for this call shape in %.1f s (%s); a restart loads it "
                 "instead of compiling", type(block).__name__, seconds, path)
        return sig, runner


# --- can this machine load a package? --------------------------------------------------------------
# A package whose load crashes takes the whole server with it (the GPU image of BENCHMARKS.md issue 12,
# seventeenth round: SIGSEGV in torch's loader for any package). So a tiny one is built and loaded in a
# child process first, once per torch version, C++ compiler and device type; the verdict is kept.
_CHECK = r"""
import sys, torch
import torch._inductor.codecache as codecache
codecache.get_device_information = lambda device_type: {}  # as aot_blocks.load_package loads
dev = sys.argv[1]
m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(dev).eval()
x = torch.randn(4, 16, device=dev)
with torch.no_grad():
    ref = m(x)
    torch._inductor.aoti_compile_and_package(torch.export.export(m, (x,)), package_path=sys.argv[2])
    out = torch._inductor.aoti_load_package(sys.argv[2])(x)
assert float((out - ref).abs().max()) < 1e-3
print("LOADS")
"""


def loads_here(root: str, device: torch.device, timeout: float = 300, cxx: str | None = None) -> str | None:
    """None where packages built with C++ compiler `cxx` (None: $CXX, inductor's own choice) load on this
    machine, else why not (kept in <root>/loadable-*.json)."""
    cxx = os.environ.get("CXX", "") if cxx is None else cxx
    key = hashlib.sha256(f"{torch.__version__}|{cxx}|{device.type}".encode()).hexdigest()[:12]
    verdict_path = os.path.join(root, f"loadable-{key}.json")
    try:
        with open(verdict_path) as f:
            return json.load(f)["why_not"]
    except (OSError, ValueError, KeyError):
        pass
    os.makedirs(root, exist_ok=True)
    package = os.path.join(root, f"loadable-{key}.pt2")
    try:
        env = dict(os.environ, CXX=cxx) if cxx else None
        proc = subprocess.run([sys.executable, "-c", _CHECK, device.type, package], capture_output=True, text=True,
                              timeout=timeout, env=env)
        why = None if "LOADS" in proc.stdout else (
            f"a test package did not load in a child process (exit {proc.returncode}: "
            f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]})")
    except subprocess.TimeoutExpired:
        why = f"a test package took over {timeout:.0f} s to build and load"
    with contextlib.suppress(OSError):
        os.remove(package)
    with open(verdict_path, "w") as f:
        json.dump({"torch": torch.__version__, "cxx": cxx, "device": device.type, "why_not": why}, f)
    return why


def _system_compiler() -> str | None:
    """The system's g++ where $CXX names another compiler (or none): GPU images ship their own toolchains,
    and the H200 image's (CXX=/opt/gcc/bin/g++) builds packages that crash at load while /usr/bin/g++'s
    load (BENCHMARKS.md issue 12, eighteenth round)."""
    chosen = shutil.which(os.environ.get("CXX") or "g++")
    for candidate in ("/usr/bin/g++", "/usr/bin/c++"):
        if os.path.isfile(candidate) and (chosen is None or os.path.realpath(candidate) != os.path.realpath(chosen)):
            return candidate
    return None


def compiler_here(root: str, device: torch.device) -> tuple[str | None, str | None]:
    """(compiler, None) where packages built with it load here ("": $CXX, inductor's own choice), else
    (None, why not). $CXX is tried first, then the system's g++; each verdict is kept (loads_here)."""
    why = loads_here(root, device)
    if why is None:
        return "", None
    system = _system_compiler()
    if system is None or loads_here(root, device, cxx=system) is not None:
        return None, why
    log.info("QuantLoRA: packages built with CXX=%s do not load here (%s); %s builds them",
             os.environ.get("CXX", "g++"), why, system)
    return system, None


def compiler_context(cxx: str):
    """Inductor's C++ compiler for a package's build (cxx "" : its own choice)."""
    if not cxx:
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch({"cpp.cxx": (None, cxx)})
