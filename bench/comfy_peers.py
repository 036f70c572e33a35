"""ComfyUI v0.33's own Flux rows and the pack's, in the same processes, with dynamic VRAM on and off
(issue 10, GPU part).

Dynamic VRAM (comfy-aimdo) has to be initialised before torch touches CUDA, so each mode runs in its
own process, set up as ComfyUI's main.py sets itself up (cuda_malloc's allocator choice, then
comfy_aimdo.control.init, then after comfy.model_management: init_devices, ModelPatcherDynamic as the
core patcher, memory_management.aimdo_enabled). The parent (--dynamic both, the default) runs
`--dynamic on` then `--dynamic off` and merges their rows.

Every figure samples through ComfyUI's machinery (comfy.sample.sample: KSampler, euler, cfg 1, the
model's ModelPatcher loaded by load_models_gpu) at FLUX.1-dev shapes (--size full: 19 + 38 blocks,
hidden 3072, 1024x1024 = 4096 image + 512 text tokens, batch 1) on seeded random weights
(bench_flux's checkpoint, written once to --workdir and reused by both processes). One step's time is
the CUDA-event interval between two sampler callbacks (median over the steps after the first).

Rows, per process (`v0.33 dynamic on|off: ...`):
- ours bf16 eager: the pack's loader (nodes.bridge.load_flux_model_patcher), the ratio baseline;
  also its bare forward (bench_flux's way) for comparison with BENCHMARKS.md's 0.165 s.
- comfyui <weight_dtype>: UNETLoader (comfy.sd.load_diffusion_model), steady s/step, first step after
  the load, then LoraLoaderModelOnly switches to fresh rank-32 LoRAs: switch_s = apply (file read +
  patches) + first step after it - steady step; step with a LoRA attached.
- comfyui fp8_e4m3fn_fast, each block compiled (off only): ComfyUI's set_torch_compile_wrapper (what
  its TorchCompileModel node uses) on every block, same measures.
- ours torchao-fp8-dynamic compile (regional), then with rank-64 slots (none active) and LoRAHotswap
  switches to the same fresh LoRAs (same switch_s definition), recompiles counted.
- graph core (the example workflows' cores, 4 steps, seed 42): loader bnb-nf4 -> LoRAHotswap ->
  KSampler; loader none -> FP8LayerwiseCast -> LoRAHotswap -> CPUOffloadSampler block. Latents saved;
  the parent compares every run present in both processes: "on vs off: <run>" rows with
  equal / max_abs_diff / rel_err.
Memory, on every sampling row: torch's peak allocated, the device's used memory (mem_get_info, max
over the steps, and before the load), what ComfyUI lists as loaded, and ModelPatcher load calls:
with dynamic VRAM torch's allocator does not see the weights, so `used` is the figure that shows a
double load.

    python bench/comfy_peers.py --out $OUT/peers                     # both modes, full size, < 8.5 min
    python bench/comfy_peers.py --dynamic on --size smoke ...       # one mode
    python bench/comfy_peers.py --device cpu --size tiny ...        # the CPU dry run (dynamic VRAM is off on CPU)

bench/_env.py installs an import-only stand-in for PyAV (comfy_api's video types; the GPU image lacks
it, nothing here decodes video) and, with QUANTLORA_IMPORT_LOG=<file>, logs each process's imports.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("on", "off")
T0 = time.time()
sys.path.insert(0, HERE)
import _env  # noqa: E402  (imports nothing heavy: torch must wait for comfy-aimdo's init; logs imports at exit)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:5.0f}s]", *a, flush=True)


# ---------------------------------------------------------------- process set-up (main.py's order)
def comfy_start(mode: str, cpu: bool) -> dict:
    """ComfyUI's main.py start-up, as far as memory management goes. Returns what was enabled."""
    comfy_dir = os.environ.get("QUANTLORA_COMFYUI") or os.path.join(ROOT, ".harness", "ComfyUI")
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, HERE)
    import comfy.cli_args
    from comfy.cli_args import args, enables_dynamic_vram

    args.cpu = cpu
    args.disable_dynamic_vram = mode == "off"
    info = {"mode": mode}
    # QUANTLORA_BENCH_NO_CUDA_MALLOC=1: as `main.py --disable-cuda-malloc` (PyTorch's own allocator)
    args.disable_cuda_malloc = os.environ.get("QUANTLORA_BENCH_NO_CUDA_MALLOC") == "1"
    try:
        import cuda_malloc  # noqa: F401  (main.py: cudaMallocAsync on cu130 builds)
    except ImportError:
        pass
    info["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    assert "torch" not in sys.modules, "torch imported before comfy-aimdo's init"
    import comfy_aimdo.control

    if enables_dynamic_vram():
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
        except TypeError:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
    _env.setup(comfy_dir=comfy_dir, cpu=cpu)  # also PyAV's stand-in (the device image has none)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    info["aimdo"] = False
    if args.enable_dynamic_vram or (enables_dynamic_vram() and mm.is_nvidia()):
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in mm.get_all_torch_devices())
        if ok:
            comfy_aimdo.control.set_log_warning()
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            info["aimdo"] = True
    import comfyui_version

    info["comfyui"] = comfyui_version.__version__
    return info


