"""GPU benchmark: a full-size FLUX.1-dev transformer (seeded random weights) at 1024x1024.

One row per variant: seconds per denoising step (one transformer forward, batch 1, 4096 image
+ 512 text tokens), weights GiB, peak VRAM GiB, load/quantize seconds and relative error
against bf16 eager, each as a ratio to bf16 eager measured in the same run; ComfyUI's own
fp8_e4m3fn_fast path as the peer. Sections run separately so each fits one device call:

    python bench/bench_flux.py --sections base --out $OUT       # bf16, quantized, ComfyUI rows
    python bench/bench_flux.py --sections lora,compile --out $OUT
    python bench/bench_flux.py --size tiny --device cpu ...       # a CPU check of the script

Rows are merged by variant name into bench/results.json (--merge) and BENCHMARKS.md is
rendered from it (bench/report.py).
"""
from __future__ import annotations

import time

# The restart figure (firststep's to_first_step_s) counts from here: before torch is imported (it was
# set after `import torch`, which left its import, ~2 s, out of the figure).
PROCESS_START = time.perf_counter()

import argparse  # noqa: E402 (PROCESS_START first)
import datetime
import gc
import json
import logging
import os
import re
import statistics
import sys

import torch

TORCH_IMPORTED = time.perf_counter()  # the restart's phases before the load: torch, ComfyUI's imports, CUDA
PHASES_AT: dict[str, float] = {}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _env  # noqa: E402

SIZES = {
    "full": dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, latent=128, txt=512),
    "smoke": dict(hidden_size=3072, num_heads=24, depth=2, depth_single_blocks=4, latent=128, txt=512),
    "tiny": dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=2, latent=16, txt=8),  # heads of 128, as ComfyUI needs
}
GIB = 2 ** 30


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def bytecode_cached() -> bool:
    """Whether ComfyUI's loader module was imported from cached bytecode (a user's restart is; a tree
    carried as sources and run with PYTHONDONTWRITEBYTECODE compiles on every start)."""
    import importlib.util

    import comfy.sd

    return os.path.exists(importlib.util.cache_from_source(comfy.sd.__file__))


def write_cprofile(prof, path: str, top: int = 80) -> None:
    import io
    import pstats

    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
    # who calls the expensive leaves (imports compiled from source, torch.library registrations, ...)
    st = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    for pattern in ("source_to_code", "build_Attribute", r"library.py.*\(wrap\)", r"library.py.*\(define\)",
                    "isfinite", "zero_", "HASH' objects", "torch.empty", "get_compiler_fn", r"_find_and_load\b"):
        st.print_callers(pattern, 25)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def bytecode_missing() -> dict:
    """Modules this process imported from source files with no cached bytecode beside them (a restart
    compiles each again, ~4 ms apiece), counted by top-level package."""
    import importlib.util

    by_pkg: dict[str, int] = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        try:
            if os.path.exists(importlib.util.cache_from_source(f)):
                continue
        except (NotImplementedError, ValueError):
            continue
        top = name.split(".")[0]
        by_pkg[top] = by_pkg.get(top, 0) + 1
    return dict(sorted(by_pkg.items(), key=lambda kv: -kv[1])[:20], dont_write=bool(sys.flags.dont_write_bytecode),
                prefix=sys.pycache_prefix)


def before_load_phases() -> dict:
    """Where the restart's time before the load goes: torch's import, _env.setup (ComfyUI's imports and
    its device query, which starts CUDA), the bench's own inputs on the device."""
    env, init = PHASES_AT.get("env_setup"), PHASES_AT.get("bench_init")
    if env is None or init is None:
        return {}
    return dict(torch_import_s=round(TORCH_IMPORTED - PROCESS_START, 2), env_setup_s=round(env - TORCH_IMPORTED, 2),
                inputs_s=round(init - env, 2))


BYPASS_REASONS: list[str] = []


class _BypassReasons(logging.Handler):
    """Keeps why AOTAutograd's cache was bypassed (torch logs it at INFO, once per graph)."""

    def emit(self, record):
        msg = record.getMessage()
        if "Bypassing autograd cache" in msg:
            BYPASS_REASONS.append(msg.split("due to:", 1)[-1].strip()[:300])


def watch_autograd_cache():
    lg = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    lg.addHandler(_BypassReasons(logging.INFO))
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
        lg.propagate = False  # the reason goes into the row, not onto stderr


def warmup_stats() -> dict:
    """The background first-use work (speed/warmup.py): on or off, and how long it took."""
    from quantlora.speed import warmup

    return dict(enabled=warmup.enabled(), **warmup.stats)


def compile_phases(min_s: float = 0.05) -> dict:
    """Dynamo's own timers over this process's compiles (seconds, summed per phase, those over
    `min_s`): where the restart's 'compile from the cache' goes (tracing, guards, inductor's caches)."""
    try:
        import torch._dynamo.utils as dynamo_utils

        names, values = dynamo_utils.compile_times(repr="csv", aggregate=True)
        out = {n: round(float(v), 2) for n, v in zip(names, values) if float(v) >= min_s}
        # the caches' own verdicts: an AOTAutograd cache bypass (e.g. for tensor-subclass weights)
        # leaves the joint-graph passes and the forward compiler to run on every restart
        for group, keys in (("aot_autograd", ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass",
                                              "autograd_cache_saved")),
                            ("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"))):
            for k in keys:
                n = dynamo_utils.counters[group].get(k)
                if n:
                    out[k] = int(n)
        if BYPASS_REASONS:
            out["autograd_cache_bypass_reasons"] = sorted(set(BYPASS_REASONS))[:4]
        return out
    except Exception as e:  # a private helper: its absence must not cost the row
        return {"unavailable": f"{type(e).__name__}: {e}"[:120]}


