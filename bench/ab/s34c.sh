#!/usr/bin/env bash
# Session 34, call 3: the committed tree (the loader beside the text encoders; the switch-interval change
# of call 2 dropped) on another machine: ours and ours-seq (QUANTLORA_OVERLAP_LOAD=0) alternating, three
# restarts each after ours' cold run, then ComfyUI's own graph cold and two restarts.
#   run(command="bash bench/ab/s34c.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
source bench/ab/server_lib.sh
sr full 575 --size full --restarts 3 --alternate ours-seq --comfy-restarts 2 --budget-s 480
grep -h "Traceback\|Error" $R/full.log | tail -3
T
