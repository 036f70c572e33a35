#!/usr/bin/env bash
# For session 37's first call (written in session 36): the real ComfyUI server's restart to the first
# step with the blocks compiled ahead of time (QUANTLORA_AOT_BLOCKS=1), alternating with ours on one
# machine. Session 36 found: the device image's CXX (/opt/gcc/bin/g++) builds packages that crash at load,
# /usr/bin/g++ works; torch's host-CPU probe at load (22-26 s) is skipped by aot_blocks.load_package;
# FA3's override is now recordable (the server run of s36b.sh refused the closure). The probe
# (h200-aoti-probe36-fp8-fa3): a block kind restarts in 0.085 s from its package against 4.28 s compiled.
# ours-aot's first restart builds (load check ~57 s once, ~56 s per block kind); the later ones load.
#   run(command="bash bench/ab/s37.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
#   (move bench/raw/traces out of the tree for the call: the carry limit)
export CXX=${AOT_CXX:-/usr/bin/g++}  # the image sets CXX=/opt/gcc/bin/g++ (its packages crash at load; the pack
# would fall back to /usr/bin/g++ after a second ~1 min check: AOT_CXX=/opt/gcc/bin/g++ to measure that)
source bench/ab/server_lib.sh
(while sleep 20; do T; done) &  # results so far, if the call is cut
echo "CXX=$CXX"
SR_TMO=${SR_TMO:-560}
sr full $SR_TMO --size full --restarts ${RESTARTS:-3} --alternate ours-aot --comfy-restarts 0 --budget-s $((SR_TMO - 70))
grep -h "ahead of time\|AOT_BLOCKS\|Traceback" $R/full.log $R/full/*.log 2>/dev/null | cut -c1-400 | sort | uniq -c | head -12
kill %1 2>/dev/null; T
