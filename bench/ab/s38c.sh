#!/usr/bin/env bash
# Session 38, call 3: the pack's defaults as a user has them (ours-default: no QUANTLORA_AOT_* set, no
# CXX set: the load check picks the compiler, speed/aot_store.compiler_here) on a fresh machine: the cold
# run, the builds after it, then ours (torch.compile alone) and ours-default restarted in turn.
#   run(command="bash bench/ab/s38c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
unset CXX QUANTLORA_AOT_BLOCKS QUANTLORA_AOT_BUILD
source bench/ab/server_lib.sh
(while sleep 20; do cp /tmp/qsr/models/quantlora_cache/aot/*/*/*.log $R/ 2>/dev/null; T; done) &
SR_TMO=${SR_TMO:-450}
sr full $SR_TMO --size full --cold-variant ours-default --restarts ${RESTARTS:-3} --alternate ours-default \
  --comfy-restarts 0 --budget-s $((SR_TMO - 60))
python3 -c "
import json
for r in json.load(open('$R/full/results-server.json'))['rows']:
    print(r['variant'], 'build wait', r.get('aot_build_wait_s'), 'marks', r.get('start_marks'))
" 2>/dev/null
ls -la /tmp/qsr/models/quantlora_cache/aot/*/* /tmp/qsr/models/quantlora_cache/aot 2>/dev/null | head -24
grep -h "exported in\|ahead of time\|not built\|compiler's modules\|do not load\|Traceback" $R/full/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | head -12
cp /tmp/qsr/models/quantlora_cache/aot/*/*/*.log $R/ 2>/dev/null
for f in $R/*.log; do [ -f "$f" ] || continue; echo "== $f"; grep -v "Enum subclass" "$f" | grep -i "warn\|error\|not found\|import\|exit\|resolve" | cut -c1-400 | head -20; done
kill %1 2>/dev/null; T
