#!/usr/bin/env bash
# Here (not on the device): the one folder a device call carries, .devcarry (git-ignored via
# .git/info/exclude), about 35 MB of the 64 MiB a call may carry:
#   .devcarry/site.tar.xz  the wheels of bench/carry-wheels.txt (what the device image lacks), unpacked
#                          and pruned (comfy-kitchen without backends/hip, bitsandbytes with only its
#                          CUDA 13.0 and CPU libraries), xz-compressed: comfy-kitchen's CUDA backend is
#                          48 MB as a wheel, 22 MB this way. device_run.sh unpacks it to /tmp/site.
#   .devcarry/ComfyUI      the harness tree's (v0.33) Python and JSON files, about 5 MB.
# .whl keeps the downloaded wheels (a cache; not carried). Then:
#   run(command="bash bench/device_run.sh comfy_peers.py --out $OUT/peers", carry=[".devcarry"])
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p .git/info .whl .devcarry
for p in /.whl/ /.devcarry/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
grep -vE '^\s*(#|$)' bench/carry-wheels.txt | while read -r pkg; do
  name="$(echo "${pkg%%==*}" | tr '-' '_')"; ver="${pkg##*==}"
  ls .whl/ 2>/dev/null | grep -qi "^${name}-${ver}-" && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" 2>&1 \
    | { grep -v "is ignored" || true; }
done
# One archive of every carried wheel, unpacked as pip --target would lay it out (no scripts needed).
if [ ! -f .devcarry/site.tar.xz ] || [ -n "$(find .whl bench/carry-wheels.txt bench/prepare_carry.sh -newer .devcarry/site.tar.xz -print -quit)" ]; then
  "$PY" - <<'EOF'
import lzma, os, re, shutil, tarfile, tempfile, zipfile

want = [l.strip() for l in open("bench/carry-wheels.txt") if l.strip() and not l.startswith("#")]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = {}
for f in sorted(os.listdir(".whl")):
    if f.endswith(".whl"):
        name, ver = f.split("-")[:2]
        wheels[(norm(name), ver)] = f
stage = tempfile.mkdtemp()
for pkg in want:
    name, ver = pkg.split("==")
    f = wheels[(norm(name), ver)]  # KeyError: the download above failed
    with zipfile.ZipFile(os.path.join(".whl", f)) as z:
        for info in z.infolist():
            n = info.filename
            if n.startswith("comfy_kitchen/backends/hip/"):
                continue
            if re.match(r"bitsandbytes/libbitsandbytes_(?!cuda130\.so$|cpu\.so$)", n):
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
tmp = ".devcarry/site.tar.xz.part"
with tarfile.open(tmp, "w:xz", preset=6) as t:
    for e in sorted(os.listdir(stage)):
        t.add(os.path.join(stage, e), arcname=e)
os.replace(tmp, ".devcarry/site.tar.xz")
shutil.rmtree(stage)
print(f"site.tar.xz: {os.path.getsize('.devcarry/site.tar.xz') / 2**20:.1f} MiB, {len(want)} distributions")
EOF
fi
rm -rf .devcarry/ComfyUI && mkdir -p .devcarry/ComfyUI
(cd .harness/ComfyUI && find comfy comfy_api comfy_execution comfy_config comfy_extras app utils folder_paths.py \
   node_helpers.py nodes.py latent_preview.py comfyui_version.py protocol.py cuda_malloc.py \
   \( -name "*.py" -o -name "*.json" \) -size -2M | tar cf - -T -) | (cd .devcarry/ComfyUI && tar xf -)
du -sh .devcarry/* .devcarry
