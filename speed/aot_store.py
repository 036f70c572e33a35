"""Where the blocks' ahead-of-time packages (speed/aot_blocks.py) live, how a load finds them and the first
sampling of a call shape builds them, and whether this machine can load a package at all.
On by default on CUDA devices for compile "regional" (QUANTLORA_AOT_BLOCKS=0 turns it off, =1 asks for it
elsewhere too). Measured on an H200 with the real server (BENCHMARKS.md issue 12, twentieth round): the
first image as without it (44.8 s), restarts to step 1 11.9-15.7 s against 14.2-17.2 s.

Layout: <root>/<block fingerprint>/<call hash>.pt2 and .pt2.json (the call's record). A block whose
fingerprint (class and source, torch, its weights' kinds and layouts) has packages is served by them at
the next load without torch.compile's start. A call no package takes builds one: exported on the
prompt's thread (~1 s per block kind on an H200), then compiled ahead of time (~45 s for FLUX's double
block) in a child process started when that sampling ends, while the prompt goes on torch.compile'd
(QUANTLORA_AOT_BUILD=inline builds at the call instead: the prompt waits). A failed build keeps its
log (failed-<call>.log, the child's whole output) and is not retried while it is there.
Plain torch; no ComfyUI import (the caller passes the export context: ComfyUI's pure-torch RoPE).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import torch
from torch import nn

from . import aot_blocks

ENV = "QUANTLORA_AOT_BLOCKS"
log = logging.getLogger("quantlora")


def asked() -> bool:
    return os.environ.get(ENV) == "1"


def enabled(device) -> bool:
    """QUANTLORA_AOT_BLOCKS=1/0; unset: on for CUDA devices (where it was measured; on a CPU the build's
    C++ compile costs more than torch.compile's start saves at these sizes)."""
    setting = os.environ.get(ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    return torch.device(device).type == "cuda"


def deferred() -> bool:
    """Packages built in child processes after the sampling (default), or at the call (=inline)."""
    return os.environ.get("QUANTLORA_AOT_BUILD", "child") != "inline"


def device_tag(device: torch.device) -> str:
    """The folder a device's packages live in: a package's kernels are built for one GPU architecture and
    CUDA version (a cache moved to another GPU starts empty instead of loading kernels it cannot run)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}-cu{torch.version.cuda}"
    return device.type


class AOTStore:
    def __init__(self, root: str, export_context=None, cxx: str | None = "", defer: bool = False,
                 check_root: str | None = None, device=None):
        """cxx: the C++ compiler packages are built with ("": inductor's own choice, $CXX); None (with
        `defer`): not yet known, no load check has run here: nothing is loaded, and the first build's
        child runs the check (`check_root`, `device`) before it."""
        self.root = root
        self.export_context = export_context or contextlib.nullcontext
        self.cxx = cxx
        self.defer = defer
        self._told: set = set()
        self.check = (check_root or os.path.dirname(root), torch.device(device or "cpu"))
        self.kinds: dict[str, aot_blocks.KindPackages] = {}
        # served/compiled: blocks attached with packages only / with a torch.compile'd fallback
        self.stats = {"loaded": 0, "built": 0, "load_s": 0.0, "build_s": 0.0, "failed": [], "served": 0, "compiled": 0}

    def kind_for(self, block: nn.Module):
        layout = aot_blocks.weight_layout(block)
        fingerprint = aot_blocks.block_fingerprint(block, layout)
        kind = self.kinds.get(fingerprint)
        if kind is None:
            kind = aot_blocks.KindPackages(self._load_all(fingerprint), build=functools.partial(self._build, fingerprint))
            self.kinds[fingerprint] = kind
        return kind, layout

    def serves_all(self) -> bool:
        """Every block attached so far takes its calls from packages: no torch.compile set-up was made, so
        none of its modules need importing ahead of the first step."""
        return self.stats["served"] > 0 and self.stats["compiled"] == 0

    def has_packages(self, block: nn.Module) -> bool:
        return bool(self.kind_for(block)[0].entries)

    def attach(self, block: nn.Module, fallback=None, compile_kwargs: dict | None = None) -> aot_blocks.AOTDispatch:
        """The block's calls through its kind's packages (fallback: its torch.compile'd call, else made
        at the first call no package takes)."""
        kind, layout = self.kind_for(block)
        self.stats["compiled" if fallback is not None else "served"] += 1
        dispatch = aot_blocks.AOTDispatch(block, kind, layout, fallback=fallback, compile_kwargs=compile_kwargs)
        block._compiled_call_impl = dispatch
        return dispatch

    def _dir(self, fingerprint: str) -> str:
        return os.path.join(self.root, fingerprint)

    def _load_all(self, fingerprint: str) -> list:
        entries, folder = [], self._dir(fingerprint)
        if self.cxx is None:  # no verdict on loading here: nothing is loaded into this process
            return entries
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
        """A package for this call: exported on the prompt's thread (the export context is global), then
        built inline (the call waits: tens of seconds), or, with `defer`, in a child process while this
        process goes on with the fallback (None). A call whose build failed once is not tried again
        while its log (`failed_log`) is kept: delete it to retry."""
        failed_log = self._failed_log(fingerprint, args, kwargs)
        if os.path.exists(failed_log):
            if failed_log not in self._told:
                self._told.add(failed_log)
                log.warning("QuantLoRA: %s is not compiled ahead of time for this call: an earlier build failed "
                            "(%s; delete it to try again); it runs torch.compile'd", type(block).__name__, failed_log)
            return None
        t0 = time.perf_counter()
        try:
            with self.export_context():
                program, sig, layout = aot_blocks.export_block(block, args, kwargs)
            record = {"fingerprint": fingerprint, "call": sig.record()}
            folder = self._dir(fingerprint)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, hashlib.sha256(json.dumps(record["call"], sort_keys=True).encode()).hexdigest()[:16] + ".pt2")
            if self.defer:
                self._defer(type(block).__name__, program, record, path, time.perf_counter() - t0, failed_log)
                return None  # this process goes on with the fallback; the package serves the next load
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
            write_failed_log(failed_log, f"{type(e).__name__}: {e}")
            log.warning("QuantLoRA: %s compiled ahead of time failed (%s: %s); it runs torch.compile'd (%s)",
                        type(block).__name__, type(e).__name__, str(e)[:300], failed_log)
            return None
        seconds = time.perf_counter() - t0
        self.stats["built"] += 1
        self.stats["build_s"] += seconds
        log.info("QuantLoRA: %s compiled ahead of time for this call shape in %.1f s (%s); a restart loads it "
                 "instead of compiling", type(block).__name__, seconds, path)
        return sig, runner

    def _failed_log(self, fingerprint: str, args: tuple, kwargs: dict) -> str:
        """Where a failed build of this call shape (its tensors' shapes and dtypes) leaves its log."""
        shapes = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
        shapes += [(tuple(a.shape), str(a.dtype)) for a in args if isinstance(a, torch.Tensor)]
        key = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
        return os.path.join(self._dir(fingerprint), f"failed-{key}.log")

    def _defer(self, name: str, program, record: dict, path: str, export_s: float, failed_log: str):
        """The exported program saved beside the package's path and its build queued (`Builder`)."""
        program_path = path[:-4] + f".program{os.getpid()}.pt2"
        torch.export.save(program, program_path)
        self.stats["export_s"] = self.stats.get("export_s", 0.0) + export_s
        self.stats["queued"] = self.stats.get("queued", 0) + 1
        BUILDER.put(BuildJob(name, program_path, path, record, op_modules(program), self, failed_log))
        log.info("QuantLoRA: %s exported in %.1f s; its package is built in a child process meanwhile "
                 "(%s) and serves the next load", name, export_s, path)


# --- builds in a child process ----------------------------------------------------------------
# Inductor's ahead-of-time compile takes tens of seconds (FLUX's double block: ~45 s on an H200) and
# patches inductor's global config while it runs, so it cannot share the server's process with a
# prompt's own compiles. A child process per program imports what registered its custom operators (the
# pack's Triton ops, FA3's), runs the load check where no verdict is kept, builds, loads the package (one
# whose load crashes takes the child, not the server) and puts it and its record where the next load
# looks. The child is in its own session, at a lower priority: it finishes when the server is stopped
# (Ctrl-C) meanwhile, within BUILD_TIMEOUT_S.
_PACK = __name__.rsplit(".speed.", 1)[0]  # the pack's package name here ("quantlora" in the child)
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TIMEOUT_S = 1800
_BUILD = r"""
import importlib, importlib.util, json, os, signal, sys
job = json.loads(sys.argv[3])
try:
    os.nice(10)  # here, not in a preexec_fn: that would make the server fork() (see build_in_child)
except (OSError, AttributeError):
    pass
if hasattr(signal, "alarm"):
    signal.alarm(job["timeout"])  # a build that hangs ends here, server or not
spec = importlib.util.spec_from_file_location("_quantlora_bootstrap", sys.argv[1])
boot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boot)
boot.register_pack(sys.argv[2])
from quantlora.speed import aot_store
aot_store.child_main(job)
"""
# The pack's own operator modules, imported by every child whatever op_modules found (an operator
# defined with torch.library.Library is not in torch's custom-op registry).
PACK_OP_MODULES = ("quantlora.speed.rowquant", "quantlora.speed.rowquant_cat")


def child_main(job: dict):
    """The child's whole run. Its output goes to a log file (job["log"]) that it removes once built or
    renames to the failed-build log otherwise (no package loads here included: not retried for this
    call), itself: the server may have stopped meanwhile."""
    import importlib
    import traceback

    for name in dict.fromkeys(PACK_OP_MODULES + tuple(job["modules"])):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the program's load names the operator it misses
            print(f"IMPORT {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    try:
        said = child_build(job)
    except BaseException:  # noqa: BLE001 - whatever it was, its traceback is the log
        traceback.print_exc()
        said = "FAILED"
    sys.stderr.flush()
    print(said, flush=True)
    with contextlib.suppress(OSError):
        if said.startswith("BUILT "):
            os.remove(job["log"])
        else:
            os.replace(job["log"], job["failed_log"])


def op_modules(program) -> list[str]:
    """The modules (as the child imports them) that define the program's custom operators: those made
    with torch.library.custom_op / triton_op, found by their definition's function; for others, the
    namespace's module where one is imported here (e.g. torchao's C++ operators)."""
    from torch._library.custom_ops import OPDEFS

    found = set()
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
    for node in (n for g in graphs for n in g.nodes if n.op == "call_function"):
        schema = getattr(getattr(node.target, "_schema", None), "name", "")
        namespace = schema.split("::")[0]
        if "::" not in schema or namespace in ("aten", "prims"):
            continue
        name = getattr(_defining_function(OPDEFS.get(schema)), "__module__", None)
        if name:
            found.add("quantlora" + name[len(_PACK):] if name == _PACK or name.startswith(_PACK + ".") else name)
        elif namespace in sys.modules:
            found.add(namespace)
    return sorted(found)


def _defining_function(opdef):
    """The function a custom operator was defined with. torch.library.triton_op (the pack's GPU ops)
    registers a wrapper of torch's own (module torch._library.triton) that holds it in its closure:
    importing the wrapper's module in the child registers nothing (H200, session 37: every child failed
    to load its program)."""
    fn = getattr(opdef, "_init_fn", None)
    if not (getattr(fn, "__module__", None) or "").startswith("torch."):
        return fn
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(inner) and not (getattr(inner, "__module__", None) or "torch.").startswith("torch."):
            return inner
    return fn


def child_build(job: dict) -> str:
    """In the build's child process: 'BUILT <seconds>' or 'NOLOAD <why>' (raises where the build fails)."""
    t0 = time.perf_counter()
    tmp = job["path"][:-4] + f".tmp{os.getpid()}.pt2"  # inductor wants the .pt2 suffix
    try:
        cxx = job["cxx"]
        if cxx is None:  # the first build on this machine: which compiler's packages load here
            cxx, why = compiler_here(job["check_root"], torch.device(job["device"]))
            if why:
                return f"NOLOAD {why}"
        program = torch.export.load(job["program"])
        with torch.no_grad(), compiler_context(cxx):
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        aot_blocks.load_package(tmp)
        os.replace(tmp, job["path"])
        with open(job["path"] + f".json.tmp{os.getpid()}", "w") as f:
            json.dump(job["record"], f)
        os.replace(job["path"] + f".json.tmp{os.getpid()}", job["path"] + ".json")
        return f"BUILT {time.perf_counter() - t0:.1f}"
    finally:
        for leftover in (tmp, job["program"]):
            with contextlib.suppress(OSError):
                os.remove(leftover)


class BuildJob:
    def __init__(self, name, program_path, path, record, modules, store, failed_log):
        self.name, self.program_path, self.path, self.record = name, program_path, path, record
        self.modules, self.store, self.failed_log = modules, store, failed_log


def write_failed_log(path: str, text: str):
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"torch {torch.__version__}\n{text}\n")


class Builder:
    """A thread per queued build waiting on its child process; `wait` for tests and benchmarks."""

    def __init__(self):
        self._pending = 0
        self._holds = 0
        self._held: list[BuildJob] = []
        self._idle = threading.Condition()
        atexit.register(self._drop_held)

    def _drop_held(self):
        """At exit during a sampling (the server stopped): its saved programs go, unbuilt."""
        for job in self._held:
            with contextlib.suppress(OSError):
                os.remove(job.program_path)

    @contextlib.contextmanager
    def hold(self):
        """Builds queued meanwhile start when the last hold ends: around a sampling, whose own compiles the
        children would slow (H200, session 37: its first compile took 24 s instead of 15 s beside them)."""
        with self._idle:
            self._holds += 1
        try:
            yield
        finally:
            with self._idle:
                self._holds -= 1
                start, self._held = (self._held, []) if self._holds == 0 else ([], self._held)
            for job in start:
                self._start(job)

    def put(self, job: BuildJob):
        with self._idle:
            self._pending += 1
            if self._holds:
                self._held.append(job)
                return
        self._start(job)

    def _start(self, job: BuildJob):
        threading.Thread(target=self._run, args=(job,), name="quantlora-aot-build", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """True once every queued build has ended (built or failed)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self, job: BuildJob):
        try:
            build_in_child(job)
        except Exception as e:  # noqa: BLE001 - a failed build leaves the fallback serving
            job.store.stats["failed"].append(f"{job.name}: {type(e).__name__}: {e}"[:300])
            log.warning("QuantLoRA: %s's package was not built (%s: %s); torch.compile serves it",
                        job.name, type(e).__name__, str(e)[:300])
        finally:
            with contextlib.suppress(OSError):  # the child removes it, unless it crashed
                os.remove(job.program_path)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()


BUILDER = Builder()


def build_in_child(job: BuildJob):
    """Runs the child and waits for it. No preexec_fn, so Python spawns it with vfork: a fork() of the
    server copies its page tables, and every page pinned for the GPU at once (H200, session 38: 17 s
    with the LoRA's 8 GiB pristine copy pinned, the prompt stalled meanwhile)."""
    store = job.store
    out_log = job.path[:-4] + f".build{os.getpid()}.log"
    spec = json.dumps({"program": job.program_path, "path": job.path, "record": job.record, "cxx": store.cxx,
                       "modules": job.modules, "check_root": store.check[0], "device": str(store.check[1]),
                       "timeout": BUILD_TIMEOUT_S, "log": out_log, "failed_log": job.failed_log})
    env = dict(os.environ, CXX=store.cxx) if store.cxx else None
    t0 = time.perf_counter()
    with open(out_log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", _BUILD, os.path.join(_PACK_ROOT, "tools", "bootstrap.py"),
                               _PACK_ROOT, spec], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=BUILD_TIMEOUT_S + 60, env=env, start_new_session=os.name == "posix")
    text = ""
    for path in (out_log, job.failed_log):
        with contextlib.suppress(OSError):
            with open(path) as f:
                text = f.read()
            break
    said = next((ln for ln in reversed(text.splitlines()) if ln.startswith(("BUILT ", "NOLOAD ", "FAILED"))), "")
    if not text and os.path.exists(job.path + ".json"):  # built: the child removed its log
        said = f"BUILT {time.perf_counter() - t0:.1f}"
    if not said.startswith("BUILT ") and os.path.exists(out_log):  # the child did not rename it (killed, crashed)
        with contextlib.suppress(OSError):
            with open(out_log, "a") as f:
                f.write(f"\n--- exit {proc.returncode}; job {spec}\n")
            os.replace(out_log, job.failed_log)
    if said.startswith("NOLOAD "):
        raise RuntimeError(f"no package can be loaded here: {said[len('NOLOAD '):]}")
    if not said.startswith("BUILT "):
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-2:]
        raise RuntimeError(f"the child process exited {proc.returncode}: {' / '.join(tail)[:300]} "
                           f"(its output: {job.failed_log})")
    seconds = float(said.split()[1])
    store.stats["built"] += 1
    store.stats["build_s"] += seconds
    log.info("QuantLoRA: %s compiled ahead of time in a child process in %.1f s (%s); a restart loads it "
             "instead of compiling", job.name, seconds, job.path)


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
    package = os.path.join(root, f"loadable-{key}.{os.getpid()}.pt2")  # two build children may check at once
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
    with open(verdict_path + f".tmp{os.getpid()}", "w") as f:
        json.dump({"torch": torch.__version__, "cxx": cxx, "device": device.type, "why_not": why}, f)
    os.replace(verdict_path + f".tmp{os.getpid()}", verdict_path)
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


def known_verdict(root: str, device: torch.device) -> tuple[str | None, str | None]:
    """compiler_here's answer from the verdicts kept, without a child process: (compiler, None),
    (None, why not), or (None, None) where a check has yet to run."""
    def kept(cxx):
        key = hashlib.sha256(f"{torch.__version__}|{cxx}|{device.type}".encode()).hexdigest()[:12]
        try:
            with open(os.path.join(root, f"loadable-{key}.json")) as f:
                return True, json.load(f)["why_not"]
        except (OSError, ValueError, KeyError):
            return False, None

    known, why = kept(os.environ.get("CXX", ""))
    if not known:
        return None, None
    if why is None:
        return "", None
    system = _system_compiler()
    if system is None:
        return None, why
    known, why_system = kept(system)
    if not known:
        return None, None
    return (system, None) if why_system is None else (None, why)


def compiler_here(root: str, device: torch.device) -> tuple[str | None, str | None]:
    """(compiler, None) where packages built with it load here ("": $CXX, inductor's own choice), else
    (None, why not). $CXX is tried first, then the system's g++; each verdict is kept (loads_here)."""
    device = torch.device(device)
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
