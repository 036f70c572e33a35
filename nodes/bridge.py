"""A Flux checkpoint -> a standard ComfyUI MODEL, built by ComfyUI's own loader.

The pack reads and checks the file (safetensors only, named errors), then calls what UNETLoader
calls (comfy.sd.load_diffusion_model_state_dict) with model_options carrying the compute dtype
and the pack's custom operations (nodes/quant_ops.py). ComfyUI detects the variant, converts keys
(BFL, diffusers, `.scale` -> `.weight`) and builds its own Flux class; each Linear's tensors reach
the pack as they are loaded and block layers are quantized there and then.
"""
from __future__ import annotations

import logging
import mmap
import os
import time

import torch

import comfy.model_management as mm

from ..checkpoint.flux_config import infer_arch
from ..checkpoint.direct_read import DirectReader
from ..checkpoint.safetensors_io import TensorReader
from ..checkpoint.sources import open_source
from ..errors import QuantLoRAError, check_choice
from ..memory import oom, pinned_file
from ..memory.sizes import module_bytes
from ..quant.backends import available_backends, require_backend
from ..quant import weight_cache
from ..quant.loader import LayerLoader, LoadReport
from ..speed import aot_store, warmup
from . import comfy_door
from .quant_ops import loading_with, operations_for

log = logging.getLogger("quantlora")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPE_NAMES = ["auto", *DTYPES]
FLUX_HEAD_DIM = 128  # FLUX.1's; ComfyUI builds its Flux with heads of 128


def resolve_compute_dtype(name: str, parameters: int) -> torch.dtype:
    check_choice("compute_dtype", name, COMPUTE_DTYPE_NAMES)
    if name != "auto":
        return DTYPES[name]
    # The same choice ComfyUI's own UNETLoader makes for this device.
    return mm.unet_dtype(model_params=parameters, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])


# QUANTLORA_DIRECT_READS=0: weights go to the GPU through the memory mapping, as before (also where
# the OS has no pread: Windows).
DIRECT_READS = os.environ.get("QUANTLORA_DIRECT_READS", "1") != "0" and hasattr(os, "preadv")


def _state_dict(src, direct: DirectReader | None = None) -> dict:
    """Every tensor of the file(s), memory-mapped: nothing is read until ComfyUI hands it to a layer.
    The 'scaled_fp8' marker goes: the pack's Linear applies the per-layer scales itself. With
    `direct`, each tensor is registered there, so the weights quantized on the GPU are read with
    pread rather than through the mapping (checkpoint/direct_read.py)."""
    reader = TensorReader(src.headers)
    sd = {}
    for k in reader.keys():
        if k == "scaled_fp8" or k.endswith(".scaled_fp8"):
            continue
        sd[k] = t = reader.get(k)
        if direct is not None:
            direct.register(reader.path_of(k), k, t)
    return sd


def _metadata(src) -> dict | None:
    meta = {}
    for h in src.headers:
        meta.update(h.metadata or {})
    return meta or None


def weight_cache_dir() -> str:
    """$QUANTLORA_WEIGHT_CACHE_DIR, else models/quantlora_cache in ComfyUI's models folder."""
    import folder_paths

    return os.environ.get(weight_cache.ENV_DIR) or os.path.join(folder_paths.models_dir, "quantlora_cache")


def _open_weight_cache(src, quantization: str, dtype: torch.dtype, backend, direct, device) -> tuple:
    """(CachedWeights found for this load or None, CacheWriter for it or None, the found file mapped
    and being page-locked (memory/pinned_file.py) or None)."""
    if direct is None or backend.apply is None:
        return None, None, None
    path, ident = weight_cache.cache_path(weight_cache_dir(), [h.path for h in src.headers], quantization, dtype)
    found = weight_cache.CachedWeights.find(path, ident)
    if found is None:
        return None, weight_cache.CacheWriter(path, ident), None
    pinned = None
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if pinned_file.enabled() and (cuda or (device.type == "cpu" and DirectReader.on_cpu)):
        try:
            pinned = pinned_file.PinnedFile(found.path, lock=cuda, bounds=found.pieces(mmap.PAGESIZE))
        except (OSError, ValueError) as e:  # read as before
            log.warning("QuantLoRA: could not map the weight cache %s (%s); reading it instead", found.path, e)
    direct.add_file(found.header, mapped=pinned)
    return found, None, pinned


