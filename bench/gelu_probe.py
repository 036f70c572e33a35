"""GPU probe (issue 12): the tanh-GELU in front of the fp8 Linear that follows it, as a Flux block runs it
compiled (torchao fp8 dynamic, per-row: the activation is quantized per row inside the compiled graph).

Why: in the H200 kernel table of the fastest sampled step, the single blocks' `cat(attn, gelu(mlp))`
-> per-row fp8 quantization takes two inductor kernels of ~130 us each (38 calls: 9.8 ms of 90.5 ms),
and the double blocks' MLP one of ~166 us (19 calls: 3.2 ms), 3-4x what their bytes need at the card's
bandwidth. Both evaluate tanh through libdevice (inductor only takes a fast tanh on ROCm) once per
pass over the row. Counted: 4608 x 15360 bf16 in (141 MB), fp8 out (71 MB): one pass 53 us, two 88 us
at 4 TB/s. Prediction: GELU written as x * sigmoid(2u) (the same function: 0.5 (1 + tanh u) =
sigmoid(2u)), which inductor lowers to tl.sigmoid on the fast exp, takes the single block's pair to
~100-120 us and the double block's to ~80 us: about -7 ms of kernels per step.

Rows (CUDA events, median of 5 rounds of 20 calls; compiled once per variant): per shape and
activation the time per call of `linear(cat(attn, act(mlp)))` / `linear(act(h))`, and the relative
error of its output against the same Linear in bf16 with the exact tanh-GELU. Writes JSON to argv[1]."""
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F


def sigmoid_gelu(x):
    x32 = x.float()
    return (x32 * torch.sigmoid(1.5957691216057308 * (x32 + 0.044715 * x32 * x32 * x32))).to(x.dtype)


ACTS = {"tanh": lambda x: F.gelu(x, approximate="tanh"), "sigmoid": sigmoid_gelu}


def fp8_linear(k, n, seed):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    g = torch.Generator(device="cpu").manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.01)
    ref = torch.nn.Linear(k, n, dtype=torch.bfloat16).cuda()
    ref.load_state_dict(lin.state_dict())
    lin = lin.cuda()
    quantize_(lin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return lin, ref


def time_calls(fn, n=20, rounds=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        per.append(a.elapsed_time(b) / n * 1e3)
    return round(statistics.median(per), 1)


def kernel_table(fn, path, calls=5):
    """The GPU kernels of `calls` calls of fn (after one warm-up call), as torch's profiler tables them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=120))


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--acts", default="tanh,sigmoid")
    ap.add_argument("--shapes", default="single,double-img")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    out_dir = a.out
    os.makedirs(out_dir, exist_ok=True)
    acts = {k: ACTS[k] for k in a.acts.split(",")}
    # inductor's own knobs in effect (e.g. TORCHINDUCTOR_MULTI_KERNEL=1: persistent reductions tried too)
    knobs = {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "inductor_env": knobs, "rows": []}
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        # single block: linear2(cat(attn, gelu(mlp))), 4096 image + 512 text tokens
        attn = (torch.randn(1, 4608, 3072, generator=g)).cuda().bfloat16()
        mlp = (torch.randn(1, 4608, 12288, generator=g) * 2).cuda().bfloat16()
        lin2, ref2 = fp8_linear(15360, 3072, 1)
        # double block: img_mlp[2](gelu(img_mlp[0](x))), the image stream's 4096 tokens
        h = (torch.randn(1, 4096, 12288, generator=g) * 2).cuda().bfloat16()
        fc2, reff = fp8_linear(12288, 3072, 2)
        cases = {"single": (lambda act, lin: lin(torch.cat((attn, act(mlp)), 2)), lin2, ref2),
                 "double-img": (lambda act, lin: lin(act(h)), fc2, reff)}
        for shape, (body, lin, ref) in cases.items():
            if shape not in a.shapes.split(","):
                continue
            want = body(ACTS["tanh"], ref).float()
            for name, act in acts.items():
                fn = torch.compile(lambda act=act, lin=lin: body(act, lin))
                got = fn().float()
                err = ((got - want).norm() / want.norm()).item()
                us = time_calls(fn)
                # the GEMM alone (input quantized outside the timing): what the activation pass adds
                row = dict(shape=shape, act=name, us_per_call=us, rel_err_vs_bf16_exact=round(err, 5), **knobs)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(os.path.join(out_dir, "gelu-probe.json"), "w") as f:
                    json.dump(res, f, indent=1)
            if len(acts) < 2:
                continue
            # the two activations' compiled outputs against each other (same fp8 weights)
            x = torch.compile(lambda lin=lin: body(ACTS["tanh"], lin))().float()
            b = torch.compile(lambda lin=lin: body(ACTS["sigmoid"], lin))().float()
            res["rows"].append(dict(shape=shape, tanh_vs_sigmoid_rel=round(((x - b).norm() / x.norm()).item(), 6)))
            print(json.dumps(res["rows"][-1]), flush=True)
        with open(os.path.join(out_dir, "gelu-probe.json"), "w") as f:
            json.dump(res, f, indent=1)
        if a.no_profile or "single" not in a.shapes.split(","):
            return
        # kernel table of one call of each single-block variant
        for name, act in acts.items():
            kernel_table(torch.compile(lambda act=act: cases["single"][0](act, lin2)),
                         os.path.join(out_dir, f"gelu-probe-kernels-{name}.txt"))


if __name__ == "__main__":
    main()
