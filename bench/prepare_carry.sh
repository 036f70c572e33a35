#!/usr/bin/env bash
# Here (not on the device): the folders a device call carries. .whl: wheels the device image lacks
# (py3.12, manylinux); .devcarry/ComfyUI: ComfyUI's Python files only (4 MB), from the harness tree.
# Both are git-ignored via .git/info/exclude. Then: run(command="bash bench/device_run.sh ...",
# carry=[".whl", ".devcarry"]).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
mkdir -p .git/info
for p in /.whl/ /.devcarry/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
for pkg in diffusers==0.42.1 bitsandbytes==0.50.2 torchao==0.18.0 optimum-quanto==0.2.7; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" 2>&1 \
    | { grep -v "is ignored" || true; }
done
rm -rf .devcarry && mkdir -p .devcarry/ComfyUI
(cd .harness/ComfyUI && find comfy comfy_api comfy_execution comfy_config app utils folder_paths.py node_helpers.py \
   nodes.py latent_preview.py comfyui_version.py protocol.py \( -name "*.py" -o -name "*.json" \) -size -2M \
   | tar cf - -T -) | (cd .devcarry/ComfyUI && tar xf -)
du -sh .whl .devcarry
