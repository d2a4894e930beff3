#!/usr/bin/env bash
# The demo job: a coordinator and two workers on this machine, data-parallel on the CPU backend.
# Usage: scripts/demo.sh BIN_DIR RUN_DIR
set -euo pipefail
bin=$1; run=$2
rm -rf "$run/state" "$run"/worker-*.log "$run"/worker-*.jsonl "$run"/coordinator.*
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

"$bin/stagecoach-coordinator" --listen 127.0.0.1:0 --job examples/demo.toml --state "$run/state" \
  >"$run/coordinator.out" 2>"$run/coordinator.log" &
coord=$!
pids+=("$coord")
# The coordinator prints its address on its first stdout line, its metrics URL on the second.
for _ in $(seq 300); do
  grep -q "^metrics on " "$run/coordinator.out" 2>/dev/null && break
  kill -0 "$coord" 2>/dev/null || { cat "$run/coordinator.log" >&2; exit 1; }
  sleep 0.1
done
url="http://$(sed -n 's/^listening on //p' "$run/coordinator.out")"
echo "coordinator at $url (log: $run/coordinator.log)"
echo "  watch it with: $bin/stagecoach --coordinator $url status"
echo "  Prometheus metrics: $(sed -n 's/^metrics on //p' "$run/coordinator.out") (each worker's: see $run/worker-*.log)"
workers=()
for i in 0 1; do
  "$bin/stagecoach-worker" join --coordinator "$url" --metrics-out "$run/worker-$i.jsonl" \
    2>"$run/worker-$i.log" >/dev/null &
  workers+=("$!"); pids+=("$!")
done
# Progress: what the coordinator decides, as it happens.
tail -n +1 -f "$run/coordinator.log" --pid "$coord" \
  | grep --line-buffered -E "forming a world|world running|step committed|stage transition|validation loss|checkpoint saved|loss spike|rolling back|generation ended|job finished|job failed" \
  | sed -u -E 's/^[^ ]+ +[A-Z]+ +([a-z_]+\{[^}]*\}: )?[a-z_:]+: //' &
pids+=("$!")
status=0
wait "$coord" || status=$?
for w in "${workers[@]}"; do wait "$w" || status=$?; done
tail -n +3 "$run/coordinator.out"
if [ "$status" -eq 0 ]; then
  echo "demo done: the ledger is in $run/state, each worker's steps in $run/worker-*.jsonl"
else
  echo "demo failed: see $run/coordinator.log and $run/worker-*.log" >&2
fi
exit "$status"