class Bench:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.dev = torch.device(args.device)
        sz = SIZES[args.size]
        self.cfg = dict(hidden_size=sz["hidden_size"], num_heads=sz["num_heads"], depth=sz["depth"],
                        depth_single_blocks=sz["depth_single_blocks"], context_in_dim=4096, vec_in_dim=768,
                        in_channels=16, mlp_ratio=4.0, guidance_embed=True, qkv_bias=True)
        self.latent, self.txt = sz["latent"], sz["txt"]
        os.makedirs(args.workdir, exist_ok=True)
        self.path = os.path.join(args.workdir, f"flux-{args.size}.safetensors")
        g = torch.Generator(device="cpu").manual_seed(1234)
        dt = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.inputs = dict(
            x=torch.randn(1, 16, self.latent, self.latent, generator=g).to(self.dev, dt),
            timestep=torch.tensor([0.5], device=self.dev, dtype=dt),
            context=torch.randn(1, self.txt, 4096, generator=g).to(self.dev, dt),
            y=torch.randn(1, 768, generator=g).to(self.dev, dt),
            guidance=torch.tensor([3.5], device=self.dev, dtype=dt))
        self.ref = None          # bf16 eager output
        self.ref_lora = None     # bf16 eager output with the rank-64 LoRA
        self.base_step = None

    # ---------- files ----------
    def write_checkpoint(self):
        if os.path.exists(self.path):
            return
        import comfy.ldm.flux.model
        import comfy.ops
        from safetensors.torch import save_file
        from quantlora.tools.demo_models import _axes

        t0 = time.perf_counter()
        c = self.cfg
        # v0.33 added a required FluxParams field (FLUX.1: no text position ids); 0.3.75 has none.
        extra = {"txt_ids_dims": []} if "txt_ids_dims" in getattr(comfy.ldm.flux.model.FluxParams, "__dataclass_fields__", {}) else {}
        meta = comfy.ldm.flux.model.Flux(
            device="meta", operations=comfy.ops.disable_weight_init, in_channels=16, out_channels=16, vec_in_dim=768,
            context_in_dim=4096, hidden_size=c["hidden_size"], mlp_ratio=4.0, num_heads=c["num_heads"],
            depth=c["depth"], depth_single_blocks=c["depth_single_blocks"], axes_dim=_axes(c["hidden_size"] // c["num_heads"]),
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, **extra)
        g = torch.Generator(device=self.dev).manual_seed(0)
        sd = {}
        for k, p in meta.state_dict().items():
            if k.endswith(("query_norm.weight", "key_norm.weight")):  # v0.33's module names; files keep BFL's .scale
                k = k[: -len("weight")] + "scale"
            std = 0.02 if k.endswith("weight") else (0.1 if k.endswith(".scale") else 0.01)
            t = torch.randn(p.shape, generator=g, device=self.dev, dtype=torch.float32) * std
            if k.endswith(".scale"):
                t += 1.0
            sd[k] = t.to(torch.bfloat16).cpu()
        save_file(sd, self.path)
        log(f"wrote {self.path}: {os.path.getsize(self.path) / GIB:.1f} GiB in {time.perf_counter() - t0:.0f} s")

    def write_lora(self, rank: int, seed: int, targets=("qkv", "proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
                                                        "txt_mlp.2", "linear1", "linear2")) -> str:
        """A BFL-layout LoRA on the blocks' attention and MLP layers; delta ~10% of weight rms."""
        from safetensors.torch import save_file
        from quantlora.checkpoint.flux_config import infer_arch
        from quantlora.checkpoint.safetensors_io import read_header

        path = os.path.join(self.args.workdir, f"lora-{self.args.size}-r{rank}-s{seed}.safetensors")
        if os.path.exists(path):
            return path
        shapes = {k: v.shape for k, v in read_header(self.path).tensors.items()}
        g = torch.Generator(device=self.dev).manual_seed(seed)
        sd = {}
        for k, shape in shapes.items():
            mod = k[: -len(".weight")]
            if not k.endswith(".weight") or len(shape) != 2 or not mod.startswith(("double_blocks", "single_blocks")):
                continue
            if not mod.endswith(targets):
                continue
            out_f, in_f = shape
            sd[f"diffusion_model.{mod}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g, device=self.dev) * 0.02).to(torch.bfloat16).cpu()
            sd[f"diffusion_model.{mod}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g, device=self.dev) * (0.1 / rank ** 0.5)).to(torch.bfloat16).cpu()
            sd[f"diffusion_model.{mod}.alpha"] = torch.tensor(float(rank))
        save_file(sd, path)
        return path

    # ---------- model handling ----------
    def load_ours(self, quantization):
        import comfy.model_management as mm
        from quantlora.nodes.bridge import load_flux_model_patcher

        torch.cuda.reset_peak_memory_stats() if self.dev.type == "cuda" else None
        t0 = time.perf_counter()
        # QUANTLORA_BENCH_WEIGHT_CACHE=on: the loader's weight cache (in <workdir>/wcache unless
        # QUANTLORA_WEIGHT_CACHE_DIR says otherwise): the first process writes it, restarts read it
        cache = os.environ.get("QUANTLORA_BENCH_WEIGHT_CACHE", "off")
        if cache == "on":
            os.environ.setdefault("QUANTLORA_WEIGHT_CACHE_DIR", os.path.join(self.args.workdir, "wcache"))
        patcher, report = load_flux_model_patcher(self.path, quantization, "bf16" if self.dev.type == "cuda" else "fp32",
                                                  weight_cache_mode=cache)
        if self.dev.type == "cuda":
            mm.load_models_gpu([patcher], force_full_load=True)
            torch.cuda.synchronize()
        return patcher, report, time.perf_counter() - t0

    def load_comfyui(self, weight_dtype):
        import comfy.model_management as mm
        import comfy.sd

        torch.cuda.reset_peak_memory_stats() if self.dev.type == "cuda" else None
        t0 = time.perf_counter()
        opts = {}
        if weight_dtype == "fp8_e4m3fn_fast":
            opts = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
        elif weight_dtype == "fp8_e4m3fn":
            opts = {"dtype": torch.float8_e4m3fn}
        patcher = comfy.sd.load_diffusion_model(self.path, model_options=opts)
        if self.dev.type == "cuda":
            mm.load_models_gpu([patcher], force_full_load=True)
            torch.cuda.synchronize()
        return patcher, time.perf_counter() - t0

    def free(self, *objs):
        import comfy.model_management as mm

        mm.unload_all_models()
        for o in objs:
            del o
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def forward(self, dm, attention=None):
        from quantlora.speed.attention import resolve, sdpa_context, sdpa_override

        i = self.inputs
        choice = attention or self.args.attention
        topts = {"optimized_attention_override": sdpa_override} if resolve(choice, self.dev) == "cudnn" else {}
        with sdpa_context(choice, self.dev):
            return dm(i["x"], i["timestep"], i["context"], y=i["y"], guidance=i["guidance"], transformer_options=topts)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, dm, n=None, attention=None):
        """(first call seconds, median step seconds, output)."""
        n = n or self.args.repeats
        fwd = self.forward
        self.forward = lambda m: fwd(m, attention)
        try:
            return self._time_steps(dm, n)
        finally:
            self.forward = fwd

    def _time_steps(self, dm, n):
        self.sync()
        t0 = time.perf_counter()
        out = self.forward(dm)
        self.sync()
        first = time.perf_counter() - t0
        self.forward(dm)
        times = []
        for _ in range(n):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = self.forward(dm)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t = time.perf_counter()
                out = self.forward(dm)
                times.append(time.perf_counter() - t)
        return first, statistics.median(times), out

    @staticmethod
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def peak(self):
        return torch.cuda.max_memory_allocated() / GIB if self.dev.type == "cuda" else float("nan")

    def add(self, variant, step_s, weights_bytes, load_s, out, ref=None, **extra):
        ref = self.ref if ref is None else ref
        row = dict(variant=variant, step_s=round(step_s, 4),
                   step_ratio=round(step_s / self.base_step, 3) if self.base_step else 1.0,
                   weights_gib=round(weights_bytes / GIB, 2), weights_ratio=round(weights_bytes / self.base_bytes, 3) if getattr(self, "base_bytes", None) else 1.0,
                   peak_vram_gib=round(self.peak(), 2), load_s=round(load_s, 1),
                   rel_err=round(self.rel(out, ref), 4) if ref is not None else 0.0, **extra)
        self.rows.append(row)
        log(json.dumps(row))
        self.flush()

    @staticmethod
    def compile_blocks(dm):  # the loader's regional compile (QUANTLORA_COMPILE_BACKEND: the CPU dry run's aot_eager)
        from quantlora.nodes import rope_fusion
        from quantlora.speed.compile import compile_blocks

        rope_fusion.install_if_enabled()  # unless QUANTLORA_FUSE_ROPE=0 (issue 12: RoPE fused by inductor)
        compile_blocks(dm)

    # ---------- sections ----------
    def section_base(self):
        from quantlora.memory.sizes import module_bytes

        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        _, step, out = self.time_steps(dm, attention="default")
        self.base_step, self.base_bytes, self.ref = step, module_bytes(dm), out
        self.add("bf16 eager", step, self.base_bytes, load_s, out)
        if "compile" in self.args.sections or self.args.compile_bf16:
            self.compile_blocks(dm)
            first, step_c, out_c = self.time_steps(dm)
            self.add("bf16 compile (regional)", step_c, self.base_bytes, load_s, out_c, compile_s=round(first, 1))
        self.free(p, dm)
        for q in self.args.quant:
            try:
                p, rep, load_s = self.load_ours(q)
                dm = p.model.diffusion_model
                _, step, out = self.time_steps(dm)
                self.add(f"{q} eager", step, rep.weights_bytes, load_s, out)
                if q in self.args.compile_quant:
                    self.compile_blocks(dm)
                    first, step_c, out_c = self.time_steps(dm)
                    self.add(f"{q} compile (regional)", step_c, rep.weights_bytes, load_s, out_c, compile_s=round(first, 1))
                self.free(p, dm)
            except Exception as e:  # one backend failing must not lose the other rows
                log(f"FAILED {q}: {type(e).__name__}: {e}")
                self.rows.append(dict(variant=f"{q} eager", error=f"{type(e).__name__}: {str(e)[:300]}"))
                self.free()
        if self.dev.type == "cuda":
            for wd in self.args.comfyui:
                try:
                    p, load_s = self.load_comfyui(wd)
                    dm = p.model.diffusion_model
                    wb = module_bytes(dm)
                    _, step, out = self.time_steps(dm)
                    self.add(f"comfyui {wd} eager", step, wb, load_s, out)
                    self.compile_blocks(dm)
                    first, step_c, out_c = self.time_steps(dm)
                    self.add(f"comfyui {wd} compile (each block)", step_c, wb, load_s, out_c, compile_s=round(first, 1))
                    self.free(p, dm)
                except Exception as e:
                    log(f"FAILED comfyui {wd}: {type(e).__name__}: {e}")
                    self.rows.append(dict(variant=f"comfyui {wd}", error=f"{type(e).__name__}: {str(e)[:300]}"))
                    self.free()

    def load_ref(self):
        """bf16 eager (default attention) in this process: the baseline every ratio divides by."""
        if self.ref is not None:
            return
        from quantlora.memory.sizes import module_bytes

        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        _, step, out = self.time_steps(dm, attention="default")
        self.base_step, self.base_bytes, self.ref = step, module_bytes(dm), out
        self.add("bf16 eager", step, self.base_bytes, load_s, out)
        self.free(p, dm)

    def section_lora(self):
        """Swap latency (file read to ready), recompiles across swaps, slot overhead, fastest path + LoRA."""
        import torch._dynamo
        from quantlora.lora.formats import FluxDims, load_lora
        from quantlora.lora.hotswap import HotswapState, attach_slots
        from quantlora.memory.sizes import module_bytes

        self.load_ref()
        c = self.cfg
        dims = FluxDims(hidden=c["hidden_size"], mlp_hidden=4 * c["hidden_size"], depth=c["depth"], depth_single=c["depth_single_blocks"])
        files = {r: self.write_lora(r, seed=r) for r in (16, 32, 64, 128)}
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32

        def swap(state, r, strength=1.0):
            self.sync()
            t0 = time.perf_counter()
            lora = load_lora(files[r], dims)
            state.activate((files[r], strength), [(lora, strength)])
            self.sync()
            return time.perf_counter() - t0

        # bf16 reference with the rank-64 LoRA, and swap latency on rank-128 slots.
        if self.args.lora_fast_only:
            files = {r: files[r] for r in (16, 32, 64)}
            return self._lora_fast(files, dims, dtype, swap)
        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        state = HotswapState(attach_slots(dm, 128, "blocks", dtype, c["hidden_size"], 4 * c["hidden_size"]))
        lat = {r: [] for r in files}
        for _ in range(3):
            for r in files:
                lat[r].append(swap(state, r))
        swap(state, 64)
        _, step, self.ref_lora = self.time_steps(dm, 3)
        for r in files:
            self.rows.append(dict(variant=f"bf16 lora swap r{r} (slots r128, eager)", swap_s=round(statistics.median(lat[r]), 3),
                                  lora_mib=round(os.path.getsize(files[r]) / 2**20, 1), recompiles=0))
            log(json.dumps(self.rows[-1]))
        self.free(p, dm, state)
        self._lora_fast(files, dims, dtype, swap)

    def _lora_fast(self, files, dims, dtype, swap):
        """The fastest path: fp8 dynamic (or the best available), rank-64 slots, regional compile."""
        import torch._dynamo
        from quantlora.lora.formats import load_lora
        from quantlora.lora.hotswap import HotswapState, attach_slots
        from quantlora.memory.sizes import module_bytes

        c = self.cfg
        q = self.args.fast_quant
        p, rep, load_s = self.load_ours(q)
        dm = p.model.diffusion_model
        state = HotswapState(attach_slots(dm, 64, "blocks", dtype, c["hidden_size"], 4 * c["hidden_size"], self.args.slot_layout))
        slot_bytes = module_bytes(dm) - rep.weights_bytes
        self.compile_blocks(dm)
        first, step_none, out_none = self.time_steps(dm)
        lay = "" if self.args.slot_layout == "per-projection" else f" {self.args.slot_layout}"
        self.add(f"{q} compile + lora slots r64{lay} (none active)", step_none, module_bytes(dm), load_s, out_none,
                 compile_s=round(first, 1), slot_gib=round(slot_bytes / GIB, 3))
        swap(state, 64)
        _, step_lora, out_lora = self.time_steps(dm)
        torch._dynamo.config.error_on_recompile = True
        recompiles, swaps = 0, []
        for r, s in [(16, 1.0), (32, 0.7), (64, 1.0), (16, 0.3), (64, 0.5), (32, 1.0), (64, 1.0), (16, 1.0), (32, 0.5), (64, 1.0)]:
            lora_t = swap(state, r, s)
            swaps.append(lora_t)
            try:
                self.forward(dm)
            except Exception as e:  # error_on_recompile raises on any recompile
                recompiles += 1
                log(f"recompile after swap to r{r}: {type(e).__name__}: {str(e)[:200]}")
                torch._dynamo.config.error_on_recompile = False
                self.forward(dm)
                torch._dynamo.config.error_on_recompile = True
        torch._dynamo.config.error_on_recompile = False
        state.activate((files[64], 1.0), [(load_lora(files[64], dims), 1.0)])
        _, step_lora2, out_lora2 = self.time_steps(dm, 3)
        err_ref = self.ref_lora if self.ref_lora is not None else out_lora  # no bf16+LoRA reference in fast-only runs
        self.add(f"{q} compile + lora r64{lay} active", step_lora, module_bytes(dm), load_s, out_lora, ref=err_ref,
                 swap_s=round(statistics.median(swaps), 3), recompiles=recompiles, swaps=len(swaps),
                 rel_err_after_swaps=round(self.rel(out_lora2, err_ref), 4))
        self.free(p, dm, state)

    def section_merge(self):
        """LoRA merge mode (lora/merge.py): swap latency from pinned host and from a GPU copy, step with a
        merged LoRA (ratio to bf16 eager, overhead vs the bare model), recompiles over 10 swaps on the
        compiled fast path, the bare base bit-exact after the swaps, and the LoRA's fidelity: the effect
        error |(y_q,lora - y_q,base) - (y_bf16,lora - y_bf16,base)| / |y_bf16,lora - y_bf16,base| and the
        error against bf16 + LoRA, where bf16 + LoRA is the LoRA as a separate bf16 term (slots)."""
        import torch._dynamo
        from quantlora.lora.formats import FluxDims, load_lora
        from quantlora.lora.hotswap import HotswapState, attach_slots
        from quantlora.lora.merge import MergeState
        from quantlora.memory.sizes import module_bytes

        c = self.cfg
        dims = FluxDims(hidden=c["hidden_size"], mlp_hidden=4 * c["hidden_size"], depth=c["depth"], depth_single=c["depth_single_blocks"])
        ranks = (16, 64, 128)
        files = {r: self.write_lora(r, seed=r) for r in ranks}
        parsed = {r: load_lora(files[r], dims) for r in ranks}  # parsing is not the swap: the page cache holds the file
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32

        def swap(state, r, strength=1.0):
            self.sync()
            t0 = time.perf_counter()
            state.activate((files[r], strength), [(parsed[r], strength)])
            self.sync()
            return time.perf_counter() - t0

        def effect_err(out_q_lora, out_q_base):
            d_ref = self.ref_lora.float() - self.ref.float()
            return ((out_q_lora.float() - out_q_base.float()) - d_ref).norm().item() / d_ref.norm().item()

        # bf16: reference outputs (base; base + the r64 LoRA as a separate bf16 term), then merge
        self.load_ref()
        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        slots = HotswapState(attach_slots(dm, 64, "blocks", dtype, c["hidden_size"], 4 * c["hidden_size"]))
        slots.activate(("r64",), [(parsed[64], 1.0)])
        self.ref_lora = self.forward(dm)
        self.free(p, dm, slots)
        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        self._merge_rows("bf16", dm, module_bytes(dm), load_s, swap, effect_err, MergeState, compiled=False)
        self.free(p, dm)
        for q in self.args.merge_quant:
            try:
                p, rep, load_s = self.load_ours(q)
                dm = p.model.diffusion_model
                compiled = q in self.args.compile_quant
                if compiled:
                    self.compile_blocks(dm)
                self._merge_rows(q, dm, rep.weights_bytes, load_s, swap, effect_err, MergeState, compiled=compiled)
                self.free(p, dm)
            except Exception as e:
                log(f"FAILED merge {q}: {type(e).__name__}: {e}")
                self.rows.append(dict(variant=f"{q} lora merge", error=f"{type(e).__name__}: {str(e)[:300]}"))
                self.free()

    def _merge_rows(self, q, dm, weights_bytes, load_s, swap, effect_err, MergeState, compiled):
        import torch._dynamo

        tag = f"{q} {'compile (regional)' if compiled else 'eager'}"
        first, step_none, out_none = self.time_steps(dm, 3)
        state = MergeState(dm, pristine="host")
        check = self._load_path_check_before(dm, q)
        first_merge = swap(state, 64)
        load_path_equal = self._load_path_check_after(dm, q, check)
        _, step_lora, out_lora = self.time_steps(dm, 3)
        torch._dynamo.config.error_on_recompile = compiled
        recompiles, swaps = 0, {16: [], 64: [], 128: []}
        for r, s in [(16, 1.0), (128, 0.7), (64, 1.0), (16, 0.3), (64, 0.5), (128, 1.0), (64, 1.0), (16, 1.0), (128, 0.5), (64, 1.0)]:
            swaps[r].append(swap(state, r, s))
            try:
                self.forward(dm)
            except Exception as e:
                recompiles += 1
                log(f"recompile after merge swap to r{r}: {type(e).__name__}: {str(e)[:200]}")
                torch._dynamo.config.error_on_recompile = False
                self.forward(dm)
                torch._dynamo.config.error_on_recompile = compiled
        torch._dynamo.config.error_on_recompile = False
        _, _, out_lora2 = self.time_steps(dm, 1)
        host_pristine = state.report.pristine_bytes
        # the pristine copy on the GPU (when it fits): the fastest swaps
        dev_swaps = []
        swap_profile = None
        if self.dev.type == "cuda" and torch.cuda.mem_get_info()[0] > host_pristine * 1.2:
            state.move_pristine("device")
            dev_swaps = [swap(state, r, 1.0) for r in (16, 64, 128, 64)]
            swap_profile = {"gpu copy": self._swap_profile(state, swap)}
            state.move_pristine("host")
            swap_profile["pinned host"] = self._swap_profile(state, swap)
        # the same swaps without the fused fp8 kernels (quant/fp8_rows.py), for the ratio in this run
        eager_swaps, eager_dev_swaps, kernels = [], [], self._kernels_apply(dm)
        if kernels:
            os.environ["QUANTLORA_MERGE_KERNELS"] = "0"
            try:
                eager_swaps = [swap(state, r, 1.0) for r in (16, 64, 128, 64)]
                if dev_swaps:
                    state.move_pristine("device")
                    eager_dev_swaps = [swap(state, r, 1.0) for r in (16, 64, 128, 64)]
                    state.move_pristine("host")
            finally:
                os.environ.pop("QUANTLORA_MERGE_KERNELS", None)
        state.deactivate()
        kernel_check = self._kernel_check(dm) if kernels else None
        _, _, out_bare = self.time_steps(dm, 1)
        bare_exact = bool(torch.equal(out_bare, out_none))
        med = {r: round(statistics.median(v), 3) for r, v in swaps.items()}
        self.add(f"{tag} + lora r64 merge", step_lora, weights_bytes, load_s, out_lora, ref=self.ref_lora,
                 swap_s=med[64], swap_r16_s=med[16], swap_r128_s=med[128], first_merge_s=round(first_merge, 2),
                 swap_gpu_copy_s=round(statistics.median(dev_swaps), 3) if dev_swaps else None,
                 step_overhead=round(step_lora / step_none - 1, 4), recompiles=recompiles, swaps=10,
                 lora_effect_err=round(effect_err(out_lora, out_none), 4),
                 rel_err_after_swaps=round(self.rel(out_lora2, self.ref_lora), 4), bare_bit_exact=bare_exact,
                 pristine_host_gib=round(host_pristine / GIB, 2), compile_s=round(first, 1) if compiled else None,
                 merged_equals_load_path=load_path_equal, fused_kernels=kernels,
                 swap_eager_s=round(statistics.median(eager_swaps), 3) if eager_swaps else None,
                 swap_gpu_copy_eager_s=round(statistics.median(eager_dev_swaps), 3) if eager_dev_swaps else None,
                 kernel_check=kernel_check, swap_profile=swap_profile)

    def _swap_profile(self, state, swap, top=8):
        """Where one r16 -> r64 swap goes: CUDA kernel/copy time by op (top), their sum, and wall."""
        from torch.profiler import ProfilerActivity, profile

        swap(state, 16, 1.0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = swap(state, 64, 1.0)
        ev = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        ev.sort(key=lambda e: -e.self_device_time_total)
        out = {"wall_s": round(wall, 4), "device_ms": round(sum(e.self_device_time_total for e in ev) / 1e3, 2),
               "top": [(e.key[:60], round(e.self_device_time_total / 1e3, 2), e.count) for e in ev[:top]]}
        log(f"swap profile: {out}")
        return out

    @staticmethod
    def _kernels_apply(dm) -> bool:
        """Whether the fused fp8 merge kernels (quant/fp8_rows.py) serve this model's weights."""
        from quantlora.quant import fp8_rows  # imports triton: only on the device

        if fp8_rows.triton is None:
            return False
        return any(fp8_rows.applies(getattr(m, "weight", None)) for m in dm.modules() if hasattr(m, "weight"))

    def _kernel_check(self, dm) -> dict:
        """Every per-row fp8 layer: the fused dequantize equals torchao's, and the fused requantize of a
        perturbed matrix (about a LoRA's size, 1e-2 relative) equals torchao's from_hp bit for bit."""
        import types
        from quantlora.quant import fp8_rows
        from quantlora.quant import weight_codecs as codecs

        layers = deq_bad = req_bad = elems_bad = 0
        g = torch.Generator(device=self.dev).manual_seed(0)
        with torch.inference_mode():
            for name, m in dm.named_modules():
                w = getattr(m, "weight", None)
                if not fp8_rows.applies(w):
                    continue
                layers += 1
                fast = fp8_rows.dequantize_rows(w)
                slow = w.dequantize().float()
                deq_bad += int(not torch.equal(fast, slow))
                full = slow + 1e-2 * slow.abs().mean() * torch.randn(slow.shape, device=slow.device, generator=g)
                want = codecs._inner(codecs._torchao_from_hp(w, full))
                scratch = types.SimpleNamespace(qdata=torch.empty_like(w.qdata), scale=torch.empty_like(w.scale), dtype=w.dtype)
                fp8_rows.requantize_rows_into(scratch, full)
                same_q = torch.equal(scratch.qdata.view(torch.uint8), want[0].view(torch.uint8))
                same_s = torch.equal(scratch.scale.view(-1), want[1].view(-1))
                if not (same_q and same_s):
                    req_bad += 1
                    elems_bad += int((scratch.qdata.view(torch.uint8) != want[0].view(torch.uint8)).sum())
                    log(f"fused requantize differs on {name}: qdata equal {same_q}, scale equal {same_s}")
                del fast, slow, full, want, scratch
        return dict(layers=layers, dequantize_differs=deq_bad, requantize_differs=req_bad, qdata_elements_differ=elems_bad)

    def _load_path_check_before(self, dm, q, names=("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2")):
        """The dequantized weights of two layers before the r64 merge (for the check after it)."""
        from quantlora.lora.merge import base_layer
        from quantlora.quant import weight_codecs as codecs

        return {n: codecs.dequantize(base_layer(dm, n)).clone() for n in names}

    def _load_path_check_after(self, dm, q, before) -> bool | str:
        """The merged layers equal (bit for bit) the hand-merged matrix made into a layer by the loader's
        own quantization path on this GPU (the CPU tests cannot run torchao fp8 dynamic)."""
        from torch import nn
        from quantlora.lora.formats import FluxDims, load_lora
        from quantlora.lora.merge import base_layer, deltas_of
        from quantlora.quant import weight_codecs as codecs
        from quantlora.quant.backends import BACKENDS, quantize_linear

        try:
            c = self.cfg
            dims = FluxDims(hidden=c["hidden_size"], mlp_hidden=4 * c["hidden_size"], depth=c["depth"], depth_single=c["depth_single_blocks"])
            deltas = deltas_of(dm, [(load_lora(self.write_lora(64, seed=64), dims), 1.0)])
            for n, w0 in before.items():
                full = w0.clone()
                for d in deltas[n]:
                    full[d.offset:d.offset + d.up.shape[0]].addmm_(d.up.to(full), d.down.to(full), alpha=d.scale)
                dt = torch.bfloat16 if self.dev.type == "cuda" else torch.float32  # load_ours' compute dtype
                lin = nn.Linear(full.shape[1], full.shape[0], device=full.device, dtype=dt)
                with torch.no_grad():
                    lin.weight.copy_(full.to(dt))
                if q != "bf16":
                    quantize_linear(BACKENDS[q], lin, dt, full.device)
                got, want = codecs.storage(base_layer(dm, n)), codecs.storage(lin)
                if not all(torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                       b.view(torch.uint8) if b.element_size() == 1 else b) for a, b in zip(got, want)):
                    return f"differs on {n}"
            return True
        except Exception as e:
            return f"check failed: {type(e).__name__}: {str(e)[:200]}"

    def section_attn(self):
        """SDPA kernels at Flux's shape, then bf16 eager and the fp8 compiled path with each choice."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from quantlora.memory.sizes import module_bytes

        self.load_ref()
        tokens = self.latent * self.latent // 4 + self.txt
        q, k, v = (torch.randn(1, 24, tokens, 128, device=self.dev, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * tokens * tokens * 128 * 24
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    for _ in range(3):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(20):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    b.record()
                    b.synchronize()
                t = a.elapsed_time(b) / 20 / 1000
                self.rows.append(dict(variant=f"sdpa {name} kernel (1x24x{tokens}x128 bf16)", step_s=round(t, 5),
                                      tflops=round(flops / t / 1e12, 1)))
            except Exception as e:
                self.rows.append(dict(variant=f"sdpa {name} kernel", error=str(e)[:200]))
            log(json.dumps(self.rows[-1]))
        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        _, step, out = self.time_steps(dm, attention="cudnn")
        self.add("bf16 eager + cudnn attention", step, module_bytes(dm), load_s, out)
        self.free(p, dm)
        q = self.args.fast_quant
        p, rep, load_s = self.load_ours(q)
        dm = p.model.diffusion_model
        self.compile_blocks(dm)
        first, step, out = self.time_steps(dm, attention="cudnn")
        self.add(f"{q} compile (regional) + cudnn attention", step, rep.weights_bytes, load_s, out, compile_s=round(first, 1))
        self.free(p, dm)
        for extra in self.args.extra_quant:
            try:
                p, rep, load_s = self.load_ours(extra)
                dm = p.model.diffusion_model
                _, step, out = self.time_steps(dm, n=3)
                self.add(f"{extra} eager", step, rep.weights_bytes, load_s, out)
                self.free(p, dm)
            except Exception as e:
                self.rows.append(dict(variant=f"{extra} eager", error=f"{type(e).__name__}: {str(e)[:300]}"))
                self.free()

    def section_profile(self):
        """Where one step's time goes, by kernel: bf16 eager with each attention choice, then the fastest
        path (fp8 compiled) without and with rank-64 LoRA slots. Answers two open questions in BENCHMARKS.md
        in one call: which SDPA kernel the model really runs, and what the slots' ~20 ms per step are."""
        from quantlora.lora.formats import FluxDims, load_lora
        from quantlora.lora.hotswap import HotswapState, attach_slots

        c = self.cfg
        dims = FluxDims(hidden=c["hidden_size"], mlp_hidden=4 * c["hidden_size"], depth=c["depth"], depth_single=c["depth_single_blocks"])
        p, rep, load_s = self.load_ours("none")
        dm = p.model.diffusion_model
        for attention in ("default", "cudnn"):
            self.profile_step(dm, f"bf16 eager, attention {attention}", attention)
        self.free(p, dm)
        q = self.args.fast_quant
        p, rep, load_s = self.load_ours(q)
        dm = p.model.diffusion_model
        self.compile_blocks(dm)
        self.profile_step(dm, f"{q} compile", self.args.attention)
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        state = HotswapState(attach_slots(dm, 64, "blocks", dtype, c["hidden_size"], 4 * c["hidden_size"], self.args.slot_layout))
        lora = self.write_lora(64, seed=64)
        state.activate((lora, 1.0), [(load_lora(lora, dims), 1.0)])
        self.profile_step(dm, f"{q} compile + lora r64 active", self.args.attention)
        self.free(p, dm, state)

    def profile_step(self, dm, label, attention, top=25):
        """Kernel time of one step (after two warm-up steps) as rows `profile <label>: <kernel>`, and
        the whole table in <out>/profile-<label>.txt."""
        from torch.profiler import ProfilerActivity, profile

        for _ in range(2):
            self.forward(dm, attention)
        self.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            self.forward(dm, attention)
            self.sync()
        key = "device_time_total" if self.dev.type == "cuda" else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0 and (self.dev.type != "cuda" or str(getattr(e, "device_type", "")).endswith("CUDA"))]
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1
        slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, f"profile-{slug}.txt"), "w") as f:
            f.write(f"{label}: {total / 1e3:.2f} ms of {'kernel' if self.dev.type == 'cuda' else 'CPU'} time in one step\n")
            for e in events:
                f.write(f"{getattr(e, key) / 1e3:9.3f} ms {e.count:6d}x  {e.key[:160]}\n")
        for e in events[:top]:
            self.rows.append(dict(variant=f"profile {label}: {e.key[:120]}", kernel_ms=round(getattr(e, key) / 1e3, 3),
                                  calls=e.count, share=round(getattr(e, key) / total, 4)))
        log(f"profile {label}: {total / 1e3:.2f} ms; top: " + "; ".join(f"{e.key[:60]} {getattr(e, key) / 1e3:.2f} ms x{e.count}" for e in events[:6]))
        self.flush()

    def section_firststep(self):  # no baseline: a wall-clock figure
        """Process start to first finished step: the fastest path, compiled, with a rank-64 LoRA merged
        (LoRAHotswap's merge mode: the first merge also takes the pristine copy). Run twice in a row:
        the second process reuses inductor's on-disk caches (a ComfyUI restart)."""
        from quantlora.lora.formats import FluxDims, load_lora
        from quantlora.lora.merge import MergeState

        c = self.cfg
        at_section = time.perf_counter() - PROCESS_START  # imports, CUDA start, checkpoint check
        watch_autograd_cache()
        # QUANTLORA_BENCH_CPROFILE=1: the host's time from the load to the first step, by function
        # (profile-firststep-*.txt beside the results): where the restart's own seconds go
        prof = None
        if os.environ.get("QUANTLORA_BENCH_CPROFILE", "") not in ("", "0"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        # QUANTLORA_BENCH_TORCH_PROFILE_LOAD=1: torch's profiler over the load (host ops and the CUDA
        # runtime calls the host waits in: allocation, synchronization), a table beside the results
        tprof = None
        if os.environ.get("QUANTLORA_BENCH_TORCH_PROFILE_LOAD", "") not in ("", "0"):
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
            tprof = profile(activities=acts)
            tprof.__enter__()
        p, rep, load_s = self.load_ours(self.args.fast_quant)
        if tprof is not None:
            tprof.__exit__(None, None, None)
            os.makedirs(self.args.out, exist_ok=True)
            with open(os.path.join(self.args.out, f"profile-load-{os.getpid()}.txt"), "w") as f:
                for key in ("self_cpu_time_total", "cpu_time_total"):
                    f.write(tprof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90) + "\n")
        dm = p.model.diffusion_model
        t_setup = time.perf_counter()
        self.compile_blocks(dm)
        compile_setup_s = time.perf_counter() - t_setup
        dims = FluxDims(hidden=c["hidden_size"], mlp_hidden=4 * c["hidden_size"], depth=c["depth"], depth_single=c["depth_single_blocks"])
        t0 = time.perf_counter()
        lora = self.write_lora(64, seed=64)
        parsed = load_lora(lora, dims)
        lora_s = time.perf_counter() - t0
        state = MergeState(dm)
        state.activate((lora, 1.0), [(parsed, 1.0)])
        self.sync()
        merge_s = time.perf_counter() - t0
        self.forward(dm)
        self.sync()
        first = time.perf_counter() - t0 - merge_s
        since_start = time.perf_counter() - PROCESS_START
        if prof is not None:
            prof.disable()
            write_cprofile(prof, os.path.join(self.args.out, f"profile-firststep-{os.getpid()}.txt"))
        bias_equal = self.bias_equal(dm)
        merge_phases = dict(state.report.phases)  # the first merge's (the deactivation below has its own)
        state.deactivate()  # the pristine weights back, bit for bit (tests/unit/test_lora_merge.py)
        weights_equal = self.weights_equal(dm)
        released = self.release_file_copy(dm, state, lora, parsed)
        self.rows.append(dict(variant=f"{self.args.fast_quant} compile + lora r64 merged: first step", compile_s=round(first, 1),
                              first_merge_s=round(merge_s, 1), lora_write_parse_s=round(lora_s, 2),
                              compile_setup_s=round(compile_setup_s, 2), bias_equal=bias_equal, weights_equal=weights_equal,
                              pristine_lock=getattr(state._arena, "last_lock", None),
                              pristine_file_gib=round(state.report.pristine_file_bytes / 2**30, 3), file_copy_release=released,
                              first_merge_phases=merge_phases, weight_cache=rep.weight_cache, warmup=warmup_stats(),
                              before_load_s=round(at_section, 1), load_s=round(load_s, 1), to_first_step_s=round(since_start, 1),
                              cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
                              direct_reads=os.environ.get("QUANTLORA_DIRECT_READS", "1") != "0",
                              # the loader's own time (load_s adds ComfyUI's move of the rest to the GPU)
                              # and its host phases: where the next second of the restart is
                              loader_s=round(rep.load_s, 2), load_phases=rep.phases,
                              bytecode_cached=bytecode_cached(), bytecode_missing=bytecode_missing(),
                              before_load_phases=before_load_phases(),
                              compile_phases=compile_phases()))
        log(json.dumps(self.rows[-1]))

    def release_file_copy(self, dm, state, lora, parsed) -> dict | None:
        """After the measured part, what a sampling without a host-side merge does (nodes/runtime.py):
        the mapped cache's pages unlocked; then a new merge state takes its pristine copy from the GPU,
        and taking the LoRA off again gives the loaded weights bit for bit."""
        from quantlora.lora.merge import MergeState
        from quantlora.memory import pinned_file

        if pinned_file.of(dm) is None:
            return None
        t0 = time.perf_counter()
        pinned_file.release(dm)
        unlock_s = time.perf_counter() - t0
        dm._quantlora_merge_bench = again = MergeState(dm)
        again.activate((lora, 1.0), [(parsed, 1.0)])
        again.deactivate()
        self.sync()
        return dict(unlock_s=round(unlock_s, 3), capture_after_s=again.report.phases.get("capture_s"),
                    pristine_file_gib_after=round(again.report.pristine_file_bytes / 2**30, 3),
                    weights_equal_after=self.weights_equal(dm))

    def bias_equal(self, dm, names=("double_blocks.{d}.img_attn.qkv", "single_blocks.{s}.linear2")) -> bool:
        """The quantized layers' biases (moved to the GPU at load, asynchronously) equal the file's."""
        from safetensors import safe_open

        c = self.cfg
        with safe_open(self.path, framework="pt", device="cpu") as f:
            return all(torch.equal(dm.get_submodule(n).bias.detach().cpu(), f.get_tensor(n + ".bias").to(self.dtype_of(dm)))
                       for n in (p.format(d=c["depth"] - 1, s=c["depth_single_blocks"] - 1) for p in names))

    def weights_equal(self, dm, names=("double_blocks.{d}.img_attn.qkv", "single_blocks.{s}.linear2")) -> bool:
        """The quantized layers' weights (read ahead of their turn, copied and quantized at load) equal
        the file's weights quantized again now, bit for bit."""
        from safetensors import safe_open
        from torch import nn
        from quantlora.quant import weight_codecs as codecs
        from quantlora.quant.backends import BACKENDS, quantize_linear

        c, dtype = self.cfg, self.dtype_of(dm)
        with safe_open(self.path, framework="pt", device="cpu") as f:
            for n in (p.format(d=c["depth"] - 1, s=c["depth_single_blocks"] - 1) for p in names):
                layer = dm.get_submodule(n)
                ref = nn.Linear(layer.in_features, layer.out_features, bias=False)
                ref.weight = nn.Parameter(f.get_tensor(n + ".weight").to(dtype), requires_grad=False)
                quantize_linear(BACKENDS[self.args.fast_quant], ref, dtype, self.dev)
                mine, theirs = codecs.storage(layer), codecs.storage(ref)
                if len(mine) != len(theirs) or not all(torch.equal(a, b) for a, b in zip(mine, theirs)):
                    return False
        return True

    @staticmethod
    def dtype_of(dm):
        return dm.double_blocks[0].img_attn.qkv.bias.dtype

    def flush(self):
        out = self.args.out
        os.makedirs(out, exist_ok=True)
        dev = torch.cuda.get_device_name(0) if self.dev.type == "cuda" else "cpu"
        with open(os.path.join(out, f"results-{'-'.join(self.args.sections)}.json"), "w") as f:
            json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "size": self.args.size, "rows": self.rows}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=SIZES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default="base")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quant", default="bnb-nf4,bnb-int8,torchao-fp8-dynamic,torchao-fp8-weight-only,torchao-int8-weight-only,"
                                         "torchao-int8-dynamic,quanto-int8,quanto-fp8")
    ap.add_argument("--compile-quant", default="torchao-fp8-dynamic")
    ap.add_argument("--compile-bf16", action="store_true")
    ap.add_argument("--comfyui", default="fp8_e4m3fn_fast")
    ap.add_argument("--fast-quant", default="torchao-fp8-dynamic")
    ap.add_argument("--attention", default="default", help="SDPA backend order for every forward (speed/attention.py)")
    ap.add_argument("--slot-layout", default="per-projection")
    ap.add_argument("--lora-fast-only", action="store_true", help="only the compiled fast path (no bf16 LoRA reference)")
    ap.add_argument("--extra-quant", default="", help="more eager variants in the attn section")
    ap.add_argument("--merge-quant", default="torchao-fp8-dynamic", help="quantizations the merge section measures (besides bf16)")
    args = ap.parse_args()
    args.sections = args.sections.split(",")
    args.quant = [q for q in args.quant.split(",") if q]
    args.compile_quant = [q for q in args.compile_quant.split(",") if q]
    args.comfyui = [q for q in args.comfyui.split(",") if q]
    args.extra_quant = [q for q in args.extra_quant.split(",") if q]
    args.merge_quant = [q for q in args.merge_quant.split(",") if q]
    _env.setup(cpu=args.device == "cpu")
    PHASES_AT["env_setup"] = time.perf_counter()
    b = Bench(args)
    PHASES_AT["bench_init"] = time.perf_counter()
    if args.device == "cuda":
        log(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    b.write_checkpoint()
    for s in args.sections:
        if s == "compile" or (s == "attn" and args.device != "cuda"):
            continue  # compile: folded into base (bf16 compile row); attn: CUDA kernels only
        log(f"=== section {s}")
        getattr(b, f"section_{s}")()
    b.flush()
    log("done")


if __name__ == "__main__":
    main()
