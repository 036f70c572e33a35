#!/usr/bin/env bash
# Session 38, call 2: s38.sh again after the fixes of its call 1 (children spawned without fork; each child keeps its own log).
# in turn) after two fixes: the children now import the module that defines each triton_op (call 3's
# children imported torch._library.triton, so quantlora::quant_rows_fp8 was unknown and the program did
# not load), and they start after the sampling ends (Builder.hold). Any child's whole log comes back.
#   run(command="bash bench/ab/s38b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
export CXX=${AOT_CXX:-/usr/bin/g++} QUANTLORA_AOT_BUILD=child
source bench/ab/server_lib.sh
(while sleep 20; do cp /tmp/qsr/models/quantlora_cache/aot/*/*/*.log $R/ 2>/dev/null; T; done) &
SR_TMO=${SR_TMO:-470}
sr full $SR_TMO --size full --cold-variant ours-aot --restarts ${RESTARTS:-3} --alternate ours-aot \
  --comfy-restarts 0 --budget-s $((SR_TMO - 60))
python3 -c "
import json
for r in json.load(open('$R/full/results-server.json'))['rows']:
    print(r['variant'], 'build wait', r.get('aot_build_wait_s'), 'marks', r.get('start_marks'))
" 2>/dev/null
ls -la /tmp/qsr/models/quantlora_cache/aot/*/* 2>/dev/null | head -20
grep -h "exported in\|ahead of time\|not built\|compiler's modules\|Traceback" $R/full/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | head -12
cp /tmp/qsr/models/quantlora_cache/aot/*/*/*.log $R/ 2>/dev/null
for f in $R/*.log; do [ -f "$f" ] || continue; echo "== $f"; grep -v "Enum subclass" "$f" | grep -i "warn\|error\|not found\|import\|exit\|resolve" | cut -c1-400 | head -20; done
kill %1 2>/dev/null; T
