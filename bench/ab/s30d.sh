#!/usr/bin/env bash
# Session 30, call 5 (runs h200-full-firststep-threads30-8-*/-16-*): with the read-ahead, the main thread
# still waits 0.8-0.9 s for reads; restarts alternating QUANTLORA_READ_THREADS=8 (the default) and 16
# (the device has 16 cores). Run from the repository root: bash bench/ab/s30d.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"read_ahead_wait_s": [0-9.]*\|"to_device_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
TMO=170 fs cold; sync
for i in 1 2 3; do fs 8-$i QUANTLORA_READ_THREADS=8; fs 16-$i QUANTLORA_READ_THREADS=16; done
