"""GPU benchmark: a real ComfyUI server's restart to the first sampling step.

bench_flux.py's firststep row is a proxy: one Python process that imports what the first step needs
and calls the loader, the merge and one forward itself. This script restarts the real server (main.py
of the carried ComfyUI tree, this pack in custom_nodes/, every built-in node and, on the GPU, the API
nodes, as a user starts it), posts a user's graph to /prompt as soon as /system_stats answers, and
takes the time from the process launch to the KSampler's first progress event on the websocket
(ComfyUI sends it when the first step is done). Between restarts nothing is kept but the disk: the page
cache, inductor's and Triton's caches and the pack's weight cache, as on a user's machine.

Graphs (full size: FLUX.1-dev's shapes with seeded random weights, a random CLIP-L and a random T5-XXL
in fp8, as users have them; LoRA rank 64 on every block layer):
  ours   QuantizedFluxLoader(torchao-fp8-dynamic, compile regional, weight_cache on) -> LoRAHotswap(merge)
  comfy  UNETLoader(fp8_e4m3fn_fast) -> LoraLoaderModelOnly: ComfyUI's own path, in the same call
both -> KSampler(euler, --steps) with DualCLIPLoader(flux) + CLIPTextEncode + FluxGuidance -> taef1 decode ->
SaveImage. The first run of each graph ("cold") writes the caches; "restart" runs follow.

    bash bench/device_run.sh server_restart.py --size full --out $OUT/sr           # on the GPU
    python bench/server_restart.py --size tiny --device cpu --out /tmp/sr ...       # a CPU check (CI)

--size tiny runs the pack's demo set (a tiny Flux conditioned by CLIP-L alone) on the CPU.
Rows go to <out>/results-server.json as each run ends; server logs to <out>/server-<run>.log.
"""
from __future__ import annotations

import time

LAUNCHED_SCRIPT = time.perf_counter()

import argparse  # noqa: E402
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _env  # noqa: E402 (stdlib only at import)

PACK = _env.bootstrap.register_pack(ROOT)
from quantlora.client.run import run_workflow  # noqa: E402
from quantlora.tools.serve import COMFY, ComfyServer  # noqa: E402

LORA_RANK, LORA_SEED = 64, 64  # bench_flux's firststep LoRA
T5_NAME, CLIP_NAME = "quantlora-bench-t5xxl-fp8.safetensors", "quantlora-bench-clip-l.safetensors"


