#!/usr/bin/env bash
# Session 31, call 1 (runs h200-full-firststep-wcache31-*): the loader's weight cache
# (quant/weight_cache.py). One cold process with the cache on (writes the checkpoint, compiles, writes
# the cache), a `sync`, then restarts alternating the cache on (reads 11 GiB of fp8 instead of 22 GiB of
# bf16, no quantization) and off (the load as before), in one machine.
# Run from the repository root: bash bench/ab/s31.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"before_load_s": [0-9.]*\|"cached_s": [0-9.]*\|"to_device_s": [0-9.]*\|"weights_equal": [a-z]*\|"read": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync; ls -la /tmp/qb/wcache; df -h /tmp | tail -1
for i in 1 2 3 4; do fs on-$i QUANTLORA_BENCH_WEIGHT_CACHE=on; fs off-$i QUANTLORA_BENCH_WEIGHT_CACHE=off; done
