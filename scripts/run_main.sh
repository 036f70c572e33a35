#!/usr/bin/env bash
# The main job: set-up (idempotent), a real ComfyUI server with this pack, then the example workflow
# example_workflows/flux-nf4-lora (QuantizedFluxLoader NF4 + one LoRA) run headless through the pack's
# client on the built-in demo models (random weights); prints the UI address and the saved image's
# path, then the server keeps serving until Ctrl-C. Options (see --help): --models DIR (your models
# folder), --exit (stop after the image), --port, --listen, --quantization, --prompt, --steps, --size,
# --seed, --base DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTLORA_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m tools.main_job "$@"
