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
# The server call (bench/server_restart.py) carries .devcarry/server.tar.xz instead of .devcarry/ComfyUI:
# the whole ComfyUI tree and what its server imports at start (bench/carry-server-wheels.txt).
if [ -f .devcarry/server.tar.xz ]; then
  if [ ! -f /tmp/srv/.unpacked ]; then
    rm -rf /tmp/srv && mkdir -p /tmp/srv
    python3 -c "import tarfile; tarfile.open('.devcarry/server.tar.xz').extractall('/tmp/srv', filter='fully_trusted')" || exit 1
    touch /tmp/srv/.unpacked
  fi
  export PYTHONPATH=/tmp/site:/tmp/srv/site QUANTLORA_COMFYUI=/tmp/srv/ComfyUI
fi
# Bytecode, once per machine, for the carried trees, the pack and the device image's own packages
# (torch, triton, sympy, networkx, numpy...): a user's ComfyUI imports from cached bytecode after its
# first start (pip writes it on install, Python on first import), so a restart figure must too. The
# image sets PYTHONDONTWRITEBYTECODE=1 and ships none: without this every process compiled ~2,900
# modules from source (bench_flux's `bytecode_missing`), ~7 s of each restart measured before
# 2026-12-02. compileall writes the files whatever that variable says.
# The carried ComfyUI tree and the pack arrive anew with every call (a warm machine keeps /tmp/site but
# not their bytecode: session 31's last restarts compiled 245 ComfyUI modules each), so they are
# compiled on every call (compileall skips what is up to date); the packages once per machine.
tb=$(date +%s)
if [ ! -f /tmp/site/.bytecode ]; then
  image_site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  python3 -m compileall -q -j 0 /tmp/site $( [ -d /tmp/srv/site ] && echo /tmp/srv/site ) "$image_site" >/dev/null 2>&1 || true
  touch /tmp/site/.bytecode
fi
python3 -m compileall -q -j 0 "$QUANTLORA_COMFYUI" . >/dev/null 2>&1 || true
echo "[device_run] bytecode written in $(( $(date +%s) - tb )) s"
echo "[device_run] packages ready in $(( $(date +%s) - t0 )) s; $(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null)"
script="$1"; shift
logf=/dev/null
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && logf="$OUT/${script%.py}.log"
python3 "bench/$script" "$@" 2>&1 | tee "$logf" | grep --line-buffered -v -iE "warn|deprecat|Configuration class|torchao. Tensor"
exit "${PIPESTATUS[0]}"
