#!/usr/bin/env bash
# For session 36's first call (written in session 35, whose device time ran out). Session 35 found that
# every AOTInductor package dies at load on the device image (SIGSEGV in torch's _load_aoti), even two
# Linears in the image's own Python, CUDA and CPU alike; the image's CXX is /opt/gcc/bin/g++ and its CPU
# wrappers link neither libstdc++ nor libgomp. The same torch wheel (2.11.0+cu130) with Debian's g++ 12 on
# the CI machine loads and runs the CPU package (bench/raw/cpu/ci-machine-aoti-load-check35-torch211.json).
# 1. the toolchain: what compilers the image has; the tiny check with each other g++ found (CXX)
# 2. gdb's C++ backtrace of the crash with the image's own compiler (where the image has gdb)
# 3. where some compiler's package loaded: bench/aoti_probe.py at full width with it, fp8 then bf16
#   run(command="bash bench/ab/s36.sh", carry=[".devcarry/site.tar.xz", ".devcarry/ComfyUI"])
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
left() { echo $(( 540 - ($(date +%s) - S) )); }
{ echo "CXX=$CXX CC=$CC"; env | grep -iE "^(CXX|CC|CFLAGS|CXXFLAGS|LDFLAGS|TORCHINDUCTOR)" ; ls -la /opt/gcc/bin 2>&1 | head -20
  file -L /opt/gcc/bin/g++ 2>&1; head -c 300 /opt/gcc/bin/g++ 2>/dev/null | strings | head -5
  /opt/gcc/bin/g++ --version 2>&1 | head -2; /opt/gcc/bin/g++ -v 2>&1 | tail -2
  /opt/gcc/bin/g++ -dumpspecs 2>&1 | grep -i -B1 -A1 "static" | head -12; /opt/gcc/bin/g++ -print-file-name=libstdc++.so
  ls -la /usr/bin/g++* /usr/bin/c++ /usr/bin/clang++* /usr/bin/gcc* 2>&1 | head; which gdb; } > $R/toolchain.txt 2>&1
cat $R/toolchain.txt
good=""
for cxx in $(ls /usr/bin/g++ /usr/bin/g++-1[0-9] /usr/bin/clang++ 2>/dev/null); do
  timeout 100 bash bench/device_run.sh aoti_load_check.py --only plain,cpu --cxx $cxx --out $R/load-$(basename $cxx) > $R/load-$(basename $cxx).log 2>&1
  python3 -c "
import json,sys
rows=json.load(open(sys.argv[1]))['rows']
for r in rows: print(r['variant'], r['rc'], r['stages'][-1:])
sys.exit(0 if rows and all(r['rc'] == 0 for r in rows) else 1)
" $R/load-$(basename $cxx)/results-aoti-load.json && good=$cxx && break
done
echo "a compiler whose packages load: ${good:-none} t=$(( $(date +%s) - S ))s"
(cd $R && tar cf $O/res.tar .)
if which gdb >/dev/null; then
  timeout 80 bash bench/device_run.sh aoti_load_check.py --only plain --gdb --out $R/gdb > $R/gdb.log 2>&1
  [ -f $R/gdb/results-aoti-load.json ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']: print(r['variant'], r['stderr_tail'][-2000:])
" $R/gdb/results-aoti-load.json
fi
(cd $R && tar cf $O/res.tar .)
summary() { [ -f $1 ] && python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(' ', r['variant'], {k: r.get(k) for k in ('export_s','aoti_compile_s','same_process_max_abs_diff','load_s','first_call_s','restart_work_s','call_ms','modules_imported','diff_to_compiled','other_block_max_abs_diff','error') if k in r})
" $1; }
if [ -n "$good" ]; then
  CXX=$good timeout $(( $(left) > 300 ? 300 : $(left) )) bash bench/device_run.sh aoti_probe.py --quant fp8 --repeats 2 --out $R/fp8 --timeout 200 > $R/fp8.log 2>&1
  echo "fp8 rc=$? t=$(( $(date +%s) - S ))s"; summary $R/fp8/results-aoti-fp8.json
  (cd $R && tar cf $O/res.tar .)
  CXX=$good timeout $(left) bash bench/device_run.sh aoti_probe.py --kind single --quant fp8 --repeats 1 --out $R/fp8-single --timeout 150 > $R/fp8-single.log 2>&1
  echo "fp8 single rc=$? t=$(( $(date +%s) - S ))s"; summary $R/fp8-single/results-aoti-fp8-single.json
fi
(cd $R && tar cf $O/res.tar .)
