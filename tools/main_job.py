"""The main job (scripts/run_main.sh): ComfyUI with this pack runs the example workflow flux-nf4-lora headless.

A real ComfyUI server with this pack; example_workflows/api/flux-nf4-lora.api.json (QuantizedFluxLoader NF4
+ one LoRA, stock ComfyUI nodes) run through the pack's client (client.run_workflow, with the job's
options as overrides) on the demo models, then the server keeps serving (--exit: stop).

Run from the repository root with the venv's python: python -m tools.main_job [--models DIR] [--exit]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from . import bootstrap
from .serve import COMFY, COMFY_VERSION, PACK_DIR_NAME, ROOT, STUBS, ComfyServer, free_port, needs_stubs, port_free

DEFAULT_BASE = os.path.join(ROOT, ".harness", "main-job")
WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "flux-nf4-lora.api.json")
CACHE = os.path.join(ROOT, ".harness", "cache")
# ComfyUI model folder names -> subfolders of a user's models folder (as ComfyUI/models lays them out).
USER_FOLDERS = {"diffusion_models": ["diffusion_models", "unet"], "text_encoders": ["text_encoders", "clip"],
                "vae": ["vae"], "vae_approx": ["vae_approx"], "loras": ["loras"], "checkpoints": ["checkpoints"]}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def import_comfy_in_process() -> None:
    """ComfyUI's modules (for writing the demo set), as the test conftest imports them."""
    bootstrap.settle_optional_imports().is_torchvision_available()  # decided before any stand-in is on the path
    bootstrap.add_to_path(COMFY)
    if needs_stubs():
        bootstrap.add_to_path(STUBS, index=1)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def pack():
    """The repository as the package `quantlora` (as ComfyUI imports it), for checkpoint/ (needs no ComfyUI)."""
    import importlib

    bootstrap.register_pack(ROOT)
    importlib.import_module("quantlora.checkpoint.sources")
    return sys.modules["quantlora"]


