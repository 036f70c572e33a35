#!/usr/bin/env bash
# On the device machine: install the carried wheels, then run one benchmark, e.g.
#   bash bench/device_run.sh bench_flux.py --size full --sections base --out $OUT/base
#   bash bench/device_run.sh bench_offload.py --size full --out $OUT/offload
# Rows are written as they are measured ($OUT/.../results-*.json); copy them to bench/raw/ here and
# run bench/report.py.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site QUANTLORA_COMFYUI="$PWD/.devcarry/ComfyUI" PYTHONUNBUFFERED=1
script="$1"; shift
python3 "bench/$script" "$@" 2>&1 | grep -v -iE "warn|deprecat|Configuration class|torchao. Tensor"
exit "${PIPESTATUS[0]}"
