"""The two frontends the browser tests run on: v0.33's (frontend 1.48, the installed package; the primary
one) and ComfyUI 0.3.75 with the frontend it pins (1.32.9), which users of the oldest supported version
still run. The old frontend is pip-installed once into .harness/frontend-<version> (no dependencies,
~50 MB, from the package registry) and served by a 0.3.75 server through --front-end-root."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from harness.server import ROOT, ComfyServer

OLD_COMFY = os.path.join(ROOT, ".harness", "ComfyUI-0.3.75")


def pinned_frontend(tree: str = OLD_COMFY) -> str | None:
    try:
        with open(os.path.join(tree, "requirements.txt")) as f:
            m = re.search(r"comfyui-frontend-package==([\w.]+)", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def old_frontend_root() -> tuple[str | None, str]:
    """(static folder of 0.3.75's pinned frontend, or None; why not)."""
    version = pinned_frontend()
    if not version or not os.path.isdir(OLD_COMFY):
        return None, f"no ComfyUI 0.3.75 tree at {OLD_COMFY}"
    target = os.path.join(ROOT, ".harness", f"frontend-{version}")
    static = os.path.join(target, "comfyui_frontend_package", "static")
    if not os.path.isfile(os.path.join(static, "index.html")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                            f"comfyui-frontend-package=={version}"], capture_output=True, text=True, timeout=600)
        if r.returncode or not os.path.isfile(os.path.join(static, "index.html")):
            return None, f"could not install comfyui-frontend-package=={version}: {r.stderr[-800:]}"
    return static, ""


class OldComfyServer(ComfyServer):
    """ComfyUI 0.3.75 (its own tree) with its pinned frontend."""

    def __init__(self, base_dir: str, front_end_root: str, **kw):
        super().__init__(base_dir, extra_args=["--front-end-root", front_end_root], **kw)
        from quantlora.tools.serve import comfy_version, version_tuple

        self.version = comfy_version(OLD_COMFY)
        self.version_tuple = version_tuple(self.version)

    def start(self, timeout: float = 180) -> "OldComfyServer":
        from quantlora.tools import serve

        new, serve.COMFY = serve.COMFY, OLD_COMFY  # main.py and the working directory (imports) of 0.3.75
        try:
            return super().start(timeout)
        finally:
            serve.COMFY = new
