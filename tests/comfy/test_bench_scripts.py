"""The GPU scripts under bench/ run end to end on CPU at tiny size, so a device call (scarce: 30
minutes a session) never finds them broken. Each runs in a subprocess, as on the device, and
writes the rows bench/report.py reads; the soak's own checks (outputs equal fresh loads, no
recompile, bounded memory) must pass here too.

Every dry run logs its processes' imports (QUANTLORA_IMPORT_LOG) and runs with the device's stand-ins
forced (QUANTLORA_FORCE_STANDINS=1: PyAV is installed here, not on the device, and its real package
once hid a stand-in that failed there), then check_device_imports fails it on anything imported that
the device image lacks and a device call does not carry (issue 11)."""
import json
import lzma
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DryRun:
    """bench/<script> on CPU as the device would import it (stand-ins forced), started at once; wait()
    then checks what its processes imported against the device image and the carry. The dry runs are
    independent processes, each mostly one thread of Python: they start together (dry_runs below)
    and each test collects its own, so the 2-core CI machine runs them side by side."""

    def __init__(self, script, out, *args, timeout=900, carries=("carry-wheels.txt",), absent_ok=()):
        self.script, self.out, self.timeout = script, out, timeout
        self.carries, self.absent_ok = carries, absent_ok
        out.mkdir(parents=True, exist_ok=True)
        self.imports = os.path.join(str(out), "imports.txt")
        if os.path.exists(self.imports):
            os.remove(self.imports)
        # aot_eager: the scripts' torch.compile calls trace the same graphs and guards (graph breaks and
        # recompiles still show) without inductor's C++ builds, minutes of CI with a cold cache; inductor's
        # own code on a CPU is not what the device runs anyway (tests/comfy and tests/browser compile for real).
        # One torch thread each: several run at once on CI's two cores.
        env = dict(os.environ, PYTHONUNBUFFERED="1", QUANTLORA_IMPORT_LOG=self.imports, QUANTLORA_FORCE_STANDINS="1",
                   QUANTLORA_COMPILE_BACKEND="aot_eager", OMP_NUM_THREADS="1")
        self.stdout, self.stderr = open(out / "stdout.txt", "w+"), open(out / "stderr.txt", "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", script), "--device", "cpu",
                                      "--out", str(out), *args], stdout=self.stdout, stderr=self.stderr, env=env, cwd=ROOT)

    def wait(self) -> str:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.started + self.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = f"killed after {self.timeout} s"
        self.stdout.seek(0)
        self.stderr.seek(0)
        out, err = self.stdout.read(), self.stderr.read()
        assert rc == 0, (self.script, rc, (out + err)[-4000:])
        assert "import-only stand-ins for av (forced" in err, err[-2000:]
        assert os.path.getsize(self.imports) > 0, "no import log: the script does not import bench/_env.py"
        # No stand-ins named: a forced stand-in is logged without a file and passes; the real PyAV would not.
        check_device_imports(self.imports, stand_ins=self.absent_ok, carries=self.carries)
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()


