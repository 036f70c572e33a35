#!/usr/bin/env bash
# Session 36, call 3 (436 s of device time left): the server run of call 2 (s36b.sh) refused to compile
# its blocks ahead of time because the pack's FlashAttention-3 override was a closure (no name a
# restarted process finds); speed/fa3.py now has module-level overrides. Does the pack's fp8 double
# block with FA3 (a Python custom op calling FA3's C++ op) go through AOTInductor, and how long does a
# restart's load take with aot_blocks.load_package (torch's host-CPU probe skipped)?
#   run(command="CXX=/usr/bin/g++ bash bench/ab/s36c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
echo "CXX=${CXX:-unset}"
(while sleep 15; do (cd $R && tar cf $O/res.tmp . && mv $O/res.tmp $O/res.tar); done) &  # results so far, if the call is cut
timeout ${TMO:-280} bash bench/device_run.sh aoti_probe.py --quant fp8 --attention fa3 --shared-only --repeats 1 \
  --out $R/fa3 --timeout 200 > $R/fa3.log 2>&1
echo "fa3 rc=$? t=$(( $(date +%s) - S ))s"
python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(' ', r['variant'], {k: r.get(k) for k in ('export_s','aoti_compile_s','same_process_max_abs_diff','load_s','first_call_s','restart_work_s','call_ms','package_calls','diff_to_compiled','custom_ops','error') if k in r})
" $R/fa3/results-aoti-fp8-fa3.json
grep -h "Error\|error\|Traceback" $R/fa3.log | sort | uniq -c | head -10
kill %1 2>/dev/null; (cd $R && tar cf $O/res.tar .)
