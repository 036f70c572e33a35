#!/usr/bin/env bash
# On the device machine: unpack the carried packages (.devcarry/site.tar.xz, from bench/prepare_carry.sh)
# to /tmp/site, point the scripts at the carried ComfyUI tree, then run one benchmark, e.g.
#   bash bench/device_run.sh comfy_peers.py --out $OUT/peers
#   bash bench/device_run.sh bench_flux.py --size full --sections base --out $OUT/base
#   bash bench/device_run.sh bench_offload.py --size full --out $OUT/offload
# Rows are written as they are measured ($OUT/.../results-*.json); copy them to bench/raw/ here and
# run bench/report.py. The whole log also goes to $OUT/<script>.log when $OUT is set.
t0=$(date +%s)
if [ -f /tmp/site/.unpacked ]; then
  :  # an earlier script of the same call unpacked it
elif [ -f .devcarry/site.tar.xz ]; then
  mkdir -p /tmp/site
  python3 -c "import tarfile; tarfile.open('.devcarry/site.tar.xz').extractall('/tmp/site', filter='fully_trusted')" || exit 1
  touch /tmp/site/.unpacked
elif ls .whl/*.whl >/dev/null 2>&1; then  # older carries: plain wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site QUANTLORA_COMFYUI="$PWD/.devcarry/ComfyUI" PYTHONUNBUFFERED=1
# Bytecode for the carried trees and the pack, once per machine: the carry holds sources only, and a
# user's ComfyUI imports from cached bytecode after its first start, so a restart figure must too.
if [ ! -f /tmp/site/.bytecode ]; then
  python3 -m compileall -q -j 0 /tmp/site .devcarry/ComfyUI . >/dev/null 2>&1 || true
  touch /tmp/site/.bytecode
fi
echo "[device_run] packages ready in $(( $(date +%s) - t0 )) s; $(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null)"
script="$1"; shift
logf=/dev/null
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && logf="$OUT/${script%.py}.log"
python3 "bench/$script" "$@" 2>&1 | tee "$logf" | grep --line-buffered -v -iE "warn|deprecat|Configuration class|torchao. Tensor"
exit "${PIPESTATUS[0]}"
