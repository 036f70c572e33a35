#!/usr/bin/env bash
# Session 37's second call: the restart with every block served by packages and the compiler's imports no
# longer run beside the text encoders (nodes/bridge.py: 1.4 s of the loader thread's Python in call 1,
# where CLIPTextEncode took 2.9-3.0 s beside it against 1.7 s alone); server logs with times per line
# (where ComfyUI's own start goes: 7.6-11.1 s until it answered in call 1); ComfyUI's own graph after.
#   run(command="bash bench/ab/s37b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
export CXX=${AOT_CXX:-/usr/bin/g++}
source bench/ab/server_lib.sh
(while sleep 20; do T; done) &
SR_TMO=${SR_TMO:-500}
sr full $SR_TMO --size full --cold-variant ours-aot --restarts ${RESTARTS:-3} --alternate ours-aot \
  --comfy-restarts ${COMFY_RESTARTS:-1} --budget-s $((SR_TMO - 70))
python3 -c "
import json
for r in json.load(open('$R/full/results-server.json'))['rows']:
    print(r['variant'], r.get('start_marks'), r.get('ready_s'))
" 2>/dev/null
grep -h "compiled ahead of time\|compiler's modules\|Traceback" $R/full/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | head -12
kill %1 2>/dev/null; T
