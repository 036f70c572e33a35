"""GPU probe (issue 12): one-pass per-row fp8 activation quantization (speed/rowquant.py) against
torchao's, as FLUX's compiled blocks run them, per call of the three shapes that carry most of it.

Counted first (H200, ~4.8 TB/s; kernel table of the fastest sampled step, BENCHMARKS.md issue 12):
- single block tail, linear2(cat(attn, gelu(mlp))), 4608 x 15360: inductor's two kernels ~195 us a
  call (38 calls: 7.4 ms a step). Bytes: attn 28 MB + mlp 113 MB in, 71 MB fp8 out: 44 us once.
- double block MLP, fc2(gelu(h)), 4096 x 12288: ~118 us a call (19 calls: 2.3 ms). 100 + 50 MB: 31 us.
- norm -> linear1, 4608 x 3072: ~41 us a call (57 calls: 2.4 ms). 28 + 14 MB: 9 us.
Predicted: with the GELU in the quantizing kernel, single ~60 us (+ the cat, which then becomes a
copy: ~60 us), double ~40 us; per step -3 to -5 ms of kernels.

Variants per shape (each compiled once; CUDA events, median of 5 rounds of 20 calls):
  torchao      what the pack runs today (torchao's Float8Tensor, the sigmoid GELU of speed/gelu.py)
  fastmath     the same with inductor's use_fast_math (fast exp)
  rq-gelu      speed/rowquant.linear with the GELU inside the quantizing kernel (gelu_from)
  rq           speed/rowquant.linear after inductor's own GELU
with each output's relative error against bf16 with the exact GELU, and the largest difference from the
torchao variant. Also: the kernel bit-checked against its torch reference, and a kernel table per
single-block variant. Writes JSON (and tables) under argv[1]."""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402

_env.bootstrap.register_pack(_env.ROOT)  # the pack as `quantlora`; no ComfyUI needed here
from quantlora.speed import rowquant, rowquant_cat  # noqa: E402
from quantlora.speed.gelu import sigmoid_gelu  # noqa: E402
from gelu_probe import fp8_linear, kernel_table, time_calls  # noqa: E402  (the same layers and timing as that probe)


