"""GPU benchmark: CPU offload (memory/offload.py, CPUOffloadSampler) and fp8 layerwise cast
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
  rank-32 one while offloaded; both outputs against the same LoRAs without offload. With
  --node-lora-mode merge: "fp8 cast offload block + lora merge r64 card N", the LoRAs merged into
  the weights (lora/merge.MergeState; streamed layers merged on the GPU into their pinned host
  copies), same fields plus merge_s (the first merge, offloaded), merged_layers, pristine_gib.
- "node CPUOffloadSampler ...": the ComfyUI path (FP8LayerwiseCast -> LoRAHotswap ->
  CPUOffloadSampler, 2 euler steps): latents of block / auto against none, the node's peak VRAM
  text, ModelPatcher.load calls during the offloaded run (0: ComfyUI did not load the weights
  itself) and what ComfyUI lists as loaded.

Emulated cards (section "cards", issue 13): before the model is placed, a ballast allocation
leaves N GiB free (the way ComfyUI's peers were measured); CPUOffloadSampler's own planner
(nodes/offload_sampler_node.plan_offload, mode block, budget from free memory) picks what stays
resident; rows "offload block <kind> card <N>" with card_gib, budget_gib (weights), reserve_gib
(sampling), resident_blocks/n_blocks, resident_share, streamed_gib_per_step, step_s,
step_ratio_vs_no_offload, floor_ratio (max(1, streamed / measured pinned bandwidth / resident
step)), predicted_ratio (the node's own prediction), peak_vram_gib (torch's peak minus the
ballast) and within_card, equal_to_no_offload / max_abs_diff, auto_mode (what auto picks there).
The cards of one kind run on one offload, re-planned in place from the last card's (as the node
does when the budget changes): those rows also have replanned, replan_peak_gib (the peak of the
re-plan itself, less the ballast: blocks leaving the card are freed before others are copied in,
so it stays within max(old, new plan)) and replan_within_card; before a smaller card than the
last, the offload is first shrunk to the new card's plan (preshrunk), as the last plan's resident
blocks would not fit beside the new ballast.
Kinds in --rebase-kinds (default torchao fp8, whose eager no-offload step varied by 20% within a
run) measure the no-offload step again right after each card, in the same process state: ballast
dropped, the offload re-planned in place with every block resident (the hooks have nothing to
move), the same timed call, then re-planned back to the card's plan. Their step_ratio_vs_no_offload
(and floor) is to that adjacent_base_step_s; step_ratio_vs_first_baseline is to the eager row's.
Kind "torchao fp8 compiled" (not in the default --kinds: one call of its own) is torchao fp8 with
every block compiled in place (speed/compile.compile_blocks, the loader's `regional`) before its
no-offload row ("torchao fp8 compiled no offload", compile_s = its first call), then the same cards
on the compiled blocks (the eager fp8-dynamic step is host-bound, so its cards had no valid ratio);
its rows add graphs_compiled (dynamo graphs made during the card: 0 when streaming keeps every
compiled block valid). --compile-backend aot_eager checks that plumbing on a CPU without inductor.
Kinds and cards: bf16 12/16/24, fp8 cast 8/12/16, NF4 6/8, torchao fp8 (compiled) 8/12/16 ("pinned H2D
bandwidth" row first: the floor's bandwidth, measured in the same run). "comfy partial" rows:
ComfyUI's own partial loading (this process: dynamic VRAM off; comfy_peers.py has it on) sampling
through comfy.sample at the same cards, ratio to its fully loaded step. Below full size the cards
are scaled to the model (the same share of its weights). A time guard (--time-limit, 190 s from the
process start at full size: with device_run.sh's unpacking the run stays under 4 minutes) skips what would not fit and says so in a row; every part records its error and goes on.

    bash bench/device_run.sh bench_offload.py --size full --out $OUT/offload   # cards, lora, node, comfy: < 4 min
    python bench/bench_offload.py --size full --sections cast,offload,lora,node,cards  # everything (longer)
    python bench/bench_offload.py --sections offload --variants nf4  # a part
    python bench/bench_offload.py --size tiny --device cpu           # a CPU check of the script (offload moves nothing)
    python bench/bench_offload.py --size tiny --device cpu --sections cards,comfy --kinds bf16  # the cards logic on CPU
    python bench/bench_offload.py --size smoke --sections cards --cards "bf16=12;nf4=6"       # a quick GPU check
    bash bench/device_run.sh bench_offload.py --size full --sections cards --kinds "torchao fp8 compiled" --time-limit 420 --out $OUT/tc
    ... --profile-cards "torchao fp8 compiled=8"   # + one profiled forward of that card (bench/timeline.py)
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
from bench_flux import GIB, PROCESS_START, SIZES, Bench, log  # noqa: E402

MODES = ("model", "block", "leaf")


class OffloadBench(Bench):
    def __init__(self, args):
        super().__init__(args)
        self.cuda = self.dev.type == "cuda"
        self.compute = "bf16" if self.cuda else "fp32"
        self.no_off = {}  # variant -> (step_s, peak_bytes, output)
        self.t_start = PROCESS_START  # the time guard counts the imports too
        self.card_plans = {}  # (kind, card) -> (weights budget, step_s)
        self.bw, self.flops = None, None

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
        from quantlora.memory.sizes import module_bytes

        dm = p.model.diffusion_model
        self.reset_peak()
        first, step, out = self.timed(dm)
        peak = self.peak_bytes()
        if self.ref is None:
            self.ref, self.base_step = out, step
        self.no_off[name] = (step, peak, out)
        compiled = name.endswith(" compiled")
        self.row(variant=f"{name} no offload" if compiled else f"{name} eager", step_s=step,
                 step_ratio=step / self.base_step, **({"compile_s": first} if compiled else {}), weights_gib=self.gib(module_bytes(dm)),
                 peak_vram_gib=self.gib(peak), rel_err=self.rel(out, self.ref))
        return out

    def compile_row(self, name, p):
        import torch._dynamo

        dm = p.model.diffusion_model
        blocks = [*dm.double_blocks, *dm.single_blocks]
        from quantlora.speed.compile import compile_blocks

        compile_blocks(dm)
        self.reset_peak()
        first, step, out = self.timed(dm)
        self.row(variant=f"{name} compile (regional)", step_s=step, step_ratio=step / self.base_step,
                 compile_s=first, peak_vram_gib=self.gib(self.peak_bytes()), rel_err=self.rel(out, self.ref))
        for b in blocks:  # back to eager for the offload rows
            b._compiled_call_impl = None
        torch._dynamo.reset()

    def offload_rows(self, name, p):
        from quantlora.memory import offload as off

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
        """fp8 cast + LoRA slots r64 + block offload (the fp8 cast card 12 budget when measured:
        part resident, part streamed); swap while offloaded. --node-lora-mode merge: the same
        with the LoRA merged into the weights (lora_merge_row)."""
        if self.args.node_lora_mode == "merge":
            return self.lora_merge_row(p)
        from quantlora.lora.formats import load_lora
        from quantlora.nodes import runtime
        from quantlora.memory import offload as off

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
        card, budget, step_nolora = self.lora_card()
        state.buffers_placed_by_offload = True  # as CPUOffloadSampler sets it
        st = off.apply_offload(dm, "block", self.dev, "cpu", budget=budget)
        state.activate(("r64",), [(loras[64], 1.0)])
        _, step, out64 = self.timed(dm, self.args.offload_repeats)
        self.sync()
        t0 = time.perf_counter()
        state.activate(("r32",), [(loras[32], 1.0)])
        self.sync()
        swap = time.perf_counter() - t0
        out32 = self.fwd(dm)
        peak = self.peak_bytes()
        self.row(variant="fp8 cast offload block + lora slots r64" + (f" card {card[1]:g}" if card else ""),
                 step_s=step, step_ratio_vs_no_offload=step / base_step,
                 step_ratio_vs_no_lora_same_card=(step / step_nolora) if step_nolora else None,
                 budget_gib=self.gib(budget), resident_blocks=st.n_resident, n_blocks=st.n_blocks,
                 streamed_gib_per_step=self.gib(st.streamed_bytes),
                 peak_vram_gib=self.gib(peak), peak_ratio_vs_no_offload=(peak / base_peak) if peak else None,
                 equal_to_no_offload=bool(torch.equal(out64, refs[64])),
                 swapped_r32_equal_to_no_offload=bool(torch.equal(out32, refs[32])),
                 lora_effect=self.rel(refs[64], self.no_off["fp8 cast"][2]), swap_s=swap, strategy=st.strategy,
                 stream=st.spec.use_stream)
        off.remove_offload(dm)
        state.deactivate()
        self.reset_peak()

    def lora_card(self):
        """(card key, weights budget, no-LoRA step) of the fp8 cast card the LoRA rows use: 12, else
        the first fp8 cast card measured, else (None, None, None): every block streamed."""
        card = next((k for k in self.card_plans if k[0] == "fp8 cast" and k[1] == 12), None) or \
            next((k for k in self.card_plans if k[0] == "fp8 cast"), None)
        budget, step_nolora = self.card_plans[card] if card else (None, None)
        return card, budget, step_nolora

    def lora_merge_row(self, p):
        """fp8 cast + a LoRA r64 merged into the weights (lora/merge.MergeState) + block offload at
        the same card as the slots row: the references without offload on the device (r64 timed,
        r32), then the offload, r64 merged into the offloaded model (streamed layers merged on the
        GPU and written back to their pinned host copies), timed steps, a swap to r32 and a forward."""
        from quantlora.lora.formats import load_lora
        from quantlora.lora.merge import MergeState
        from quantlora.nodes import runtime
        from quantlora.memory import offload as off

        dm = p.model.diffusion_model
        dims = runtime.dims_of(dm)
        loras = {r: load_lora(self.write_lora(r, seed=r), dims) for r in (64, 32)}
        state = MergeState(dm)
        st = None
        try:
            self.to_gpu(p)
            refs = {}
            for r in (64, 32):
                state.activate((f"r{r}",), [(loras[r], 1.0)])
                self.reset_peak()
                if r == 64:
                    _, base_step, refs[r] = self.timed(dm, 2)
                    base_peak = self.peak_bytes()
                else:
                    refs[r] = self.fwd(dm)
            state.deactivate()
            self.unload()
            dm.to("cpu")
            self.reset_peak()
            card, budget, step_nolora = self.lora_card()
            st = off.apply_offload(dm, "block", self.dev, "cpu", budget=budget)
            self.sync()
            t0 = time.perf_counter()
            state.activate(("r64",), [(loras[64], 1.0)])
            self.sync()
            merge_s = time.perf_counter() - t0
            _, step, out64 = self.timed(dm, self.args.offload_repeats)
            self.sync()
            t0 = time.perf_counter()
            state.activate(("r32",), [(loras[32], 1.0)])
            self.sync()
            swap = time.perf_counter() - t0
            out32 = self.fwd(dm)
            peak = self.peak_bytes()
            self.row(variant="fp8 cast offload block + lora merge r64" + (f" card {card[1]:g}" if card else ""),
                     step_s=step, step_ratio_vs_no_offload=step / base_step,
                     step_ratio_vs_no_lora_same_card=(step / step_nolora) if step_nolora else None,
                     budget_gib=self.gib(budget), resident_blocks=st.n_resident, n_blocks=st.n_blocks,
                     streamed_gib_per_step=self.gib(st.streamed_bytes),
                     peak_vram_gib=self.gib(peak), peak_ratio_vs_no_offload=(peak / base_peak) if peak else None,
                     equal_to_no_offload=bool(torch.equal(out64, refs[64])),
                     swapped_r32_equal_to_no_offload=bool(torch.equal(out32, refs[32])),
                     lora_effect=self.rel(refs[64], self.no_off["fp8 cast"][2]), swap_s=swap,
                     merge_s=merge_s, merged_layers=state.report.layers,
                     pristine_gib=self.gib(state.report.pristine_bytes), strategy=st.strategy,
                     stream=st.spec.use_stream)
        finally:
            if st is not None:
                off.remove_offload(dm)
            state.deactivate()  # the weights as loaded, for the node rows
            self.reset_peak()

    # ---------- emulated cards (issue 13) ----------
    # full-size weights per kind (BENCHMARKS.md): smaller sizes scale the cards to the same share
    FULL_WEIGHTS_GIB = {"bf16": 22.17, "fp8 cast": 11.9, "torchao fp8": 11.16, "torchao fp8 compiled": 11.16, "nf4": 5.81}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def time_ok(self, need: float, what: str) -> bool:
        left = self.args.time_limit - self.elapsed()
        if left < need:
            log(f"SKIPPED {what}: time guard ({left:.0f} s left, needs ~{need:.0f} s)")
            self.row(variant=what, skipped=f"time guard: {left:.0f} s left of --time-limit, needs ~{need:.0f} s")
            return False
        return True

    def error_row(self, what: str, e: BaseException, **extra):
        import traceback

        traceback.print_exc()
        log(f"FAILED {what}: {type(e).__name__}: {e}")
        self.row(variant=what, error=f"{type(e).__name__}: {str(e)[:300]}", **extra)

    def latent_dict(self):
        return {"samples": torch.zeros(1, 16, self.latent, self.latent)}

    def bandwidth_row(self):
        """The floor's bandwidth (pinned host-to-device, 1 GiB copies) and the matmul rate the
        node's prediction uses, measured here, once (memory/streaming caches them for the node)."""
        from quantlora.memory import streaming

        if self.cuda:
            self.bw = streaming.pinned_bandwidth(self.dev, nbytes=1 << 30, repeats=5)
            self.flops = streaming.matmul_rate(self.dev)
            fp8 = streaming.fp8_matmul_rate(self.dev)
            self.row(variant="pinned H2D bandwidth", gb_s=self.bw / 1e9, matmul_tflops=self.flops / 1e12,
                     fp8_matmul_tflops=None if fp8 is None else fp8 / 1e12)
        else:  # injected numbers: the logic runs, nothing is measured
            self.bw, self.flops = 10e9, 1e12
            self.row(variant="pinned H2D bandwidth", gb_s=self.bw / 1e9, matmul_tflops=self.flops / 1e12,
                     note="cpu dry run: injected numbers")

    def card_free_bytes(self, kind: str, n_gib: float, weights: int, reserve: int) -> int:
        if self.args.size == "full":
            return int(n_gib * GIB)
        share = (n_gib * GIB - reserve) / (self.FULL_WEIGHTS_GIB[kind] * GIB)
        return int(reserve + max(0.0, share) * weights)

    def make_ballast(self, free_target: int, at_rest: int):
        """A device allocation leaving free_target bytes free for the model (what it holds there
        now, at_rest, counts as free: the planner reclaims it). (tensor, bytes)."""
        if not self.cuda:
            return None, 0
        import comfy.model_management as mm

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        n = int(mm.get_free_memory(self.dev) + at_rest - free_target)
        if n <= 0:
            return None, 0
        return torch.empty(n, dtype=torch.uint8, device=self.dev), n

    def card_rows(self, kind: str, p, cards, keep_model: bool = True):
        """Block offload at each emulated card, budget and residency chosen by the node's planner.
        keep_model=False: the model is dropped afterwards, so its offload is not taken off (no copy
        of the pinned weights back to pageable memory; the pinned blocks go back to torch's cache
        for the next model)."""
        import comfy.model_management as mm
        from quantlora.nodes import offload_run as node
        from quantlora.memory import offload as off
        from quantlora.memory.sizes import module_bytes

        dm = p.model.diffusion_model
        base_step, base_peak, base_out = self.no_off[kind]
        weights = module_bytes(dm)
        lat = self.latent_dict()
        reserve = node.sampling_reserve(p, lat, cfg=1.0)
        act_est = node.sampling_reserve(p, lat, cfg=1.0, rule="sum") - int(mm.minimum_inference_memory())
        act_measured = (base_peak - weights) if base_peak is not None else None
        self.unload()
        dm.to("cpu")
        per_card = 4 + (self.args.offload_repeats + 2) * base_step * 5
        if kind in self.args.rebase_kinds:  # the adjacent baseline: two re-plans and its forwards
            per_card += 4 + (self.args.offload_repeats + 2) * base_step * 1.5
        default_extra, default_rule = mm.extra_reserved_memory(), node.RESERVE_RULE
        try:
            for n, rv, rule in [(n, rv, rule) for n in cards for rule in self.args.reserve_rules
                                for rv in self.args.reserve_vram]:
                name = (f"offload block {kind} card {n:g}" + ("" if rv is None else f" reserve-vram {rv:g}")
                        + ("" if rule == self.args.reserve_rules[0] else f" reserve {rule}"))
                if not self.time_ok(per_card + (10 if n == cards[0] else 0), name):
                    continue
                # as if ComfyUI ran with --reserve-vram rv (its headroom beside the model, which the
                # node's reserve includes through minimum_inference_memory); None: as started
                mm.EXTRA_RESERVED_VRAM = default_extra if rv is None else int(rv * GIB)
                node.RESERVE_RULE = rule  # offload_plan.RESERVE_RULES: the node's rule, or the old one beside it
                reserve = node.sampling_reserve(p, lat, cfg=1.0)
                ballast, nb, replanned, preshrunk, replan_peak = None, 0, False, False, None
                try:
                    free_target = self.card_free_bytes(kind, n, weights, reserve)
                    injected = dict(free_bytes=free_target, bandwidth=self.bw, flops=self.flops)
                    st0 = off.offload_state(dm)
                    at_rest = st0.nonblock + st0.residency.resident_bytes if st0 is not None and st0.residency else 0
                    replanned = st0 is not None
                    if at_rest > free_target - reserve:
                        # a smaller card than the last one: what the last plan keeps resident would not fit
                        # beside this card's ballast, so shrink to this card's plan first (no ballast yet),
                        # then emulate the card (the re-plan below is then a no-op or a small one)
                        pre = node.plan_offload(p, "block", 1, 0.0, lat, cfg=1.0, card=injected)
                        off.apply_offload(dm, "block", self.dev, "cpu", 1, budget=pre.budget, timing=pre.timing)
                        st0 = off.offload_state(dm)
                        at_rest = st0.nonblock + st0.residency.resident_bytes
                        preshrunk = True
                    gc.collect()  # nothing of the last card (its outputs, a failed forward's copies) is kept
                    ballast, nb = self.make_ballast(free_target, at_rest)
                    card = None if self.cuda else injected
                    plan = node.plan_offload(p, "block", 1, 0.0, lat, cfg=1.0, card=card)
                    auto = node.plan_offload(p, "auto", 1, 0.0, lat, cfg=1.0, card=card)
                    self.reset_peak()
                    graphs0 = graphs_compiled()
                    t0 = time.perf_counter()
                    st = off.apply_offload(dm, "block", self.dev, "cpu", 1, budget=plan.budget, timing=plan.timing)
                    self.sync()
                    setup = time.perf_counter() - t0
                    # the re-plan in place (blocks moved between the card and pinned memory) on its own:
                    # it must stay within the card like the forwards (free first, then promote)
                    if replanned and self.peak_bytes() is not None:
                        replan_peak = self.peak_bytes() - nb
                    a0 = self.alloc_counts()
                    first, step, out = self.timed(dm, self.args.offload_repeats)
                    peak = self.peak_bytes()
                    # one more forward: the hooks' host time in a step, the part of it waiting for the
                    # compute stream, and the host-to-device copies it issued
                    h0, w0, c0 = (st.streamer.stats[k] for k in ("host_s", "wait_s", "copies"))
                    self.fwd(dm)
                    self.sync()
                    hook_host_ms = (st.streamer.stats["host_s"] - h0) * 1e3
                    hook_wait_ms = (st.streamer.stats["wait_s"] - w0) * 1e3
                    copies = st.streamer.stats["copies"] - c0
                    allocs = {k: v - a0.get(k, 0) for k, v in self.alloc_counts().items()}
                    # the same plan with the room counted as lookahead + 1 whole buffers (the streamer
                    # before its byte window), timed right after, same state: the window's own gain
                    window, st.streamer.window = st.streamer.window, None
                    try:
                        _, whole_step, whole_out = self.timed(dm, self.args.offload_repeats)
                    finally:
                        st.streamer.window = window
                    whole = dict(whole_buffers_step_s=whole_step, whole_buffers_equal=bool(torch.equal(whole_out, out)))
                    whole_out = None
                    profiled = self.profile_card(dm, name) if n in self.args.profile_cards.get(kind, ()) else {}
                    peak_card = None if peak is None else peak - nb
                    if rv is None and rule == self.args.reserve_rules[0]:  # the LoRA rows compare with the card as started
                        self.card_plans[(kind, n)] = (plan.budget, step)
                    r = dict(variant=name, card_gib=round(free_target / GIB, 3), budget_gib=self.gib(plan.budget),
                             reserve_gib=self.gib(reserve), reserve_vram_gib=rv, reserve_rule=rule,
                             resident_blocks=st.n_resident, n_blocks=st.n_blocks,
                             resident_share=(st.nonblock + st.residency.resident_bytes) / st.model_bytes,
                             streamed_gib_per_step=self.gib(st.streamed_bytes), step_s=step,
                             step_ratio_vs_no_offload=step / base_step, floor_ratio=None, vs_floor=None,
                             predicted_ratio=plan.predicted_ratio,
                             peak_vram_gib=self.gib(peak_card), within_card=None if peak_card is None else peak_card <= free_target,
                             peak_reserved_gib=self.gib(torch.cuda.max_memory_reserved() - nb) if self.cuda else None,
                             equal_to_no_offload=bool(torch.equal(out, base_out)),
                             max_abs_diff=(out.float() - base_out.float()).abs().max().item(),
                             replanned=replanned, preshrunk=preshrunk, replan_peak_gib=self.gib(replan_peak),
                             replan_within_card=None if replan_peak is None else replan_peak <= free_target,
                             auto_mode=auto.mode, activation_est_gib=self.gib(act_est),
                             activation_measured_gib=self.gib(act_measured), setup_s=setup, first_s=first,
                             prefetched=st.streamer.stats["prefetched"], on_the_spot=st.streamer.stats["on_the_spot"],
                             host_waits=st.streamer.stats["waits"], hook_host_ms_per_step=hook_host_ms,
                             hook_wait_ms_per_step=hook_wait_ms, copies_per_step=copies,
                             **{f"allocator_{k}": v for k, v in allocs.items()}, **profiled, **whole,
                             pinned_gib=self.gib(st.streamer.pinned_bytes),
                             lookahead=st.residency.lookahead, plan=plan.describe())
                    if kind.endswith(" compiled"):
                        r["graphs_compiled"] = graphs_compiled() - graphs0
                    ref_step = base_step
                    if kind in self.args.rebase_kinds:
                        ballast = None
                        adj = self.adjacent_base(dm, 2 * weights, plan, base_out, out)
                        out = None
                        r.update(adj)
                        if adj.get("adjacent_base_step_s"):
                            ref_step = adj["adjacent_base_step_s"]
                            r["step_ratio_vs_first_baseline"] = step / base_step
                            r["step_ratio_vs_no_offload"] = step / ref_step
                    r["whole_buffers_ratio_vs_no_offload"] = whole_step / ref_step
                    floor = max(1.0, st.streamed_bytes / self.bw / ref_step)
                    r.update(floor_ratio=floor, vs_floor=(step / ref_step) / floor)
                    self.row(**r)
                except Exception as e:  # one card failing (an OOM) must not lose the others
                    peak = self.peak_bytes()
                    self.error_row(name, e, replanned=replanned, preshrunk=preshrunk,
                                   peak_vram_gib=self.gib(None if peak is None else peak - nb))
                finally:
                    out = None
                    del ballast
                    self.reset_peak()
        finally:
            mm.EXTRA_RESERVED_VRAM = default_extra
            node.RESERVE_RULE = default_rule
            try:
                if keep_model:
                    off.remove_offload(dm, release_pinned=False)
            except Exception as e:
                self.error_row(f"remove offload {kind}", e)
            self.reset_peak()

    def profile_card(self, dm, name: str) -> dict:
        """One offloaded forward under torch.profiler (after one warm-up forward): its Chrome trace
        goes to the output folder and bench/timeline.py's summary into the card's row: compute and
        copy engine busy time, and the compute engine's idle time split into waiting for a copy and
        waiting for the host (issue 13's card 8)."""
        import re

        import timeline
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.fwd(dm)  # warm-up outside the profiler (a schedule's cycle dropped the GPU events on the H200)
        self.sync()
        with profile(activities=acts) as prof:
            self.fwd(dm)
            self.sync()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        path = os.path.join(self.args.out, f"trace-{slug}.json")
        os.makedirs(self.args.out, exist_ok=True)
        prof.export_chrome_trace(path)
        got = timeline.summarize(path) or {}
        log(f"profile {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()) if got else f"profile {name}: no GPU events")
        return {"profile_trace": os.path.basename(path), **{f"profile_{k}": v for k, v in got.items()}}

    def alloc_counts(self) -> dict:
        """The caching allocator's cumulative counters that mean device-wide stalls: retries (a
        failed allocation frees cached blocks, synchronizing) and segments taken from the driver."""
        if not self.cuda:
            return {}
        st = torch.cuda.memory_stats()
        return {"retries": st.get("num_alloc_retries", 0), "segments": st.get("segment.all.allocated", 0),
                "segments_freed": st.get("segment.all.freed", 0), "syncs": st.get("num_sync_all_streams", 0)}

    def adjacent_base(self, dm, all_budget: int, plan, base_out, card_out=None) -> dict:
        """The no-offload step measured right after a card's (--rebase-kinds), in the same state of
        the process: the card's ballast is gone (the caller dropped it), the offload is re-planned
        in place with every block resident (a budget of all_budget: the stream hooks stay but have
        nothing to move, so the forward is the plain model's on the device), timed with the same
        call as the card, then re-planned back to the card's plan, so the next card re-plans from
        this one's as without the baseline. Fields for the card's row; an error is recorded there."""
        from quantlora.memory import offload as off

        try:
            self.reset_peak()
            t0 = time.perf_counter()
            st = off.apply_offload(dm, "block", self.dev, "cpu", 1, budget=all_budget, timing=plan.timing)
            self.sync()
            promote = time.perf_counter() - t0
            if st.streamed_bytes:
                raise RuntimeError(f"the baseline re-plan still streams {st.streamed_bytes} bytes")
            _, adj_step, adj_out = self.timed(dm, self.args.offload_repeats)
            equal = bool(torch.equal(adj_out, base_out))
            # compiled kinds: the offload hooks can make dynamo compile a second graph, whose kernels
            # need not round like the first baseline's; the card must then equal this baseline
            equal_card = None if card_out is None else bool(torch.equal(adj_out, card_out))
            adj_out = None
            peak = self.peak_bytes()
            t0 = time.perf_counter()
            off.apply_offload(dm, "block", self.dev, "cpu", 1, budget=plan.budget, timing=plan.timing)
            self.sync()
            return dict(adjacent_base_step_s=adj_step, adjacent_base_equal_to_first=equal,
                        card_equal_to_adjacent_base=equal_card,
                        adjacent_base_peak_vram_gib=self.gib(peak), adjacent_base_replan_s=promote,
                        adjacent_back_replan_s=time.perf_counter() - t0)
        except Exception as e:  # the card's row keeps its first-baseline ratio
            import traceback

            traceback.print_exc()
            log(f"FAILED adjacent baseline: {type(e).__name__}: {e}")
            return dict(adjacent_base_error=f"{type(e).__name__}: {str(e)[:300]}")

    def comfy_rows(self, weight_dtype: str, kind: str, cards):
        """ComfyUI's own partial loading (v0.33's ModelPatcher, dynamic VRAM off in this process)
        at the same emulated cards: UNETLoader, comfy.sample with euler, steady step from the
        sampler callbacks, ratio to the same model fully loaded."""
        import comfy.model_management as mm
        import folder_paths
        import nodes

        folder_paths.add_model_folder_path("diffusion_models", self.args.workdir)
        name0 = f"comfy partial {weight_dtype}"
        if not self.time_ok(25 + 8 * len(cards), name0):
            return
        self.unload()
        t0 = time.perf_counter()
        p = nodes.UNETLoader().load_unet(os.path.basename(self.path), weight_dtype)[0]
        load_s = time.perf_counter() - t0
        try:
            base = self.comfy_step(p)
            self.row(variant=f"{name0} fully loaded", step_s=base, load_s=load_s,
                     peak_vram_gib=self.gib(self.peak_bytes()), patcher=type(p).__name__)
            for n in cards:
                name = f"{name0} card {n:g}"
                if not self.time_ok(10, name):
                    continue
                ballast = None
                try:
                    mm.unload_all_models()
                    weights = p.model_size()
                    ballast, nb = self.make_ballast(self.card_free_bytes(kind, n, weights, 3 * GIB), 0)
                    self.reset_peak()
                    step = self.comfy_step(p)
                    peak = self.peak_bytes()
                    loaded = [lm.model.loaded_size() for lm in mm.current_loaded_models if lm.model is p]
                    self.row(variant=name, step_s=step, step_ratio_vs_fully_loaded=step / base if base else None,
                             peak_vram_gib=self.gib(None if peak is None else peak - nb),
                             comfy_loaded_gib=[self.gib(x) for x in loaded], model_gib=self.gib(weights))
                except Exception as e:
                    self.error_row(name, e)
                finally:
                    del ballast
                    mm.unload_all_models()
                    self.reset_peak()
        finally:
            del p
            self.unload()

    def comfy_step(self, p, steps: int = 4) -> float:
        import comfy.sample

        g = torch.Generator().manual_seed(5)
        pos = [[torch.randn(1, self.txt, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        lat = torch.zeros(1, 16, self.latent, self.latent)
        noise = comfy.sample.prepare_noise(lat, 42)
        stamps = []

        def cb(step, x0, x, total):
            self.sync()
            stamps.append(time.perf_counter())

        comfy.sample.sample(p, noise, steps, 1.0, "euler", "simple", pos, pos, lat, callback=cb, disable_pbar=True, seed=42)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return statistics.median(gaps) if gaps else float("nan")

    def node_rows(self, p):
        """Through ComfyUI: LoRAHotswap -> CPUOffloadSampler (none, block, auto with a budget)."""
        import comfy.model_management as mm
        import comfy.model_patcher
        import folder_paths
        from quantlora.nodes import offload_run as node
        from quantlora.nodes.hotswap_node import LoRAHotswap

        folder_paths.add_model_folder_path("loras", self.args.workdir)
        import inspect

        name = os.path.basename(self.write_lora(64, seed=64))
        lora_mode = self.args.node_lora_mode
        kw = {"mode": lora_mode} if "mode" in inspect.signature(LoRAHotswap.execute).parameters else {}
        m = LoRAHotswap.execute(p, name, 1.0, 64, "blocks", **kw).args[0]
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
                self.row(variant=f"node CPUOffloadSampler {mode}" + (f" (budget {gb:.1f} GiB)" if gb else "")
                         + (f", LoRA {lora_mode}" if lora_mode != "slots" else ""),
                         wall_s=wall, text=text, comfy_weight_loads=loads["n"],
                         comfy_loaded_gib=[self.gib(a) for a, _ in listed], comfy_model_gib=[self.gib(b) for _, b in listed],
                         equal_to_none=bool(torch.equal(res[mode], res["none"])))
                if mode == "none":
                    self.unload()
        finally:
            comfy.model_patcher.ModelPatcher.load = orig
            self.unload()


CARDS = {"bf16": (12, 16, 24), "fp8 cast": (8, 12, 16), "nf4": (6, 8), "torchao fp8": (8, 12, 16),
         "torchao fp8 compiled": (8, 12, 16)}


def graphs_compiled() -> int:
    """Dynamo graphs made so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
# ComfyUI's weight dtypes beside the pack's kinds (fp8_e4m3fn_fast: its fp8 matmul path, the
# counterpart of torchao fp8), first what matters most (a --time-limit cuts the tail)
COMFY_CARDS = {"fp8_e4m3fn_fast": ("torchao fp8", (8, 12)), "fp8_e4m3fn": ("fp8 cast", (8, 12, 16)),
               "default": ("bf16", (12, 16, 24))}


def parse_cards(text: str) -> dict:
    """"bf16=12/16/24;nf4=6/8" -> {"bf16": (12, 16, 24), "nf4": (6, 8)}; empty: CARDS."""
    if not text:
        return dict(CARDS)
    out = {}
    for part in text.split(";"):
        if part.strip():
            k, v = part.split("=")
            out[k.strip()] = tuple(float(x) for x in v.split("/") if x)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=SIZES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default=None,
                    help="full size: cards,lora,node,comfy (< 4 min); other sizes also cast,offload (the per-mode rows)")
    ap.add_argument("--variants", default="bf16,fp8,nf4", help="offload section: the per-mode rows' weight kinds")
    ap.add_argument("--kinds", default="bf16,fp8 cast,nf4,torchao fp8", help="cards section: weight kinds, in this order")
    ap.add_argument("--cards", default="", help='cards per kind, e.g. "bf16=12/16/24;nf4=6/8" (default: issue 13\'s)')
    ap.add_argument("--profile-cards", default="", help='cards to profile one forward of, same form as --cards '
                    '(e.g. "torchao fp8 compiled=8"): a Chrome trace and bench/timeline.py\'s summary in the row')
    ap.add_argument("--reserve-rules", default="comfy", help='cards section: the reserve rules to run each card '
                    'with (memory/offload_plan.RESERVE_RULES), the first as the node has it; e.g. "comfy,sum" adds '
                    'rows " reserve sum" with the pre-2026-12 rule, same process')
    ap.add_argument("--reserve-vram-gib", default="", help='cards section: each card also as if ComfyUI ran with '
                    '--reserve-vram X, e.g. "0" (a row per value after the default one, same process)')
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--blocks-per-group", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-repeats", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds from the process start (default: 190 at full size, else none)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-backend", default=None,
                    help='"torchao fp8 compiled": torch.compile backend (default: QUANTLORA_COMPILE_BACKEND, else '
                         'inductor; aot_eager: the plumbing on a CPU, no codegen)')
    ap.add_argument("--rebase-kinds", default="torchao fp8,torchao fp8 compiled",
                    help="cards section: kinds whose no-offload step is measured again right after each card "
                         "(every block resident, no ballast, same process state); their step_ratio_vs_no_offload "
                         "is to that adjacent baseline (step_ratio_vs_first_baseline: to the eager row's)")
    ap.add_argument("--node-lora-mode", default="slots", choices=("slots", "merge"),
                    help="node section: LoRAHotswap's mode before CPUOffloadSampler; lora section: the lora row's "
                         "mode (slots: LoRA slots r64; merge: merged into the weights, lora/merge.MergeState)")
    args = ap.parse_args()
    if args.sections is None:
        args.sections = "cards,lora,node,comfy" if args.size == "full" else "cast,offload,lora,node,cards"
    args.sections = args.sections.split(",")
    args.variants = args.variants.split(",")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    args.cards = parse_cards(args.cards)
    args.profile_cards = parse_cards(args.profile_cards) if args.profile_cards else {}
    args.reserve_rules = [r.strip() for r in args.reserve_rules.split(",") if r.strip()]
    args.reserve_vram = [None] + [float(x) for x in args.reserve_vram_gib.split(",") if x.strip()]
    args.rebase_kinds = {k.strip() for k in args.rebase_kinds.split(",") if k.strip()}
    args.modes = [m for m in args.modes.split(",") if m]
    if args.time_limit is None:
        args.time_limit = 190.0 if args.size == "full" else 1e9
    args.attention = "default"  # read by bench_flux.Bench where it has that option
    _env.setup(cpu=args.device == "cpu")  # also PyAV's stand-in (the device image has none)
    from quantlora.nodes import offload_run as node
    from quantlora.nodes.fp8_cast_run import cast_model

    b = OffloadBench(args)
    if not b.cuda:
        node.FORCE_ON_CPU = True  # the planner and the hooks run on the CPU (nothing moves)
    if b.cuda:
        log(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    b.write_checkpoint()
    log(f"checkpoint ready at {b.elapsed():.0f} s")
    sections = set(args.sections)
    cards = "cards" in sections
    if cards:
        try:
            b.bandwidth_row()
        except Exception as e:
            b.error_row("pinned H2D bandwidth", e)
            b.bw, b.flops = 10e9, 1e12
    kinds = [k for k in args.kinds if k in args.cards] if cards else []
    fp8_needed = ("fp8" in args.variants and "offload" in sections) or {"lora", "node", "cast"} & sections \
        or "fp8 cast" in kinds

    def guarded(what, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # keep the other rows
            b.error_row(what, e)
            b.unload()
            return None

    p = p8 = None
    try:
        p, load_s = b.load("none")
        log(f"bf16 loaded in {load_s:.0f} s")
        b.eager_row("bf16", p)
        if "offload" in sections and "bf16" in args.variants:
            guarded("bf16 offload", b.offload_rows, "bf16", p)
        if "bf16" in kinds:
            guarded("bf16 cards", b.card_rows, "bf16", p, args.cards["bf16"])
        if fp8_needed:
            t0 = time.perf_counter()
            p8, msg = cast_model(p, "float8_e4m3fn", "auto")
            log(f"FP8LayerwiseCast in {time.perf_counter() - t0:.0f} s: {msg}")
    except Exception as e:
        b.error_row("bf16", e)
    p = None
    b.unload()
    if p8 is not None:
        try:
            b.to_gpu(p8)
            b.eager_row("fp8 cast", p8)
            if "cast" in sections and not args.no_compile:
                guarded("fp8 cast compile", b.compile_row, "fp8 cast", p8)
            if "offload" in sections and "fp8" in args.variants:
                guarded("fp8 cast offload", b.offload_rows, "fp8 cast", p8)
            if "fp8 cast" in kinds:
                guarded("fp8 cast cards", b.card_rows, "fp8 cast", p8, args.cards["fp8 cast"],
                        bool({"lora", "node"} & sections))
            if "lora" in sections and b.time_ok(20, "lora"):
                guarded("lora", b.lora_row, p8)
        except Exception as e:
            b.error_row("fp8 cast", e)
        p8_keep = p8 if ("node" in sections) else None
        p8 = None
        b.unload()
    else:
        p8_keep = None
    fast_quant = "torchao-fp8-dynamic" if b.cuda else "torchao-int8-weight-only"
    for kind, quant in (("nf4", "bnb-nf4"), ("torchao fp8", fast_quant), ("torchao fp8 compiled", fast_quant)):
        want_cards = kind in kinds
        want_modes = kind == "nf4" and "offload" in sections and "nf4" in args.variants
        if not (want_cards or want_modes) or not b.time_ok(40, f"{kind} load"):
            continue
        try:
            pq, load_s = b.load(quant)
            log(f"{kind} ({quant}) loaded in {load_s:.0f} s")
            if kind.endswith(" compiled"):
                from quantlora.speed.compile import compile_blocks

                kw = {"backend": args.compile_backend} if args.compile_backend else {}
                log(f"compiled {compile_blocks(pq.model.diffusion_model, **kw)} blocks in place "
                    f"({args.compile_backend or 'default backend'}; the first call below compiles)")
            b.eager_row(kind, pq)
            if want_modes:
                guarded(f"{kind} offload", b.offload_rows, kind, pq)
            if want_cards:
                guarded(f"{kind} cards", b.card_rows, kind, pq, args.cards[kind], False)
            pq = None
        except Exception as e:
            b.error_row(kind, e)
        b.unload()
    if "comfy" in sections:
        for dtype, (kind, cs) in COMFY_CARDS.items():
            guarded(f"comfy partial {dtype}", b.comfy_rows, dtype, kind, cs)
    if "node" in sections and p8_keep is not None and b.time_ok(20, "node"):
        guarded("node", b.node_rows, p8_keep)
    p8_keep = None
    b.unload()
    b.flush()
    log(f"done in {b.elapsed():.0f} s")


if __name__ == "__main__":
    main()
