#!/usr/bin/env bash
# Session 33, call 2 (the machine of call 1, still warm): bench_flux's firststep proxy on the same host as
# the real server's restarts of call 1: one cold process, then restarts. bash bench/ab/s33b.sh
#   run(command="bash bench/ab/s33b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
# The model file is call 1's (same writer, same seed, /tmp/qsr); call 1's server archive may still lie in
# the warm machine's copy: removed, so device_run.sh takes the carried tree as every firststep run did.
rm -f .devcarry/server.tar.xz
O=$OUT; R=/tmp/res2; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qsr --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s $(grep -o '"to_first_step_s": [0-9.]*\|"before_load_s": [0-9.]*\|"loader_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"compile_s": [0-9.]*\|"weights_equal": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
left() { [ $(( $(date +%s) - S )) -lt ${1:-300} ]; }
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
for i in 1 2 3 4; do left 330 && fs proxy-$i QUANTLORA_BENCH_WEIGHT_CACHE=on; done
T