def _dry_run_args(work):
    """Each dry run: (script, args, timeout[, DryRun options]). `work(name)` is that run's scratch folder."""
    return {
        "flux": ("bench_flux.py", ["--size", "tiny", "--sections", "base,lora,profile,merge,firststep",
                                   "--quant", "torchao-int8-weight-only", "--compile-quant", "",
                                   "--fast-quant", "torchao-int8-weight-only", "--merge-quant", "bnb-int8",
                                   "--workdir", work("flux")], 900),
        # fewer cards than the GPU run (each kind still re-plans down and up), LoRA rows in merge mode; the
        # torchao cards on compiled blocks (aot_eager, as every dry run here: dynamo and the stream hooks)
        "offload": ("bench_offload.py", ["--size", "tiny", "--workdir", work("offload"),
                                         "--cards", "bf16=12/16;fp8 cast=8/12;nf4=6;torchao fp8 compiled=8/16",
                                         "--node-lora-mode", "merge", "--kinds", "bf16,fp8 cast,nf4,torchao fp8 compiled",
                                         "--profile-cards", "torchao fp8 compiled=8", "--reserve-vram-gib", "0",
                                         "--reserve-rules", "comfy,sum"], 900),
        "soak": ("soak.py", ["--size", "tiny", "--quantization", "none", "--compile", "regional", "--prompts", "24",
                             "--steps", "1", "--px", "128", "--workdir", work("soak")], 900),
        "pin": ("pin_probe.py", ["--gib", "0.02", "--chunks", "2"], 600),
        "pinmap": ("pin_probe.py", ["--map-gib", "0.02", "--workdir", work("pinmap")], 600),
        "oom": ("oom_check.py", [], 600),
        "peers": ("comfy_peers.py", ["--size", "tiny", "--fast-quant", "torchao-int8-weight-only", "--profile-merge",
                                     "--graph-quant", "torchao-int8-weight-only", "--steps", "3", "--graph-steps", "2",
                                     "--switches", "1", "--workdir", work("peers")], 1200),
        # one Flux block compiled ahead of time (AOTInductor) against torch.compile, each restarted
        "aoti": ("aoti_probe.py", ["--device", "cpu", "--hidden", "128", "--tokens", "64", "--repeats", "1",
                                   "--workdir", work("aoti")], 600),
        # the real server, restarted: its imports checked against the server call's carry too; ComfyUI's
        # template and docs packages are not carried (imported in try/except: the server logs and goes on)
        "server": ("server_restart.py", ["--size", "tiny", "--workdir", work("server"), "--quant", "torchao-int8-weight-only",
                                         "--compile", "off", "--comfy-dtype", "default", "--px", "128", "--steps", "2",
                                         "--restarts", "1", "--alternate", "ours-seq", "--comfy-restarts", "1"], 600,
                   dict(carries=("carry-wheels.txt", "carry-server-wheels.txt"), absent_ok=SERVER_NOT_CARRIED)),
    }


# imported by ComfyUI's server where a failed import is logged and passed over (docs, templates, the GLSL
# node), not carried (bench/carry-server-wheels.txt)
SERVER_NOT_CARRIED = ("OpenGL", "comfy_angle", "comfyui_embedded_docs", "comfyui_workflow_templates", "comfyui_workflow_templates_core",
                      "comfyui_workflow_templates_json", "comfyui_workflow_templates_media_api",
                      "comfyui_workflow_templates_media_assets_01", "comfyui_workflow_templates_media_image",
                      "comfyui_workflow_templates_media_other", "comfyui_workflow_templates_media_video")


# which dry run each test collects (only the selected tests' runs start)
DRY_RUN_OF_TEST = {"test_bench_flux_sections": "flux", "test_bench_offload": "offload", "test_soak_dry_run": "soak",
                   "test_pin_probe_dry_run": "pin", "test_pin_probe_map_dry_run": "pinmap", "test_oom_check_dry_run": "oom", "test_comfy_peers_dry_run": "peers",
                   "test_server_restart_dry_run": "server", "test_aoti_probe_dry_run": "aoti"}


@pytest.fixture(scope="module")
def dry_runs(request, tmp_path_factory):
    wanted = {DRY_RUN_OF_TEST[item.originalname] for item in request.session.items
              if item.module is request.module and item.originalname in DRY_RUN_OF_TEST}
    base = tmp_path_factory.mktemp("dry-runs")
    runs = {}
    for name, (script, args, timeout, *options) in _dry_run_args(lambda n: str(base / n / "work")).items():
        if name in wanted:
            runs[name] = DryRun(script, base / name, *args, timeout=timeout, **(options[0] if options else {}))
    yield runs
    for r in runs.values():
        r.close()


def rows(path):
    with open(path) as f:
        d = json.load(f)
    assert {"device", "date", "rows"} <= set(d)
    return {r["variant"]: r for r in d["rows"]}


