"""Packs downloaded wheels (.whl/) into one xz archive laid out as `pip --target` would (no scripts
needed on the device), for bench/prepare_carry.sh. Pruned on packing: comfy-kitchen's ROCm backend,
bitsandbytes' libraries other than CUDA 13.0's and the CPU one.

    python bench/carry_pack.py bench/carry-wheels.txt .devcarry/site.tar.xz
    python bench/carry_pack.py bench/carry-server-wheels.txt .devcarry/server.tar.xz --under site \\
        --tree .harness/ComfyUI=ComfyUI     # the server call: its wheels under site/, the whole tree
"""
import argparse
import os
import re
import shutil
import tarfile
import tempfile
import zipfile

PRUNE = (r"comfy_kitchen/backends/hip/", r"bitsandbytes/libbitsandbytes_(?!cuda130\.so$|cpu\.so$)")
TREE_TOP_SKIP = {".git", ".github", "tests", "tests-unit", "custom_nodes", "models", "output", "input", "user", "temp"}


def norm(s: str) -> str:
    return re.sub(r"[-_.]+", "_", s).lower()


def unpack(wheel: str, stage: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            n = info.filename
            if any(re.match(p, n) for p in PRUNE):
                continue
            m = re.match(r"[^/]+\.data/(purelib|platlib)/(.*)", n)
            if m:
                n = m.group(2)
            elif re.match(r"[^/]+\.data/", n):
                continue
            if n.endswith("/"):
                continue
            dest = os.path.join(stage, n)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)


def tree_filter(ti, arc):
    """No bytecode anywhere; none of the tree's own tests, VCS or user folders at its top."""
    parts = ti.name.split("/")
    if "__pycache__" in parts or (len(parts) > 1 and parts[0] == arc and parts[1] in TREE_TOP_SKIP):
        return None
    return ti


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("wheel_list")
    ap.add_argument("out")
    ap.add_argument("--under", default="", help="folder of the archive the wheels go to")
    ap.add_argument("--tree", action="append", default=[], help="SRC=ARCNAME: a source tree to add (no caches, tests)")
    args = ap.parse_args()
    want = [ln.strip() for ln in open(args.wheel_list) if ln.strip() and not ln.startswith("#")]
    wheels = {}
    for f in sorted(os.listdir(".whl")):
        if f.endswith(".whl"):
            name, ver = f.split("-")[:2]
            wheels[(norm(name), ver)] = f
    stage = tempfile.mkdtemp()
    for pkg in want:
        name, ver = pkg.split("==")
        unpack(os.path.join(".whl", wheels[(norm(name), ver)]), os.path.join(stage, args.under))  # KeyError: not downloaded
    tmp = args.out + ".part"
    with tarfile.open(tmp, "w:xz", preset=6) as t:
        for e in sorted(os.listdir(stage)):
            t.add(os.path.join(stage, e), arcname=e)
        for spec in args.tree:
            src, arc = spec.split("=", 1)
            t.add(src, arcname=arc, filter=lambda ti, arc=arc: tree_filter(ti, arc))
    os.replace(tmp, args.out)
    shutil.rmtree(stage)
    print(f"{os.path.basename(args.out)}: {os.path.getsize(args.out) / 2**20:.1f} MiB, {len(want)} distributions"
          + (f", trees {', '.join(s.split('=')[1] for s in args.tree)}" if args.tree else ""))


if __name__ == "__main__":
    main()
