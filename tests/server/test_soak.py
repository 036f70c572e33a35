"""Layer 3 soak, short enough for CI on a CPU: 200 prompts through the real server, queued at once.

The prompts cycle through eight settings on one loaded demo model (max_rank 16 slots): no LoRA,
three LoRAs (BFL rank 8, kohya rank 4, BFL rank 4 on attention only) at several strengths, and
two chained. Consecutive prompts always differ, so every prompt really samples (1 step, 128x128
pixels = a 16x16 latent, SaveLatent, no decode). Checked:

- every output equals, bit for bit, the output of the same setting computed once on a fresh
  load (a copy of the model file per setting, loaded and sampled once, before the queue);
- the server's resident memory (VmRSS of server.proc.pid) after the queue is at most RSS_BOUND
  (5%) above what it was once the first 10 prompts were done (all eight settings seen by then);
- the pack's long-lived state stays bounded (GET /quantlora/stats): the LoRA cache holds at most
  its capacity and parses no file again, no model is left with an active LoRA set once idle, the
  reference models dropped by ComfyUI's cache leave no hot-swap state behind, and slots are
  written at most once per prompt.

A compile-enabled soak (lora_max_rank set, compile=regional, swaps never recompiling) needs a
GPU: bench/bench_flux.py's lora/compile sections have the GPU figures.
"""
import os
import time

import pytest
import torch
from safetensors.torch import load as load_safetensors

from graphs import loader, txt2img
from harness.server import execution_error, fresh_names
from quantlora.tools.demo_models import DEMO_FLUX, write_demo_lora

pytestmark = pytest.mark.server

N_PROMPTS = 200
WARM = 10
RSS_BOUND = 0.05
MAX_RANK = 16
A, B, C = "soak-a.safetensors", "soak-b.safetensors", "soak-c.safetensors"
SETTINGS = [[], [(A, 1.0)], [(B, 0.5)], [(C, 1.0)], [(A, 0.3)], [(B, -0.7)], [(A, 1.0), (C, 0.5)], [(C, -0.4)]]


@pytest.fixture(scope="module")
def soak_models(server):
    root = os.path.join(server.base, "models")
    flux = os.path.join(root, "diffusion_models", DEMO_FLUX)
    loras = os.path.join(root, "loras")
    write_demo_lora(os.path.join(loras, A), flux, rank=8, seed=101, fmt="bfl")
    write_demo_lora(os.path.join(loras, B), flux, rank=4, seed=102, fmt="kohya")
    write_demo_lora(os.path.join(loras, C), flux, rank=4, seed=103, fmt="bfl", modules=(".qkv", ".proj", ".linear1"))
    return fresh_names(flux, "soak-fresh", len(SETTINGS))


def graph(model_name, loras, seed, prefix):
    g = loader(model_name)
    g["model"]["inputs"]["lora_max_rank"] = MAX_RANK
    last = "model"
    for i, (name, strength) in enumerate(loras):
        g[f"lora{i}"] = {"class_type": "LoRAHotswap", "inputs": {"model": [last, 0], "lora_name": name,
                                                                 "strength": strength, "max_rank": MAX_RANK,
                                                                 "targets": "blocks"}}
        last = f"lora{i}"
    g = txt2img(g, seed=seed, steps=1, size=128, decode=False)
    g["sample"]["inputs"]["model"] = [last, 0]
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    return g


def latent(server, entry):
    assert execution_error(entry) is None, execution_error(entry)
    return load_safetensors(server.view(entry["outputs"]["save"]["latents"][0]))["latent_tensor"]


def rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_soak_200_prompts(server, soak_models):
    t0 = time.perf_counter()
    seed = lambda s: 9000 + s  # noqa: E731  one seed per setting: a setting's outputs are all equal
    want = [latent(server, server.run(graph(soak_models[s], SETTINGS[s], seed(s), f"soak-ref-{s}")))
            for s in range(len(SETTINGS))]
    assert len({w.numpy().tobytes() for w in want}) == len(SETTINGS)  # every setting gives another latent
    stats0 = server.get("/quantlora/stats")
    t_ref = time.perf_counter() - t0

    ids = [server.queue(graph(DEMO_FLUX, SETTINGS[i % len(SETTINGS)], seed(i % len(SETTINGS)), f"soak-{i}"))
           for i in range(N_PROMPTS)]
    entries = []
    for i, pid in enumerate(ids):
        entries.append(server.wait(pid, timeout=300))
        if i == WARM - 1:
            rss_warm, stats_warm = rss(server), server.get("/quantlora/stats")
    t_soak = time.perf_counter() - t0 - t_ref

    mismatched = [i for i, e in enumerate(entries) if not torch.equal(latent(server, e), want[i % len(SETTINGS)])]
    assert not mismatched, f"{len(mismatched)} outputs differ from a fresh load, e.g. prompts {mismatched[:10]}"

    deadline = time.time() + 20  # ComfyUI collects garbage at most every 10 s after a prompt
    while True:
        stats = server.get("/quantlora/stats")
        if stats["hotswap"]["models"] <= 1 or time.time() > deadline:
            break
        time.sleep(1)
    rss_end = rss(server)
    growth = (rss_end - rss_warm) / rss_warm
    print(f"\nsoak: references {t_ref:.1f} s, {N_PROMPTS} prompts {t_soak:.1f} s "
          f"({1000 * t_soak / N_PROMPTS:.0f} ms each); VmRSS after {WARM}: {rss_warm / 2 ** 20:.1f} MiB, "
          f"after {N_PROMPTS}: {rss_end / 2 ** 20:.1f} MiB ({100 * growth:+.2f}%); stats {stats0} -> {stats_warm} -> {stats}")
    assert growth <= RSS_BOUND, f"resident memory grew {100 * growth:.1f}% over {N_PROMPTS - WARM} prompts"

    cache = stats["lora_cache"]
    assert cache["entries"] <= cache["capacity"]
    assert cache["parses"] == stats0["lora_cache"]["parses"]  # the three files were parsed for the references only
    assert stats["hotswap"]["active"] == 0  # idle: no adapter left switched on
    # the eight reference models, dropped from ComfyUI's cache, left no hot-swap state behind:
    # the soak's own model is the only one with slots
    assert stats["hotswap"]["models"] == 1
    assert stats["hotswap"]["swaps"] - stats_warm["hotswap"]["swaps"] <= N_PROMPTS - WARM
