#!/usr/bin/env bash
# Session 34, call 3: the committed tree (the loader beside the text encoders; the switch-interval change
# of call 2 dropped) on another machine: ours and ours-seq (QUANTLORA_OVERLAP_LOAD=0) alternating, three
# restarts each after ours' cold run, then ComfyUI's own graph cold and two restarts.
#   run(command="bash bench/ab/s34c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
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
sr full 575 --size full --restarts 3 --alternate ours-seq --comfy-restarts 2 --budget-s 480
grep -h "Traceback\|Error" $R/full.log | tail -3
T
