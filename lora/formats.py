"""Flux LoRA files in any common format -> one canonical form on ComfyUI's (BFL) Flux modules.

Every LoRA becomes a list of `LoRATarget`s: a low-rank delta on a row range of one BFL
Linear (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer.linear`, ...):

    W[offset:offset+rows] += scale * up @ down

Formats (detected per key, so mixed files work; `ParsedLoRA.format` names what was found):

- diffusers / PEFT (diffusers, ai-toolkit, SimpleTuner): `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`
  / `.lora_B.weight` (+ optional `.alpha`), also with `base_model.model.` or no prefix, PEFT
  adapter names (`.lora_A.default.weight`), old diffusers `.lora.down.weight`, `_lora.down.weight`,
  `.lora_linear_layer.down.weight`. Names map through `checkpoint.flux_keys.linear_maps`: q/k/v become
  row ranges of the fused layer, `norm_out.linear` gets its (scale, shift) halves swapped. Alpha
  also comes from diffusers' `lora_adapter_metadata` (lora_alpha, alpha_pattern, use_rslora) when
  the file has no `.alpha` keys.
- kohya sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- BFL / ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `lora_down`/`lora_up`,
  `model.diffusion_model.`, `transformer.`, `base_model.model.` (fal) or no prefix), and ComfyUI's
  `single_blocks.N.linear1_qkv` (the q/k/v rows of linear1).
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` (lora1 = image stream, lora2 = text),
  `proj_lora1/2`, and `single_blocks.N.processor.qkv_lora` / `proj_lora` (-> linear1 q/k/v rows, linear2).
- OneTrainer: `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`; SimpleTuner
  LyCORIS-style LoRA names `lycoris_transformer_blocks_0_attn_to_q` likewise.

Text-encoder keys (`lora_te*`, `text_encoder*`, `text_encoders.*`) are listed in `ignored`.

Why diffusers' converters (`diffusers.loaders.lora_conversion_utils`) are not used: they convert
*to* diffusers' split q/k/v names, hard-code FLUX.1's hidden size 3072 and rank splitting
heuristics, pre-multiply alpha into the weights (and for a fused kohya qkv either copy `down` to
q, k and v or guess a block-sparse split), and raise plain ValueError/AssertionError on anything
unexpected. Here the target is BFL's fused layout, so a fused LoRA stays one exact target, a split
one becomes exact row ranges, sizes come from `FluxDims`, and every failure is a QuantLoRAError that
names the file. The key variants they accept were used as the reference list.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..checkpoint.flux_keys import BLOCK_DOT, BLOCK_US, linear_maps, swap_halves
from ..errors import QuantLoRAError

log = logging.getLogger("quantlora")


@dataclass(frozen=True)
class FluxDims:
    hidden: int
    mlp_hidden: int
    depth: int
    depth_single: int
    # Optional input sizes of the embedders; None = not checked.
    img_in_features: int | None = None   # img_in input (patchified latent channels, 64 for FLUX.1)
    txt_in_features: int | None = None   # txt_in input (T5 width, 4096)
    vec_in_features: int | None = None   # vector_in input (CLIP pooled width, 768)

    @classmethod
    def from_arch(cls, arch) -> "FluxDims":
        """From a checkpoint.flux_config.FluxArch."""
        return cls(arch.hidden_size, arch.mlp_hidden, arch.depth, arch.depth_single_blocks,
                   arch.in_channels * arch.patch_size ** 2, arch.context_in_dim, arch.vec_in_dim)


@dataclass
class LoRATarget:
    module: str         # BFL module name, e.g. "double_blocks.0.img_attn.qkv"
    offset: int         # first output row of that layer the delta covers
    rows: int           # output rows covered (== up.shape[0])
    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor    # B: (rows, rank)
    scale: float        # alpha/rank, or 1.0 without alpha

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class ParsedLoRA:
    name: str
    format: str
    targets: list[LoRATarget]
    ignored: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        return max((t.rank for t in self.targets), default=0)

    @property
    def modules(self) -> list[str]:
        return sorted({t.module for t in self.targets}, key=_natural)

    def dense_delta(self, module: str, out_features: int, in_features: int) -> torch.Tensor:
        """Sum of all deltas on `module` as a dense fp32 (out_features, in_features) matrix."""
        delta = torch.zeros(out_features, in_features, dtype=torch.float32)
        for t in self.targets:
            if t.module != module:
                continue
            if t.offset + t.rows > out_features or t.down.shape[1] != in_features:
                raise QuantLoRAError(
                    f"{self.name}: LoRA on {module} covers rows {t.offset}..{t.offset + t.rows} x {t.down.shape[1]} inputs, "
                    f"which does not fit a {out_features}x{in_features} layer. The LoRA is for another model size."
                )
            delta[t.offset:t.offset + t.rows] += t.scale * (t.up.float() @ t.down.float())
        return delta


# ----------------------------------------------------------------------------- name tables



@dataclass(frozen=True)
class _Entry:
    bfl: str             # BFL module template, "#" for the block index
    offset: int
    rows: int | None     # None = all rows of the layer
    swap: bool
    naming: str          # "bfl" | "diffusers" | "xlabs"


def _template(name: str) -> tuple[str, int | None]:
    m = BLOCK_DOT.match(name)
    return (f"{m.group(1)}.#.{m.group(3)}", int(m.group(2))) if m else (name, None)


def _layer_shapes(d: FluxDims) -> dict[str, tuple[int | None, int | None]]:
    """BFL module template -> (out_features, in_features); None where FluxDims cannot tell."""
    h, m = d.hidden, d.mlp_hidden
    out = {}
    for s in ("img", "txt"):
        out.update({
            f"double_blocks.#.{s}_attn.qkv": (3 * h, h), f"double_blocks.#.{s}_attn.proj": (h, h),
            f"double_blocks.#.{s}_mlp.0": (m, h), f"double_blocks.#.{s}_mlp.2": (h, m),
            f"double_blocks.#.{s}_mod.lin": (6 * h, h),
        })
    out.update({
        "single_blocks.#.linear1": (3 * h + m, h), "single_blocks.#.linear2": (h, h + m),
        "single_blocks.#.modulation.lin": (3 * h, h),
        "img_in": (h, d.img_in_features), "txt_in": (h, d.txt_in_features),
        "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
        "vector_in.in_layer": (h, d.vec_in_features), "vector_in.out_layer": (h, h),
        "guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h),
        "final_layer.linear": (None, h), "final_layer.adaLN_modulation.1": (2 * h, h),
    })
    return out


@lru_cache(maxsize=16)
def _tables(d: FluxDims) -> tuple[dict, dict, dict]:
    """(dotted name template -> entry, underscored lower-case template -> entry, shapes)."""
    h = d.hidden
    dotted: dict[str, _Entry] = {}
    for mm in linear_maps(1, 1, d.hidden, d.mlp_hidden):
        bfl, _ = _template(mm.bfl)
        dotted[_template(mm.diffusers)[0]] = _Entry(bfl, mm.offset, mm.rows, mm.swap_halves, "diffusers")
        dotted.setdefault(bfl, _Entry(bfl, 0, None, False, "bfl"))
    dotted["single_blocks.#.linear1_qkv"] = _Entry("single_blocks.#.linear1", 0, 3 * h, False, "bfl")
    for n, s in (("1", "img"), ("2", "txt")):
        dotted[f"double_blocks.#.processor.qkv_lora{n}"] = _Entry(f"double_blocks.#.{s}_attn.qkv", 0, None, False, "xlabs")
        dotted[f"double_blocks.#.processor.proj_lora{n}"] = _Entry(f"double_blocks.#.{s}_attn.proj", 0, None, False, "xlabs")
    dotted["single_blocks.#.processor.qkv_lora"] = _Entry("single_blocks.#.linear1", 0, 3 * h, False, "xlabs")
    dotted["single_blocks.#.processor.proj_lora"] = _Entry("single_blocks.#.linear2", 0, None, False, "xlabs")
    underscored = {k.replace(".", "_").lower(): e for k, e in dotted.items() if e.naming != "xlabs"}
    shapes = _layer_shapes(d)
    missing = {e.bfl for e in dotted.values()} - shapes.keys()
    assert not missing, missing  # flux_keys and the shape table must agree
    return dotted, underscored, shapes


# Prefixes a tool may put before the transformer's module names (stripped repeatedly).
_DOT_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "model.")
# Underscored (kohya-style) prefixes -> format label.
_US_PREFIXES = (("lora_unet_", "kohya"), ("lora_transformer_", "onetrainer"), ("lycoris_", "lycoris"))
_IGNORED_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te_", "te1_", "te2_", "te.", "te1.", "te2.",
                     "clip_l.", "clip_g.", "t5xxl.", "text_model.", "base_model.model.text_model.")

# Key ending -> role. Order matters only for which split is reported when nothing resolves;
# resolution tries every split that fits.
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "extra"), (".lora_mid.weight", "extra"), (".diff", "extra"), (".diff_b", "extra"),
    (".lora_B.bias", "extra"), (".lora_up.bias", "extra"), (".reshape_weight", "extra"),
)
_PEFT_NAMED = re.compile(r"\.lora_([AB])\.[A-Za-z0-9_\-]+\.weight$")
_PEFT_MAGNITUDE = re.compile(r"\.lora_magnitude_vector(\.[A-Za-z0-9_\-]+)?(\.weight)?$")

_FOREIGN = (
    (re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|time_guidance_embed"), "FLUX.2"),
    (re.compile(r"distilled_guidance_layer"), "Chroma"),
    (re.compile(r"input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block"),
     "Stable Diffusion 1.x/2.x or SDXL (UNet)"),
    (re.compile(r"joint_blocks|context_block[._]|x_block[._]"), "SD3 / SD3.5 (MMDiT)"),
    (re.compile(r"individual_token_refiner|token_refiner|(img|txt)_mlp[._]fc[12]"), "HunyuanVideo"),
    (re.compile(r"(img|txt)_mod[._]1([._]|$)|(img|txt)_mlp[._]net"), "Qwen-Image"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)"), "Wan (video)"),
    (re.compile(r"(^|[._])layers[._]\d+[._](attention|feed_forward)"), "Lumina 2 / Z-Image"),
    (re.compile(r"[._]attn[12][._]"), "a diffusion model with attn1/attn2 blocks (SD/PixArt/SD3.5-style)"),
)
_LYCORIS = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|oft_blocks|oft_diag|b_norm|w_norm)$")


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _strip_dot_prefixes(mod: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _DOT_PREFIXES:
            if mod.startswith(p) and len(mod) > len(p):
                mod, changed = mod[len(p):], True
    return mod


@dataclass(frozen=True)
class _Resolved:
    entry: _Entry
    index: int | None
    fmt: str
    path: str  # module name after prefixes, for PEFT alpha patterns


def _resolve(mod: str, d: FluxDims) -> _Resolved | None:
    dotted, underscored, _ = _tables(d)
    for p, fmt in _US_PREFIXES:
        if mod.startswith(p):
            rest = mod[len(p):].lower()
            m = BLOCK_US.match(rest)
            key, idx = (f"{m.group(1)}_#_{m.group(3)}", int(m.group(2))) if m else (rest, None)
            e = underscored.get(key)
            return _Resolved(e, idx, fmt, rest) if e else None
    path = _strip_dot_prefixes(mod)
    key, idx = _template(path)
    e = dotted.get(key)
    if e is None:
        return None
    return _Resolved(e, idx, {"bfl": "bfl", "diffusers": "diffusers", "xlabs": "xlabs"}[e.naming], path)


def _split_key(key: str, d: FluxDims) -> tuple[str, str, _Resolved | None] | None:
    """(module part, role, resolution) for the first ending whose module resolves, else the first ending."""
    cands = [(key[:-len(s)], r) for s, r in _SUFFIXES if key.endswith(s) and len(key) > len(s)]
    m = _PEFT_NAMED.search(key)
    if m and m.start() > 0:
        cands.insert(0, (key[:m.start()], "down" if m.group(1) == "A" else "up"))
    m = _PEFT_MAGNITUDE.search(key)
    if m and m.start() > 0:
        cands.insert(0, (key[:m.start()], "extra"))
    for mod, role in cands:
        r = _resolve(mod, d)
        if r is not None:
            return mod, role, r
    return (cands[0][0], cands[0][1], None) if cands else None


def _is_ignored(key: str) -> bool:
    k = _strip_dot_prefixes(key) if key.startswith(_DOT_PREFIXES) else key
    return key.startswith(_IGNORED_PREFIXES) or k.startswith(_IGNORED_PREFIXES)


def _foreign(keys: list[str], all_keys: list[str]) -> tuple[str, str] | None:
    for rx, arch in _FOREIGN:
        for k in keys:
            if rx.search(k.lower() if arch != "FLUX.2" else k):
                if arch.startswith("Stable Diffusion 1") and any(
                        x.startswith(("lora_te2_", "text_encoder_2")) or "label_emb" in x or "add_embedding" in x
                        for x in all_keys):
                    arch = "SDXL (UNet)"
                return arch, k
    return None


def _examples(keys, n: int = 3) -> str:
    keys = list(keys)
    s = ", ".join(repr(k) for k in keys[:n])
    return s + (", ..." if len(keys) > n else "")


# ----------------------------------------------------------------------------- alpha from metadata

def _peft_alpha(metadata: dict | None) -> dict | None:
    """diffusers' `lora_adapter_metadata` (a LoraConfig per component) -> transformer alpha settings."""
    if not metadata or not isinstance(metadata, dict):
        return None
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if not isinstance(cfg, dict):
            return None
        get = lambda k, default=None: cfg.get(f"transformer.{k}", cfg.get(k, default))  # noqa: E731
        alpha = get("lora_alpha")
        if alpha is None:
            return None
        pattern = get("alpha_pattern") or {}
        return {"alpha": float(alpha), "pattern": {str(k): float(v) for k, v in dict(pattern).items()},
                "rslora": bool(get("use_rslora", False))}
    except (ValueError, TypeError, AttributeError):
        log.warning("LoRA metadata 'lora_adapter_metadata' is not readable; using alpha = rank")
        return None


