#!/usr/bin/env bash
# Session 31, call 5 (runs h200-full-firststep-bias31-*): the weight cache also holds the quantized
# layers' biases (a load from the disk no longer seeks through the 22 GiB checkpoint for 304 small
# tensors: call 3's cached load spent 8.8-9.5 s outside its reads against 5.2-5.3 s without the cache).
# One cold process, a restart, then restarts from the disk (bench/evict.py) with the cache on and off.
# Run from the repository root: bash bench/ab/s31e.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"loader_s": [0-9.]*\|"other_s": [0-9.]*\|"bias_equal": [a-z]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=200 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
fs on-1 QUANTLORA_BENCH_WEIGHT_CACHE=on
python3 bench/evict.py /tmp/qb; TMO=90 fs disk-on-1 QUANTLORA_BENCH_WEIGHT_CACHE=on
python3 bench/evict.py /tmp/qb; TMO=90 fs disk-off-1 QUANTLORA_BENCH_WEIGHT_CACHE=off
fs on-2 QUANTLORA_BENCH_WEIGHT_CACHE=on
