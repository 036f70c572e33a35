"""The pack says at start when ComfyUI is older than it supports, with the version it needs
(nodes/comfy_door.version_problem, called from the package's __init__ when ComfyUI imports it)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Import the pack as ComfyUI does (a package from custom_nodes/), with a ComfyUI version file on the path.
PROBE = """import importlib.util, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("QuantLoRA", sys.argv[2] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[2]])
mod = importlib.util.module_from_spec(spec)
sys.modules["QuantLoRA"] = mod
spec.loader.exec_module(mod)
print("loaded", mod.WEB_DIRECTORY)
"""


def import_pack_under(tmp_path, version):
    fake = tmp_path / f"comfy-{version or 'none'}"
    fake.mkdir()
    if version:
        (fake / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    r = subprocess.run([sys.executable, "-c", PROBE, str(fake), ROOT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "loaded ./web" in r.stdout, r.stderr
    return r.stderr


def test_older_comfyui_gets_a_warning_naming_the_needed_version(tmp_path):
    log = import_pack_under(tmp_path, "0.3.60")
    lines = [ln for ln in log.splitlines() if ln.startswith("WARNING quantlora")]
    assert len(lines) == 1, log
    assert "needs ComfyUI 0.3.75 or newer" in lines[0] and "this is ComfyUI 0.3.60" in lines[0], lines


def test_supported_versions_load_quietly(tmp_path):
    for version in ("0.3.75", "0.33.0", None):  # None: no version file (not ComfyUI's tree on the path)
        log = import_pack_under(tmp_path, version)
        assert "WARNING" not in log, (version, log)
