#!/usr/bin/env bash
# Session 32, call 1 (runs h200-full-firststep-map32-*): the weight cache mapped and page-locked in place
# (memory/pinned_file.py): the load copies the cached layers to the GPU straight from the page cache's
# locked pages (no pread, no staging), and the first LoRA merge takes those pages as its pristine copy
# (no 8 GiB buffer to allocate, lock and fill from the GPU). Predicted: loader -0.3 to -0.6 s, first
# merge -0.5 to -0.7 s (its capture phase to ~0), restart -0.8 to -1.3 s; from the disk no slower.
# One cold process (checkpoint and cache written), then restarts alternating QUANTLORA_MAP_CACHE=1/0,
# then one restart each from the disk (bench/evict.py). Run from the repository root: bash bench/ab/s32.sh
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s $(grep -o '"to_first_step_s": [0-9.]*\|"loader_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"capture_s": [0-9.]*\|"pristine_file_gib": [0-9.]*\|"failed": [^,]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
left() { [ $(( $(date +%s) - S )) -lt ${1:-480} ]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; df -hT /tmp | tail -1
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3; do
  left 430 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1
  left 450 && fs nomap-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=0
done
left 470 && { python3 bench/evict.py /tmp/qb; TMO=60 fs disk-map-1 QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1; }
left 520 && { python3 bench/evict.py /tmp/qb; TMO=60 fs disk-nomap-1 QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=0; }
T
