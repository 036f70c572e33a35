#!/usr/bin/env bash
# Session 34, call 2: the real ComfyUI server's restart to the first step, three variants of our graph
# alternating on one machine (bench/server_restart.py VARIANT_ENV): ours (the loader beside the text
# encoders, Python's switch interval 0.5 ms while it runs), ours-noswitch (beside them, Python's 5 ms),
# ours-seq (the loader before them: QUANTLORA_OVERLAP_LOAD=0); then ComfyUI's own graph. No smoke run:
# call 1 ran the threaded load on this image.
#   run(command="bash bench/ab/s34b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
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
          {k: ns.get(k) for k in ('QuantizedFluxLoader','CLIPTextEncode','KSampler')})
" $R/$n/results-server.json 2>/dev/null
  T
}
sr full 575 --size full --restarts 3 --alternate ours-noswitch,ours-seq --comfy-restarts 1 --budget-s 500
grep -h "Traceback\|Error" $R/full.log | tail -3
T