def load_flux_model_patcher(path: str, quantization: str, compute_dtype: str, progress=None, weight_cache_mode: str = "off"):
    """Returns (ModelPatcher, LoadReport). weight_cache_mode 'on': quantized layers read from / written
    to the weight cache (quant/weight_cache.py)."""
    check_choice("weight_cache", weight_cache_mode, weight_cache.CHOICES)
    src = open_source(path)
    arch, layout, _ = infer_arch(src.shapes(), src.name)  # names what a non-Flux file is, before ComfyUI sees it
    if arch.hidden_size <= 0 or arch.num_heads <= 0:
        raise QuantLoRAError(f"{src.name}: its tensors describe a Flux transformer that cannot be built (width "
                             f"{arch.hidden_size}, {arch.num_heads} heads). The file is damaged; re-download it.")
    if arch.head_dim != FLUX_HEAD_DIM:
        raise QuantLoRAError(f"{src.name}: a Flux-like transformer with attention heads of {arch.head_dim}, but FLUX.1 "
                             f"and ComfyUI's Flux use heads of {FLUX_HEAD_DIM}. This is not a FLUX.1 dev/schnell "
                             "checkpoint ComfyUI can run; pick a FLUX.1 transformer.")
    n_params = sum(int(torch.Size(s).numel()) for s in src.shapes().values())
    dtype = resolve_compute_dtype(compute_dtype, n_params)
    load_device = mm.get_torch_device()
    backend = require_backend(quantization, load_device)
    warmup.start(load_device)  # Triton's cache key, hashed while the load waits on its reads
    n_linears = sum(1 for k, s in src.shapes().items() if k.endswith(".weight") and len(s) == 2)
    direct = DirectReader(src.headers) if DIRECT_READS else None
    cache, writer, pinned = (_open_weight_cache(src, quantization, dtype, backend, direct, load_device)
                             if weight_cache_mode == "on" else (None, None, None))
    loader = LayerLoader(backend, dtype, load_device, src.name, n_linears, progress, direct=direct,
                         cache=cache, cache_writer=writer)
    ops = operations_for(cast=mm.unet_manual_cast(dtype, load_device) is not None)
    model_options = {"dtype": dtype, "custom_operations": ops}

    failed = patcher = None
    sd = _state_dict(src, direct)
    try:
        with loading_with(loader):
            patcher = comfy_door.load_diffusion_model_state_dict(sd, model_options, _metadata(src))
    except torch.OutOfMemoryError as e:
        failed = oom.detail(e)
    except QuantLoRAError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantLoRAError(f"{src.name}: ComfyUI {comfy_door.comfy_version()} could not build a Flux model from this "
                             f"file ({type(e).__name__}: {str(e)[:400]}). If the file loads in ComfyUI's own "
                             "'Load Diffusion Model' node, report this to QuantLoRA; otherwise the file is damaged.") from None
    finally:
        sd = None
        if direct is not None:
            direct.close()
        if pinned is not None and patcher is None:
            pinned.unlock()
    if failed is not None:
        # Out of the except block: the OOM's traceback (and the frames holding the partly loaded
        # model) is gone; hand the memory back.
        oom.release()
        raise oom.load_error(src.name, quantization, dtype, load_device, src.shapes(), available_backends(load_device), failed)
    if patcher is None:
        raise QuantLoRAError(f"{src.name}: ComfyUI {comfy_door.comfy_version()} does not recognise this file as a "
                             "diffusion model. Pick a FLUX.1 dev/schnell transformer.")
    loader.check_complete()
    dm = patcher.model.diffusion_model
    if not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks"):
        raise QuantLoRAError(f"{src.name}: ComfyUI built a {type(dm).__name__}, not a FLUX.1 transformer.")
    phases = loader.phases()
    if pinned is not None:
        pinned_file.attach(dm, pinned_file.FileCopy(pinned, loader.file_views))
        phases["cache_map"] = pinned.describe()
    if writer is not None:  # now, before anything (a LoRA merge) writes into the weights
        if writer.write():
            phases["cache_written_s"] = round(writer.written_s, 3)
    report = LoadReport(src.path, layout, quantization, str(dtype).replace("torch.", ""),
                        sorted(set(src.dtypes().values())), loader.elapsed(), module_bytes(dm),
                        loader.quantized, phases=phases)
    if weight_cache_mode == "on":
        report.weight_cache = dict(path=(cache or writer).path if (cache or writer) else None,
                                   read=cache is not None, layers=cache.hits if cache else len(writer.layers) if writer else 0,
                                   written=bool(writer is not None and writer.written_s))
    comfy_door.set_true_size(patcher, module_bytes(patcher.model))
    patcher.model_options.setdefault("quantlora", {})["report"] = report
    return patcher, report


