#!/usr/bin/env bash
# Session 33, call 3 (the same as call 1, on another machine, with the weight-cache header fix): a real ComfyUI server's restart to the first step (bench/server_restart.py): a smoke
# run of our graph (2+4 blocks: the server, the carried packages, the T5 file on the GPU), then full size:
# our graph cold and three restarts, ComfyUI's own graph cold and two restarts, one machine.
#   run(command="bash bench/ab/s33c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tar .); }
sr() { # name, seconds, args...
  local n=$1 tmo=$2; shift 2
  timeout $tmo bash bench/device_run.sh server_restart.py --workdir /tmp/qsr --out $R/$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s"
  python3 -c "import json,sys; [print(' ', r['variant'], {k: r.get(k) for k in ('ready_s','to_first_step_s','done_s','error','skipped')}) for r in json.load(open(sys.argv[1]))['rows']]" $R/$n/results-server.json 2>/dev/null
  T
}
sr smoke 200 --size smoke --restarts 0 --comfy-restarts 0 --budget-s 150
left=$(( 565 - ($(date +%s) - S) ))
sr full $left --size full --restarts 3 --comfy-restarts 2 --budget-s $(( left - 100 ))
grep -h "to_first_step\|error" $R/full.log | tail -3
T
