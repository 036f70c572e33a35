"""GPU check of the out-of-memory handling (memory/oom.py, nodes/bridge.py, nodes/runtime.py) under
real memory pressure: the GPU is filled on purpose, then the pack loads and samples into the OOM.

STATUS: steps 1-5 ran on an H200 with ComfyUI v0.33 (run h200-smoke-oom-v033, all checks passed);
step 6 (the offload sampler's re-plan) not yet run on a GPU. tests/comfy/test_oom.py covers the same paths on
CPU with an injected torch.OutOfMemoryError; this script is the check that real CUDA OOMs (raised by the caching
allocator, bitsandbytes, the attention kernels) go through the same handling.

On a CUDA device it:
 1. writes a seeded random Flux checkpoint (--size smoke: FLUX.1 width, 2+4 blocks, ~2.5 GiB bf16);
 2. load under pressure: fills the GPU (plain allocations, 256 MiB then 16 MiB chunks) until only
    about half of what --quantization's weights need is free, loads with load_flux_model_patcher
    (quantized weights are made on the GPU block by block) and expects a QuantLoRAError saying
    "out of GPU memory while loading" with the GPU's numbers and settings that would fit;
    torch.cuda.memory_allocated() must be back at the filler's level (partial weights released);
 3. recovery: frees the filler, loads again: must succeed;
 4. sampling under pressure: with that model (the loader node's wrappers installed), fills the
    GPU until --leave-sample-gib is free and samples one step at --sample-px (2048: 16k image
    tokens) through ComfyUI's common_ksampler; expects "out of GPU memory while sampling" with a
    lower resolution that fits, the models unloaded and the memory back at the filler's level;
 5. recovery: frees the filler and samples one step at 512 px: must succeed;
 6. CPUOffloadSampler, block mode with a budget read from the card, whose sampling reserve is made
    0.6x what sampling at --offload-px measured beside the weights, on a card filled to that reserve
    plus all of the weights: the plan keeps every block resident and the first attempt is meant to
    run out of memory for real; the node re-plans once with twice the reserve and gives the fully
    loaded latent. Not yet achieved on an H200 (session 25): with 70% of the weights every block
    streamed, with all of them every block stayed, and both times sampling fit (the need measured
    beside a fully loaded model overstates sampling's peak), so the two OOM checks failed and the
    latent check passed. The re-plan itself is tested on the CPU (tests/comfy/test_oom.py).
Each check is a row in --out/oom_check.json; the exit status is 1 if any failed.

    python bench/oom_check.py --out $OUT                    # CUDA
    python bench/oom_check.py --device cpu                  # dry run: imports, plan, then skips
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20
SIZES = {
    "smoke": dict(hidden_size=3072, num_heads=24, depth=2, depth_single_blocks=4),
    "tiny": dict(hidden_size=128, num_heads=4, depth=1, depth_single_blocks=2),
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


class Filler:
    """Holds plain allocations until at most `leave` bytes are free on the device."""

    def __init__(self, device):
        self.device, self.chunks = device, []

    def fill(self, leave: int) -> int:
        for chunk in (256 * MIB, 16 * MIB):
            while True:
                free, _ = torch.cuda.mem_get_info(self.device)
                if free - chunk < leave:
                    break
                try:
                    self.chunks.append(torch.empty(chunk, dtype=torch.uint8, device=self.device))
                except torch.OutOfMemoryError:
                    break
        return torch.cuda.mem_get_info(self.device)[0]

    def free(self):
        self.chunks.clear()
        gc.collect()
        torch.cuda.empty_cache()


def conds(context_in_dim: int = 4096, tokens: int = 256):
    c = [[torch.zeros(1, tokens, context_in_dim), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]
    return c, [[torch.zeros(1, tokens, context_in_dim), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]


def sample(patcher, px: int):
    import nodes

    pos, neg = conds()
    latent = {"samples": torch.zeros(1, 16, px // 8, px // 8)}
    with torch.no_grad():
        return nodes.common_ksampler(patcher, 1, 1, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]


def run(args) -> list[dict]:
    import comfy.model_management as mm

    from quantlora.errors import QuantLoRAError
    from quantlora.nodes import runtime
    from quantlora.nodes.bridge import load_flux_model_patcher
    from quantlora.memory import oom
    from quantlora.checkpoint.safetensors_io import read_header
    from quantlora.tools import demo_models as dm

    dev = torch.device(args.device)
    rows = []

    def check(name, ok, **info):
        rows.append({"check": name, "ok": bool(ok), **info})
        log(("PASS" if ok else "FAIL"), name, json.dumps(info)[:600])

    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"oom-flux-{args.size}.safetensors")
    if not os.path.exists(path):
        cfg = dict(dm.TINY, context_in_dim=4096, **SIZES[args.size])
        dm.write_bfl(path, dm.flux_bfl_state_dict(cfg, seed=0))
        log(f"wrote {path}: {os.path.getsize(path) / GIB:.2f} GiB")
    shapes = {k: v.shape for k, v in read_header(path).tensors.items()}
    need = oom.weight_estimates(shapes, torch.bfloat16, [args.quantization])[0][args.quantization]
    filler = Filler(dev)

    # 2. load under pressure
    free = filler.fill(leave=max(need // 2, 64 * MIB))
    base = torch.cuda.memory_allocated(dev)
    log(f"load: weights need ~{need / GIB:.2f} GiB, {free / GIB:.2f} GiB left free")
    msg, other = None, None
    try:
        load_flux_model_patcher(path, args.quantization, "bf16")
    except QuantLoRAError as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001 - the point is to see what escapes
        other = f"{type(e).__name__}: {e}"[:1000]
    after = torch.cuda.memory_allocated(dev)
    check("load OOM is a QuantLoRAError", msg is not None and "out of GPU memory while loading" in msg,
          message=msg, escaped=other)
    check("load OOM names free memory and settings", bool(msg) and "free" in msg and
          ("would fit" in msg or "No quantization fits" in msg), message=msg)
    check("partial weights released", after <= base + 64 * MIB, allocated_before=base, allocated_after=after)

    # 3. recovery
    filler.free()
    patcher, report = None, None
    try:
        patcher, report = load_flux_model_patcher(path, args.quantization, "bf16")
        runtime.install(patcher)
        check("load succeeds after the OOM", True, weights_gib=round(report.weights_bytes / GIB, 3))
    except Exception as e:  # noqa: BLE001
        check("load succeeds after the OOM", False, error=f"{type(e).__name__}: {e}"[:1000])
        return rows

    # 4. sampling under pressure
    sample(patcher, 256)  # warm: ComfyUI loads the model, kernels are chosen
    torch.cuda.synchronize(dev)
    free = filler.fill(leave=int(args.leave_sample_gib * GIB))
    base = torch.cuda.memory_allocated(dev)
    log(f"sampling {args.sample_px}px with {free / GIB:.2f} GiB free")
    msg, other = None, None
    try:
        sample(patcher, args.sample_px)
    except QuantLoRAError as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001
        import traceback

        other = f"{type(e).__name__}: {e}"[:1000]
        log("escaped:\n" + "".join(traceback.format_exception(e))[-6000:])
    torch.cuda.synchronize(dev)
    after = torch.cuda.memory_allocated(dev)
    check("sampling OOM is a QuantLoRAError", msg is not None and "out of GPU memory while sampling" in msg,
          message=msg, escaped=other)
    check("sampling OOM suggests a resolution", bool(msg) and "lower resolution" in msg, message=msg)
    check("activations released, models unloaded", after <= base + 64 * MIB and not mm.current_loaded_models,
          allocated_before=base, allocated_after=after, loaded=len(mm.current_loaded_models))
    state = runtime.hotswap_state(patcher.model.diffusion_model)
    check("no adapter left active", state is None or not state.active)

    # 5. recovery
    filler.free()
    try:
        out = sample(patcher, 512)
        check("sampling succeeds after the OOM", bool(torch.isfinite(out).all()), shape=list(out.shape))
    except Exception as e:  # noqa: BLE001
        check("sampling succeeds after the OOM", False, error=f"{type(e).__name__}: {e}"[:1000])
    offload_replan(patcher, report, filler, dev, args, check)
    return rows


def offload_replan(patcher, report, filler, dev, args, check):
    """6. CPUOffloadSampler in block mode with a budget read from the card, whose sampling reserve
    was too small (0.6x what sampling at --offload-px measured beside the weights): the first attempt
    runs out of GPU memory for real, the node re-plans once with twice the reserve and samples; the
    latent equals the fully loaded one (offload is exact)."""
    import comfy.model_management as mm

    from quantlora.nodes import offload_run as node

    px = args.offload_px
    mm.unload_all_models()
    filler.free()
    want = sample(patcher, px)  # fully loaded; what sampling needs beside the weights, measured
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    sample(patcher, px)
    need = torch.cuda.max_memory_allocated(dev) - torch.cuda.memory_allocated(dev)
    mm.unload_all_models()
    filler.free()
    weights = report.weights_bytes
    small = int(0.6 * need)
    free = filler.fill(leave=small + weights)
    log(f"offload re-plan: sampling needs {need / GIB:.2f} GiB beside the weights, reserve made "
        f"{small / GIB:.2f} GiB, {free / GIB:.2f} GiB free for {weights / GIB:.2f} GiB of weights")
    real_reserve, plans = node.sampling_reserve, []
    real_plan = node.plan_offload
    node.sampling_reserve = lambda *a, **k: small

    def recorded(*a, **k):
        plans.append(real_plan(*a, **k))
        return plans[-1]

    node.plan_offload = recorded
    pos, neg = conds()
    text, out, err = "", None, None
    try:
        with torch.no_grad():
            latent, text = node.sample(patcher, 1, 1, 1.0, "euler", "simple", pos, neg,
                                       {"samples": torch.zeros(1, 16, px // 8, px // 8)}, 1.0, "block", 1, 0.0)
        out = latent["samples"]
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"[:1000]
    finally:
        node.sampling_reserve, node.plan_offload = real_reserve, real_plan
        filler.free()
    described = [p.describe() for p in plans]
    check("offload: the first plan ran out of GPU memory", len(plans) == 2, plans=described, error=err)
    check("offload: re-planned with twice the reserve and sampled", out is not None and "re-planned" in text,
          text=text, error=err)
    check("offload: the re-planned latent equals the fully loaded one",
          out is not None and torch.equal(out.cpu(), want.cpu()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="smoke", choices=SIZES)
    ap.add_argument("--quantization", default="bnb-int8", help="a quantization whose weights are made on the GPU")
    ap.add_argument("--sample-px", type=int, default=2048)
    ap.add_argument("--leave-sample-gib", type=float, default=0.5)
    ap.add_argument("--offload-px", type=int, default=1024, help="6: CPUOffloadSampler's re-plan after an OOM")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    _env.setup(cpu=not cuda)
    from quantlora.memory import oom  # noqa: F401 - the dry run checks the imports too
    from quantlora.nodes import bridge, runtime  # noqa: F401

    if not cuda or not torch.cuda.is_available():
        log(f"dry run on {args.device}: imports fine; plan: fill the GPU to half of what {args.quantization} "
            f"weights of the {args.size} model need, load (expect OOM + recovery), then sample "
            f"{args.sample_px}px with {args.leave_sample_gib} GiB free (expect OOM + recovery), then "
            f"CPUOffloadSampler block at {args.offload_px}px with a reserve 0.6x of the measured need (expect "
            "one OOM, a re-plan with twice the reserve, the fully loaded latent).")
        log("skipped: needs a CUDA device (this check has not yet been run on a GPU)")
        return 0
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "oom_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": args.size,
                   "quantization": args.quantization, "rows": rows}, f, indent=1)
    failed = [r["check"] for r in rows if not r["ok"]]
    log(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