def test_bench_flux_sections(dry_runs):
    run = dry_runs["flux"]
    run.wait()
    tmp_path = run.out
    got = rows(tmp_path / "results-base-lora-profile-merge-firststep.json")
    # the restart row: process start to the first step, with the load's host phases
    first = got["torchao-int8-weight-only compile + lora r64 merged: first step"]
    assert first["to_first_step_s"] >= first["before_load_s"] + first["load_s"] - 0.2 and isinstance(first["bytecode_cached"], bool)
    # modules imported from source without cached bytecode, by package (the device image ships none)
    assert isinstance(first["bytecode_missing"]["dont_write"], bool), first["bytecode_missing"]
    phases = first["load_phases"]
    assert phases["quantize_s"] > 0 and phases["other_s"] >= 0 and phases["read_threads"] >= 1, phases
    assert first["loader_s"] <= first["load_s"] + 0.05
    # the loaded weights and biases are the file's (after the LoRA is taken off again), bit for bit
    assert first["bias_equal"] is True and first["weights_equal"] is True, first
    assert set(first["first_merge_phases"]) == {"pin_lora_s", "capture_s", "queue_s", "gpu_wait_s"}
    for v in ("bf16 eager + lora r64 merge", "bnb-int8 eager + lora r64 merge"):
        r = got[v]
        assert r["merged_equals_load_path"] is True and r["bare_bit_exact"] is True and r["recompiles"] == 0, r
        assert r["swap_s"] > 0 and r["lora_effect_err"] < 1, r
    assert got["bf16 eager"]["step_ratio"] == 1.0 and "torchao-int8-weight-only eager" in got
    active = got["torchao-int8-weight-only compile + lora r64 active"]
    assert active["recompiles"] == 0 and active["swaps"] == 10
    profiled = [v for v in got if v.startswith("profile ")]
    assert any("lora r64 active" in v for v in profiled) and any("attention cudnn" in v for v in profiled)
    assert len(list(tmp_path.glob("profile-*.txt"))) == 4


def test_bench_offload(dry_runs):
    run = dry_runs["offload"]
    run.wait()
    tmp_path = run.out
    got = rows(tmp_path / "results-offload.json")
    compiled, eager = got["fp8 cast compile (regional)"], got["fp8 cast eager"]
    assert abs(compiled["rel_err"] - eager["rel_err"]) < 1e-3, (compiled, eager)
    assert got["torchao fp8 compiled no offload"]["compile_s"] > 0
    modes = [v for v in got if " offload " in v and v.split()[-1] in ("model", "block", "leaf")]
    assert len(modes) == 9 and all(got[v]["equal_to_no_offload"] for v in modes)
    merged = got["fp8 cast offload block + lora merge r64 card 12"]
    assert merged["equal_to_no_offload"] and merged["swapped_r32_equal_to_no_offload"]
    rebased = [r for v, r in got.items() if v.startswith("offload block torchao fp8 compiled card")]
    assert len(rebased) == 8 and all("adjacent_base_step_s" in r and r["equal_to_no_offload"] for r in rebased)
    assert all(r["card_equal_to_adjacent_base"] for r in rebased)
    # one profiled forward of the card asked for: its trace written (no GPU events on a CPU: no summary)
    traced = got["offload block torchao fp8 compiled card 8"]
    trace = (tmp_path / traced["profile_trace"]).read_text()
    assert '"aten::' in trace  # the profiled forward's own ops are in it (not only the final sync)
    assert "profile_trace" not in got["offload block torchao fp8 compiled card 16"]
    # each card also as if ComfyUI ran with --reserve-vram 0: 0.4 GiB less reserve, the rest equal
    for v in ("offload block bf16 card 12", "offload block torchao fp8 compiled card 8"):
        dflt, lean = got[v], got[v + " reserve-vram 0"]
        assert dflt["reserve_vram_gib"] is None and lean["reserve_vram_gib"] == 0
        assert abs(dflt["reserve_gib"] - lean["reserve_gib"] - 400 / 1024) < 0.01  # ComfyUI's 400 MiB on Linux
        assert lean["equal_to_no_offload"]
        # the rule before 2026-12 (minimum inference memory + activations) beside the node's (ComfyUI's
        # max of the two), same process: more reserve, the rest equal
        old = got[v + " reserve sum"]
        assert dflt["reserve_rule"] == "comfy" and old["reserve_rule"] == "sum"
        assert abs(old["reserve_gib"] - dflt["reserve_gib"] - old["activation_est_gib"]) < 0.01, (old, dflt)
        assert old["equal_to_no_offload"] and old["budget_gib"] <= dflt["budget_gib"]
    cards = [r for v, r in got.items() if v.startswith("offload block ") and " card " in v and "lora" not in v]
    assert cards and all(r["hook_host_ms_per_step"] > 0 for r in cards)  # the hooks' host time, per step
    # each card also timed with the room as lookahead + 1 whole buffers (the streamer without its byte window)
    assert all(r["whole_buffers_equal"] and r["whole_buffers_step_s"] > 0 for r in cards)
    # streaming runs around the compiled calls: no card compiles anything (the first installs the
    # streaming, the second re-plans in place)
    assert all(r["graphs_compiled"] == 0 for r in rebased), rebased


