#!/usr/bin/env bash
# Session 35, call 3: bench/aoti_load_check.py: a tiny AOTInductor package built and loaded in the device
# image's Python alone, with the carried packages, with ComfyUI imported, and on the CPU (s35b.sh: every
# package died at load, SIGSEGV, even in the process that built it).
#   run(command="bash bench/ab/s35c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
timeout 280 bash bench/device_run.sh aoti_load_check.py --out $R/load > $R/load.log 2>&1
echo "load check rc=$? t=$(( $(date +%s) - S ))s"
python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(r['variant'], r['rc'], r['seconds'], r['stages'][-3:]); print('   ', r['stderr_tail'][-600:].replace(chr(10), ' / '))
" $R/load/results-aoti-load.json
(cd $R && tar cf $O/res.tar .)
