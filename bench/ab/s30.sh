#!/usr/bin/env bash
# Session 30, one device call (runs h200-full-firststep-bias30-*, h200-comfy-peers-dynon30-1):
# (1) the load with the bias through page-locked staging (the working tree's, carried) against
# the plain bias copy (quant/loader.py at b275db4), restarts alternating in one machine; (2) the fastest
# path with dynamic VRAM on. Run from the repository root: bash bench/ab/s30.sh
O=$OUT; R=/tmp/res; mkdir -p $R
T() { (cd $R && tar cf $O/res.tar .); }
cp quant/loader.py /tmp/loader_pinned.py; git show b275db4:quant/loader.py > /tmp/loader_plain.py || exit 1
use() { cp "$1" quant/loader.py; python3 -m compileall -q quant/loader.py >/dev/null; }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"bias_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
use /tmp/loader_pinned.py; TMO=170 fs cold-P; sync
for i in 1 2 3; do use /tmp/loader_pinned.py; fs r$i-P; use /tmp/loader_plain.py; fs r$i-B; done
use /tmp/loader_pinned.py; fs prof-P QUANTLORA_BENCH_TORCH_PROFILE_LOAD=1
use /tmp/loader_plain.py; fs prof-B QUANTLORA_BENCH_TORCH_PROFILE_LOAD=1
use /tmp/loader_pinned.py
QUANTLORA_BENCH_NO_CUDA_MALLOC=1 OUT=$R/p1 timeout 215 bash bench/device_run.sh comfy_peers.py --dynamic on --sections "ours_bf16,ours fp8 compile + merge" --merge-variants fa3-fp8+graphs --profile-merge --budget 175 --workdir /tmp/qb --out $R/p1 > $R/p1.log 2>&1
echo "p1 rc=$?"; grep -h '"variant"' -A0 $R/p1/*.json 2>/dev/null | head -20; T
