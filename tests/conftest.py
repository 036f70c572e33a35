"""Makes the repo importable as the package `quantlora` (as ComfyUI imports it from custom_nodes)
and, for tests that need it, ComfyUI's own modules from the harness tree, in-process, on CPU."""
import importlib.machinery
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The test layers, one folder each (fastest first): unit/ (layer 1, no ComfyUI), comfy/ (ComfyUI's modules
# in-process), server/ (a real ComfyUI server) and browser/ (headless Chromium). None is a package, so a test
# module is imported by its file name, unique across the folders; every folder is on the path so a test may
# import helpers from another layer's module (e.g. comfy/ from unit/test_lora_formats.py) whichever folders
# pytest was given. tests/ itself for the shared helpers: `harness`, `graphs`, this conftest.
LAYERS = ("unit", "comfy", "server", "browser")
for _p in [os.path.join(HERE, layer) for layer in reversed(LAYERS)] + [HERE]:
    if _p not in sys.path:
        sys.path.insert(0, _p)


class _NoLayerPackages:
    """tests/comfy and tests/server are folders of test files, not ComfyUI's `comfy` and `server`. With tests/
    on the path Python would take such a folder as (a portion of) a namespace package: `comfy` alone while
    ComfyUI is not on the path, or ComfyUI's `comfy` (itself a namespace package) with tests/comfy in its
    __path__. The layer folders are left out of those names: found elsewhere or not at all, as before."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in LAYERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is None or spec.origin is not None or spec.submodule_search_locations is None:
            return None  # absent, or a regular module or package
        others = [p for p in spec.submodule_search_locations if os.path.dirname(p) != HERE]
        if not others:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        ns = importlib.machinery.ModuleSpec(name, None, is_package=True)
        ns.submodule_search_locations = others
        return ns


sys.meta_path.insert(0, _NoLayerPackages())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bootstrap():
    """tools/bootstrap.py by file path: it registers the pack, so it cannot be imported through it."""
    if "_quantlora_bootstrap" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_quantlora_bootstrap", os.path.join(ROOT, "tools", "bootstrap.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_quantlora_bootstrap"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["_quantlora_bootstrap"]


bootstrap = _load_bootstrap()
STUBS = bootstrap.STUBS
COMFY = bootstrap.COMFY


def _register_pack():
    bootstrap.register_pack(ROOT)


_register_pack()

# Layer 1 (scripts/test.sh runs it first, alone): quant/, checkpoint/, speed/, memory/ and lora/ on plain
# torch modules. With QUANTLORA_LAYER1=1, ComfyUI's modules cannot be imported at all, so a layer-1 test that reaches
# for them (directly or through the pack) fails instead of passing on ComfyUI's back.
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                 "comfyui_version", "execution")


class _NoComfy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in COMFY_MODULES:
            raise ImportError(f"layer 1 runs without ComfyUI: {name} may not be imported here")
        return None


if os.environ.get("QUANTLORA_LAYER1") == "1":
    sys.meta_path.insert(0, _NoComfy())


def import_comfy():
    """ComfyUI's modules from the harness tree; on a machine without CUDA, in --cpu mode."""
    if os.environ.get("QUANTLORA_LAYER1") == "1":
        pytest.fail("a layer-1 test asked for ComfyUI", pytrace=False)
    # transformers/diffusers decide at import whether torchvision exists: let them see that it
    # does not before the import-only stand-ins go on the path.
    bootstrap.settle_optional_imports()
    for p in (COMFY, STUBS):
        bootstrap.add_to_path(p)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    # SDPA, ComfyUI's default on GPUs; on CPU it defaults to sub-quadratic attention, which reads
    # free RAM inside the graph (a torch.compile graph break and a guard that recompiles).
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    return comfy


@pytest.fixture(scope="session")
def comfy():
    return import_comfy()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


CACHE = os.path.join(ROOT, ".harness", "cache")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the session, the pack in custom_nodes, the demo model set written.

    A failure to write the demo set does not stop the server: it is kept on `server.demo_error` and
    fails every server test not marked `no_demo_models` (see _demo_models_written), so the routes,
    frontend and client tests still run and the others say why they cannot."""
    import_comfy()
    from harness.server import ComfyServer

    base = str(tmp_path_factory.mktemp("comfy-base"))
    os.makedirs(CACHE, exist_ok=True)
    demo_error = None
    try:
        from quantlora.tools.demo_models import write_demo_set

        write_demo_set(os.path.join(base, "models"), cache_dir=CACHE)
    except Exception as e:  # noqa: BLE001 - reported by every test that needs the models
        import traceback

        demo_error = f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e)[-3:])}"
    srv = ComfyServer(base).start()
    srv.demo_error = demo_error
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _demo_models_written(request):
    if "server" not in request.fixturenames or request.node.get_closest_marker("no_demo_models"):
        return
    err = getattr(request.getfixturevalue("server"), "demo_error", None)
    if err:
        pytest.fail(f"the demo model set could not be written for the server (tools/demo_models.py): {err}",
                    pytrace=False)


def write_tiny_flux(tmp_path_factory, filename: str, seed: int, **overrides):
    """A seeded fp32 tiny Flux (demo TINY config with overrides) in BFL layout: (config, path)."""
    import torch
    from quantlora.tools import demo_models as dm

    cfg = dict(dm.TINY, **overrides)
    sd = dm.flux_bfl_state_dict(cfg, seed=seed, dtype=torch.float32)
    return cfg, dm.write_bfl(str(tmp_path_factory.mktemp(filename.split(".")[0]) / filename), sd)
