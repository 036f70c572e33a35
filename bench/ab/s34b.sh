#!/usr/bin/env bash
# Session 34, call 2: the real ComfyUI server's restart to the first step, three variants of our graph
# alternating on one machine (bench/server_restart.py VARIANT_ENV): ours (the loader beside the text
# encoders, Python's switch interval 0.5 ms while it runs), ours-noswitch (beside them, Python's 5 ms),
# ours-seq (the loader before them: QUANTLORA_OVERLAP_LOAD=0); then ComfyUI's own graph. No smoke run:
# call 1 ran the threaded load on this image.
# Ran at 3ddf6ce: the switch-interval variant (ours-noswitch) is gone from server_restart.py since.
#   run(command="bash bench/ab/s34b.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
source bench/ab/server_lib.sh
sr full 575 --size full --restarts 3 --alternate ours-noswitch,ours-seq --comfy-restarts 1 --budget-s 500
grep -h "Traceback\|Error" $R/full.log | tail -3
T
