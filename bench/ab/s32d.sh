#!/usr/bin/env bash
# Session 32, call 4 (run h200-comfy-peers-cachemerge32): the restart's workflow through the nodes on the
# mapped weight cache, ComfyUI v0.33 with dynamic VRAM on (its default): QuantizedFluxLoader(fp8, compile
# regional, weight_cache on) -> LoRAHotswap(merge) -> sampling, three LoRAs in turn, then the bare MODEL,
# then a load sampled without a LoRA (comfy_peers.py section "ours weight cache + merge").
# Run from the repository root: bash bench/ab/s32d.sh
O=$OUT; R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OUT=$R/peers timeout 480 bash bench/device_run.sh comfy_peers.py --size full --dynamic on --sections "ours weight cache" \
  --switches 3 --steps 2 --budget 420 --workdir /tmp/qp --out $R/peers > $R/peers.log 2>&1
echo "peers rc=$?"; grep -o '{"variant".*' $R/peers.log | cut -c1-1500
(cd $R && tar cf $O/res.tar .)
