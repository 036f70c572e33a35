"""Shared set-up of every bench script: makes the pack importable as `quantlora` and ComfyUI's tree
importable (through tools/bootstrap.py, shared with the tests and tools), installs import-only
stand-ins for what the GPU device image lacks, and logs imports.

Stand-ins (STAND_INS): packages ComfyUI imports at module level that the device image
(bench/device-image.txt) lacks, that no bench uses, and that a device call does not carry
(bench/carry-wheels.txt). Only PyAV: comfy_api's video types import it (`from av.video.reformatter
import ColorRange`, ...). torchsde (comfy.k_diffusion.sampling imports it at module level; the
Brownian-tree samplers call it) is carried, so it is the real package.
 - installed by setup() where the package is missing (the device), before ComfyUI or the pack load;
 - QUANTLORA_FORCE_STANDINS=1 installs them even where the package is installed (the CPU dry runs in
   tests/test_bench_scripts.py), so CI imports through the stand-ins exactly as the device does: the
   real PyAV here once hid a stand-in that broke on the device.

QUANTLORA_IMPORT_LOG=<file>: at exit, each process that imported this module appends one line per
top-level module it imported, "name<TAB>file" (a stand-in has no file);
tests/test_bench_scripts.py::check_device_imports checks them against the device image and the carry.
"""
import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bootstrap():
    """tools/bootstrap.py (the shared part: register the pack, ComfyUI and the harness stand-ins on
    sys.path) by file path: bench scripts run as `python3 bench/<script>.py`, without the repo root."""
    if "_quantlora_bootstrap" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_quantlora_bootstrap", os.path.join(ROOT, "tools", "bootstrap.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_quantlora_bootstrap"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["_quantlora_bootstrap"]


bootstrap = _load_bootstrap()
STAND_INS = ("av",)
FORCE_ENV = "QUANTLORA_FORCE_STANDINS"
LOG_ENV = "QUANTLORA_IMPORT_LOG"


def log_imports(path: str | None = None):
    """Appends "name<TAB>file" for every top-level module imported so far to `path` (default: $QUANTLORA_IMPORT_LOG)."""
    path = path or os.environ.get(LOG_ENV)
    if not path:
        return
    lines = []
    for name in sorted({m.split(".")[0] for m in list(sys.modules)}):
        mod = sys.modules.get(name)
        spec = getattr(mod, "__spec__", None)
        where = getattr(mod, "__file__", None) or ",".join(getattr(spec, "submodule_search_locations", None) or [])
        lines.append(f"{name}\t{where or ''}\n")
    with open(path, "a") as f:
        f.write("".join(lines))


if os.environ.get(LOG_ENV):
    atexit.register(log_imports)


# ---------------------------------------------------------------- import-only stand-ins
class _AnyMeta(type):
    """A placeholder class: any attribute of it is another placeholder (enum members read at import)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


def _placeholder(name: str):
    return _AnyMeta(name, (), {"__init__": lambda self, *a, **k: None})


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _placeholder(name)


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every import of `pkg` and `pkg.*` (any depth: no list of submodules to fall behind
    ComfyUI's) with an empty package whose names are placeholder classes."""

    def __init__(self, packages):
        self.packages = tuple(packages)

    def _ours(self, fullname):
        return any(fullname == p or fullname.startswith(p + ".") for p in self.packages)

    def find_spec(self, fullname, path=None, target=None):
        if self._ours(fullname):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name, f"import-only stand-in (bench/_env.py) for {spec.name}")
        mod.__path__ = []
        mod.__getattr__ = _module_getattr
        mod.__quantlora_stand_in__ = True
        return mod

    def exec_module(self, module):
        pass


_installed: tuple[str, ...] = ()


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "").strip() not in ("", "0")


def install_stand_ins(force: bool | None = None) -> tuple[str, ...]:
    """Installs the stand-ins for the STAND_INS that are missing (all of them when forced). Returns
    the packages now answered by stand-ins. Idempotent."""
    global _installed
    force = forced() if force is None else force
    # transformers records at import which optional packages exist: let it see the real state (the
    # device: no PyAV) rather than the stand-in. diffusers is left to the benches that use it (a
    # restart figure must not carry its import: ComfyUI's start has none); it takes a stand-in for
    # absent (no distribution metadata), so importing it later is safe.
    bootstrap.settle_optional_imports(diffusers=False)

    want = []
    for pkg in STAND_INS:
        if pkg in _installed:
            continue
        if not force and importlib.util.find_spec(pkg) is not None:
            continue
        real = [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]
        if real and not getattr(sys.modules.get(pkg), "__quantlora_stand_in__", False):
            raise RuntimeError(f"{pkg} was imported before the stand-ins were installed: {sorted(real)[:5]}")
        want.append(pkg)
    if want:
        sys.meta_path.insert(0, _StandInFinder(want))  # ahead of the real package, where there is one
        _installed += tuple(want)
        why = "forced by " + FORCE_ENV if force else "not installed"
        print(f"[_env] import-only stand-ins for {', '.join(want)} ({why})", file=sys.stderr, flush=True)
    return _installed


def setup(comfy_dir: str | None = None, cpu: bool = False):
    comfy_dir = comfy_dir or os.environ.get("QUANTLORA_COMFYUI") or bootstrap.DEFAULT_COMFY
    bootstrap.add_to_path(comfy_dir)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # Let transformers/diffusers see that torchvision is absent before the stand-ins appear.
        bootstrap.settle_optional_imports()
        bootstrap.add_to_path(bootstrap.STUBS, index=None)
    install_stand_ins()
    bootstrap.register_pack(ROOT)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