def build_model(path: str, quantization: str, compute_dtype: str, lora_max_rank: int = 0, lora_targets: str = "blocks",
                lora_slot_layout: str = "per-projection", compile: str = "off", attention: str = "auto", progress=None,
                weight_cache_mode: str = "off", warm_compiler: bool = False, between_phases=None):
    """QuantizedFluxLoader's whole job after its input checks: load, LoRA slots before compiling (when
    asked), regional compile, the pack's sampling wrappers and the attention choice. warm_compiler
    (a load beside the graph's other nodes, nodes/load_overlap.py): the compiler's modules are imported
    now rather than in the first sampling step (speed/warmup.py). between_phases: called between the phases
    (nodes/load_overlap.py: a load whose prompt has ended raises there)."""
    import os

    from ..speed.compile import compile_backend, compile_blocks
    from . import rope_fusion, runtime

    patcher, report = load_flux_model_patcher(path, quantization, compute_dtype, progress, weight_cache_mode)
    if between_phases is not None:
        between_phases()
    dm = patcher.model.diffusion_model
    if lora_max_rank > 0:
        try:
            runtime.ensure_slots(dm, lora_max_rank, lora_targets, lora_slot_layout)
        except QuantLoRAError:  # e.g. out of GPU memory for the slots: the model goes with the error
            patcher = dm = None
            oom.release()
            raise
    set_up = ""
    if compile != "off":
        t0 = time.perf_counter()
        rope_fusion.install_if_enabled()  # unless QUANTLORA_FUSE_ROPE=0: before the first trace
        aot = _aot_store(compile, lora_max_rank, patcher.load_device)
        compile_blocks(dm, cudagraphs=compile == "regional+cudagraphs", aot=aot)
        set_up = f"; blocks set up for torch.compile in {time.perf_counter() - t0:.2f} s"
        if aot is not None:
            set_up += (f" ({aot.stats['loaded']} packages compiled ahead of time loaded in {aot.stats['load_s']:.2f} s;"
                       f" {aot_store.ENV}=0 turns them off)")
        if between_phases is not None:
            between_phases()
        # blocks served by packages compile nothing at the first step: importing the compiler now would
        # only hold the interpreter lock against the text encoders (1.4 s on an H200: issue 12, nineteenth round)
        served = aot is not None and aot.serves_all()
        if warm_compiler and compile_backend() in (None, "inductor") and not served:
            set_up += f", the compiler's modules imported in {warmup.warm_compiler(patcher.load_device):.2f} s"
    runtime.install(patcher)
    runtime.set_attention(patcher, attention)
    log.info("QuantLoRA: loaded %s as %s/%s in %.1f s, %.2f GiB of weights%s%s",
             os.path.basename(path), quantization, report.compute_dtype, report.load_s, report.weights_bytes / 2**30,
             _cache_note(report.weight_cache, report.phases.get("cache_map")), set_up)
    return patcher


def _aot_store(compile: str, lora_max_rank: int, device):
    """The blocks' packages compiled ahead of time, kept in the weight cache folder (speed/aot_store.py: on
    by default on CUDA); None where off, or where they cannot serve this model (said where asked for)."""
    if not aot_store.enabled(device):
        return None
    why, cxx = None, ""
    check_root = os.path.join(weight_cache_dir(), "aot")
    if compile != "regional":
        why = f"compile {compile!r} (packages serve 'regional' only)"
    elif lora_max_rank > 0:
        why = "LoRA slots (packages serve merged LoRAs only)"
    elif aot_store.deferred():  # the load check's verdict if kept, else the first build's child runs it
        cxx, why = aot_store.known_verdict(check_root, device)
    else:
        cxx, why = aot_store.compiler_here(check_root, device)
    if why:
        if aot_store.asked():
            log.warning("QuantLoRA: %s=1 ignored: %s", aot_store.ENV, why)
        else:
            log.info("QuantLoRA: no blocks compiled ahead of time here (%s); torch.compile serves them", why)
        return None
    from . import rope_fusion

    return aot_store.AOTStore(os.path.join(check_root, aot_store.device_tag(device)), rope_fusion.plain_rope_for_export,
                              cxx=cxx, defer=aot_store.deferred(), check_root=check_root, device=device)


def _cache_note(info: dict | None, mapped: dict | None = None) -> str:
    if not info:
        return ""
    if not info["layers"]:
        return "; weight cache: nothing to cache for this quantization (torchao and optimum-quanto int8/fp8 only)"
    verb = "read from" if info["read"] else "written to" if info["written"] else "not written to"
    note = f"; {info['layers']} quantized layers {verb} the weight cache {info['path']}"
    if mapped and mapped.get("locked_gib"):
        note += (f" ({mapped['locked_gib']:.2f} GiB of its pages locked in place: a LoRA merge's pristine copy; "
                 "given back at the first sampling without one)")
    elif mapped and mapped.get("failed"):
        note += f" (its pages could not be locked: {mapped['failed']}; read instead)"
    return note
