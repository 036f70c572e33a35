#!/usr/bin/env bash
# Session 32, call 2 (runs h200-full-firststep-map32b-*): the mapped weight cache on a second host
# (restarts alternating QUANTLORA_MAP_CACHE=1/0), the file copy's release on the GPU (bench_flux's
# `file_copy_release`: pages unlocked, then a merge from a copy taken off the GPU, weights bit-exact),
# and one restart with the host profile (QUANTLORA_BENCH_CPROFILE=1): where the load's remaining
# "other" second and the first step's go. Run from the repository root: bash bench/ab/s32b.sh
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s $(grep -o '"to_first_step_s": [0-9.]*\|"before_load_s": [0-9.]*\|"loader_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"compile_s": [0-9.]*\|"pristine_file_gib": [0-9.]*\|"failed": [^,]*\|"weights_equal[a-z_]*": [a-z]*\|"unlock_s": [0-9.]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
left() { [ $(( $(date +%s) - S )) -lt ${1:-480} ]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2; do
  left 430 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1
  left 450 && fs nomap-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=0
done
for i in 3 4; do left 480 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1; done
left 500 && fs prof QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1 QUANTLORA_BENCH_CPROFILE=1
T
