"""GPU probe (issue 12): FA3's Python wrapper against its C++ op, called the way a Flux block calls it
(1x4608 tokens, 24 heads of 128, bf16, q/k/v as transposed views). Host microseconds per call with
the GPU kept busy (no sync inside the loop), whether the outputs are bit-equal, and whether a compiled
function can call the C++ op. Prints and writes JSON.

Why: in an H200 trace of the fp8 step, the fa3-fwd package's Python custom op cost the host ~0.24 ms
per block call beside the C++ op's 0.08 ms. Measured (session 25): eager 78-82 us per call through the
wrapper, 33-51 us direct, bit-equal; but inductor refuses the C++ op ("a custom (non-ATen) operator
whose output has alias annotations": its schema returns the optional `out!` argument), so the compiled
blocks cannot call it. Dropped."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402


def call_direct(fwd, q, k, v, softmax_scale):
    # the positional order of fa3_fwd_interface._flash_attn_forward's call (batch mode, no cache, no splits)
    return fwd(q, k, v, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None, None,
               None, None, None, softmax_scale, False, -1, -1, 0, 0.0, True, None, 1, None, 0)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "bench/out")
    os.makedirs(out_dir, exist_ok=True)
    _env.setup()
    from quantlora.speed import fa3

    res = {"device": torch.cuda.get_device_name(0)}
    kernel, why = fa3._load()
    res["wrapper"] = why or "ok"
    if kernel is None:
        print(json.dumps(res))
        return
    direct = torch.ops.fa3_fwd.fwd
    op = torch.ops.fa3_fwd.fwd.default
    res["schema"] = str(op._schema)[:600]
    res["meta_kernel"] = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, 4608, 3, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (b, h, s, d) views as Flux has them
    scale = 128 ** -0.5
    wrapper_call = lambda: torch.ops.fa3_fwd._flash_attn_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)[0]  # noqa: E731
    direct_call = lambda: call_direct(direct, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)[0]  # noqa: E731
    a, b = wrapper_call(), direct_call()
    torch.cuda.synchronize()
    res["bit_equal"] = bool(torch.equal(a, b))
    for name, f in (("wrapper", wrapper_call), ("direct", direct_call), ("wrapper", wrapper_call), ("direct", direct_call)):
        n = 200
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / n
        res.setdefault(f"{name}_host_us", []).append(round(host * 1e6, 1))
        res.setdefault(f"{name}_wall_us", []).append(round(gpu * 1e6, 1))
    comp = torch.compile(lambda q, k, v: call_direct(direct, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)[0])
    try:
        c = comp(q, k, v)
        torch.cuda.synchronize()
        res["compiled_equal"] = bool(torch.equal(c, b))
    except Exception as e:
        res["compiled_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(json.dumps(res))
    with open(os.path.join(out_dir, "fa3_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