# ---------------------------------------------------------------- model files (a subprocess: torch)
def t5xxl_shapes() -> dict:
    """Key -> shape of ComfyUI's own T5-XXL encoder (its fixed config), from the model built on meta."""
    import comfy.ops
    import comfy.text_encoders.t5 as t5
    import torch

    cfg = json.load(open(os.path.join(os.path.dirname(t5.__file__), "t5_config_xxl.json")))
    model = t5.T5(cfg, torch.float16, "meta", comfy.ops.manual_cast)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_t5xxl_fp8(path: str, device: str, seed: int = 5) -> str:
    """A T5-XXL encoder with random weights in float8_e4m3fn, the layout of the t5xxl_fp8_e4m3fn files
    users have (4.9 GB); norms 1, so activations stay finite for a few layers at least."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(path):
        return path
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in t5xxl_shapes().items():
        if "layer_norm" in k:
            t = torch.ones(shape, device=device)
        else:
            std = 1.0 if k == "shared.weight" else (0.1 if "relative_attention_bias" in k else shape[-1] ** -0.5)
            t = torch.randn(shape, generator=g, device=device) * std
        sd[k] = t.to(torch.float8_e4m3fn).cpu()
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return path


def write_files(args) -> dict:
    """The models of --size under <workdir>/models (ComfyUI's folder names); returns their names."""
    models = os.path.join(args.workdir, "models")
    for sub in ("diffusion_models", "loras", "text_encoders", "vae_approx"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    _env.setup(cpu=args.device == "cpu")
    from quantlora.tools.demo_models import write_clip_l, write_demo_set, write_taef1

    t0 = time.perf_counter()
    if args.size == "tiny":
        from quantlora.tools.demo_models import DEMO_CLIP, DEMO_FLUX, DEMO_LORA_A

        write_demo_set(models)
        return dict(flux=DEMO_FLUX, lora=DEMO_LORA_A, clip_l=DEMO_CLIP, t5=None)
    import bench_flux

    b = bench_flux.Bench(argparse.Namespace(size=args.size, device=args.device, workdir=args.workdir))
    b.write_checkpoint()
    lora = b.write_lora(LORA_RANK, seed=LORA_SEED)
    for src, sub in ((b.path, "diffusion_models"), (lora, "loras")):
        dst = os.path.join(models, sub, os.path.basename(src))
        if not os.path.exists(dst):
            os.symlink(src, dst)
    write_clip_l(os.path.join(models, "text_encoders", CLIP_NAME))
    write_t5xxl_fp8(os.path.join(models, "text_encoders", T5_NAME), args.device)
    if not os.path.exists(os.path.join(models, "vae_approx", "taef1_decoder.safetensors")):
        write_taef1(os.path.join(models, "vae_approx"))
    bench_flux.log(f"model files ready in {time.perf_counter() - t0:.0f} s")
    return dict(flux=os.path.basename(b.path), lora=os.path.basename(lora), clip_l=CLIP_NAME, t5=T5_NAME)


# ---------------------------------------------------------------- graphs
def graph(kind: str, files: dict, args) -> dict:
    px, steps = args.px, args.steps
    if kind.startswith("ours"):
        model = {"1": {"class_type": "QuantizedFluxLoader", "inputs": {
                     "model_name": files["flux"], "quantization": args.quant, "compute_dtype": "auto", "lora_max_rank": 0,
                     "lora_targets": "blocks", "lora_slot_layout": "per-projection", "compile": args.compile,
                     "attention": "auto", "weight_cache": "on"}},
                 "2": {"class_type": "LoRAHotswap", "inputs": {
                     "model": ["1", 0], "lora_name": files["lora"], "strength": 1.0, "max_rank": LORA_RANK,
                     "targets": "blocks", "mode": "merge"}}}
    else:
        model = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["flux"], "weight_dtype": args.comfy_dtype}},
                 "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
                     "model": ["1", 0], "lora_name": files["lora"], "strength_model": 1.0}}}
    if files["t5"]:
        clip = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["t5"],
                                                           "type": "flux", "device": "default"}}
    else:
        clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip_l"], "type": "stable_diffusion",
                                                       "device": "default"}}
    return {**model, "10": clip,
            "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in fresh snow", "clip": ["10", 0]}},
            "12": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["11", 0]}},
            "13": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["11", 0]}},
            "14": {"class_type": "EmptySD3LatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
            "20": {"class_type": "KSampler", "inputs": {
                "seed": 42, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "model": ["2", 0], "positive": ["12", 0], "negative": ["13", 0], "latent_image": ["14", 0]}},
            "21": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
            "22": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["21", 0]}},
            "23": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"sr-{kind}", "images": ["22", 0]}}}


# Variants of our graph: the same graph, the server started with these settings (nodes/load_overlap.py)
VARIANT_ENV = {
    "ours-seq": {"QUANTLORA_OVERLAP_LOAD": "0"},  # the loader before the text encoders, as before session 34
    # the blocks compiled ahead of time (speed/aot_store.py, experimental): its first run builds the
    # packages (in the weight cache folder), the later ones load them instead of compiling
    "ours-aot": {"QUANTLORA_AOT_BLOCKS": "1"},
    # the pack's defaults as a user has them (session 38 on: the packages on by default on CUDA)
    "ours-default": {},
}
# `ours` itself: torch.compile alone, whatever the defaults (the comparison every round made)
OURS_ENV = {"QUANTLORA_AOT_BLOCKS": "0"}


