#!/usr/bin/env bash
# Session 34, call 4: the final tree (the load beside the text encoders stops when its prompt ends) at
# smoke size on the GPU: ours cold, then ours and ours-seq once each; the images must agree.
#   run(command="bash bench/ab/s34d.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
timeout 200 bash bench/device_run.sh server_restart.py --workdir /tmp/qsr --out $R/smoke --size smoke --restarts 1 \
  --alternate ours-seq --comfy-restarts 0 --budget-s 150 > $R/smoke.log 2>&1
echo "smoke rc=$? t=$(( $(date +%s) - S ))s"
python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(' ', r['variant'], {k: r.get(k) for k in ('ready_s','to_first_step_s','image_sha','error')})
" $R/smoke/results-server.json
(cd $R && tar cf $O/res.tar .)
