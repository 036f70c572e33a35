"""GPU benchmark: CPU offload (quant/offload.py, CPUOffloadSampler) and fp8 layerwise cast
(quant/fp8_cast.py, FP8LayerwiseCast) on a full-size FLUX.1-dev transformer (seeded random
weights, bench_flux's checkpoint) at 1024x1024: one step = one transformer forward, batch 1,
4096 image + 512 text tokens.

Rows (one JSON file, results-offload.json, in --out):
- "bf16 eager", "fp8 cast eager", "fp8 cast compile (regional)": step_s, step_ratio (to bf16 eager),
  weights_gib, peak_vram_gib, rel_err (to bf16 eager).
- "<variant> no offload" and "<variant> offload <mode>" for variant in {bf16, fp8 cast, nf4} and
  mode in {model, block, leaf}: step_s, step_ratio_vs_no_offload, peak_vram_gib,
  peak_ratio_vs_no_offload, equal_to_no_offload (same inputs, bit for bit) and max_abs_diff,
  setup_s (hooks + pinning, or the move in for model), working_set_gib, strategy, stream.
- "fp8 cast offload block + lora slots r64": a rank-64 LoRA active through the slots, swapped to a
  rank-32 one while offloaded; both outputs against the same LoRAs without offload.
- "node CPUOffloadSampler ...": the ComfyUI path (FP8LayerwiseCast -> LoRAHotswap ->
  CPUOffloadSampler, 2 euler steps): latents of block / auto against none, the node's peak VRAM
  text, ModelPatcher.load calls during the offloaded run (0: ComfyUI did not load the weights
  itself) and what ComfyUI lists as loaded.

    python bench/bench_offload.py --out $OUT                        # all sections, < 8 min on an H100
    python bench/bench_offload.py --sections offload --variants nf4  # a part
    python bench/bench_offload.py --size tiny --device cpu           # a CPU check of the script (offload moves nothing)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402
from bench_flux import GIB, SIZES, Bench, log  # noqa: E402

MODES = ("model", "block", "leaf")


class OffloadBench(Bench):
    def __init__(self, args):
        super().__init__(args)
        self.cuda = self.dev.type == "cuda"
        self.compute = "bf16" if self.cuda else "fp32"
        self.no_off = {}  # variant -> (step_s, peak_bytes)

    # ---------- measuring ----------
    def reset_peak(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    @torch.no_grad()
    def fwd(self, dm):
        i = self.inputs
        return dm(i["x"], i["timestep"], i["context"], y=i["y"], guidance=i["guidance"])

    def timed(self, dm, n=None):
        """(first call s, median step s, output): one warm-up after the first call."""
        n = n or self.args.repeats
        self.sync()
        t0 = time.perf_counter()
        out = self.fwd(dm)
        self.sync()
        first = time.perf_counter() - t0
        self.fwd(dm)
        times = []
        for _ in range(n):
            self.sync()
            t = time.perf_counter()
            out = self.fwd(dm)
            self.sync()
            times.append(time.perf_counter() - t)
        return first, statistics.median(times), out

    def row(self, **r):
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        self.rows.append(r)
        log(json.dumps(r))
        self.flush()

    def flush(self):
        os.makedirs(self.args.out, exist_ok=True)
        dev = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        with open(os.path.join(self.args.out, "results-offload.json"), "w") as f:
            json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "size": self.args.size, "rows": self.rows}, f, indent=1)

    def gib(self, b):
        return None if b is None else round(b / GIB, 3)

    # ---------- models ----------
    def load(self, quantization):
        import comfy.model_management as mm
        from quantlora.nodes.bridge import load_flux_model_patcher

        t0 = time.perf_counter()
        p, rep = load_flux_model_patcher(self.path, quantization, self.compute)
        if self.cuda:
            mm.load_models_gpu([p], force_full_load=True)
            torch.cuda.synchronize()
        return p, time.perf_counter() - t0

    def to_gpu(self, p):
        import comfy.model_management as mm

        if self.cuda:
            mm.load_models_gpu([p], force_full_load=True)
            torch.cuda.synchronize()

    def unload(self):
        import comfy.model_management as mm

        mm.unload_all_models()
        self.reset_peak()

    # ---------- sections ----------
    def eager_row(self, name, p):
        from quantlora.quant.sizes import module_bytes

        dm = p.model.diffusion_model
        self.reset_peak()
        _, step, out = self.timed(dm)
        peak = self.peak_bytes()
        if self.ref is None:
            self.ref, self.base_step = out, step
        self.no_off[name] = (step, peak, out)
        self.row(variant=f"{name} eager" if name != "nf4" else "nf4 eager", step_s=step,
                 step_ratio=step / self.base_step, weights_gib=self.gib(module_bytes(dm)),
                 peak_vram_gib=self.gib(peak), rel_err=self.rel(out, self.ref))
        return out

    def compile_row(self, name, p):
        import torch._dynamo

        dm = p.model.diffusion_model
        blocks = [*dm.double_blocks, *dm.single_blocks]
        for b in blocks:
            b.compile()
        self.reset_peak()
        first, step, out = self.timed(dm)
        self.row(variant=f"{name} compile (regional)", step_s=step, step_ratio=step / self.base_step,
                 compile_s=first, peak_vram_gib=self.gib(self.peak_bytes()), rel_err=self.rel(out, self.ref))
        for b in blocks:  # back to eager for the offload rows
            b._compiled_call_impl = None
        torch._dynamo.reset()

    def offload_rows(self, name, p):
        from quantlora.quant import offload as off

        dm = p.model.diffusion_model
        base_step, base_peak, base_out = self.no_off[name]
        self.row(variant=f"{name} no offload", step_s=base_step, step_ratio_vs_no_offload=1.0,
                 peak_vram_gib=self.gib(base_peak), peak_ratio_vs_no_offload=1.0, equal_to_no_offload=True)
        self.unload()  # ComfyUI puts the weights back on the host
        for mode in self.args.modes:
            try:
                self.reset_peak()
                t0 = time.perf_counter()
                st = off.apply_offload(dm, mode, self.dev, "cpu", blocks_per_group=self.args.blocks_per_group)
                self.sync()
                setup = time.perf_counter() - t0
                first, step, out = self.timed(dm, self.args.offload_repeats)
                peak = self.peak_bytes()
                t0 = time.perf_counter()
                off.remove_offload(dm)
                self.sync()
                teardown = time.perf_counter() - t0
                self.row(variant=f"{name} offload {mode}", step_s=step, step_ratio_vs_no_offload=step / base_step,
                         peak_vram_gib=self.gib(peak),
                         peak_ratio_vs_no_offload=(peak / base_peak) if peak is not None else None,
                         equal_to_no_offload=bool(torch.equal(out, base_out)),
                         max_abs_diff=(out.float() - base_out.float()).abs().max().item(),
                         first_s=first, setup_s=setup, teardown_s=teardown, working_set_gib=self.gib(st.working_set),
                         strategy=st.strategy, stream=st.spec.use_stream, blocks_per_group=st.spec.blocks_per_group)
            except Exception as e:  # one mode failing must not lose the others
                log(f"FAILED {name} offload {mode}: {type(e).__name__}: {e}")
                self.rows.append(dict(variant=f"{name} offload {mode}", error=f"{type(e).__name__}: {str(e)[:300]}"))
                off.remove_offload(dm)
        self.reset_peak()

    def lora_row(self, p):
        """fp8 cast + LoRA slots r64 + block offload; swap while offloaded."""
        from quantlora.lora.formats import load_lora
        from quantlora.nodes import runtime
        from quantlora.quant import offload as off

        dm = p.model.diffusion_model
        state = runtime.ensure_slots(dm, 64, "blocks")
        dims = runtime.dims_of(dm)
        loras = {r: load_lora(self.write_lora(r, seed=r), dims) for r in (64, 32)}
        self.to_gpu(p)
        dm.to(self.dev)  # the new slot buffers too
        refs = {}
        for r in (64, 32):
            state.activate((f"r{r}",), [(loras[r], 1.0)])
            self.reset_peak()
            _, step_r, refs[r] = self.timed(dm, 2)
            if r == 64:
                base_step, base_peak = step_r, self.peak_bytes()
        self.unload()
        dm.to("cpu")
        self.reset_peak()
        st = off.apply_offload(dm, "block", self.dev, "cpu")
        state.activate(("r64",), [(loras[64], 1.0)])
        _, step, out64 = self.timed(dm, self.args.offload_repeats)
        self.sync()
        t0 = time.perf_counter()
        state.activate(("r32",), [(loras[32], 1.0)])
        self.sync()
        swap = time.perf_counter() - t0
        out32 = self.fwd(dm)
        peak = self.peak_bytes()
        self.row(variant="fp8 cast offload block + lora slots r64", step_s=step, step_ratio_vs_no_offload=step / base_step,
                 peak_vram_gib=self.gib(peak), peak_ratio_vs_no_offload=(peak / base_peak) if peak else None,
                 equal_to_no_offload=bool(torch.equal(out64, refs[64])),
                 swapped_r32_equal_to_no_offload=bool(torch.equal(out32, refs[32])),
                 lora_effect=self.rel(refs[64], self.no_off["fp8 cast"][2]), swap_s=swap, strategy=st.strategy,
                 stream=st.spec.use_stream)
        off.remove_offload(dm)
        state.deactivate()
        self.reset_peak()

    def node_rows(self, p):
        """Through ComfyUI: LoRAHotswap -> CPUOffloadSampler (none, block, auto with a budget)."""
        import comfy.model_management as mm
        import comfy.model_patcher
        import folder_paths
        from quantlora.nodes import offload_sampler_node as node
        from quantlora.nodes.hotswap_node import LoRAHotswap

        folder_paths.add_model_folder_path("loras", self.args.workdir)
        name = os.path.basename(self.write_lora(64, seed=64))
        m = LoRAHotswap.execute(p, name, 1.0, 64, "blocks").args[0]
        g = torch.Generator().manual_seed(3)
        pos = [[torch.randn(1, self.txt, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        latent = {"samples": torch.zeros(1, 16, self.latent, self.latent)}
        loads = {"n": 0}
        orig = comfy.model_patcher.ModelPatcher.load

        def counting(*a, **k):
            loads["n"] += 1
            return orig(*a, **k)

        comfy.model_patcher.ModelPatcher.load = counting
        try:
            self.unload()
            res = {}
            budget = (self.no_off["fp8 cast"][1] or 0) / GIB * 0.6 if self.cuda else 0.0
            for mode, gb in (("none", 0.0), ("block", 0.0), ("auto", budget)):
                loads["n"] = 0
                t0 = time.perf_counter()
                lat, text = node.sample(m, 7, 2, 1.0, "euler", "simple", pos, pos, latent, 1.0, mode, 1, gb)
                wall = time.perf_counter() - t0
                listed = [(lm.model.loaded_size(), lm.model.model_size()) for lm in mm.current_loaded_models
                          if lm.model is not None and lm.model.model is m.model]
                res[mode] = lat["samples"]
                self.row(variant=f"node CPUOffloadSampler {mode}" + (f" (budget {gb:.1f} GiB)" if gb else ""),
                         wall_s=wall, text=text, comfy_weight_loads=loads["n"],
                         comfy_loaded_gib=[self.gib(a) for a, _ in listed], comfy_model_gib=[self.gib(b) for _, b in listed],
                         equal_to_none=bool(torch.equal(res[mode], res["none"])))
                if mode == "none":
                    self.unload()
        finally:
            comfy.model_patcher.ModelPatcher.load = orig
            self.unload()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=SIZES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default="cast,offload,lora,node")
    ap.add_argument("--variants", default="bf16,fp8,nf4")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--blocks-per-group", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-repeats", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    args.sections = args.sections.split(",")
    args.variants = args.variants.split(",")
    args.modes = [m for m in args.modes.split(",") if m]
    args.attention = "default"  # read by bench_flux.Bench where it has that option
    _env.setup(cpu=args.device == "cpu")  # also PyAV's stand-in (the device image has none)
    from quantlora.nodes.fp8_cast_node import cast_model

    t_start = time.perf_counter()
    b = OffloadBench(args)
    if b.cuda:
        log(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    b.write_checkpoint()
    fp8_needed = "fp8" in args.variants or {"lora", "node"} & set(args.sections) or "cast" in args.sections

    p, load_s = b.load("none")
    log(f"bf16 loaded in {load_s:.0f} s")
    b.eager_row("bf16", p)
    if "offload" in args.sections and "bf16" in args.variants:
        b.offload_rows("bf16", p)
    if fp8_needed:
        t0 = time.perf_counter()
        p8, msg = cast_model(p, "float8_e4m3fn", "auto")
        log(f"FP8LayerwiseCast in {time.perf_counter() - t0:.0f} s: {msg}")
        del p
        b.unload()
        b.to_gpu(p8)
        b.eager_row("fp8 cast", p8)
        if "cast" in args.sections and not args.no_compile:
            b.compile_row("fp8 cast", p8)
        if "offload" in args.sections and "fp8" in args.variants:
            b.offload_rows("fp8 cast", p8)
        for section, fn in (("lora", b.lora_row), ("node", b.node_rows)):
            if section in args.sections:
                try:
                    fn(p8)
                except Exception as e:  # keep the other rows
                    import traceback

                    traceback.print_exc()
                    b.rows.append(dict(variant=section, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    b.unload()
        del p8
    else:
        del p
    b.unload()
    if "offload" in args.sections and "nf4" in args.variants:
        try:
            p4, load_s = b.load("bnb-nf4")
            log(f"nf4 loaded in {load_s:.0f} s")
            b.eager_row("nf4", p4)
            b.offload_rows("nf4", p4)
            del p4
        except Exception as e:
            log(f"FAILED nf4: {type(e).__name__}: {e}")
            b.rows.append(dict(variant="nf4", error=f"{type(e).__name__}: {str(e)[:300]}"))
        b.unload()
    b.flush()
    log(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
