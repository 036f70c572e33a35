#!/usr/bin/env bash
# Written in session 37 for the next session's first call (diagnosis; not run: the device budget was
# spent): call 3's build children (QUANTLORA_AOT_BUILD=child) failed to load the saved programs ("error
# when deserializing the saved file"); one smoke-size cold run of ours-aot in child mode, then the
# children's whole output (kept in <aot folder>/<fingerprint>/failed-*.log, speed/aot_store.py).
#   run(command="bash bench/ab/s37d.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
export CXX=${AOT_CXX:-/usr/bin/g++} QUANTLORA_AOT_BUILD=child
source bench/ab/server_lib.sh
(while sleep 15; do cp /tmp/qsr/models/quantlora_cache/aot/*/*/failed-*.log $R/ 2>/dev/null; T; done) &
sr smoke ${SR_TMO:-150} --size smoke --cold-variant ours-aot --restarts 0 --comfy-restarts 0 --budget-s 100
cp /tmp/qsr/models/quantlora_cache/aot/*/*/failed-*.log $R/ 2>/dev/null
for f in $R/failed-*.log; do echo "== $f"; grep -v "^W1203\|Enum subclass" "$f" | grep -i "warn\|error\|not found\|import\|exit" | cut -c1-400 | head -20; done
ls -la /tmp/qsr/models/quantlora_cache/aot/*/* 2>/dev/null | head
kill %1 2>/dev/null; T
