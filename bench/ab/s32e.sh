#!/usr/bin/env bash
# Session 32, call 5 (runs h200-full-firststep-map32e-*): restarts of the committed tree (mapped weight
# cache, the default) on another host: one cold process, then five restarts. bash bench/ab/s32e.sh
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s $(grep -o '"to_first_step_s": [0-9.]*\|"before_load_s": [0-9.]*\|"loader_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"compile_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
left() { [ $(( $(date +%s) - S )) -lt ${1:-300} ]; }
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3 4 5; do left 280 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on; done
T
