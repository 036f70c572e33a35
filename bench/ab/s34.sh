#!/usr/bin/env bash
# Session 34, call 1: the real ComfyUI server's restart to the first step with the loader run beside the
# text encoders (nodes/load_overlap.py) against the loader run before them (QUANTLORA_OVERLAP_LOAD=0,
# "ours-seq"), alternating on one machine, and ComfyUI's own graph. A smoke run first (2+4 blocks: the
# threaded load on the GPU, both variants), then full size: ours cold, 3 x (ours, ours-seq), comfy cold + 1.
#   run(command="bash bench/ab/s34.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
sr() { # name, seconds, args...
  local n=$1 tmo=$2; shift 2
  timeout $tmo bash bench/device_run.sh server_restart.py --workdir /tmp/qsr --out $R/$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s"
  python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    ns = r.get('node_s') or {}
    print(' ', r['variant'], {k: r.get(k) for k in ('ready_s','to_first_step_s','done_s','image_sha','error','skipped')},
          {k: ns.get(k) for k in ('QuantizedFluxLoader','DualCLIPLoader','CLIPTextEncode','KSampler','UNETLoader')})
" $R/$n/results-server.json 2>/dev/null
  T
}
sr smoke 170 --size smoke --restarts 1 --seq-restarts 1 --comfy-restarts 0 --budget-s 130
left=$(( 570 - ($(date +%s) - S) ))
sr full $left --size full --restarts 3 --seq-restarts 3 --comfy-restarts 1 --budget-s $(( left - 60 ))
grep -h "Traceback\|Error" $R/full.log | tail -3
T
