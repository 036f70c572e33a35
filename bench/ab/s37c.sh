#!/usr/bin/env bash
# Session 37's third call: the packages built after the first prompt, in child processes that outlive
# the server (speed/aot_store.py), not inside it. The cold run is ours-aot on a fresh machine: its first
# image with torch.compile's cold compile and the two exports; the harness then waits for the builds
# (wait_for_aot_builds) and restarts ours and ours-aot in turn: do the loaded restarts stay at call 2's
# 13.0-13.8 s, and is the first image under 60 s?
#   run(command="bash bench/ab/s37c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
export CXX=${AOT_CXX:-/usr/bin/g++} QUANTLORA_AOT_BUILD=child  # the mode it measured (then the default)
source bench/ab/server_lib.sh
(while sleep 20; do T; done) &
SR_TMO=${SR_TMO:-480}
sr full $SR_TMO --size full --cold-variant ours-aot --restarts ${RESTARTS:-3} --alternate ours-aot \
  --comfy-restarts 0 --budget-s $((SR_TMO - 60))
python3 -c "
import json
for r in json.load(open('$R/full/results-server.json'))['rows']:
    print(r['variant'], 'build wait', r.get('aot_build_wait_s'), 'marks', r.get('start_marks'))
" 2>/dev/null
ls -la /tmp/qsr/models/quantlora_cache/aot/*/* 2>/dev/null | head -20
grep -h "exported in\|ahead of time\|not built\|compiler's modules\|Traceback" $R/full/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | head -12
kill %1 2>/dev/null; T