def test_soak_dry_run(dry_runs):  # regional compile (the eager soak is the same code without it: CI time)
    run = dry_runs["soak"]
    run.wait()
    got = rows(run.out / "results-soak.json")
    checks = {v: r for v, r in got.items() if "ok" in r}
    assert len(checks) == 5 and all(r["ok"] for r in checks.values()), checks


def test_pin_probe_dry_run(dry_runs):
    """Issue 12's page-locking probe: on CPU nothing is locked, but every variant runs and writes its
    row. (bench/graph_probe.py, the other probe of that round, only adds a CUDA capture to
    bench_flux's loading and forward: nothing of it runs on a CPU, so CI leaves it out.)"""
    run = dry_runs["pin"]
    run.wait()
    got = rows(run.out / "results-pin.json")
    assert len(got) == 6 and not any("error" in r for r in got.values()), got  # hostalloc: CUDA only
    assert not any(r["locked"] for r in got.values())


def test_pin_probe_map_dry_run(dry_runs):
    """The probe of a file locked in place (memory/pinned_file.py): on CPU the file is mapped, not locked,
    and copied from the mapping."""
    run = dry_runs["pinmap"]
    run.wait()
    got = rows(run.out / "results-pin.json")
    assert not any("error" in r for r in got.values()), got
    mapped = next(r for v, r in got.items() if "file mapped" in v)
    assert mapped["gib"] > 0.019 and not mapped["locked"]
    assert next(r for v, r in got.items() if "copied from the mapping" in v)["copied"] is True


def test_oom_check_dry_run(dry_runs):
    out = dry_runs["oom"].wait()
    assert "dry run on cpu" in out and "skipped: needs a CUDA device" in out


def _device_allowed(carries=("carry-wheels.txt",)) -> set[str]:
    """Distributions a script may import on the GPU device: the image's, the carried wheels', and
    what the image's own distributions require, transitively (the image brings those with them).
    carries: the wheel lists the call carries (the server call adds carry-server-wheels.txt)."""
    import importlib.metadata as md
    import re

    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    read = lambda f: [l.strip().split("==")[0] for l in open(os.path.join(ROOT, "bench", f)) if l.strip() and not l.startswith("#")]  # noqa: E731,E741
    image, carried = {norm(n) for n in read("device-image.txt")}, {norm(n) for f in carries for n in read(f)}
    requires = {}
    for d in md.distributions():
        requires.setdefault(norm(d.metadata["Name"]), set()).update(
            norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]) for req in d.requires or () if "extra ==" not in req)
    brought, todo = set(image), list(image)
    while todo:  # what the image's distributions require, transitively (as installed here)
        for r in requires.get(todo.pop(), ()):
            if r not in brought:
                brought.add(r)
                todo.append(r)
    return brought | carried


def check_device_imports(log_path, stand_ins=("av",), carries=("carry-wheels.txt",)):
    """Every third-party module the script's processes imported maps to a distribution the device
    has or a call carries (bench/device-image.txt, bench/carry-wheels.txt); issue 11: a device call
    once found torchsde and PyAV missing. Modules named in stand_ins are let through wherever they
    were loaded from (bench/_env.py's STAND_INS, when the log comes from a run without them forced);
    a stand-in itself is logged without a file and always passes."""
    import importlib.metadata as md
    import re
    import site

    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    allowed = _device_allowed(carries)
    owners = md.packages_distributions()
    roots = [os.path.realpath(p) for p in site.getsitepackages()]
    missing = {}
    for line in open(log_path):
        name, _, where = line.rstrip("\n").partition("\t")
        where = os.path.realpath(where.split(",")[0]) if where else ""
        root = next((r for r in roots if where.startswith(r + os.sep)), None)
        if root is None or name in stand_ins:
            continue  # stdlib, the pack, the ComfyUI tree, the harness stand-ins, generated code
        top = where[len(root) + 1:].split(os.sep)[0].removesuffix(".py")
        # a vendored module (setuptools/_vendor/jaraco) counts as its host package's, whatever this process's
        # sys.path makes of the vendored copies' own metadata (setuptools puts _vendor on it once imported)
        dists = (owners.get(top) if top != name else None) or owners.get(name) or [top]
        if not any(norm(d) in allowed for d in dists):
            missing[name] = dists
    assert not missing, f"imported, but neither in the device image nor carried: {missing}"


