#!/usr/bin/env bash
# For session 36, after s36.sh found a compiler whose packages load (CXX=<it> below; written in session 35;
# session 36: /usr/bin/g++ loads; torch's 22-26 s host-CPU probe at load is skipped by aot_blocks.load_package).
# The real ComfyUI server's restart to the first step with the blocks compiled ahead of time
# (QUANTLORA_AOT_BLOCKS=1, speed/aot_store.py), alternating with ours on one machine: ours cold, then
# ours / ours-aot restarts (ours-aot's first run builds its packages; the later ones load them). The
# images are compared by their pixel hashes (inductor ahead of time against inductor's compiled graphs).
#   run(command="CXX=/usr/bin/g++ bash bench/ab/s36b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
source bench/ab/server_lib.sh
echo "CXX=${CXX:-unset}"
SR_TMO=${SR_TMO:-560}  # a shorter call where the session's device time is short
sr full $SR_TMO --size full --restarts ${RESTARTS:-3} --alternate ours-aot --comfy-restarts 0 --budget-s $((SR_TMO - 60))
grep -h "ahead of time\|AOT_BLOCKS\|Traceback" $R/full.log $R/full/*.log 2>/dev/null | sort | uniq -c | head -12
T
