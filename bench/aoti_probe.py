"""What would ahead-of-time compiled blocks save at a restart? (issue 12: the restart's own seconds after
ComfyUI answers are host Python, most of it torch.compile's start: inductor's imports when the blocks are
set up, dynamo tracing and the compiled graphs from the caches at the first step.)

One ComfyUI Flux block (--kind double | single: ComfyUI's own class and operations, --hidden wide,
128-wide heads, seeded weights, the compute dtype of the device; --quant fp8: the pack's
torchao-fp8-dynamic Linears) in fresh processes, each timing the restart's work only:
  compile      block.compile() (the set-up: what QuantizedFluxLoader does) and its first call, inductor's
               caches warm (one process run first to fill them): what a restart pays today per block kind
  aoti         torch._inductor.aoti_load_package of the block exported and compiled ahead of time with
               its weights as constants (done once before), called with the tensors
  aoti-shared  the pack's speed/aot_blocks.py: the weights an input (one package for every block of a
               kind), the call's record beside the package, the block called as ComfyUI calls it and the
               package taking the call in place of torch.compile; checked with a second block too
Each row also gives the modules the process imported for it, the steady call time, and the output's
largest difference from the eager block and from the compiled block.

    bash bench/device_run.sh aoti_probe.py --quant fp8 --out $OUT/aoti      # on the GPU
    python bench/aoti_probe.py --device cpu --hidden 128 --out /tmp/aoti    # a CPU check (CI)
Rows go to <out>/results-aoti-<quant>[-single].json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

PROCESS_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _env  # noqa: E402  (stdlib only at import)


def make_block(args, seed: int = 0):
    """ComfyUI's DoubleStreamBlock with seeded weights, as the pack compiles it: with --quant fp8 its
    Linears are the pack's torchao-fp8-dynamic (quant/backends.py), and the block is prepared as
    speed/compile.py prepares it before a trace (sigmoid GELU, one-pass fp8 quantization). For the
    package with the weights as constants, quantized weights are unwrapped into plain tensors (torchao's
    unwrap_tensor_subclass: what torch.export takes); speed/aot_blocks.py flattens them itself."""
    import torch

    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    if args.kind == "single":
        blk = SingleStreamBlock(args.hidden, args.hidden // 128, 4.0, operations=comfy.ops.disable_weight_init,
                                dtype=dtype, device=dev)
    else:
        blk = DoubleStreamBlock(args.hidden, args.hidden // 128, 4.0, qkv_bias=True,
                                operations=comfy.ops.disable_weight_init, dtype=dtype, device=dev)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    if args.quant == "fp8":
        from quantlora.quant.backends import quantize_block, require_backend

        quantize_block(require_backend("torchao-fp8-dynamic", dev), blk, dtype, dev)
    from quantlora.speed.compile import prepare_block

    prepare_block(blk)
    if args.quant == "fp8" and args.phase in ("build", "aoti"):
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(blk)
    return blk.eval()


def block_and_inputs(args):
    """The block (make_block) and FLUX-shaped inputs (--tokens image, 1/8 text)."""
    import torch

    blk = make_block(args)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(1)
    n_txt = max(args.tokens // 8, 1)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt)

    pe = rnd(1, 1, args.tokens + n_txt, 64, 2, 2, dt=torch.float32)
    if args.kind == "single":  # text and image tokens in one sequence
        return blk, (rnd(1, args.tokens + n_txt, args.hidden), rnd(1, args.hidden), pe)
    return blk, (rnd(1, args.tokens, args.hidden), rnd(1, n_txt, args.hidden), rnd(1, args.hidden), pe)


def wrap(blk):
    """The block as ComfyUI's Flux calls it, its tensors positional (for torch.export)."""
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, *inputs):
            return self.b(*inputs, transformer_options={})

    return Wrap(blk).eval()


def comfy_call(args, blk, x, options=None):
    """(args, kwargs) of the block's call as ComfyUI's Flux makes it (v0.33 forward_orig): a double block's
    inputs by keyword, a single block's image first; transformer_options as Flux fills them."""
    import torch

    opts = options if options is not None else {
        "patches": {}, "patches_replace": {}, "cond_or_uncond": [0], "sigmas": torch.ones(1, device=args.device),
        "block_type": args.kind, "block_index": 0, "total_blocks": 38 if args.kind == "single" else 19}
    if options is None and args.attention != "default":  # as the pack's loader sets it (speed/attention.py)
        from quantlora.speed.attention import override_for

        override = override_for(args.attention, torch.device(args.device))
        if override is not None:
            opts["optimized_attention_override"] = override
    if args.kind == "single":
        return (x[0],), dict(vec=x[1], pe=x[2], attn_mask=None, transformer_options=opts)
    return (), dict(img=x[0], txt=x[1], vec=x[2], pe=x[3], attn_mask=None, transformer_options=opts)


