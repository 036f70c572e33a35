#!/usr/bin/env bash
# Session 31, call 3 (runs h200-full-firststep-warm31-*, -disk31-*): (1) restarts alternating the
# background hashing of Triton's cache key during the load (speed/warmup.py, QUANTLORA_WARMUP=1/0), the
# weight cache on; (2) restarts with the checkpoint and the weight cache dropped from the page cache first
# (bench/evict.py), weight cache on and off: what the cache saves where the weights come from the disk.
# Run from the repository root: bash bench/ab/s31c.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"loader_s": [0-9.]*\|"before_load_s": [0-9.]*\|"queue_s": [0-9.]*\|"triton_key_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3; do fs w1-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_WARMUP=1; fs w0-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_WARMUP=0; done
for i in 1 2; do
  python3 bench/evict.py /tmp/qb; TMO=120 fs disk-on-$i QUANTLORA_BENCH_WEIGHT_CACHE=on
  python3 bench/evict.py /tmp/qb; TMO=150 fs disk-off-$i QUANTLORA_BENCH_WEIGHT_CACHE=off
done