# ---------------------------------------------------------------- one mode, in its own process
class Peers:
    def __init__(self, args, info):
        import torch
        from bench_flux import GIB, Bench

        self.torch, self.GIB = torch, GIB
        self.args, self.info = args, info
        self.cuda = args.device == "cuda"
        self.tag = f"v0.33 dynamic {args.dynamic}"
        bargs = argparse.Namespace(device=args.device, size=args.size, workdir=args.workdir, out=args.out,
                                   repeats=5, attention="default", sections=["peers"])
        self.b = Bench(bargs)  # checkpoint/LoRA writers and the bare-forward timing
        self.rows = []
        self.base_step = None
        self.ref = None
        self.latdir = os.path.join(args.workdir, f"latents-{args.size}-{args.dynamic}")
        os.makedirs(self.latdir, exist_ok=True)
        for f in os.listdir(self.latdir):
            os.remove(os.path.join(self.latdir, f))
        g = torch.Generator().manual_seed(7)
        ctx, pooled = torch.randn(1, self.b.txt, 4096, generator=g), torch.randn(1, 768, generator=g)
        self.pos = [[ctx, {"pooled_output": pooled, "guidance": 3.5}]]
        self.neg = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
        self.latent = {"samples": torch.zeros(1, 16, self.b.latent, self.b.latent)}
        self.loads = {"load": 0, "partially_load": 0}
        self._count_loads()

    # ---------- bookkeeping ----------
    def left(self) -> float:
        return self.args.deadline - time.time()

    def row(self, variant, **r):
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        r = {"variant": f"{self.tag}: {variant}", **r}
        self.rows.append(r)
        log(json.dumps(r))
        self.flush()

    def flush(self):
        torch = self.torch
        os.makedirs(self.args.out, exist_ok=True)
        dev = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        with open(os.path.join(self.args.out, f"results-peers-{self.args.dynamic}.json"), "w") as f:
            json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "size": self.args.size, "setup": self.info, "rows": self.rows}, f, indent=1)

    def _count_loads(self):
        import comfy.model_patcher as mp

        for cls in {mp.ModelPatcher, getattr(mp, "ModelPatcherDynamic", mp.ModelPatcher)}:
            for name in ("load", "partially_load"):
                if name not in cls.__dict__:
                    continue
                orig = cls.__dict__[name]

                def counting(*a, _orig=orig, _name=name, **k):
                    self.loads[_name] += 1
                    return _orig(*a, **k)

                setattr(cls, name, counting)

    def reset_peak(self):
        try:
            self.torch.cuda.reset_peak_memory_stats()
        except Exception:  # an allocator backend without the statistics
            pass

    def peak(self) -> float | None:
        """torch's peak allocated GiB since reset_peak (under dynamic VRAM the weights are not in it)."""
        if not self.cuda:
            return None
        try:
            return self.torch.cuda.max_memory_allocated() / self.GIB
        except Exception:
            return None

    def used(self) -> float | None:
        if not self.cuda:
            return None
        free, total = self.torch.cuda.mem_get_info()
        return (total - free) / self.GIB

    def nvidia_smi_used(self) -> float | None:
        if not self.cuda:
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            return round(float(out[0]) / 1024, 2)
        except Exception:
            return None

    def comfy_listed(self) -> list:
        import comfy.model_management as mm

        out = []
        for lm in mm.current_loaded_models:
            m = lm.model
            if m is None:
                continue
            try:
                out.append([type(m).__name__, round(m.loaded_size() / self.GIB, 2), round(m.model_size() / self.GIB, 2)])
            except Exception as e:
                out.append([type(m).__name__, f"{type(e).__name__}"])
        return out

    def free(self):
        import comfy.model_management as mm
        import torch._dynamo

        mm.unload_all_models()
        gc.collect()
        torch._dynamo.reset()
        mm.soft_empty_cache()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def save(self, label, lat):
        import re

        self.torch.save(lat.cpu(), os.path.join(self.latdir, re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".pt"))

    # ---------- sampling ----------
    def sample(self, model, steps, seed=42, t_apply=None, label=None):
        """ComfyUI's KSampler path (common_ksampler minus its preview callback). Returns a dict:
        steady (median step after the first), first (apply/sampling start to the end of step 1),
        latent, peak/used memory."""
        import comfy.sample

        torch = self.torch
        lat = comfy.sample.fix_empty_latent_channels(model, self.latent["samples"])
        noise = comfy.sample.prepare_noise(lat, seed)
        ev, used = [], []
        t_first = [None]

        def cb(step, x0, x, total):
            with torch.profiler.record_function(f"quantlora sampler step {step}"):  # a trace marker (profile_sampling)
                pass
            if self.cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                ev.append(e)
                if step == 0:
                    torch.cuda.synchronize()
                if step in (0, total - 1):
                    used.append(self.used())
            else:
                ev.append(time.perf_counter())
            if step == 0:
                t_first[0] = time.perf_counter()

        if self.cuda:
            self.reset_peak()
        t0 = time.perf_counter() if t_apply is None else t_apply
        with torch.no_grad():
            out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", self.pos, self.neg, lat,
                                      denoise=1.0, callback=cb, disable_pbar=True, seed=seed)
        if self.cuda:
            torch.cuda.synchronize()
            d = [a.elapsed_time(b) / 1000 for a, b in zip(ev, ev[1:])]
        else:
            d = [b - a for a, b in zip(ev, ev[1:])]
        steady = statistics.median(d[1:] if len(d) > 2 else d) if d else float("nan")
        res = dict(steady=steady, first=t_first[0] - t0, latent=out,
                   peak_alloc_gib=self.peak(),
                   used_max_gib=max(u for u in used if u is not None) if any(u is not None for u in used) else None)
        if label:
            self.save(label, out)
        return res

    def rel(self, a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # ---------- sections ----------
    def section_ours_bf16(self):
        from quantlora.nodes.bridge import load_flux_model_patcher

        self.free()
        before = self.used()
        t0 = time.perf_counter()
        p, rep = load_flux_model_patcher(self.b.path, "none", "bf16" if self.cuda else "fp32")
        load_s = time.perf_counter() - t0
        r = self.sample(p, self.args.steps, label="ours bf16 eager")
        r2 = self.sample(p, self.args.steps)
        steady = min(r["steady"], r2["steady"])
        self.base_step, self.ref = steady, r["latent"]
        # the bare forward, as bench_flux times it (comparable with BENCHMARKS.md's bf16 eager)
        dm = p.model.diffusion_model
        bare = None
        try:
            if self.cuda:
                import comfy.model_management as mm

                mm.load_models_gpu([p], force_full_load=True)
            _, bare, _ = self.b.time_steps(dm, 5)
        except Exception as e:
            log(f"bare forward failed: {type(e).__name__}: {e}")
        self.row("ours bf16 eager", step_s=steady, step_ratio=1.0, bare_forward_s=bare, load_s=load_s,
                 first_step_s=r["first"], weights_gib=rep.weights_bytes / self.GIB, peak_alloc_gib=r["peak_alloc_gib"],
                 used_before_gib=before, used_max_gib=r["used_max_gib"], nvidia_smi_used_gib=self.nvidia_smi_used(),
                 comfy_listed=self.comfy_listed(), patcher=type(p).__name__, loads=dict(self.loads))
        del p, dm
        self.free()

    def _switches(self, base, apply, name, first_run):
        """Steady step of `base`, then switches to each fresh LoRA via apply(base, lora_name)."""
        steady0 = first_run["steady"]
        switch, steps_lora = [], []
        for name_l in self.lora_names:
            if self.left() < self.args.switch_budget:
                log(f"{name}: time guard, {len(switch)} switches done")
                break
            if self.cuda:
                self.torch.cuda.synchronize()
            t = time.perf_counter()
            m = apply(base, name_l)
            r = self.sample(m, self.args.steps, t_apply=t, label=f"{name} + {name_l}" if name_l == self.lora_names[0] else None)
            switch.append(r["first"] - steady0)
            steps_lora.append(r["steady"])
            del m
        return switch, steps_lora

    def section_comfy(self, weight_dtype, compiled=False):
        import nodes

        self.free()
        loads0 = dict(self.loads)
        before = self.used()
        t0 = time.perf_counter()
        p = nodes.UNETLoader().load_unet(os.path.basename(self.b.path), weight_dtype)[0]
        load_s = time.perf_counter() - t0
        name = f"comfyui {weight_dtype}"
        if compiled:
            from comfy_api.torch_helpers import set_torch_compile_wrapper
            from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

            p = p.clone(disable_dynamic=True)
            dm = p.model.diffusion_model
            keys = [f"diffusion_model.double_blocks.{i}" for i in range(len(dm.double_blocks))] + \
                   [f"diffusion_model.single_blocks.{i}" for i in range(len(dm.single_blocks))]
            set_torch_compile_wrapper(model=p, backend=os.environ.get("QUANTLORA_COMPILE_BACKEND") or "inductor", options={"guard_filter_fn": skip_torch_compile_dict}, keys=keys)
            name += ", each block compiled"
        r = self.sample(p, self.args.steps, t_apply=t0, label=name)
        r2 = self.sample(p, self.args.steps)
        r["steady"] = min(r["steady"], r2["steady"])
        listed, used_loaded = self.comfy_listed(), self.used()
        loader = nodes.LoraLoaderModelOnly()  # one node: it keeps the last file read, as in a graph
        switch, steps_lora = self._switches(p, lambda m, n: loader.load_lora_model_only(m, n, 1.0)[0], name, r)
        self.row(name, step_s=r["steady"], step_ratio=r["steady"] / self.base_step if self.base_step else None,
                 load_s=load_s, load_to_first_step_s=r["first"], switch_s=switch,
                 switch_s_median=statistics.median(switch) if switch else None,
                 step_lora_s=statistics.median(steps_lora) if steps_lora else None,
                 rel_err_vs_ours_bf16=self.rel(r["latent"], self.ref) if self.ref is not None else None,
                 peak_alloc_gib=r["peak_alloc_gib"], used_before_gib=before, used_max_gib=r["used_max_gib"],
                 used_loaded_gib=used_loaded, nvidia_smi_used_gib=self.nvidia_smi_used(), comfy_listed=listed,
                 patcher=type(p).__name__, dynamic=bool(getattr(p, "is_dynamic", lambda: False)()),
                 loads={k: self.loads[k] - loads0[k] for k in self.loads})
        del p
        self.free()

    def section_ours_fp8(self, slots: bool, merge: bool = False, attention: str = "auto", profile: bool = False,
                         tune: bool = False, cpp_wrapper: bool = False, graphs: bool = False):
        """The example workflow (b)'s core: QuantizedFluxLoader(fp8 dynamic, lora_max_rank 64 or 0, compile
        regional) -> [LoRAHotswap] -> KSampler. Slots come before the compile (the loader's lora_max_rank),
        so swaps should never recompile; recompiles are counted (torch._dynamo's error_on_recompile).
        merge: no slots, LoRAHotswap mode 'merge' (the LoRA merged into the fp8 weights when sampling
        starts, restored from pinned host memory on the next switch)."""
        import torch._dynamo

        from quantlora.nodes import rope_fusion, runtime
        from quantlora.nodes.hotswap_node import LoRAHotswap
        from quantlora.speed import gelu
        from quantlora.speed.compile import inductor_options, rowquant_cat_wanted, rowquant_enabled
        from quantlora.nodes.loader_node import QuantizedFluxLoader

        self.free()
        q = self.args.fast_quant
        loads0 = dict(self.loads)
        before = self.used()
        t0 = time.perf_counter()
        if tune:
            os.environ["QUANTLORA_INDUCTOR_TUNE"] = "1"
        if cpp_wrapper:
            os.environ["QUANTLORA_INDUCTOR_CPP_WRAPPER"] = "1"
        try:
            p = asyncio.run(QuantizedFluxLoader.execute(os.path.basename(self.b.path), q, "auto",
                                                        lora_max_rank=64 if slots else 0,
                                                        compile="regional+cudagraphs" if graphs else "regional",
                                                        attention=attention)).args[0]
        finally:
            os.environ.pop("QUANTLORA_INDUCTOR_TUNE", None)
            os.environ.pop("QUANTLORA_INDUCTOR_CPP_WRAPPER", None)
        load_s = time.perf_counter() - t0
        rep = p.model_options.get("quantlora", {}).get("report")
        name = (f"ours {q} compile (regional)" + (" + slots r64" if slots else "") + (" + LoRA merge" if merge else "")
                + (f", attention {attention}" if attention != "auto" else "") + (", inductor tuning" if tune else "")
                + (", inductor cpp_wrapper" if cpp_wrapper else "")
                + (", fused RoPE" if rope_fusion.active() else "")
                + ("" if gelu.enabled() else ", tanh GELU")
                + ("" if rowquant_enabled() else ", torchao GELU-fed quantization")
                # the concatenation pass is on by default (tenth round); rows before it were named
                # ", linear2 without the concatenation" where it ran
                + (", the concatenation written" if rowquant_enabled() and not rowquant_cat_wanted() else "")
                + (", CUDA graphs" if graphs or "triton.cudagraphs" in inductor_options() else "")
                + (", skip guards" if os.environ.get("QUANTLORA_SKIP_GUARDS") == "1" else ""))
        r = self.sample(p, self.args.steps, t_apply=t0, label=name + (" (none active)" if slots or merge else ""))
        r2 = self.sample(p, self.args.steps)
        r["steady"] = min(r["steady"], r2["steady"])
        listed, used_loaded = self.comfy_listed(), self.used()
        switch, steps_lora, recompiles = [], [], []
        if slots or merge:
            def apply(base, lora_name):
                return LoRAHotswap.execute(base, lora_name, 1.0, 64, "blocks", "merge" if merge else "slots").args[0]

            torch._dynamo.config.error_on_recompile = True
            try:
                switch, steps_lora = self._switches(p, apply, name, r)
            except Exception as e:  # error_on_recompile raises on any recompile: measure again without it
                if "recompil" not in str(e).lower():
                    raise
                recompiles.append(str(e)[:300])
                log(f"recompile: {str(e)[:300]}")
                torch._dynamo.config.error_on_recompile = False
                switch, steps_lora = self._switches(p, apply, name, r)
            finally:
                torch._dynamo.config.error_on_recompile = False
        self.row(name + (" (none active)" if slots or merge else ""), step_s=r["steady"],
                 step_ratio=r["steady"] / self.base_step if self.base_step else None,
                 load_s=load_s, load_to_first_step_s=r["first"],
                 weights_gib=rep.weights_bytes / self.GIB if rep is not None else None,
                 switch_s=switch or None, switch_s_median=statistics.median(switch) if switch else None,
                 step_lora_s=statistics.median(steps_lora) if steps_lora else None,
                 step_lora_ratio=statistics.median(steps_lora) / self.base_step if steps_lora and self.base_step else None,
                 recompiles=recompiles if slots or merge else None,
                 rel_err_vs_ours_bf16=self.rel(r["latent"], self.ref) if self.ref is not None else None,
                 peak_alloc_gib=r["peak_alloc_gib"], used_before_gib=before, used_max_gib=r["used_max_gib"],
                 used_loaded_gib=used_loaded, nvidia_smi_used_gib=self.nvidia_smi_used(), comfy_listed=listed,
                 patcher=type(p).__name__, loads={k: self.loads[k] - loads0[k] for k in self.loads},
                 lora_stats=runtime.stats() if slots or merge else None,
                 # QUANTLORA_SKIP_GUARDS: forwards run without dynamo's guards / with them (speed/guards.py)
                 guard_forwards=self.guard_counts(p),
                 cat_rewrites=self.cat_rewrites())
        if profile:  # on a CPU (the dry run) the same code runs, with CPU events only
            self.profile_sampling(p, name)
        del p
        self.free()

    def section_cache_merge(self):
        """The restart's workflow through the nodes on the mapped weight cache (memory/pinned_file.py):
        QuantizedFluxLoader(fast quantization, compile regional, weight_cache on) loaded once to write the
        cache, then again to read it mapped -> LoRAHotswap(merge) -> sampling, one LoRA after another. The
        merges take the cache file's locked pages as their pristine copy; the loader's bare MODEL sampled
        after them gets the loaded weights back bit for bit; a third load sampled without a LoRA gives
        its pages back (nodes/runtime.py)."""
        from quantlora.checkpoint.direct_read import DirectReader
        from quantlora.memory import pinned_file
        from quantlora.nodes import runtime
        from quantlora.nodes.hotswap_node import LoRAHotswap
        from quantlora.nodes.loader_node import QuantizedFluxLoader
        from quantlora.quant import weight_codecs as codecs

        torch = self.torch
        os.environ.setdefault("QUANTLORA_WEIGHT_CACHE_DIR", os.path.join(self.args.workdir, "wcache"))
        DirectReader.on_cpu = not self.cuda  # the dry run reads (and maps) as a GPU load does
        q, name = self.args.fast_quant, os.path.basename(self.b.path)
        probe = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2")

        def load():
            t = time.perf_counter()
            p = asyncio.run(QuantizedFluxLoader.execute(name, q, "auto", compile="regional", weight_cache="on")).args[0]
            return p, time.perf_counter() - t

        self.free()
        p, first_load_s = load()
        dm = p.model.diffusion_model
        loaded = {n: [t.clone() for t in codecs.storage(dm.get_submodule(n))] for n in probe}
        written = p.model_options["quantlora"]["report"].weight_cache
        del p, dm
        self.free()
        p, load_s = load()
        dm = p.model.diffusion_model
        rep = p.model_options["quantlora"]["report"]
        copy = pinned_file.of(dm)
        mapped_gib = copy.pinned.locked_bytes() / self.GIB if copy is not None else 0.0
        same_load = all(torch.equal(a, b) for n in probe for a, b in zip(codecs.storage(dm.get_submodule(n)), loaded[n]))
        switch, first = [], None
        for lora_name in self.lora_names:
            m = LoRAHotswap.execute(p, lora_name, 1.0, 64, "blocks", "merge").args[0]
            r = self.sample(m, 2)
            first = r["first"] if first is None else first
            switch.append(runtime.merge_state(dm).report.seconds)
        report = runtime.merge_state(dm).report
        kept = pinned_file.of(dm) is not None
        self.sample(p, 2)  # the bare MODEL: restored from the file's pages
        bare_equal = all(torch.equal(a, b) for n in probe for a, b in zip(codecs.storage(dm.get_submodule(n)), loaded[n]))
        del p, dm, m
        self.free()
        p3, _ = load()
        self.sample(p3, 1)
        released = pinned_file.of(p3.model.diffusion_model) is None
        del p3
        self.free()
        DirectReader.on_cpu = False
        self.row(f"ours {q} compile (regional), weight cache mapped + LoRA merge", cache=written, load_s=load_s,
                 first_load_s=first_load_s, mapped_gib=mapped_gib, load_phases=rep.phases, loaded_equal=same_load,
                 first_sampling_s=first, switch_s=switch, pristine_gib=report.pristine_bytes / self.GIB,
                 pristine_file_gib=report.pristine_file_bytes / self.GIB, kept_for_merges=kept,
                 bare_equal_after_merges=bare_equal, released_without_merge=released)

    @staticmethod
    def cat_rewrites() -> int | None:
        """Single blocks whose linear2 input CatQuantPass rewrote in this process (QUANTLORA_ROWQUANT_CAT=1)."""
        import sys

        mod = sys.modules.get("quantlora.speed.rowquant_cat")
        return None if mod is None else mod.CatQuantPass.rewrites

    @staticmethod
    def guard_counts(patcher) -> dict | None:
        g = getattr(patcher.model.diffusion_model, "_quantlora_guards", None)
        return None if g is None else {"skipped": g.skipped, "checked": g.checked}

    def profile_sampling(self, model, name, steps=3):
        """Kernel time per sampled step by kind (GEMMs, attention, Triton, copies, other) against the
        wall step: what the base step is made of, and how long the GPU waits on the host."""
        from torch.profiler import ProfilerActivity, profile

        torch = self.torch
        self.sample(model, 2)  # a LoRA merged by an earlier sampling is restored here, not in the profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            r = self.sample(model, steps)
            if self.cuda:
                torch.cuda.synchronize()
        waits = self.trace_waits(prof, name, steps)
        kinds = {"gemm": 0.0, "attention": 0.0, "triton": 0.0, "copy": 0.0, "other": 0.0}
        table = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", 0) or 0
            if t <= 0 or not str(getattr(e, "device_type", "")).endswith("CUDA"):
                continue
            k = e.key.lower()
            kind = ("attention" if any(w in k for w in ("flash", "fmha", "attention", "cudnn", "sdpa")) else
                    "gemm" if any(w in k for w in ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "sm90_", "_mm")) else
                    "triton" if k.startswith("triton") else
                    "copy" if "memcpy" in k or "copy" in k else "other")
            kinds[kind] += t / 1e3 / steps
            table.append((t / 1e3 / steps, e.count // steps, e.key[:140]))
        table.sort(reverse=True)
        slug = "".join(c if c.isalnum() else "-" for c in name)[:80]
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, f"profile-{slug}.txt"), "w") as f:
            f.write(f"{name}: per sampled step (mean of {steps})\n")
            for ms, n, key in table:
                f.write(f"{ms:9.3f} ms {n:6d}x  {key}\n")
        kernel_ms = sum(kinds.values())
        self.row(name + ": profile", wall_step_ms=r["steady"] * 1e3, kernel_ms=kernel_ms,
                 gpu_busy_share=kernel_ms / (r["steady"] * 1e3) if r["steady"] else None,
                 **{f"{k}_ms": v for k, v in kinds.items()}, top=[(round(a, 3), n, k[:90]) for a, n, k in table[:12]],
                 **waits)

    def trace_waits(self, prof, name, steps) -> dict:
        """The profiled sampling's Chrome trace (xz) and bench/timeline.py's reading of it, per step:
        the GPU's idle gaps, how much of them followed a host call that waited for the GPU, the
        blocking calls and host reads of GPU values. Issue 12: the sampled step runs 7-13% above its
        kernel sum; this says whether syncs or a slow host leave the GPU idle."""
        import lzma
        import re
        import tempfile

        import timeline

        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:80]
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            events = timeline.load_events(raw)
            out = os.path.join(self.args.out, f"trace-{slug}.json.xz")
            with open(raw, "rb") as src, lzma.open(out, "wb", preset=1) as dst:
                dst.write(src.read())
        # the steps after the first: its set-up (loading, conditioning) is not a step's cost
        since = timeline.marker_end(events, "quantlora sampler step 0")
        got = timeline.host_waits(events, since_us=since)
        regions = timeline.compiled_regions(events)  # host time per compiled block call, guards apart
        steps = steps - 1 if since is not None else steps
        if got is None:
            log(f"profile {name}: no GPU events (trace {os.path.basename(out)})")
            return {"trace": os.path.basename(out), "scalar_reads_per_step": sum(
                1 for e in events if e.get("cat") == "cpu_op" and e.get("name") in timeline.SCALAR_OPS) / steps}
        per_step = {k: (v / steps if isinstance(v, (int, float)) and k != "top_gaps" else v) for k, v in got.items()}
        log(f"profile {name}: idle gaps {per_step['gap_idle_ms']:.2f} ms/step ({per_step['gap_idle_after_sync_ms']:.2f} after a "
            f"sync), {per_step['sync_calls']:.1f} blocking calls/step, {per_step['scalar_reads']:.1f} host reads/step")
        return {"trace": os.path.basename(out), "compiled_regions": regions,
                **{f"{k}_per_step" if k not in ("sync_kinds", "top_gaps") else k: v for k, v in per_step.items()}}

    def section_graph(self):
        """The example workflows' cores through the pack's nodes, fixed seed: latents kept for on vs off."""
        import nodes

        from quantlora.nodes import offload_sampler_node as off_node
        from quantlora.nodes.fp8_cast_node import cast_model
        from quantlora.nodes.hotswap_node import LoRAHotswap
        from quantlora.nodes.loader_node import QuantizedFluxLoader

        flux, lora = os.path.basename(self.b.path), self.lora_names[0]
        steps = self.args.graph_steps
        # (a) NF4 + LoRA: QuantizedFluxLoader -> LoRAHotswap -> KSampler
        self.free()
        loads0, before = dict(self.loads), self.used()
        if self.cuda:
            self.reset_peak()
        t0 = time.perf_counter()
        m = asyncio.run(QuantizedFluxLoader.execute(flux, self.args.graph_quant, "auto")).args[0]
        m = LoRAHotswap.execute(m, lora, 1.0, 64, "blocks").args[0]
        lat = nodes.common_ksampler(m, 42, steps, 1.0, "euler", "simple", self.pos, self.neg, self.latent)[0]["samples"]
        self.save(f"graph {self.args.graph_quant} + LoRAHotswap + KSampler", lat)
        self.row(f"graph {self.args.graph_quant} + LoRAHotswap + KSampler ({steps} steps)", wall_s=time.perf_counter() - t0,
                 peak_alloc_gib=self.peak(),
                 used_before_gib=before, used_after_gib=self.used(), nvidia_smi_used_gib=self.nvidia_smi_used(),
                 comfy_listed=self.comfy_listed(), patcher=type(m).__name__,
                 loads={k: self.loads[k] - loads0[k] for k in self.loads}, finite=bool(self.torch.isfinite(lat).all()))
        del m
        self.free()
        # (c) bf16 -> FP8LayerwiseCast -> LoRAHotswap -> CPUOffloadSampler (none, then block)
        loads0, before = dict(self.loads), self.used()
        t0 = time.perf_counter()
        m = asyncio.run(QuantizedFluxLoader.execute(flux, "none", "auto")).args[0]
        m8, msg = cast_model(m, "float8_e4m3fn", "auto")
        del m
        cast_s = time.perf_counter() - t0
        m8 = LoRAHotswap.execute(m8, lora, 1.0, 64, "blocks").args[0]
        lats = {}
        for mode in ("none", "block"):
            if self.cuda:
                self.reset_peak()
            loads_m = dict(self.loads)
            t = time.perf_counter()
            lat, text = off_node.sample(m8, 42, steps, 1.0, "euler", "simple", self.pos, self.neg, self.latent, 1.0, mode, 1, 0.0)
            lats[mode] = lat["samples"]
            label = f"graph bf16 -> FP8LayerwiseCast + LoRAHotswap + CPUOffloadSampler {mode}"
            self.save(label, lats[mode])
            self.row(f"{label} ({steps} steps)", wall_s=time.perf_counter() - t, cast_s=cast_s if mode == "none" else None,
                     cast_msg=msg if mode == "none" else None, text=text,
                     peak_alloc_gib=self.peak(),
                     used_before_gib=before, used_after_gib=self.used(), nvidia_smi_used_gib=self.nvidia_smi_used(),
                     comfy_listed=self.comfy_listed(), loads={k: self.loads[k] - loads_m[k] for k in self.loads},
                     equal_to_none=bool(self.torch.equal(lats[mode], lats["none"])),
                     finite=bool(self.torch.isfinite(lats[mode]).all()))
            if mode == "none":
                self.free()
        del m8
        self.free()

    def prepare(self):
        """The seeded checkpoint (bf16, ~22 GiB at full size) and the rank-32 LoRAs, written once."""
        t = time.perf_counter()
        self.b.write_checkpoint()
        import folder_paths

        folder_paths.add_model_folder_path("diffusion_models", self.args.workdir)
        folder_paths.add_model_folder_path("loras", self.args.workdir)
        self.lora_names = [os.path.basename(self.b.write_lora(32, seed=s)) for s in range(101, 101 + self.args.switches)]
        log(f"model and {len(self.lora_names)} LoRAs ready in {time.perf_counter() - t:.0f} s")

    def run(self):
        self.prepare()
        off = self.args.dynamic == "off" or not self.info.get("aimdo")
        # In priority order: the time guard skips from the end. Estimates are full-size seconds.
        plan = [("ours_bf16", self.section_ours_bf16, 20),
                ("comfy fp8_e4m3fn_fast", lambda: self.section_comfy("fp8_e4m3fn_fast"), 45 if off else 35),
                ("comfy default", lambda: self.section_comfy("default"), 45 if off else 35)]
        if off:
            plan.append(("comfy fp8_e4m3fn_fast compiled", lambda: self.section_comfy("fp8_e4m3fn_fast", compiled=True), 45))
        for v in (v for v in self.args.merge_variants.split(",") if v):
            att, *extra = v.split("+")
            plan.append((f"ours fp8 compile + merge" + (f", {v}" if v != "auto" else ""),
                         lambda att=att, extra=extra: self.section_ours_fp8(
                             False, merge=True, attention=att, profile=self.args.profile_merge,
                             tune="tune" in extra, cpp_wrapper="cppwrap" in extra, graphs="graphs" in extra),
                         80 if {"tune", "cppwrap"} & set(extra) else 40))
        plan += [
                 ("ours fp8 compile + slots", lambda: self.section_ours_fp8(True), 40),
                 ("ours weight cache + merge", self.section_cache_merge, 60),
                 ("graph", self.section_graph, 45),
                 ("ours fp8 compile, no slots", lambda: self.section_ours_fp8(False), 25)]
        only = [s for s in self.args.sections.split(",") if s]
        for name, fn, est in plan:
            if only and not any(name.startswith(s) for s in only):
                continue
            est = est if self.args.size == "full" else est / 4
            if self.left() < est:
                self.row(name, skipped=f"time guard: {self.left():.0f} s left, section needs ~{est:.0f} s")
                continue
            log(f"=== {name} ({self.left():.0f} s left)")
            t = time.perf_counter()
            try:
                fn()
            except Exception as e:  # one section failing must not lose the others
                import traceback

                traceback.print_exc()
                self.row(name, error=f"{type(e).__name__}: {str(e)[:400]}")
                self.torch._dynamo.config.error_on_recompile = False
                try:
                    self.free()
                except Exception:
                    pass
            log(f"=== {name} took {time.perf_counter() - t:.0f} s")
        self.flush()


