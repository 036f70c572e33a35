"""Why did every AOTInductor package die at load on the GPU (session 35, bench/aoti_probe.py: SIGSEGV in
torch's _load_aoti, even in the process that built it)? A tiny model (two Linears) is exported, compiled
ahead of time and loaded in a fresh process per environment, each one step closer to the probe's:
  plain      the device image's Python alone (no carried packages)
  carried    + PYTHONPATH=/tmp/site (bench/device_run.sh's carried wheels: torchao, ...)
  comfy      + ComfyUI's modules imported first (comfy.model_management, comfy.ops: comfy_kitchen, aimdo)
  cpu        the carried environment, the model on the CPU
Each row: the exit status (negative: killed by that signal), how far it got, the shared libraries the
package's .so needs (ldd) and the compiler inductor used.

    python3 bench/aoti_load_check.py --out $OUT/aoti-load    # on the device, after device_run.sh unpacked
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

CHILD = r'''
import faulthandler, os, sys, time, glob, zipfile, subprocess
faulthandler.enable()
dev = sys.argv[1]; pkg = sys.argv[2]; comfy = sys.argv[3] == "1"
def say(s): print("STAGE " + s, flush=True)
import torch
say(f"torch {torch.__version__} cuda {torch.version.cuda}")
if comfy:
    sys.path.insert(0, os.environ["QUANTLORA_COMFYUI"])
    import comfy.model_management, comfy.ops  # noqa
    say("comfy imported")
m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(dev).eval()
x = torch.randn(8, 64, device=dev)
with torch.inference_mode():
    ref = m(x)
    ep = torch.export.export(m, (x,))
    say("exported")
    t = time.time()
    torch._inductor.aoti_compile_and_package(ep, package_path=pkg)
    say(f"packaged in {time.time() - t:.1f} s")
    z = zipfile.ZipFile(pkg)
    sos = [n for n in z.namelist() if n.endswith(".so")]
    d = pkg + ".x"; z.extractall(d)
    for n in sos:
        out = subprocess.run(["ldd", os.path.join(d, n)], capture_output=True, text=True).stdout
        say("ldd " + n + ": " + " | ".join(l.strip() for l in out.splitlines()))
        try:  # what the wrapper needs and which compiler built it (a static libstdc++ would not show in ldd)
            dyn = subprocess.run(["readelf", "-d", os.path.join(d, n)], capture_output=True, text=True).stdout
            say("readelf NEEDED/RPATH: " + " | ".join(l.split()[-1] for l in dyn.splitlines() if "NEEDED" in l or "RPATH" in l or "RUNPATH" in l))
            com = subprocess.run(["readelf", "-p", ".comment", os.path.join(d, n)], capture_output=True, text=True).stdout
            say("readelf .comment: " + " | ".join(l.strip() for l in com.splitlines() if "]" in l)[:300])
        except OSError as e:
            say(f"readelf: {e}")
    from torch._inductor import config
    cxx = os.environ.get("CXX") or [c for c in (config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)) if c][-1]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split(chr(10))[0]
    except OSError as e:
        version = str(e)
    say(f"cpp compiler {cxx}: {version}")
    r = torch._inductor.aoti_load_package(pkg)
    say("loaded")
    y = r(x)
    if dev == "cuda": torch.cuda.synchronize()
    say(f"called: max diff {float((y - ref).abs().max()):.2e}")
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workdir", default="/tmp/aoti-load")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--gdb", action="store_true", help="run each child under gdb (where the image has it): "
                    "the C++ backtrace of a crash goes into the row's stderr_tail")
    ap.add_argument("--cxx", default="", help="the C++ compiler inductor uses (its CXX variable), e.g. /usr/bin/g++")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    carried = dict(base, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    variants = [("plain", "cuda", base, "0"), ("carried", "cuda", carried, "0"), ("comfy", "cuda", carried, "1"),
                ("cpu", "cpu", carried, "0")]
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    if args.cxx:
        variants = [(f"{n} CXX={args.cxx}", d, dict(e, CXX=args.cxx), c) for n, d, e, c in variants]
    rows = []
    for name, dev, env, comfy in variants:
        t = time.time()
        pkg = os.path.join(args.workdir, f"tiny-{name.split()[0]}.pt2")
        try:
            cmd = [sys.executable, "-c", CHILD, dev, pkg, comfy]
            if args.gdb and shutil.which("gdb"):
                cmd = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args"] + cmd
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
            rc, out, err = p.returncode, p.stdout, p.stderr
            if args.gdb:  # gdb exits 0 after a crash: the backtrace says what happened
                err = (err + out[-4000:]) if "SIGSEGV" in out else err
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
        stages = [ln[6:] for ln in out.splitlines() if ln.startswith("STAGE ")]
        row = dict(variant=f"aoti load check: {name}", rc=rc, seconds=round(time.time() - t, 1), stages=stages,
                   stderr_tail=err[-2500:] if rc != 0 else "")
        rows.append(row)
        print(json.dumps(row)[:3000], flush=True)
        with open(os.path.join(args.out, "results-aoti-load.json"), "w") as f:
            json.dump({"device": os.environ.get("QUANTLORA_BENCH_DEVICE_NAME", ""),
                       "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
