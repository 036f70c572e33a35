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
# --server: also .devcarry/server.tar.xz (bench/carry-server-wheels.txt and the whole ComfyUI tree) for
# bench/server_restart.py; carry it with the site archive alone (the tree is in it):
#   carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"]
lists=bench/carry-wheels.txt
[ "${1:-}" = "--server" ] && lists="$lists bench/carry-server-wheels.txt"
cat $lists | grep -vE '^\s*(#|$)' | while read -r pkg; do
  name="$(echo "${pkg%%==*}" | tr '-' '_')"; ver="${pkg##*==}"
  ls .whl/ 2>/dev/null | grep -qi "^${name}-${ver}-" && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" 2>&1 \
    | { grep -v "is ignored" || true; }
done
# One archive of every carried wheel, unpacked as pip --target would lay it out (no scripts needed).
if [ ! -f .devcarry/site.tar.xz ] || [ -n "$(find .whl bench/carry-wheels.txt bench/carry_pack.py -newer .devcarry/site.tar.xz -print -quit)" ]; then
  "$PY" bench/carry_pack.py bench/carry-wheels.txt .devcarry/site.tar.xz
fi
if [ "${1:-}" = "--server" ]; then
  "$PY" bench/carry_pack.py bench/carry-server-wheels.txt .devcarry/server.tar.xz --under site --tree .harness/ComfyUI=ComfyUI
fi
rm -rf .devcarry/ComfyUI && mkdir -p .devcarry/ComfyUI
(cd .harness/ComfyUI && find comfy comfy_api comfy_execution comfy_config comfy_extras app utils folder_paths.py \
   node_helpers.py nodes.py latent_preview.py comfyui_version.py protocol.py cuda_malloc.py \
   \( -name "*.py" -o -name "*.json" \) -size -2M | tar cf - -T -) | (cd .devcarry/ComfyUI && tar xf -)
du -sh .devcarry/* .devcarry