def test_comfy_peers_dry_run(dry_runs):
    """Both processes (dynamic VRAM 'on' runs with it off on a CPU), every section, the merged rows
    and the on-vs-off comparison; and (DryRun.wait) nothing imported that the device lacks."""
    run = dry_runs["peers"]
    out = run.wait()
    tmp_path = run.out
    assert "all done" in out
    got = rows(tmp_path / "results-peers.json")
    errors = {v: r for v, r in got.items() if "error" in r or "skipped" in r}
    assert not errors, errors
    for mode in ("on", "off"):
        tag = f"v0.33 dynamic {mode}: "
        assert got[tag + "ours bf16 eager"]["step_ratio"] == 1.0
        for v in ("comfyui default", "comfyui fp8_e4m3fn_fast"):
            assert len(got[tag + v]["switch_s"]) == 1 and got[tag + v]["step_lora_s"] > 0
        rope = ", fused RoPE"  # on by default (nodes/rope_fusion.py): the compiled rows say so
        slotted = got[tag + f"ours torchao-int8-weight-only compile (regional) + slots r64{rope} (none active)"]
        assert len(slotted["switch_s"]) == 1 and slotted["recompiles"] == []
        merged = got[tag + f"ours torchao-int8-weight-only compile (regional) + LoRA merge{rope} (none active)"]
        assert len(merged["switch_s"]) == 1 and merged["recompiles"] == [] and merged["lora_stats"]["merge"]["swaps"] >= 1
        assert tag + f"ours torchao-int8-weight-only compile (regional){rope}" in got
        assert got[tag + "graph bf16 -> FP8LayerwiseCast + LoRAHotswap + CPUOffloadSampler block (2 steps)"]["equal_to_none"]
    assert "v0.33 dynamic off: comfyui fp8_e4m3fn_fast, each block compiled" in got
    compared = {v: r for v, r in got.items() if v.startswith("on vs off: ")}
    assert len(compared) >= 10 and all(r["equal"] for r in compared.values()), compared
    # --profile-merge: each merge section's profiled sampling, its trace kept (xz) and read by
    # bench/timeline.py (CPU events only here: no GPU gaps, the host reads of GPU values counted)
    profiled = {v: r for v, r in got.items() if v.endswith(": profile")}
    assert profiled, sorted(got)
    for r in profiled.values():
        assert (tmp_path / r["trace"]).stat().st_size > 0 and r["trace"].endswith(".json.xz"), r
        assert r["scalar_reads_per_step"] >= 0
        with lzma.open(tmp_path / r["trace"], "rt") as f:  # the marker host_waits counts the steps from
            assert '"quantlora sampler step 0"' in f.read()


def test_device_import_check_catches_a_missing_package(tmp_path):
    import site

    pkg = os.path.join(site.getsitepackages()[0], "av", "__init__.py")
    log = tmp_path / "imports.txt"
    log.write_text(f"av\t{pkg}\nnumpy\t{os.path.join(site.getsitepackages()[0], 'numpy', '__init__.py')}\n")
    check_device_imports(log)  # av has a stand-in
    with pytest.raises(AssertionError, match="av"):
        check_device_imports(log, stand_ins=())


