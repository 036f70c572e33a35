# Sourced by bench/ab/s34*.sh: the server restart bench (bench/server_restart.py) run under a time limit,
# its rows printed as they come, and everything under /tmp/res tarred into $OUT after each run.
O=$OUT; R=/tmp/res; mkdir -p $R; S=$(date +%s)
T() { (cd $R && tar cf $O/res.tmp . && mv $O/res.tmp $O/res.tar); }
sr() { # name, seconds, args...
  local n=$1 tmo=$2; shift 2
  timeout $tmo bash bench/device_run.sh server_restart.py --workdir /tmp/qsr --out $R/$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$? t=$(( $(date +%s) - S ))s"
  python3 -c "
import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    ns = r.get('node_s') or {}
    print(' ', r['variant'], {k: r.get(k) for k in ('ready_s','to_first_step_s','done_s','image_sha','error','skipped')},
          {k: ns.get(k) for k in ('QuantizedFluxLoader','DualCLIPLoader','CLIPTextEncode','KSampler','UNETLoader')})
" $R/$n/results-server.json 2>/dev/null
  T
}
