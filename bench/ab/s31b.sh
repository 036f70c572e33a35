#!/usr/bin/env bash
# Session 31, call 2 (runs h200-full-firststep-chunk31-*): call 1 showed both loads bound by their page-cache
# reads (~10 GB/s with 8 threads): a weight is read in 16 MiB pieces, so a 19-75 MB weight keeps only 2-5
# of the 8 readers busy. Restarts alternating the read piece (QUANTLORA_READ_CHUNK_MIB 16, the default,
# and 4) with the weight cache on and off, after one cold process that writes the checkpoint and the cache.
# Run from the repository root: bash bench/ab/s31b.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"loader_s": [0-9.]*\|"before_load_s": [0-9.]*\|"cached_s": [0-9.]*\|"read_ahead_wait_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3; do
  fs on4-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_READ_CHUNK_MIB=4
  fs off16-$i QUANTLORA_BENCH_WEIGHT_CACHE=off QUANTLORA_READ_CHUNK_MIB=16
  fs on16-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_READ_CHUNK_MIB=16
  fs off4-$i QUANTLORA_BENCH_WEIGHT_CACHE=off QUANTLORA_READ_CHUNK_MIB=4
done
