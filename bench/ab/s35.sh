#!/usr/bin/env bash
# Session 35, call 1: bench/aoti_probe.py on the GPU at full width (FLUX.1: hidden 3072, 4096 image
# tokens): one ComfyUI DoubleStreamBlock restarted as torch.compile does it against an AOTInductor
# package, first with the pack's torchao-fp8-dynamic Linears (the restart bench's model), then bf16.
#   run(command="bash bench/ab/s35.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - S) )); }
timeout 330 bash bench/device_run.sh aoti_probe.py --quant fp8 --repeats 2 --out $R/fp8 --timeout 240 > $R/fp8.log 2>&1
echo "fp8 rc=$? t=$(( $(date +%s) - S ))s"
(cd $R && tar cf $O/res.tar .)
timeout $(left) bash bench/device_run.sh aoti_probe.py --quant none --repeats 2 --out $R/bf16 --timeout 200 > $R/bf16.log 2>&1
echo "bf16 rc=$? t=$(( $(date +%s) - S ))s"
for f in $R/fp8/results-aoti-fp8.json $R/bf16/results-aoti-none.json; do
  [ -f $f ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(' ', r['variant'], {k: r.get(k) for k in ('export_s','aoti_compile_s','load_s','first_call_s','restart_work_s','call_ms','modules_imported','diff_to_compiled','max_abs_diff','other_block_max_abs_diff','error')})
" $f
done
(cd $R && tar cf $O/res.tar .)
