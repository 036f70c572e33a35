"""Makes the pack importable as `quantlora` and ComfyUI's tree importable, for bench scripts."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(comfy_dir: str | None = None, cpu: bool = False):
    comfy_dir = comfy_dir or os.environ.get("QUANTLORA_COMFYUI") or os.path.join(ROOT, ".harness", "ComfyUI")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    stubs = os.path.join(ROOT, "tests", "harness", "stubs")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # Let transformers/diffusers see that torchvision is absent before the stand-ins appear.
        import diffusers.utils.import_utils  # noqa: F401
        import transformers.utils.import_utils  # noqa: F401
        sys.path.append(stubs)
    if "quantlora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quantlora", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quantlora"] = mod
        spec.loader.exec_module(mod)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
