"""GPU soak (issue 7): a long queue of prompts on one loaded, compiled model, alternating three LoRAs,
strengths, chains and no LoRA, in-process through the pack's nodes and ComfyUI's own sampler.

tests/test_soak.py is the short CPU version through the real server (200 prompts, bit-exact against
fresh loads, bounded RSS). This is the one that needs a GPU: torch.compile on (regional), fp8 weights,
and VRAM. For each prompt: LoRAHotswap nodes on the loaded MODEL, then nodes.common_ksampler.

Checked, each a row in <out>/results-soak.json (exit status 1 if one fails):
- every output equals, bit for bit, the same setting on a fresh load (loaded, slotted, compiled and
  sampled once per setting before the queue);
- no recompile after the warm-up (every setting seen once; torch._dynamo.config.error_on_recompile);
- host RSS and torch's allocated/reserved VRAM after the queue within --bound (3%) of after the warm-up;
- no model is left with an active LoRA set.

    python bench/soak.py --out $OUT                                    # CUDA: smoke size, fp8, compiled
    python bench/soak.py --device cpu --size tiny --quantization none --compile off --prompts 24   # dry run
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402
from bench_flux import GIB, log  # noqa: E402

SIZES = {
    "full": dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38),
    "smoke": dict(hidden_size=3072, num_heads=24, depth=2, depth_single_blocks=4),
    "tiny": dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=2),  # heads of 128, as ComfyUI needs
}
A, B, C = "soak-a.safetensors", "soak-b.safetensors", "soak-c.safetensors"
# Consecutive prompts always differ, so every prompt swaps.
SETTINGS = [[], [(A, 1.0)], [(B, 0.5)], [(C, 1.0)], [(A, 0.3)], [(B, -0.7)], [(A, 1.0), (C, 0.5)], [(C, -0.4)]]
WARM = len(SETTINGS) + 2  # prompts before memory is read and recompiles become errors: every setting seen


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory(dev) -> dict:
    m = {"rss": rss()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        m.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved())
    return m


def write_models(args) -> str:
    import folder_paths
    from quantlora.tools import demo_models as dm

    flux_dir, lora_dir = os.path.join(args.workdir, "diffusion_models"), os.path.join(args.workdir, "loras")
    os.makedirs(flux_dir, exist_ok=True)
    flux = os.path.join(flux_dir, f"soak-flux-{args.size}.safetensors")
    if not os.path.exists(flux):
        cfg = dict(dm.TINY, context_in_dim=4096, **SIZES[args.size])
        dm.write_bfl(flux, dm.flux_bfl_state_dict(cfg, seed=11, dtype=torch.bfloat16))
    r = args.max_rank  # B fills the slots; A + C chained fill them too
    dm.write_demo_lora(os.path.join(lora_dir, A), flux, rank=3 * r // 4, seed=101, fmt="bfl")
    dm.write_demo_lora(os.path.join(lora_dir, B), flux, rank=r, seed=102, fmt="kohya")
    dm.write_demo_lora(os.path.join(lora_dir, C), flux, rank=r // 4, seed=103, fmt="bfl", modules=(".qkv", ".proj", ".linear1"))
    folder_paths.add_model_folder_path("diffusion_models", flux_dir)
    folder_paths.add_model_folder_path("loras", lora_dir)
    return os.path.basename(flux)


def run(args) -> list[dict]:
    import comfy.model_management as mm
    import nodes
    import torch._dynamo

    from quantlora.nodes import runtime
    from quantlora.nodes.hotswap_node import LoRAHotswap
    from quantlora.nodes.loader_node import QuantizedFluxLoader

    dev = torch.device(args.device)
    rows = []

    def check(name, ok, **info):
        detail = json.dumps(info)[:400]
        rows.append({"variant": f"soak: {name}", "ok": bool(ok), "detail": detail})
        log("PASS" if ok else "FAIL", name, detail)

    flux_name = write_models(args)
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randn(1, 64, 4096, generator=g), torch.randn(1, 768, generator=g)]
    pos = [[ctx[0], {"pooled_output": ctx[1], "guidance": 3.5}]]
    neg = [[torch.zeros_like(ctx[0]), {"pooled_output": torch.zeros_like(ctx[1]), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, args.px // 8, args.px // 8)}

    def load():
        return asyncio.run(QuantizedFluxLoader.execute(flux_name, args.quantization, "auto", lora_max_rank=args.max_rank,
                                                       compile=args.compile)).args[0]

    def sample(base, setting, seed):
        m = base
        for name, strength in setting:
            m = LoRAHotswap.execute(m, name, strength, args.max_rank, "blocks").args[0]
        with torch.no_grad():
            return nodes.common_ksampler(m, seed, args.steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    seed = lambda s: 9000 + s  # noqa: E731  one seed per setting
    t0 = time.perf_counter()
    want = []
    for s, setting in enumerate(SETTINGS):  # fresh loads, each dropped before the next
        fresh = load()
        want.append(sample(fresh, setting, seed(s)))
        del fresh
        mm.unload_all_models()
        gc.collect()
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    check("settings give distinct outputs", len({w.numpy().tobytes() for w in want}) == len(SETTINGS))
    t_ref = time.perf_counter() - t0

    base = load()
    mismatched, max_rel, recompiles, times = [], 0.0, 0, []
    for i in range(args.prompts):
        s = i % len(SETTINGS)
        if i == WARM:
            mem_warm = memory(dev)
            torch._dynamo.config.error_on_recompile = args.compile != "off"
        t = time.perf_counter()
        try:
            out = sample(base, SETTINGS[s], seed(s))
        except Exception as e:  # error_on_recompile raises on any recompile
            if "recompil" not in str(e).lower():
                raise
            recompiles += 1
            log(f"prompt {i}: recompile: {str(e)[:300]}")
            torch._dynamo.config.error_on_recompile = False
            out = sample(base, SETTINGS[s], seed(s))
            torch._dynamo.config.error_on_recompile = True
        times.append(time.perf_counter() - t)
        if not torch.equal(out, want[s]):
            mismatched.append(i)
            max_rel = max(max_rel, ((out.float() - want[s].float()).norm() / want[s].float().norm()).item())
        if (i + 1) % 50 == 0:
            log(f"{i + 1} prompts, median {statistics.median(times[-50:]) * 1000:.0f} ms, {json.dumps(memory(dev))}")
    torch._dynamo.config.error_on_recompile = False
    mem_end = memory(dev)
    t_soak = sum(times)

    check("outputs equal fresh loads", not mismatched, mismatched=len(mismatched), first=mismatched[:10], max_rel=max_rel)
    check("no recompile after warm-up", recompiles == 0, recompiles=recompiles, compile=args.compile)
    for k in mem_warm:
        growth = (mem_end[k] - mem_warm[k]) / max(mem_warm[k], 1)
        check(f"{k} bounded", growth <= args.bound, after_warm_gib=round(mem_warm[k] / GIB, 3),
              after_queue_gib=round(mem_end[k] / GIB, 3), growth=round(growth, 4))
    stats = runtime.stats()
    check("no adapter left active", stats["hotswap"]["active"] == 0, stats=stats)
    summary = dict(quantization=args.quantization, compile=args.compile, prompts=args.prompts, steps=args.steps, px=args.px,
                   references_s=round(t_ref, 1), queue_s=round(t_soak, 1), prompt_ms_median=round(statistics.median(times) * 1000, 1))
    rows.append({"variant": "soak: summary", "detail": json.dumps(summary)})
    log(json.dumps(summary))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="smoke", choices=SIZES)
    ap.add_argument("--quantization", default="torchao-fp8-dynamic")
    ap.add_argument("--compile", default="regional", choices=["off", "regional"])
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--bound", type=float, default=0.03)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-soak")
    args = ap.parse_args()
    if args.prompts <= WARM:
        ap.error(f"--prompts must be more than the {WARM} warm-up prompts")
    _env.setup(cpu=args.device == "cpu")
    shutil.rmtree(os.path.join(args.workdir, "loras"), ignore_errors=True)
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    with open(os.path.join(args.out, "results-soak.json"), "w") as f:  # bench/report.py's raw-run format
        json.dump({"device": dev, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "size": args.size,
                   "rows": rows}, f, indent=1)
    failed = [r["variant"] for r in rows if r.get("ok") is False]
    log("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