def child(args):
    info = comfy_start(args.dynamic, cpu=args.device == "cpu")
    import torch

    info.update(torch=torch.__version__, device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu")
    log(f"dynamic {args.dynamic}: {json.dumps(info)}")
    p = Peers(args, info)
    if args.prepare_only:
        p.prepare()
        return
    p.run()
    log(f"dynamic {args.dynamic}: done")


# ---------------------------------------------------------------- parent: both modes, merged
def compare(args) -> list[dict]:
    import torch

    dirs = {m: os.path.join(args.workdir, f"latents-{args.size}-{m}") for m in MODES}
    rows = []
    if not all(os.path.isdir(d) for d in dirs.values()):
        return rows
    common = sorted(set(os.listdir(dirs["on"])) & set(os.listdir(dirs["off"])))
    for f in common:
        a, b = (torch.load(os.path.join(dirs[m], f)) for m in MODES)
        diff = (a.float() - b.float())
        rows.append({"variant": f"on vs off: {f[:-3]}", "equal": bool(torch.equal(a, b)),
                     "max_abs_diff": round(diff.abs().max().item(), 6),
                     "rel_err": round((diff.norm() / b.float().norm().clamp_min(1e-30)).item(), 6),
                     "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all())})
    return rows


def parent(args, argv):
    deadline = T0 + args.budget
    merged, setups = [], {}
    modes = MODES if args.dynamic == "both" else (args.dynamic,)

    def run_child(extra, until, what):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, *extra, "--deadline", str(until)]
        log(f"--- {what}: {' '.join(cmd[1:])}")
        try:
            rc = subprocess.run(cmd, timeout=max(30.0, until - time.time() + args.grace)).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at the time limit"
        log(f"--- {what}: exit {rc} ({time.time() - T0:.0f} s since start)")
        return rc

    import shutil

    for mode in MODES:  # nothing stale from an earlier run in the same folders
        shutil.rmtree(os.path.join(args.workdir, f"latents-{args.size}-{mode}"), ignore_errors=True)
        if os.path.exists(os.path.join(args.out, f"results-peers-{mode}.json")):
            os.remove(os.path.join(args.out, f"results-peers-{mode}.json"))
    # The checkpoint and LoRAs first, in a process of their own, so the modes share the time left fairly.
    rc = run_child(["--dynamic", "off", "--prepare-only"], deadline, "writing the model and LoRAs")
    if rc != 0:
        merged.append({"variant": "prepare: model and LoRAs", "error": f"exit {rc}"})
    for i, mode in enumerate(modes):
        until = time.time() + (deadline - time.time()) * (args.on_share if len(modes) == 2 and i == 0 else 1.0)
        rc = run_child(["--dynamic", mode], until, f"dynamic {mode}")
        path = os.path.join(args.out, f"results-peers-{mode}.json")
        if os.path.exists(path):
            with open(path) as f:
                d_ = json.load(f)
            merged += d_["rows"]
            setups[mode] = d_.get("setup")
        if rc != 0:
            merged.append({"variant": f"v0.33 dynamic {mode}: process", "error": f"exit {rc}"})
    merged += compare(args)
    out = {"device": "cpu", "date": datetime.date.today().isoformat(), "size": args.size, "setup": setups, "rows": merged}
    for mode in modes:
        p = os.path.join(args.out, f"results-peers-{mode}.json")
        if os.path.exists(p):
            with open(p) as f:
                d_ = json.load(f)
            out.update(device=d_["device"], torch=d_["torch"])
    with open(os.path.join(args.out, "results-peers.json"), "w") as f:
        json.dump(out, f, indent=1)
    summary(merged)
    log(f"all done in {time.time() - T0:.0f} s")


def summary(rows):
    keys = ("step_s", "step_ratio", "switch_s_median", "step_lora_s", "load_to_first_step_s", "used_max_gib", "equal",
            "rel_err", "error", "skipped")
    print("\n| variant | " + " | ".join(keys) + " |", flush=True)
    for r in rows:
        vals = []
        for k in keys:
            v = r.get(k, "")
            vals.append(str(v)[:60])
        print(f"| {r['variant'][:90]} | " + " | ".join(vals) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dynamic", default="both", choices=("both", *MODES))
    ap.add_argument("--size", default="full", choices=("full", "smoke", "tiny"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/quantlora-bench")
    ap.add_argument("--steps", type=int, default=6, help="sampler steps per timed run")
    ap.add_argument("--graph-steps", type=int, default=4)
    ap.add_argument("--graph-quant", default="bnb-nf4")
    ap.add_argument("--fast-quant", default="torchao-fp8-dynamic")
    ap.add_argument("--switches", type=int, default=3, help="LoRA switches per model (each to a fresh rank-32 file)")
    ap.add_argument("--switch-budget", type=float, default=12.0, help="seconds left below which no more switches start")
    ap.add_argument("--sections", default="", help="comma-separated name prefixes (default: all)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for everything, from the process's start; sections that do not fit are skipped. "
                         "The first process on a fresh device writes the full-size checkpoint first (~45 s on an "
                         "H200 host): the bf16 and one fp8 section then need ~140 s in all, later processes ~95 s")
    ap.add_argument("--on-share", type=float, default=0.47, help="share of the time left after the model is written for 'on'")
    ap.add_argument("--merge-variants", default="auto", help="merge sections, comma-separated: an attention choice "
                    "(speed/attention.py), optionally +tune (QUANTLORA_INDUCTOR_TUNE=1) and/or +cppwrap "
                    "(QUANTLORA_INDUCTOR_CPP_WRAPPER=1) and/or +graphs (compile regional+cudagraphs; needs "
                    "QUANTLORA_BENCH_NO_CUDA_MALLOC=1), e.g. auto,fa3-fp8+graphs")
    ap.add_argument("--profile-merge", action="store_true", help="profile a sampled step of each merge section")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grace", type=float, default=25.0, help="seconds past a process's deadline before it is killed")
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dynamic == "both":
        argv = []
        skip = False
        for a in sys.argv[1:]:
            if skip:
                skip = False
                continue
            if a in ("--dynamic", "--deadline", "--on-share", "--budget", "--grace"):
                skip = True
                continue
            if a.startswith(("--dynamic=", "--deadline=", "--on-share=", "--budget=", "--grace=")):
                continue
            argv.append(a)
        os.makedirs(args.out, exist_ok=True)
        parent(args, argv)
    else:
        if args.dynamic == "on" and not args.prepare_only and args.deadline is None:
            # run on its own: the model and LoRAs are written first with dynamic VRAM off, as the parent
            # does (written under comfy-aimdo the checkpoint came out empty: H200, 2026-12-01)
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--dynamic", "off", "--prepare-only"],
                           check=True)
        if args.deadline is None:
            args.deadline = T0 + args.budget
        if args.device == "cpu" and args.dynamic == "on":
            log("dynamic VRAM needs CUDA: this 'on' process runs with it off (a dry run of the code path)")
        child(args)


if __name__ == "__main__":
    main()