def call_ms(args, call, fresh, n: int = 10) -> float:
    """Median of n calls after the first (each on its own input copies, made before the clock starts)."""
    import statistics

    times = []
    for x in [fresh() for _ in range(n)]:
        sync(args)
        t = time.perf_counter()
        call(x)
        sync(args)
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def sync(args):
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def child(args) -> dict:
    """One process: --phase build | aoti | compile | build-shared | aoti-shared; returns its row.
    build/aoti: a package with the weights as constants, called with the tensors only. build-shared/
    aoti-shared: the pack's speed/aot_blocks.py (the weights an input, a record of the call beside the
    package), the block called as ComfyUI calls it, the package taking the call in place of torch.compile."""
    import faulthandler

    faulthandler.enable()  # a crash in a loaded package's C++ still says where Python was
    _env.setup(cpu=args.device == "cpu")
    import torch

    import comfy.model_management  # noqa: F401  what the server has imported when the loader runs
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401

    if args.rope == "plain":  # the pack's compiled graphs trace ComfyUI's pure-torch RoPE (nodes/rope_fusion.py)
        from quantlora.nodes import rope_fusion

        rope_fusion.install()  # torch.compile (dynamo)
    blk, inputs = block_and_inputs(args)
    row = dict(phase=args.phase, setup_s=round(time.perf_counter() - PROCESS_START, 2), torch=torch.__version__,
               gpu=torch.cuda.get_device_name() if args.device == "cuda" else "")
    shared = args.phase.endswith("-shared")
    package = args.package.replace(".pt2", "-shared.pt2") if shared else args.package
    cuda_options = args.device == "cuda"

    def fresh():  # FLUX's blocks add into their inputs and return them: every call gets its own copies
        return tuple(t.clone() for t in inputs)

    def outputs(out):
        return [o.clone() for o in (out if isinstance(out, (list, tuple)) else [out])]

    def run(block, x):  # as ComfyUI calls it
        a, k = comfy_call(args, block, x)
        return block(*a, **k)

    def diff(xs, ys):
        return max(float((o.float().cpu() - r.float().cpu()).abs().max()) for o, r in zip(xs, ys))

    with torch.inference_mode():
        ref = outputs(run(blk, fresh()))
        sync(args)
        mods0 = len(sys.modules)
        t0 = time.perf_counter()
        if args.phase.startswith("build"):
            from quantlora.speed import aot_blocks

            training = comfy.model_management.in_training
            # export does not go through dynamo's substitution: ComfyUI's own switch picks its pure-torch RoPE
            comfy.model_management.in_training = args.rope == "plain"
            try:
                if shared:
                    a, k = comfy_call(args, blk, fresh())
                    ep, sig, layout = aot_blocks.export_block(blk, a, k)
                    aot_blocks.save_record(package + ".json", blk, sig, layout)
                else:
                    ep = torch.export.export(wrap(blk), fresh())
            finally:
                comfy.model_management.in_training = training
            row["export_s"] = round(time.perf_counter() - t0, 2)
            row["custom_ops"] = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                                        and not str(n.target).startswith(("aten.", "<"))})
            t1 = time.perf_counter()
            torch._inductor.aoti_compile_and_package(ep, package_path=package)
            row["aoti_compile_s"] = round(time.perf_counter() - t1, 2)
            print(f"[aoti_probe] {args.phase}: loading the package in the process that built it", file=sys.stderr, flush=True)
            runner = torch._inductor.aoti_load_package(package)
            if shared:
                aot_blocks.use_package(blk, runner, sig, layout)
                out = run(blk, fresh())
            else:
                out = runner(*fresh())
            sync(args)
            row["same_process_max_abs_diff"] = diff(outputs(out), ref)
            return row
        dispatch = None
        if args.phase.startswith("aoti"):
            print(f"[aoti_probe] {args.phase}: loading {package}", file=sys.stderr, flush=True)
            if shared:
                from quantlora.speed import aot_blocks
                from quantlora.speed.compile import inductor_options

                loaded = aot_blocks.load_record(package + ".json", blk)
                if loaded is None:
                    raise SystemExit("the record beside the package does not fit this block")
                runner = aot_blocks.load_package(package)
                dispatch = aot_blocks.use_package(blk, runner, *loaded, compile_kwargs=dict(
                    options=inductor_options()) if cuda_options else {})
            else:
                runner = torch._inductor.aoti_load_package(package)
            print(f"[aoti_probe] {args.phase}: loaded; first call", file=sys.stderr, flush=True)
            row["load_s"] = round(time.perf_counter() - t0, 3)
            t1 = time.perf_counter()
            out = run(blk, fresh()) if shared else runner(*fresh())
        else:
            from quantlora.speed.compile import inductor_options

            blk.compile(options=inductor_options() if cuda_options else None)  # as compile_blocks does
            row["load_s"] = round(time.perf_counter() - t0, 3)  # the set-up
            t1 = time.perf_counter()
            out = run(blk, fresh())
        sync(args)
        row["first_call_s"] = round(time.perf_counter() - t1, 3)
        row["restart_work_s"] = round(time.perf_counter() - t0, 3)
        row["modules_imported"] = len(sys.modules) - mods0
        row["compile_fx_imported"] = "torch._inductor.compile_fx" in sys.modules
        outs = outputs(out)
        call = (lambda x: runner(*x)) if args.phase == "aoti" else (lambda x: run(blk, x))
        row["call_ms"] = call_ms(args, call, fresh)
        if dispatch is not None:
            row["package_calls"] = dict(dispatch.calls)
        compiled_out = os.path.join(os.path.dirname(args.package), f"out-compile-{args.kind}-{args.quant}-{args.attention}.pt")
        if args.phase == "compile":
            torch.save([o.cpu() for o in outs], compiled_out)
        elif os.path.exists(compiled_out):
            row["diff_to_compiled"] = diff(outs, torch.load(compiled_out))
        row["max_abs_diff"] = diff(outs, ref)
        if shared:  # the same package for another block of the kind, against that block run eagerly
            other = make_block(args, seed=7)
            ref_b = outputs(run(other, fresh()))
            other_dispatch = aot_blocks.use_package(other, runner, *aot_blocks.load_record(package + ".json", other))
            out_b = outputs(run(other, fresh()))
            row["other_block_max_abs_diff"] = diff(out_b, ref_b)
            row["other_block_differs"] = diff(out_b, outs)
            row["other_block_package_calls"] = dict(other_dispatch.calls)
    return row


