#!/usr/bin/env bash
# Session 32, call 3 (runs h200-full-firststep-map32c-*, h200-pin-map32c): a third host's restarts with the
# mapped weight cache (QUANTLORA_MAP_CACHE=1/0 alternating), the locking probe on the real cache file
# (bench/pin_probe.py --map: lock time, host-to-device rate from the locked page cache against anonymous
# pinned memory, the same file locked by a second mapping), and one restart with torch's profiler over
# the load (where the 0.45 s between the loader's end and the load's go). bash bench/ab/s32c.sh
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s $(grep -o '"to_first_step_s": [0-9.]*\|"before_load_s": [0-9.]*\|"load_s": [0-9.]*\|"loader_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"compile_s": [0-9.]*\|"failed": [^,]*\|"weights_equal[a-z_]*": [a-z]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
left() { [ $(( $(date +%s) - S )) -lt ${1:-480} ]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TMO=230 fs cold QUANTLORA_BENCH_WEIGHT_CACHE=on; sync
f=$(ls /tmp/qb/wcache/*.safetensors | head -1)
OUT=$R/mapprobe timeout 90 bash bench/device_run.sh pin_probe.py --map "$f" --out $R/mapprobe > $R/mapprobe.log 2>&1
echo "mapprobe rc=$?"; grep '^{' $R/mapprobe.log | cut -c1-400; T
for i in 1 2; do
  left 400 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1
  left 420 && fs nomap-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=0
done
for i in 3 4; do left 460 && fs map-$i QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1; done
left 480 && fs tprof QUANTLORA_BENCH_WEIGHT_CACHE=on QUANTLORA_MAP_CACHE=1 QUANTLORA_BENCH_TORCH_PROFILE_LOAD=1
T
