#!/usr/bin/env bash
# Session 35, call 4: s35c.sh found even a tiny package (two Linears, the image's Python alone, CUDA and
# CPU) dies at load (SIGSEGV in _load_aoti); the wrapper was built by /opt/gcc/bin/g++. The same with the
# system's g++ (inductor's CXX), if the image has one; then the image's own compiler under gdb (where
# the image has gdb) for the C++ backtrace of the crash. Not run in session 35 (its device time was spent).
#   run(command="bash bench/ab/s35d.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
ls -la /usr/bin/g++* /usr/bin/c++ /opt/gcc/bin/ 2>&1 | head -12
/opt/gcc/bin/g++ --version | head -1; /usr/bin/g++ --version 2>&1 | head -1
CXXS=$(ls /usr/bin/g++ 2>/dev/null || ls /usr/bin/c++ 2>/dev/null)
[ -n "$CXXS" ] && timeout 95 bash bench/device_run.sh aoti_load_check.py --only plain,cpu --cxx $CXXS --out $R/load > $R/load.log 2>&1
echo "load check rc=$? t=$(( $(date +%s) - S ))s"
which gdb && timeout 80 bash bench/device_run.sh aoti_load_check.py --only plain --gdb --out $R/gdb > $R/gdb.log 2>&1
[ -f $R/gdb/results-aoti-load.json ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']: print(r['variant'], r['rc'], r['stderr_tail'][-2500:])
" $R/gdb/results-aoti-load.json
[ -f $R/load/results-aoti-load.json ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(r['variant'], r['rc'], r['seconds'], r['stages'][-2:]); print('   ', r['stderr_tail'][-300:].replace(chr(10), ' / '))
" $R/load/results-aoti-load.json
(cd $R && tar cf $O/res.tar .)
