#!/usr/bin/env bash
# Session 34, call 1: the real ComfyUI server's restart to the first step with the loader run beside the
# text encoders (nodes/load_overlap.py) against the loader run before them (QUANTLORA_OVERLAP_LOAD=0,
# "ours-seq"), alternating on one machine, and ComfyUI's own graph. A smoke run first (2+4 blocks: the
# threaded load on the GPU, both variants), then full size: ours cold, 3 x (ours, ours-seq), comfy cold + 1.
#   run(command="bash bench/ab/s34.sh", carry=[".devcarry/site.tar.xz", ".devcarry/server.tar.xz"])
source bench/ab/server_lib.sh
sr smoke 170 --size smoke --restarts 1 --alternate ours-seq --comfy-restarts 0 --budget-s 130
left=$(( 570 - ($(date +%s) - S) ))
sr full $left --size full --restarts 3 --alternate ours-seq --comfy-restarts 1 --budget-s $(( left - 60 ))
grep -h "Traceback\|Error" $R/full.log | tail -3
T
