#!/usr/bin/env bash
# Session 30, call 4 (runs h200-full-firststep-ahead30-new-*/-old-*): restarts alternating in one machine
# between this tree ("new": checkpoint/direct_read.py reads the next weight ahead, staging buffers made
# once at full size) and "old" (checkpoint/direct_read.py of d8a9dbb: no read-ahead, buffers grown as
# weights grow). The load's row has read_ahead_hits/misses; weights_equal checks the loaded weights
# against the file's quantized again. Run from the repository root: bash bench/ab/s30c.sh
O=$OUT; R=/tmp/res; mkdir -p $R /tmp/ab
T() { (cd $R && tar cf $O/res.tar .); }
cp checkpoint/direct_read.py /tmp/ab/dr_new.py
# (a copy of that file was carried untracked as bench/ab/direct_read_old.py, in case the device copy of
# .git lacked the commit)
git show d8a9dbb:checkpoint/direct_read.py > /tmp/ab/dr_old.py 2>/dev/null || cp bench/ab/direct_read_old.py /tmp/ab/dr_old.py || exit 1
use() { cp /tmp/ab/dr_$1.py checkpoint/direct_read.py; python3 -m compileall -q checkpoint >/dev/null; }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"read_ahead_hits": [0-9]*\|"read_ahead_misses": [0-9]*\|"read_s": [0-9.]*\|"weights_equal": [a-z]*\|"bias_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
use new; TMO=170 fs cold-new; sync
for i in 1 2 3 4; do use new; fs new-$i; use old; fs old-$i; done
use new
