#!/usr/bin/env bash
# Session 30, call 2 (runs h200-full-firststep-restart30-new-*/-old-*): restarts alternating in one
# machine between this tree ("new": the compiler's imports started during the load, the pristine copy's
# device-to-host copies queued, the LoRA parser's one-sum finiteness check) and "old" (the same tree with
# QUANTLORA_PREFETCH_COMPILE=0, the copies waited for, lora/formats.py of e0928ef). Each change shows in
# its own phase of the firststep row: compile_setup_s and load_s, first_merge_phases.capture_s,
# lora_write_parse_s. Run from the repository root: bash bench/ab/s30b.sh
# Both the import prefetch and the queued copies were dropped after this run (BENCHMARKS.md issue 12,
# twelfth round): on later trees the "new" side differs from the one measured (commit e0928ef + the diff
# described there).
O=$OUT; R=/tmp/res; mkdir -p $R /tmp/ab
T() { (cd $R && tar cf $O/res.tar .); }
cp lora/merge.py /tmp/ab/merge_new.py; cp lora/formats.py /tmp/ab/formats_new.py
sed 's/, queue=True)/)/' lora/merge.py > /tmp/ab/merge_old.py
# lora/formats.py of e0928ef (the device copy of .git lacked that commit: the run carried it as an
# untracked bench/ab/formats_old.py)
git show e0928ef:lora/formats.py > /tmp/ab/formats_old.py 2>/dev/null || cp bench/ab/formats_old.py /tmp/ab/formats_old.py || exit 1
grep -c "queue=True" /tmp/ab/merge_old.py
use() { cp /tmp/ab/merge_$1.py lora/merge.py; cp /tmp/ab/formats_$1.py lora/formats.py; python3 -m compileall -q lora >/dev/null; }
fs() { # name, env...
  local n=$1; shift
  env "$@" OUT=$R/$n timeout ${TMO:-100} bash bench/device_run.sh bench_flux.py --size full --sections firststep --workdir /tmp/qb --out $R/$n > $R/$n.log 2>&1
  echo "$n rc=$? $(grep -o '"to_first_step_s": [0-9.]*\|"load_s": [0-9.]*\|"compile_setup_s": [0-9.]*\|"first_merge_s": [0-9.]*\|"lora_write_parse_s": [0-9.]*\|"capture_s": [0-9.]*\|"waited_s": [0-9.]*' $R/$n/results-firststep.json 2>/dev/null | tr '\n' ' ')"
  T
}
use new; TMO=170 fs cold-new; sync
for i in 1 2 3 4; do use new; fs new-$i; use old; fs old-$i QUANTLORA_PREFETCH_COMPILE=0; done
use new; fs new-prof QUANTLORA_BENCH_CPROFILE=1
# the queued pristine copies on a GPU: the bare base bit-exact after swaps, merged == load path (smoke size)
OUT=$R/merge-smoke timeout 200 bash bench/device_run.sh bench_flux.py --size smoke --sections merge --workdir /tmp/qbs --out $R/merge-smoke > $R/merge-smoke.log 2>&1
echo "merge-smoke rc=$? $(grep -o '"bare_bit_exact": [a-z]*\|"merged_equals_load_path": [a-z]*\|"first_merge_s": [0-9.]*' $R/merge-smoke/results-merge.json 2>/dev/null | tr '\n' ' ')"; T
