"""Packaging: `pip wheel .` builds the pack as one package, `quantlora` (the repository root, as ComfyUI
imports it from custom_nodes/), with its subpackages, web files and examples; installed, the
`quantlora-run` client starts and the pure-torch layers import without ComfyUI. The declared
requirements are the ones the code imports, with floors at the tested versions."""
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_builds_installs_and_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = tmp_path.glob("quantlora-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for must in ("quantlora/__init__.py", "quantlora/errors.py", "quantlora/nodes/loader_node.py", "quantlora/lora/merge.py",
                 "quantlora/quant/weight_codecs.py", "quantlora/checkpoint/sources.py",
                 "quantlora/speed/compile.py", "quantlora/memory/offload.py", "quantlora/client/cli.py", "quantlora/tools/demo_models.py",
                 "quantlora/web/vram_widget.js", "quantlora/example_workflows/flux-nf4-lora.json"):
        assert must in names, must
    assert not [n for n in names if n.startswith(("quantlora/tests/", "quantlora/bench/", "tests/", "client/", "nodes/"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "quantlora-run = quantlora.client.cli:main" in zipfile.ZipFile(whl).read(entry).decode()

    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import quantlora.lora.merge, quantlora.quant.weight_codecs, quantlora.checkpoint.sources, quantlora.speed.compile, sys; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules); "
            "from quantlora.client.cli import main; sys.argv = ['quantlora-run', '--help']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0 and "usage" in r.stdout.lower(), (r.stdout + r.stderr)[-3000:]


def test_requirements_match_pyproject_and_imports():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert sorted(deps) == sorted(reqs)
    names = {re.split(r"[<>=]", d)[0].lower() for d in deps}
    imported = set()
    for sub in ("nodes", "quant", "checkpoint", "speed", "memory", "lora", "client", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, sub)):
            for fn in files:
                if fn.endswith(".py"):
                    with open(os.path.join(dirpath, fn)) as f:
                        imported |= set(re.findall(r"^\s*(?:from|import) ([a-zA-Z_]+)", f.read(), re.M))
    module_of = {"safetensors": "safetensors", "diffusers": "diffusers", "peft": "peft", "psutil": "psutil",
                 "bitsandbytes": "bitsandbytes", "torchao": "torchao", "optimum-quanto": "optimum"}
    assert names == set(module_of), names
    for dist, mod in module_of.items():
        assert mod in imported, f"{dist} is declared but never imported"
    # the floors are the tested versions: what the constraints pin for the test venv satisfies them exactly
    import importlib.metadata as md

    for d in deps:
        name, floor = re.split(r">=", d)
        assert md.version(name) == floor or md.version(name).startswith(floor), (name, md.version(name), floor)