def write_extra_paths(base: str, models: str) -> str:
    """An extra_model_paths.yaml that adds the user's models folder to ComfyUI's search paths."""
    lines = ["quantlora_user_models:", f"  base_path: {json.dumps(os.path.abspath(models))}"]
    for kind, subs in USER_FOLDERS.items():
        lines.append(f"  {kind}: |")
        lines += [f"    {s}" for s in subs]
    path = os.path.join(base, "extra_model_paths.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def workflow_overrides(a, prefix: str = "quantlora-main") -> list[str]:
    """The job's options as client overrides on the workflow's nodes (addressed by their titles)."""
    return [f"Flux model.quantization={json.dumps(a.quantization)}", f"Prompt.text={json.dumps(a.prompt)}",
            f"Sampler.seed={a.seed}", f"Sampler.steps={a.steps}", f"Image size.width={a.size}",
            f"Image size.height={a.size}", f"Save.filename_prefix={json.dumps(prefix)}"]


class Progress:
    """Plain progress lines from the client's events: each node as it starts, sampling steps by quarters."""

    def __init__(self):
        self.last = None

    def __call__(self, p) -> None:
        if p.kind == "executing":
            say(f"  running {p.title} ({p.class_type})" if p.title != p.class_type else f"  running {p.title}")
            self.last = None
        elif p.kind == "cached" and p.data and p.data.get("nodes"):
            say(f"  cached: {len(p.data['nodes'])} node(s)")
        elif p.kind == "progress" and p.max:
            quarter = int(4 * (p.value or 0) / p.max)
            if quarter != self.last:
                self.last = quarter
                say(f"    {p.value:g}/{p.max:g}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/run_main.sh", description=__doc__.splitlines()[0])
    p.add_argument("--models", metavar="DIR", help="your own ComfyUI models folder (diffusion_models/, unet/, "
                   "text_encoders/, clip/, vae/, loras/ ...): added to ComfyUI's search paths, never written to")
    p.add_argument("--base", metavar="DIR", default=DEFAULT_BASE,
                   help="ComfyUI base directory for this job (custom_nodes, output, demo models); default %(default)s")
    p.add_argument("--listen", default="127.0.0.1", help="address the server listens on (default %(default)s)")
    p.add_argument("--port", type=int, default=8188, help="port (default %(default)s; a free one if taken)")
    p.add_argument("--quantization", default="bnb-nf4", help="QuantizedFluxLoader quantization (default %(default)s)")
    p.add_argument("--prompt", default="a red fox in the snow", help="text prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="image width and height (multiple of 16)")
    p.add_argument("--exit", action="store_true", help="stop the server after the image (for scripting)")
    return p.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    a = parse_args(argv)
    # Ctrl-C and a plain kill both stop the server with the job (also where SIGINT was ignored at start).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    base = os.path.abspath(a.base)
    os.makedirs(base, exist_ok=True)
    extra = []

    list_checkpoints = pack().checkpoint.sources.list_checkpoints

    if a.models:
        if not os.path.isdir(a.models):
            say(f"--models {a.models}: not a folder.")
            return 2
        extra += ["--extra-model-paths-config", write_extra_paths(base, a.models)]
        found = list_checkpoints([os.path.join(a.models, s) for s in USER_FOLDERS["diffusion_models"]])
        if found:
            say(f"Your models folder {a.models} is added to ComfyUI's search paths; its FLUX candidates: {', '.join(found)}.")
            say("Pick them in QuantizedFluxLoader in the UI (with your text encoders and VAE). "
                "This job's own check image uses the small demo set below.")
        else:
            say(f"No FLUX.1 transformer found in {a.models}/diffusion_models or {a.models}/unet.")

    models_dir = os.path.join(base, "models")
    from tools.demo_models import DEMO_CLIP, DEMO_FLUX, DEMO_LORAS, demo_set_complete

    say("")
    say("DEMO MODELS: a tiny FLUX-architecture transformer, a CLIP-L text encoder, taef1 and two LoRAs, all with "
        "RANDOM WEIGHTS.")
    say("They exercise the machinery (loading, quantization, LoRA, sampling, decoding); their images are noise.")
    say(f"  {DEMO_FLUX}, {DEMO_CLIP}, taef1, {', '.join(DEMO_LORAS)}")
    say(f"  written to {models_dir} (once; reused afterwards)")
    if not demo_set_complete(models_dir):
        import_comfy_in_process()
        from tools.demo_models import write_demo_set

        os.makedirs(CACHE, exist_ok=True)
        write_demo_set(models_dir, cache_dir=CACHE)

    import torch

    cuda = torch.cuda.is_available()
    port = a.port
    if not port_free(port, a.listen if a.listen not in ("0.0.0.0", "::") else "127.0.0.1"):
        port = free_port()
        say(f"Port {a.port} is taken; using {port}.")
    srv = ComfyServer(base, extra_args=extra, port=port, listen=a.listen, cpu=not cuda)
    say("")
    say(f"Starting ComfyUI {COMFY_VERSION} ({COMFY}) on {'the GPU' if cuda else 'the CPU'}; "
        f"log: {os.path.join(base, 'server.log')}")
    try:
        t0 = time.time()
        srv.start()
        host = a.listen if a.listen not in ("0.0.0.0", "::") else "127.0.0.1"
        ui = f"http://{host}:{srv.port}"
        say(f"ComfyUI is up after {time.time() - t0:.1f} s. UI: {ui}")

        from client import ClientError, run_workflow

        rel = os.path.relpath(WORKFLOW, ROOT)
        overrides = workflow_overrides(a)
        say(f"Running the example workflow {rel} (Flux NF4 + one LoRA) headless through the pack's client "
            f"(client.run_workflow), on the demo models, with these overrides:")
        for item in overrides:
            say(f"  --set {item}")
        t0 = time.time()
        try:
            result = run_workflow(srv.url, WORKFLOW, overrides=overrides, out_dir=None, timeout=3600,
                                  progress=Progress())
        except ClientError as e:
            say(f"The workflow failed: {e}")
            rc = 1
        else:
            files = [f for out in result.node_outputs.values() for f in out.get("images", [])]
            for f in files:
                say(f"Image saved in {time.time() - t0:.1f} s: "
                    f"{os.path.join(base, f.get('type', 'output'), f.get('subfolder', ''), f['filename'])}")
            rc = 0 if files else 1
            if not files:
                say(f"The workflow ran but saved no image: {result.node_outputs}")
        say(f"All example workflows are in the UI: Templates (left sidebar) > {PACK_DIR_NAME} (under Extensions; "
            "Custom Nodes in older frontends).")
        if a.exit:
            return rc
        say(f"\nComfyUI is serving at {ui} (the pack's nodes are under QuantLoRA). Press Ctrl-C to stop.")
        while srv.alive():
            time.sleep(1)
        say(f"ComfyUI exited with {srv.proc.returncode}; see {srv.log_path}")
        return srv.proc.returncode or 1
    except KeyboardInterrupt:
        say("\nStopping ComfyUI.")
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
