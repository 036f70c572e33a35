"""Can the fast path's forward (torchao fp8 dynamic, regional compile) be captured as one CUDA graph,
and what does replaying it gain? One configuration per process (a failed capture can abort the
process under the cudaMallocAsync allocator): the allocator comes from PYTORCH_CUDA_ALLOC_CONF,
the attention from --attention. Bare forwards (bench_flux's inputs), CUDA events, median of 10.
Rows: results-graph-<attention>-<allocator>.json under --out."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402  (the carried packages and ComfyUI tree; stand-ins)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--quant", default="torchao-fp8-dynamic")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    a = ap.parse_args()
    _env.setup(cpu=a.device == "cpu")
    import torch
    from bench_flux import Bench
    from quantlora.speed.attention import override_for, sdpa_context

    cuda = a.device == "cuda"
    backend = torch.cuda.get_allocator_backend() if cuda else "cpu"
    rows = []
    tag = f"{a.attention}-{backend}"

    def row(**r):
        rows.append(dict(variant=f"graph probe {a.quant} compile, attention {a.attention}, allocator {backend}", **r))
        print(json.dumps(rows[-1]), flush=True)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"results-graph-{tag}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat(),
                       "torch": torch.__version__, "size": a.size, "rows": rows}, f, indent=1)

    b = Bench(argparse.Namespace(device=a.device, size=a.size, workdir=a.workdir, out=a.out, repeats=5,
                                 attention=a.attention, sections=["graph"]))
    b.write_checkpoint()
    p, _, _ = b.load_ours(a.quant if cuda else "torchao-int8-weight-only")
    dm = p.model.diffusion_model
    if cuda:  # on a CPU (the test suite's dry run) the compile would only cost time
        b.compile_blocks(dm)
    dev = b.dev
    i = b.inputs
    over = override_for(a.attention, dev)
    topts = {"optimized_attention_override": over} if over is not None else {}

    def fwd():
        with sdpa_context(a.attention, dev):
            return dm(i["x"], i["timestep"], i["context"], y=i["y"], guidance=i["guidance"], transformer_options=topts)

    def timed(fn, n=10):
        if not cuda:
            return None
        ts = []
        for _ in range(n):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        return statistics.median(ts)

    with torch.no_grad():
        ref = fwd()
        fwd()
        step = timed(fwd)
        if not cuda:
            row(step_s=step, captured=False, note="cpu: no capture")
            return
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                out = fwd()
        except Exception as e:
            row(step_s=step, captured=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            os._exit(0)  # freeing the half-captured tensors can abort under cudaMallocAsync
        g.replay()
        torch.cuda.synchronize()
        graph_step = timed(g.replay)
        row(step_s=step, captured=True, graph_step_s=graph_step, graph_vs_plain=graph_step / step,
            equal=bool(torch.equal(out, ref)), max_abs_diff=(out.float() - ref.float()).abs().max().item())


if __name__ == "__main__":
    main()