def run_child(args, phase) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--phase", phase, "--device", args.device,
           "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--package", args.package,
           "--quant", args.quant, "--rope", args.rope, "--kind", args.kind, "--attention", args.attention]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)  # its stderr: ours
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        return dict(phase=phase, error=f"rc {proc.returncode} (its log above): {proc.stdout[-1500:]}")
    return json.loads(lines[-1][4:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=3072, help="FLUX.1: 3072 (24 heads of 128)")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (1024x1024: 4096); text: 1/8 of it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-aoti")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quant", default="none", choices=["none", "fp8"],
                    help="fp8: the pack's torchao-fp8-dynamic Linears (unwrapped into plain tensors for export)")
    ap.add_argument("--kind", default="double", choices=["double", "single"], help="FLUX's two block kinds")
    ap.add_argument("--rope", default="plain", choices=["plain", "kernel"],
                    help="plain: ComfyUI's pure-torch RoPE in the traced graphs, as the pack compiles them; "
                         "kernel: comfy_kitchen's custom op")
    ap.add_argument("--attention", default="default", choices=["default", "cudnn", "fa3", "fa3-fp8"],
                    help="transformer_options' attention override, as the pack's loader sets it")
    ap.add_argument("--shared-only", action="store_true",
                    help="only the pack's way (weights as an input) and torch.compile's restart")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--phase", default="")
    ap.add_argument("--package", default="")
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    _env.install_stand_ins()  # (logged) what each child installs too
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    args.package = os.path.join(args.workdir, f"{args.kind}-{args.device}-{args.hidden}-{args.quant}-{args.attention}.pt2")
    rows = []

    def flush():
        with open(os.path.join(args.out, f"results-aoti-{args.quant}{'-single' if args.kind == 'single' else ''}"
                               f"{'' if args.attention == 'default' else '-' + args.attention}.json"), "w") as f:
            json.dump({"device": next((r["gpu"] for r in rows if r.get("gpu")), args.device),
                       "date": datetime.date.today().isoformat(), "hidden": args.hidden, "tokens": args.tokens,
                       "quant": args.quant, "torch": next((r["torch"] for r in rows if r.get("torch")), "?"),
                       "rows": rows}, f, indent=1)

    plan = [("build", "build"), ("build-shared", "build, weights as an input"),
            ("compile", "compile cold (fills inductor's caches)")]
    for i in range(args.repeats):
        plan += [("aoti", f"aoti restart {i + 1}"), ("aoti-shared", f"aoti weights as an input, restart {i + 1}"),
                 ("compile", f"compile restart {i + 1}")]
    if args.shared_only:
        plan = [p for p in plan if p[0] != "aoti" and p[0] != "build"]
    attn = "" if args.attention == "default" else f" {args.attention}"
    for phase, label in plan:
        r = run_child(args, phase)
        r["variant"] = f"aoti probe, {args.kind} block {args.hidden} {args.quant}{attn}: {label}"
        rows.append(r)
        flush()
        print(json.dumps(r), flush=True)
    failed = [r["variant"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
