"""The GPU scripts under bench/ run end to end on CPU at tiny size, so a device call (scarce: 30
minutes a session) never finds them broken. Each runs in a subprocess, as on the device, and
writes the rows bench/report.py reads; the soak's own checks (outputs equal fresh loads, no
recompile, bounded memory) must pass here too."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(script, out, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--device", "cpu", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def rows(path):
    with open(path) as f:
        d = json.load(f)
    assert {"device", "date", "rows"} <= set(d)
    return {r["variant"]: r for r in d["rows"]}


def test_bench_flux_sections(tmp_path):
    bench("bench_flux.py", tmp_path, "--size", "tiny", "--sections", "base,lora,profile", "--quant", "torchao-int8-weight-only",
          "--compile-quant", "", "--fast-quant", "torchao-int8-weight-only", "--workdir", str(tmp_path / "work"))
    got = rows(tmp_path / "results-base-lora-profile.json")
    assert got["bf16 eager"]["step_ratio"] == 1.0 and "torchao-int8-weight-only eager" in got
    active = got["torchao-int8-weight-only compile + lora r64 active"]
    assert active["recompiles"] == 0 and active["swaps"] == 10
    profiled = [v for v in got if v.startswith("profile ")]
    assert any("lora r64 active" in v for v in profiled) and any("attention cudnn" in v for v in profiled)
    assert len(list(tmp_path.glob("profile-*.txt"))) == 4


def test_bench_offload(tmp_path):
    bench("bench_offload.py", tmp_path, "--size", "tiny", "--workdir", str(tmp_path / "work"))
    got = rows(tmp_path / "results-offload.json")
    modes = [v for v in got if " offload " in v and v.split()[-1] in ("model", "block", "leaf")]
    assert len(modes) == 9 and all(got[v]["equal_to_no_offload"] for v in modes)


@pytest.mark.parametrize("compile_mode", ["off", "regional"])
def test_soak_dry_run(tmp_path, compile_mode):
    bench("soak.py", tmp_path, "--size", "tiny", "--quantization", "none", "--compile", compile_mode, "--prompts", "24",
          "--steps", "1", "--px", "128", "--workdir", str(tmp_path / "work"))
    got = rows(tmp_path / "results-soak.json")
    checks = {v: r for v, r in got.items() if "ok" in r}
    assert len(checks) == 5 and all(r["ok"] for r in checks.values()), checks


def test_oom_check_dry_run(tmp_path):
    out = bench("oom_check.py", tmp_path)
    assert "dry run on cpu" in out and "skipped: needs a CUDA device" in out