def _pattern_alpha(peft: dict, path: str) -> float:
    for pk, v in peft["pattern"].items():
        try:
            if path == pk or re.match(rf"(.*\.)?({pk})$", path):
                return v
        except re.error:
            if path.endswith(pk):
                return v
    return peft["alpha"]


# ----------------------------------------------------------------------------- parsing

def _as_matrix(name: str, key: str, t: torch.Tensor) -> torch.Tensor:
    if not (t.is_floating_point()):
        raise QuantLoRAError(f"{name}: LoRA weight {key!r} has dtype {t.dtype}; LoRA weights must be floating point. "
                             "The file is damaged or not a LoRA.")
    if t.ndim == 4 and t.shape[2] == 1 and t.shape[3] == 1:
        t = t.reshape(t.shape[0], t.shape[1])
    if t.ndim != 2:
        raise QuantLoRAError(f"{name}: LoRA weight {key!r} has shape {tuple(t.shape)}; a Linear LoRA weight is 2-D. "
                             "The file is damaged or not a Flux LoRA.")
    if not _all_finite(t):
        raise QuantLoRAError(f"{name}: LoRA weight {key!r} contains NaN or infinite values; the training run diverged "
                             "or the file is damaged. Use an earlier checkpoint or re-download it.")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. One reduction: a NaN or an infinity makes the sum non-finite, so a
    finite sum clears the tensor (~20x faster on a CPU than isfinite().all(), which writes a boolean
    copy: 0.9 s -> 0.05 s for a rank-64 FLUX LoRA on 2 cores); a sum that overflows gets the exact check."""
    try:
        if math.isfinite(float(t.sum(dtype=torch.float32))):
            return True
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError):  # dtypes without these kernels (fp8)
        return bool(torch.isfinite(t.float()).all())


def _alpha_value(name: str, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise QuantLoRAError(f"{name}: {key!r} should be one number (the LoRA alpha) but has shape {tuple(t.shape)}. "
                             "The file is damaged.")
    try:
        v = float(t.reshape(()).float().item())
    except (RuntimeError, TypeError, ValueError):
        raise QuantLoRAError(f"{name}: {key!r} (the LoRA alpha) cannot be read as a number. The file is damaged.") from None
    if not math.isfinite(v):
        raise QuantLoRAError(f"{name}: {key!r} (the LoRA alpha) is {v}. The file is damaged; re-download it.")
    return v


def _block_error(name: str, key: str, bfl: str, idx: int, d: FluxDims) -> QuantLoRAError:
    double = bfl.startswith("double_blocks")
    n = d.depth if double else d.depth_single
    kind = "double" if double else "single"
    return QuantLoRAError(
        f"{name}: key {key!r} targets {kind} block {idx}, but this model has {n} {kind} blocks (0..{n - 1}). "
        f"The LoRA was made for a deeper Flux model (FLUX.1 dev/schnell have 19 double and 38 single blocks); "
        "pick a LoRA trained for this model."
    )


def parse_lora(state_dict: dict, name: str, dims: FluxDims, metadata: dict | None = None) -> ParsedLoRA:
    """Canonical form of a Flux LoRA state dict; raises QuantLoRAError naming `name` on anything wrong."""
    if not isinstance(state_dict, dict):
        raise QuantLoRAError(f"{name}: not a LoRA state dict (got {type(state_dict).__name__}).")
    if not state_dict:
        raise QuantLoRAError(f"{name}: the file holds no tensors. Re-download it or pick another LoRA.")
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise QuantLoRAError(f"{name}: entry {k!r} is not a named tensor; the file is not a LoRA.")

    keys = list(state_dict)
    ignored = [k for k in keys if _is_ignored(k)]
    ignored_set = set(ignored)
    rest = [k for k in keys if k not in ignored_set]

    foreign = _foreign(rest, keys)
    if foreign:
        arch, example = foreign
        raise QuantLoRAError(
            f"{name}: this LoRA looks like one for {arch}, not FLUX.1 (e.g. key {example!r}). "
            "Use it with a model of that family, or pick a FLUX.1 LoRA."
        )

    groups: dict[str, dict] = {}   # module part -> {"res", "down", "up", "alpha", "extra": [...]} (keys)
    unmatched: list[str] = []
    for k in rest:
        split = _split_key(k, dims)
        if split is None or split[2] is None:
            unmatched.append(k)
            continue
        mod, role, res = split
        g = groups.setdefault(mod, {"res": res, "extra": []})
        if role == "extra":
            g["extra"].append(k)
        elif role in g:
            # two spellings of the same part (e.g. lora_A.weight and lora_A.default.weight): keep the first
            unmatched.append(k)
        else:
            g[role] = k

    for mod, g in groups.items():
        for k in g["extra"]:
            t = state_dict[k]
            if not k.endswith((".dora_scale", ".reshape_weight")) and not _PEFT_MAGNITUDE.search(k) \
                    and t.numel() and t.is_floating_point() and not bool(torch.any(t.float() != 0)):
                ignored.append(k)  # all-zero diff / bias parts change nothing
            else:
                unmatched.append(k)
        has_down, has_up = "down" in g, "up" in g
        if has_down != has_up:
            present = g["down"] if has_down else g["up"]
            missing = "up (B)" if has_down else "down (A)"
            raise QuantLoRAError(
                f"{name}: LoRA weight {present!r} has no matching {missing} weight; the file is incomplete or damaged. "
                "Re-download or re-export it."
            )
        if not has_down:
            unmatched.extend(g[r] for r in ("alpha",) if r in g)

    _, _, shapes = _tables(dims)
    peft = _peft_alpha(metadata)
    targets: list[tuple[LoRATarget, str, str]] = []
    depth_errors: list[QuantLoRAError] = []
    for mod, g in groups.items():
        if "down" not in g:
            continue
        res: _Resolved = g["res"]
        dk, uk = g["down"], g["up"]
        down = _as_matrix(name, dk, state_dict[dk])
        up = _as_matrix(name, uk, state_dict[uk])
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise QuantLoRAError(
                f"{name}: LoRA ranks do not match on {mod!r}: down/A {dk!r} has rank {rank} ({tuple(down.shape)}) but "
                f"up/B {uk!r} has rank {up.shape[1]} ({tuple(up.shape)}). The file is damaged; re-download or re-export it."
            )
        if rank == 0:
            raise QuantLoRAError(f"{name}: LoRA weight {dk!r} has rank 0 (shape {tuple(down.shape)}); the file is damaged.")
        e = res.entry
        out_f, in_f = shapes[e.bfl]
        rows = e.rows if e.rows is not None else (out_f if out_f is not None else up.shape[0])
        bfl_tmpl = e.bfl
        if up.shape[0] != rows or (in_f is not None and down.shape[1] != in_f):
            lora_in = down.shape[1]
            raise QuantLoRAError(
                f"{name}: LoRA {mod!r} is {up.shape[0]}x{lora_in} (out x in) but this model's "
                f"{bfl_tmpl.replace('#', str(res.index))}"
                f"{f' rows {e.offset}..{e.offset + rows}' if e.rows is not None else ''} is {rows}x{in_f if in_f is not None else '?'} "
                f"(model hidden size {dims.hidden}, MLP {dims.mlp_hidden}). The LoRA was made for a different "
                "Flux model size; pick a LoRA trained for this model."
            )
        if res.index is not None:
            n = dims.depth if bfl_tmpl.startswith("double_blocks") else dims.depth_single
            if res.index >= n:
                depth_errors.append(_block_error(name, dk, bfl_tmpl, res.index, dims))
                continue
        module = bfl_tmpl.replace("#", str(res.index)) if res.index is not None else bfl_tmpl
        if "alpha" in g:
            scale = _alpha_value(name, g["alpha"], state_dict[g["alpha"]]) / rank
        elif peft is not None and res.fmt == "diffusers":
            a = _pattern_alpha(peft, res.path)
            scale = a / math.sqrt(rank) if peft["rslora"] else a / rank
        else:
            scale = 1.0
        if e.swap:
            if up.shape[0] % 2:
                raise QuantLoRAError(f"{name}: {uk!r} has an odd number of rows ({up.shape[0]}); cannot be {module}.")
            up = swap_halves(up)
        targets.append((LoRATarget(module, e.offset, rows, down, up, scale), res.fmt, dk))
    if depth_errors:
        raise depth_errors[0]

    if not targets:
        if keys and len(ignored_set) == len(keys):
            raise QuantLoRAError(
                f"{name}: holds only text-encoder LoRA weights ({len(keys)} keys, e.g. {_examples(keys)}). "
                "QuantLoRA applies LoRAs to the Flux transformer only; load this one on the CLIP/T5 model with ComfyUI's LoraLoader."
            )
        lyco = [k for k in keys if _LYCORIS.search(k)]
        hint = (" It is a LyCORIS (LoHa/LoKr/OFT) file, which QuantLoRA does not apply; use a plain LoRA export."
                if lyco else
                " Expected diffusers/PEFT (transformer.transformer_blocks.N.attn.to_q.lora_A.weight), kohya "
                "(lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight), ComfyUI/BFL "
                "(diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight), XLabs or OneTrainer names. Pick a FLUX.1 LoRA.")
        raise QuantLoRAError(
            f"{name}: none of its {len(keys)} keys matches a FLUX.1 LoRA layout (e.g. {_examples(keys)}).{hint}"
        )

    fmts = Counter(f for _, f, _ in targets)
    fmt = "+".join(f for f, _ in fmts.most_common())
    out = sorted((t for t, _, _ in targets), key=lambda t: (_natural(t.module), t.offset))
    if unmatched:
        log.warning("%s: %d of %d keys were not understood and are skipped (e.g. %s); %d LoRA targets loaded.",
                    name, len(unmatched), len(keys), _examples(unmatched), len(out))
    if ignored:
        log.info("%s: %d text-encoder or no-op keys ignored (e.g. %s).", name, len(ignored), _examples(ignored))
    return ParsedLoRA(name=name, format=fmt, targets=out, ignored=ignored, unmatched=unmatched)


def load_lora(path: str, dims: FluxDims) -> ParsedLoRA:
    """Read a LoRA safetensors file (validated, never unpickled) and parse it."""
    from ..checkpoint.safetensors_io import load_state_dict

    tensors, metadata = load_state_dict(path)
    return parse_lora(tensors, os.path.basename(path), dims, metadata=metadata)