def rel(a, b):
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "bench/out")
    os.makedirs(out_dir, exist_ok=True)
    import datetime

    res = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "size": "full", "rows": []}

    def save(row=None):
        if row is not None:
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        with open(os.path.join(out_dir, "rowquant-probe.json"), "w") as f:
            json.dump(res, f, indent=1)

    g = torch.Generator(device="cpu").manual_seed(0)
    exact = lambda t: F.gelu(t, approximate="tanh")
    with torch.no_grad():
        # the kernel against its torch reference (same arithmetic: bit-equal expected, or nearly)
        for shape, gf in (((4608, 15360), 3072), ((4096, 12288), 0), ((4608, 3072), -1), ((7, 100), 50)):
            x = (torch.randn(*shape, generator=g) * 3).cuda().bfloat16()
            q, s = torch.ops.quantlora.quant_rows_fp8(x, gf)
            rq, rs = rowquant.reference_quant_rows(x, gf)
            save(dict(check="kernel vs reference", shape=list(shape), gelu_from=gf,
                      q_equal_frac=round((q.float() == rq.float()).float().mean().item(), 6),
                      q_max_diff=(q.float() - rq.float()).abs().max().item(),
                      scale_max_rel=((s - rs).abs() / rs).max().item()))

        lin1_out = (torch.randn(1, 4608, 21504, generator=g) * 2).cuda().bfloat16()
        attn = torch.randn(1, 4608, 3072, generator=g).cuda().bfloat16()
        mlp = lin1_out[..., 9216:]  # a view of linear1's output, as in ComfyUI's split
        h = (torch.randn(1, 4096, 12288, generator=g) * 2).cuda().bfloat16()
        x = torch.randn(1, 4608, 3072, generator=g).cuda().bfloat16()
        shift = (torch.randn(1, 1, 3072, generator=g) * 0.5).cuda().bfloat16()
        scale = (torch.randn(1, 1, 3072, generator=g) * 0.5).cuda().bfloat16()
        lin2, ref2 = fp8_linear(15360, 3072, 1)
        fc2, reff = fp8_linear(12288, 3072, 2)
        lin1, ref1 = fp8_linear(3072, 21504, 3)
        norm = lambda t: F.layer_norm(t, (3072,), eps=1e-6) * (1 + scale) + shift
        cases = {
            "single": {
                "ref": lambda: ref2(torch.cat((attn, exact(mlp)), 2)),
                "torchao": lambda: lin2(torch.cat((attn, sigmoid_gelu(mlp)), 2)),
                "rq-gelu": lambda: rowquant.linear(torch.cat((attn, mlp), 2), lin2.weight, lin2.bias, 3072),
                "rq": lambda: rowquant.linear(torch.cat((attn, sigmoid_gelu(mlp)), 2), lin2.weight, lin2.bias),
            },
            "double-mlp": {
                "ref": lambda: reff(exact(h)),
                "torchao": lambda: fc2(sigmoid_gelu(h)),
                "rq-gelu": lambda: rowquant.linear(h, fc2.weight, fc2.bias, 0),
                "rq": lambda: rowquant.linear(sigmoid_gelu(h), fc2.weight, fc2.bias),
            },
            "norm-linear1": {
                "ref": lambda: ref1(norm(x)),
                "torchao": lambda: lin1(norm(x)),
                "rq": lambda: rowquant.linear(norm(x), lin1.weight, lin1.bias),
            },
        }
        import torch._inductor.config as ind

        for shape, fns in cases.items():
            want = fns["ref"]()
            base = None
            for name in ("torchao", "fastmath", "rq-gelu", "rq"):
                body = fns.get("torchao" if name == "fastmath" else name)
                if body is None:
                    continue
                torch._dynamo.reset()
                opts = {"use_fast_math": True} if name == "fastmath" else {}
                try:
                    with ind.patch(opts):
                        fn = torch.compile(body)
                        got = fn()
                        us = time_calls(fn)
                except Exception as e:  # a variant that does not compile is a finding, not the end
                    save(dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:400]}"))
                    continue
                if base is None:
                    base = got
                save(dict(shape=shape, variant=name, us_per_call=us, rel_err_vs_bf16_exact=rel(got, want),
                          rel_diff_vs_torchao=rel(got, base)))
        # eager: the quantizing kernel alone on this shape's input (what the op costs by itself)
        for shape, (t, gf) in {"single": (torch.cat((attn, mlp), 2), 3072), "double-mlp": (h, 0),
                               "norm-linear1": (x, -1)}.items():
            t2 = t.reshape(-1, t.shape[-1])
            save(dict(shape=shape, variant="quant kernel alone", gelu_from=gf,
                      us_per_call=time_calls(lambda: torch.ops.quantlora.quant_rows_fp8(t2, gf))))

        # the single block's pair kernel (speed/rowquant_cat.py): attn and mlp read where they lie
        mlp2 = mlp.reshape(-1, mlp.shape[-1])
        a2 = attn.reshape(-1, 3072)
        q, s = torch.ops.quantlora.quant_rows_fp8_pair(a2, mlp2)
        rq, rs = rowquant_cat.reference_quant_rows_pair(a2, mlp2)
        save(dict(check="pair kernel vs reference", shape=[a2.shape[0], 15360],
                  q_equal_frac=round((q.float() == rq.float()).float().mean().item(), 6),
                  q_max_diff=(q.float() - rq.float()).abs().max().item(),
                  scale_max_rel=((s - rs).abs() / rs).max().item()))
        save(dict(shape="single", variant="pair kernel alone",
                  us_per_call=time_calls(lambda: torch.ops.quantlora.quant_rows_fp8_pair(a2, mlp2))))
        attention_probe(save, g)

        for name in ("torchao", "rq-gelu"):
            torch._dynamo.reset()
            kernel_table(torch.compile(cases["single"][name]), os.path.join(out_dir, f"rowquant-kernels-{name}.txt"))
    save()


def attention_probe(save, g):
    """FA3 bf16 against FA3 fp8 on q, k, v cast unscaled (speed/fa3.to_fp8_unscaled), FLUX's shape
    (4608 tokens, 24 heads of 128), q and k normed as FLUX's are: kernel time and the output's error
    against torch's SDPA in fp32."""
    from quantlora.speed import fa3

    kernel, why = fa3._load()
    if kernel is None:
        save(dict(shape="attention", error=why))
        return
    b, n, h, d = 1, 4608, 24, 128
    mk = lambda: torch.randn(b, n, h, d, generator=g).cuda()
    q, k, v = [F.rms_norm(mk(), (d,)) * 1.5 for _ in range(2)] + [mk() * 2]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    q8, k8, v8 = (fa3.to_fp8_unscaled(t) for t in (qb, kb, vb))
    for name, args in (("fa3 bf16", (qb, kb, vb)), ("fa3 fp8 unscaled", (q8, k8, v8))):
        out = kernel(*args, softmax_scale=d ** -0.5)[0]
        save(dict(shape="attention", variant=name, us_per_call=time_calls(lambda: kernel(*args, softmax_scale=d ** -0.5)),
                  rel_err_vs_fp32=rel(out, ref)))
    cast = torch.compile(lambda a, b_, c: tuple(fa3.to_fp8_unscaled(t) for t in (a, b_, c)))
    save(dict(shape="attention", variant="cast q, k, v alone (compiled)", us_per_call=time_calls(lambda: cast(qb, kb, vb))))


if __name__ == "__main__":
    main()
