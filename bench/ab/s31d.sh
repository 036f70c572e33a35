#!/usr/bin/env bash
# Session 31, call 4 (runs h200-full-firststep-final31-*): the tree as committed (reads in 4 MiB pieces,
# Triton's cache key hashed in the background), restarts alternating the weight cache on and off.
# Run from the repository root: bash bench/ab/s31d.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"loader_s": [0-9.]*\|"before_load_s": [0-9.]*\|"queue_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3; do fs on-$i QUANTLORA_BENCH_WEIGHT_CACHE=on; fs off-$i QUANTLORA_BENCH_WEIGHT_CACHE=off; done