def test_forced_stand_in_answers_any_av_module(tmp_path):
    """The PyAV stand-in (bench/_env.py) answers every av.* module, however deep, where the real one
    is installed too (forced): ComfyUI v0.33's video types import av.video.reformatter, which a fixed
    list of submodules once missed on the device."""
    code = ("import sys; sys.path.insert(0, 'bench'); import _env; _env.setup(cpu=True)\n"
            "import av, comfy_api.latest._input_impl.video_types, comfy_api.latest._ui\n"
            "from av.video.reformatter import ColorRange\n"
            "from av.not_a_module.deeper import Anything\n"
            "assert av.__quantlora_stand_in__ and getattr(av, '__file__', None) is None\n"
            "Anything(1, k=2); print(ColorRange.JPEG.__name__)\n")
    imports = tmp_path / "imports.txt"
    env = dict(os.environ, QUANTLORA_IMPORT_LOG=str(imports), QUANTLORA_FORCE_STANDINS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "JPEG", (r.stdout + r.stderr)[-4000:]
    assert "av\t\n" in imports.read_text()
    check_device_imports(imports, stand_ins=())


def test_server_restart_dry_run(dry_runs):
    """The real server restarted with each graph: the first run writes the weight cache, the restart reads
    it; the LoRA is merged; the KSampler's first step is timed after the server answered and the loader ran;
    ComfyUI's own graph runs too; and (DryRun.wait) the server's own imports are on the device or carried."""
    run = dry_runs["server"]
    run.wait()
    got = rows(run.out / "results-server.json")
    assert set(got) == {"server ours: cold", "server ours: restart-1", "server ours-seq: restart-1", "server comfy: cold",
                        "server comfy: restart-1"}, got
    for name, r in got.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["images"] == 1 and 0 < r["ready_s"] < r["to_first_step_s"] <= r["done_s"], (name, r)
        assert (run.out / f"server-{r['graph']}-{r['attempt']}.log").exists()
        # the server's lines timed from the launch: ComfyUI's start in order, before the first step
        marks = r["start_marks"]
        assert 0 < marks["device"] < marks["nodes_imported"] <= marks["serving"] < r["to_first_step_s"], (name, marks)
    for label, cache in (("cold", "written to the weight cache"), ("restart-1", "read from the weight cache")):
        r = got[f"server ours: {label}"]
        assert r["node_s"]["QuantizedFluxLoader"] > 0 and "KSampler" in r["node_s"], r["node_s"]
        log = " ".join(r["pack_log"])
        assert cache in log and "LoRA merge: " in log, log
    assert "UNETLoader" in got["server comfy: restart-1"]["node_s"]
    # the loader beside the text encoder (nodes/load_overlap.py), or before it with QUANTLORA_OVERLAP_LOAD=0;
    # the same image either way
    for variant, beside in (("server ours: restart-1", True), ("server ours-seq: restart-1", False)):
        order = [name for _, name in got[variant]["timeline"]]
        assert order.index("QuantizedFluxLoader") < order.index("CLIPTextEncode"), (variant, order)
        assert ("loader done" in order and order.index("loader done") > order.index("QuantizedFluxLoader")), order
        log = " ".join(open(run.out / f"server-{got[variant]['graph']}-restart-1.log").read().splitlines())
        assert ("while ComfyUI runs the graph's other nodes" in log) is beside, variant
    assert got["server ours: restart-1"]["image_sha"] == got["server ours-seq: restart-1"]["image_sha"] is not None


def test_aoti_probe_dry_run(dry_runs):
    """A block compiled ahead of time loads in a fresh process without inductor's compiler (fewer modules
    than torch.compile's restart imports) and computes what the eager block computes; the torch.compile
    restart row is there to compare with."""
    run = dry_runs["aoti"]
    run.wait()
    got = rows(run.out / "results-aoti-none.json")
    aoti = got["aoti probe, double block 128 none: aoti restart 1"]
    compiled = got["aoti probe, double block 128 none: compile restart 1"]
    assert "error" not in aoti and "error" not in compiled, (aoti, compiled)
    assert aoti["compile_fx_imported"] is False and compiled["compile_fx_imported"] is True
    assert aoti["modules_imported"] < compiled["modules_imported"], (aoti, compiled)
    assert aoti["max_abs_diff"] < 1e-4 and compiled["max_abs_diff"] < 1e-4, (aoti, compiled)
    assert aoti["first_call_s"] > 0 and aoti["load_s"] > 0
    # one package for every block of a kind: the weights an input, another block's give that block's output
    shared = got["aoti probe, double block 128 none: aoti weights as an input, restart 1"]
    assert "error" not in shared and shared["max_abs_diff"] < 1e-4, shared
    assert shared["other_block_max_abs_diff"] < 1e-4 < shared["other_block_differs"], shared
    # through the pack's speed/aot_blocks.py: ComfyUI's calls (keywords, Flux's transformer_options) all
    # taken by the package, nothing left to torch.compile
    assert shared["package_calls"]["fallback"] == 0 < shared["package_calls"]["package"], shared
    assert shared["other_block_package_calls"] == {"package": 1, "fallback": 0}, shared
    # the package computes what the compiled block computes (compared with the compile cold run's output)
    assert aoti["diff_to_compiled"] < 1e-4 and shared["diff_to_compiled"] < 1e-4, (aoti, shared)
    assert aoti["call_ms"] > 0 and compiled["call_ms"] > 0