# ---------------------------------------------------------------- one server run
# main.py through bench/_env.py: its import-only stand-in for PyAV where PyAV is missing (the device: not
# carried, see bench/carry-server-wheels.txt) or forced (the CI dry run), the harness's torchvision
# stand-ins where torchvision is missing (CPU), and its import log at exit (CI checks it)
_BOOT = """import runpy, sys
sys.path.insert(0, sys.argv[1])
import _env
sys.path.remove(sys.argv[1])  # bench/'s other modules must not shadow a package ComfyUI imports
b = _env.bootstrap
if b.needs_stubs():
    b.settle_optional_imports()
    b.add_to_path(b.STUBS, index=None)
_env.install_stand_ins()
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Server(ComfyServer):
    """The harness's server, started as a user starts it on a GPU: no --cpu, API nodes on; no frontend
    package (not on the device image): --front-end-root serves an empty folder (the frontend is static
    files, read per request, not at start)."""

    def __init__(self, base, args):
        web = os.path.join(base, "web-root")
        os.makedirs(web, exist_ok=True)
        open(os.path.join(web, "index.html"), "w").write("<html></html>")
        super().__init__(base, extra_args=["--front-end-root", web], cpu=args.device == "cpu")
        self.api_nodes = args.device != "cpu"  # CPU dry runs skip them, as the server tests do

    def command(self):
        args = super().command()
        args = args[args.index(os.path.join(COMFY, "main.py")) + 1:]
        if self.api_nodes:
            args.remove("--disable-api-nodes")
        return [sys.executable, "-c", _BOOT, HERE, os.path.join(COMFY, "main.py"), *args]

    def stop(self):
        """Ctrl-C, as a user stops it (ComfyUI exits cleanly, so the import log is written); killed
        after 20 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "stamper", None):
            self.stamper.join(5)  # the pipe ends with the process: its last lines written
        if getattr(self, "_log", None):
            self._log.close()


def stamp_lines(pipe, log, t0: float):
    """The server's output into its log, each line after the seconds since the launch: where ComfyUI's own
    start spends its time (its log has no times)."""
    for raw in iter(pipe.readline, b""):
        log.write(f"{time.perf_counter() - t0:8.3f} ".encode() + raw)
        log.flush()


# Lines of ComfyUI's start (v0.33) whose times say where it goes: torch and the device, comfy-aimdo, the
# built-in and custom nodes, the server
START_MARKS = {"device": "Total VRAM", "aimdo": "comfy-aimdo inited", "version": "ComfyUI version:",
               "nodes_imported": "Import times for custom nodes", "serving": "Starting server"}


def start_marks(lines: list[str]) -> dict:
    marks = {}
    for ln in lines:
        for name, text in START_MARKS.items():
            m = re.match(r"\s*(\d+\.\d+) ", ln)
            if m and name not in marks and text in ln:
                marks[name] = float(m.group(1))
    return marks


def wait_for_aot_builds(args, limit_s: float = 400) -> float:
    """After a run with the blocks ahead of time: the packages its first calls queued are built by child
    processes that outlive the server (speed/aot_store.py); the next run starts when they are done (each
    removes its saved program at the end), so that it loads them and no build shares the machine."""
    aot = os.path.join(args.workdir, "models", "quantlora_cache", "aot")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        pending = [n for _, _, names in os.walk(aot) for n in names if ".program" in n]
        if not pending:
            break
        time.sleep(0.5)
    return round(time.perf_counter() - t0, 2)


