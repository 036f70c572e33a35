#!/usr/bin/env bash
# Session 35, call 2: call 1 (s35.sh) built both packages at full width but every fresh process that
# loaded one died (SIGSEGV, no Python trace). Now the children run with faulthandler, the builder loads
# its own package too, and ComfyUI's pure-torch RoPE is what gets exported (as the pack's compiled graphs
# trace it; comfy_kitchen's op went into call 1's packages). A small smoke first, then full width fp8,
# then comfy_kitchen's RoPE op at smoke size (is it the crash?).
#   run(command="bash bench/ab/s35b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
left() { echo $(( 530 - ($(date +%s) - S) )); }
summary() { [ -f $1 ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(' ', r['variant'], {k: r.get(k) for k in ('export_s','aoti_compile_s','same_process_max_abs_diff','custom_ops','load_s','first_call_s','restart_work_s','call_ms','modules_imported','diff_to_compiled','max_abs_diff','other_block_max_abs_diff','error') if k in r})
" $1; }
timeout 150 bash bench/device_run.sh aoti_probe.py --hidden 256 --tokens 256 --repeats 1 --out $R/smoke --workdir /tmp/aoti-smoke --timeout 120 > $R/smoke.log 2>&1
echo "smoke rc=$? t=$(( $(date +%s) - S ))s"; summary $R/smoke/results-aoti-none.json; grep -A12 "Fatal Python" $R/smoke.log | head -30
(cd $R && tar cf $O/res.tar .)
timeout 300 bash bench/device_run.sh aoti_probe.py --quant fp8 --repeats 2 --out $R/fp8 --timeout 200 > $R/fp8.log 2>&1
echo "fp8 rc=$? t=$(( $(date +%s) - S ))s"; summary $R/fp8/results-aoti-fp8.json; grep -A12 "Fatal Python" $R/fp8.log | head -30
(cd $R && tar cf $O/res.tar .)
timeout $(left) bash bench/device_run.sh aoti_probe.py --rope kernel --hidden 256 --tokens 256 --repeats 1 --out $R/kernel --workdir /tmp/aoti-kernel --timeout 100 > $R/kernel.log 2>&1
echo "kernel rope rc=$? t=$(( $(date +%s) - S ))s"; summary $R/kernel/results-aoti-none.json; grep -A12 "Fatal Python" $R/kernel.log | head -20
(cd $R && tar cf $O/res.tar .)
