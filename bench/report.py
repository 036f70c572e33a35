"""Merge the device runs under bench/raw/ into bench/results.json and the tables of BENCHMARKS.md.

Each raw file is one process on the device; its ratios are to the bf16 eager step measured in
that same process. Rows keep the run they came from (`run`), so a ratio is never mixed with
another run's baseline.   python bench/report.py
"""
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- tables:begin (bench/report.py) -->", "<!-- tables:end -->"
COLS = ["variant", "step_s", "step_ratio", "weights_gib", "weights_ratio", "peak_vram_gib", "load_s", "rel_err",
        "compile_s", "swap_s", "recompiles", "slot_gib", "lora_mib", "step_ratio_vs_no_offload", "peak_ratio_vs_no_offload",
        "to_first_step_s", "ready_s", "done_s", "before_load_s", "bytecode_cached", "tflops", "kernel_ms", "calls", "share", "ok", "detail",
        # comfy_peers.py (copy only its merged results-peers.json into raw/)
        "bare_forward_s", "load_to_first_step_s", "switch_s_median", "step_lora_s", "used_max_gib", "equal",
        "max_abs_diff", "gap_idle_ms_per_step", "gap_idle_after_sync_ms_per_step", "sync_calls_per_step",
        "scalar_reads_per_step",
        # bench_flux.py --sections merge (LoRA merge mode)
        "swap_r16_s", "swap_r128_s", "swap_gpu_copy_s", "first_merge_s", "step_overhead", "lora_effect_err",
        "rel_err_after_swaps", "bare_bit_exact", "merged_equals_load_path", "pristine_host_gib", "fused_kernels",
        "swap_eager_s", "swap_gpu_copy_eager_s", "kernel_check", "step_lora_ratio",
        # bench_offload.py cards
        "card_gib", "budget_gib", "resident_share", "streamed_gib_per_step", "floor_ratio", "vs_floor",
        "predicted_ratio", "within_card", "equal_to_no_offload", "gb_s",
        "error", "skipped"]


def load_runs():
    runs = []
    for path in sorted(glob.glob(os.path.join(HERE, "raw", "*.json"))):
        with open(path) as f:
            d = json.load(f)
        d["run"] = os.path.splitext(os.path.basename(path))[0]
        runs.append(d)
    return runs


def table(rows):
    cols = [c for c in COLS if any(c in r for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main():
    runs = load_runs()
    rows = [dict(r, run=run["run"], size=run.get("size", "full")) for run in runs for r in run["rows"]]
    devices = sorted({run["device"] for run in runs})
    result = {"device": ", ".join(devices), "date": max(run["date"] for run in runs),
              "torch": sorted({run.get("torch", "") for run in runs}), "rows": rows}
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    parts = [BEGIN]
    for run in runs:
        parts.append(f"\n### `{run['run']}` ({run['device']}, torch {run.get('torch', '?')}, {run['date']}, size {run.get('size', 'full')})\n")
        parts.append(table(run["rows"]))
    parts.append("\n" + END)
    md_path = os.path.join(ROOT, "BENCHMARKS.md")
    md = open(md_path).read() if os.path.exists(md_path) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    md = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: "\n".join(parts), md, flags=re.S)
    with open(md_path, "w") as f:
        f.write(md)
    print(f"{len(rows)} rows from {len(runs)} runs -> bench/results.json, BENCHMARKS.md")


if __name__ == "__main__":
    main()