def one_run(kind: str, label: str, files: dict, args, rows: list) -> dict:
    base = os.path.join(args.workdir, "base")
    os.makedirs(base, exist_ok=True)
    link = os.path.join(base, "models")
    if not os.path.exists(link):
        os.symlink(os.path.join(args.workdir, "models"), link)
    srv = Server(base, args)
    srv.log_path = os.path.join(base, "server.log")
    if os.path.exists(srv.log_path):
        os.remove(srv.log_path)
    events, row = [], dict(variant=f"server {kind}: {label}", graph=kind, attempt=label)
    t0 = time.perf_counter()
    try:
        # ComfyServer.start polls every 0.5 s: fine for tests, coarse for a figure; poll every 50 ms here
        nodes_dir = os.path.join(base, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        if not os.path.exists(os.path.join(nodes_dir, "QuantLoRA")):
            os.symlink(ROOT, os.path.join(nodes_dir, "QuantLoRA"))
        srv._log = open(srv.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(OURS_ENV if kind == "ours" else VARIANT_ENV.get(kind, {}))
        srv.proc = subprocess.Popen(srv.command(), cwd=COMFY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        srv.stamper = threading.Thread(target=stamp_lines, args=(srv.proc.stdout, srv._log, t0), daemon=True)
        srv.stamper.start()
        while True:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {srv.proc.returncode}:\n{srv.log_tail()}")
            if time.perf_counter() - t0 > args.ready_timeout:
                raise RuntimeError(f"ComfyUI not ready after {args.ready_timeout} s:\n{srv.log_tail()}")
            try:
                if srv.get("/system_stats"):
                    break
            except OSError:
                time.sleep(0.05)
        row["ready_s"] = round(time.perf_counter() - t0, 2)

        def progress(p):
            events.append((round(time.perf_counter() - t0, 3), p.kind, p.node, p.value))

        res = run_workflow(srv.url, graph(kind, files, args), out_dir=os.path.join(args.workdir, "images"),
                           timeout=args.run_timeout, progress=progress)
        row["done_s"] = round(time.perf_counter() - t0, 2)
        row["images"] = len(res.outputs)
        steps = [t for t, k, n, v in events if k == "progress" and str(n) == "20"]
        row["to_first_step_s"] = steps[0] if steps else None
        row["steps_s"] = round(steps[-1] - steps[0], 3) if len(steps) > 1 else None
        # each node's span: from its 'executing' to the next node's (the sampler's to its first step); the
        # loader, which ComfyUI runs beside the next nodes (async, nodes/load_overlap.py): to its last
        # progress event, sent when its load is done
        starts = [(t, str(n)) for t, k, n, v in events if k == "executing"]
        types = {n: v["class_type"] for n, v in graph(kind, files, args).items()}
        ends = [t for t, _ in starts[1:]] + [row["done_s"]]
        last_progress = {}
        for t, k, n, v in events:
            if k == "progress":
                last_progress[str(n)] = t
        row["node_s"] = {types.get(n, n): round((row["to_first_step_s"] if n == "20" and steps else
                                                 last_progress.get(n, end) if n == "1" else end) - t, 2)
                         for (t, n), end in zip(starts, ends)}
        row["queued_to_start_s"] = round(starts[0][0] - row["ready_s"], 2) if starts else None
        # when each node started and the loader ended, from the launch: what ran beside what
        row["timeline"] = [[t, types.get(n, n)] for t, n in starts] + (
            [[last_progress["1"], "loader done"]] if "1" in last_progress else [])
        row["image_sha"] = pixel_sha(res.outputs[0]) if res.outputs else None
    except Exception as e:  # noqa: BLE001 - a failed run is a row with its error, the next run goes on
        row["error"] = f"{type(e).__name__}: {e}"[-3000:]
    finally:
        srv.stop()
        shutil.copy(srv.log_path, os.path.join(args.out, f"server-{kind}-{label}.log"))
    lines = open(srv.log_path, errors="replace").read().splitlines()
    row["pack_log"] = [ln.strip()[:400] for ln in lines
                       if "quantlora" in ln.lower() and ("load" in ln.lower() or "merge" in ln.lower())][-8:]
    row["start_marks"] = start_marks(lines)
    if kind != "ours":  # builds a run queued (none: returns at once)
        row["aot_build_wait_s"] = wait_for_aot_builds(args)
    # built-in node modules that did not load (a package not carried): the start is that much shorter
    row["import_failed"] = [ln.strip()[:200] for ln in lines if "Cannot import" in ln or "IMPORT FAILED" in ln][:12]
    for ln in lines:
        m = re.search(r"pytorch version: (\S+)", ln)
        if m:
            TORCH_VERSION[0] = m.group(1)
    rows.append(row)
    flush(args, rows)
    print(json.dumps(row), flush=True)
    return row


def pixel_sha(path: str) -> str | None:
    """The image's pixels, hashed (the PNG's own bytes hold the graph, which names the variant)."""
    try:
        import hashlib

        from PIL import Image

        with Image.open(path) as im:
            return hashlib.sha256(im.tobytes()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - a figure without the check, not a failed run
        return None


TORCH_VERSION = ["?"]  # as the server logs it (this process never imports torch)


def flush(args, rows):
    os.makedirs(args.out, exist_ok=True)
    device = os.environ.get("QUANTLORA_BENCH_DEVICE_NAME", args.device)
    with open(os.path.join(args.out, "results-server.json"), "w") as f:
        json.dump({"device": device, "date": datetime.date.today().isoformat(), "size": args.size,
                   "torch": TORCH_VERSION[0], "comfyui": os.path.basename(COMFY), "rows": rows}, f, indent=1)


def device_name(args) -> str:
    if args.device == "cpu":
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cuda"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=["full", "smoke", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-sr")
    ap.add_argument("--quant", default="torchao-fp8-dynamic")
    ap.add_argument("--compile", default="regional")
    ap.add_argument("--comfy-dtype", default="fp8_e4m3fn_fast")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--restarts", type=int, default=3, help="restarts of our graph after its cold run")
    ap.add_argument("--alternate", default="", help="comma-separated variants of our graph (VARIANT_ENV) restarted "
                                                     "--restarts times each, alternating with ours")
    ap.add_argument("--cold-variant", default="ours", help="the variant of our graph whose run writes the caches")
    ap.add_argument("--comfy-restarts", type=int, default=2, help="restarts of ComfyUI's own graph (0: none)")
    ap.add_argument("--budget-s", type=float, default=520, help="no new run starts after this many seconds")
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--run-timeout", type=float, default=300)
    ap.add_argument("--write-files", action="store_true", help="(internal) write the model files and exit")
    args = ap.parse_args()
    if args.write_files:
        print("FILES " + json.dumps(write_files(args)), flush=True)
        return
    _env.install_stand_ins()  # (logged) what each server process installs too, see _BOOT
    os.makedirs(args.out, exist_ok=True)
    os.environ["QUANTLORA_BENCH_DEVICE_NAME"] = device_name(args)
    # the files in their own process: its CUDA context and host copies are gone before any server starts
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--write-files", *sys.argv[1:]],
                          capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FILES ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"writing the model files failed ({proc.returncode}):\n{proc.stdout[-2000:]}")
    files = json.loads(lines[-1][len("FILES "):])
    rows = []
    kinds = ["ours"] + [k for k in args.alternate.split(",") if k]
    unknown = [k for k in kinds[1:] if k not in VARIANT_ENV]
    if unknown:
        raise SystemExit(f"--alternate: unknown variants {unknown}; known: {sorted(VARIANT_ENV)}")
    plan = [(args.cold_variant, "cold")] + [(k, f"restart-{i + 1}") for i in range(args.restarts) for k in kinds]
    if args.comfy_restarts:
        plan += [("comfy", "cold")] + [("comfy", f"restart-{i + 1}") for i in range(args.comfy_restarts)]
    for kind, label in plan:
        if time.perf_counter() - LAUNCHED_SCRIPT > args.budget_s:
            rows.append(dict(variant=f"server {kind}: {label}", skipped="out of the call's time budget"))
            continue
        one_run(kind, label, files, args, rows)
    flush(args, rows)
    failed = [r["variant"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"failed runs: {failed}")


if __name__ == "__main__":
    main()
