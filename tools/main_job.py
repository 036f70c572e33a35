"""The main job (scripts/run_main.sh): a real ComfyUI server with this pack, one txt2img image
through QuantizedFluxLoader and stock ComfyUI nodes, then the server keeps serving (--exit: stop).

Run from the repository root with the venv's python: python -m tools.main_job [--models DIR] [--exit]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .serve import COMFY, ROOT, STUBS, ComfyServer, execution_error, free_port, needs_stubs, port_free

DEFAULT_BASE = os.path.join(ROOT, ".harness", "main-job")
CACHE = os.path.join(ROOT, ".harness", "cache")
# ComfyUI model folder names -> subfolders of a user's models folder (as ComfyUI/models lays them out).
USER_FOLDERS = {"diffusion_models": ["diffusion_models", "unet"], "text_encoders": ["text_encoders", "clip"],
                "vae": ["vae"], "vae_approx": ["vae_approx"], "loras": ["loras"], "checkpoints": ["checkpoints"]}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def import_comfy_in_process() -> None:
    """ComfyUI's modules (for writing the demo set), as the test conftest imports them."""
    import diffusers.utils.import_utils  # noqa: F401
    import transformers.utils.import_utils as t

    t.is_torchvision_available()  # decided before any stand-in is on the path
    sys.path.insert(0, COMFY)
    if needs_stubs():
        sys.path.insert(1, STUBS)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def pack():
    """The repository as the package `quantlora` (as ComfyUI imports it), for quant/ (needs no ComfyUI)."""
    import importlib
    import importlib.util

    if "quantlora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quantlora", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules["quantlora"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    importlib.import_module("quantlora.quant.sources")
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


def txt2img(flux: str, clip: str, quantization: str, text: str, seed: int, steps: int, size: int) -> dict:
    """QuantizedFluxLoader on a Flux transformer through stock ComfyUI nodes, ending in SaveImage."""
    return {
        "model": {"class_type": "QuantizedFluxLoader",
                  "inputs": {"model_name": flux, "quantization": quantization, "compute_dtype": "auto"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["clip", 0]}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["guided", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "quantlora-main"}},
    }


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

    list_checkpoints = pack().quant.sources.list_checkpoints

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
    from tools.demo_models import DEMO_CLIP, DEMO_FLUX

    say("")
    say("DEMO MODELS: a tiny FLUX-architecture transformer, a CLIP-L text encoder and taef1 with RANDOM WEIGHTS.")
    say("They exercise the machinery (loading, quantization, sampling, decoding); their images are noise.")
    say(f"  written to {models_dir} (once; reused afterwards)")
    if not (os.path.exists(os.path.join(models_dir, "diffusion_models", DEMO_FLUX))
            and os.path.exists(os.path.join(models_dir, "text_encoders", DEMO_CLIP))
            and os.path.exists(os.path.join(models_dir, "vae_approx", "taef1_decoder.safetensors"))):
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
    say(f"Starting ComfyUI ({COMFY}) on {'the GPU' if cuda else 'the CPU'}; log: {os.path.join(base, 'server.log')}")
    try:
        t0 = time.time()
        srv.start()
        host = a.listen if a.listen not in ("0.0.0.0", "::") else "127.0.0.1"
        ui = f"http://{host}:{srv.port}"
        say(f"ComfyUI is up after {time.time() - t0:.1f} s. UI: {ui}")

        say(f"Queueing txt2img: QuantizedFluxLoader({DEMO_FLUX}, {a.quantization}) -> CLIPTextEncode -> FluxGuidance "
            f"-> KSampler ({a.steps} steps, {a.size}x{a.size}) -> VAEDecode (taef1) -> SaveImage")
        t0 = time.time()
        entry = srv.run(txt2img(DEMO_FLUX, DEMO_CLIP, a.quantization, a.prompt, a.seed, a.steps, a.size))
        err = execution_error(entry)
        if err:
            say(f"The graph failed in {err.get('node_type')}: {err.get('exception_message', '').strip()}")
            rc = 1
        else:
            img = entry["outputs"]["save"]["images"][0]
            path = os.path.join(base, img["type"], img["subfolder"], img["filename"])
            say(f"Image saved in {time.time() - t0:.1f} s: {path}")
            rc = 0
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
