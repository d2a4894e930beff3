#!/usr/bin/env bash
# The demo job: a coordinator and two workers on this machine, data-parallel on the CPU backend.
# Usage: scripts/demo.sh BIN_DIR RUN_DIR [--secure]
# --secure: the same job over mutual TLS with tokens, from `stagecoach certs init RUN_DIR/certs`:
# one worker joins with the worker certificate, the other with the worker token.
set -euo pipefail
bin=$1; run=$2; secure=${3:-}
rm -rf "$run/state" "$run/certs" "$run"/worker-*.log "$run"/worker-*.jsonl "$run"/coordinator.*
coordinator_tls=(); worker0_tls=(); worker1_tls=(); cli_tls=""; scheme=http
if [ "$secure" = "--secure" ]; then
  "$bin/stagecoach" certs init "$run/certs" >/dev/null
  c="$run/certs"
  coordinator_tls=(--tls-cert "$c/coordinator.pem" --tls-key "$c/coordinator.key" --client-ca "$c/ca.pem" --auth "$c/auth.toml")
  worker0_tls=(--ca "$c/ca.pem" --cert "$c/worker.pem" --key "$c/worker.key")
  worker1_tls=(--ca "$c/ca.pem" --token-file "$c/worker.token")
  cli_tls=" --ca $c/ca.pem --cert $c/operator.pem --key $c/operator.key"
  scheme=https
elif [ -n "$secure" ]; then
  echo "usage: scripts/demo.sh BIN_DIR RUN_DIR [--secure]" >&2; exit 2
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

"$bin/stagecoach-coordinator" --listen 127.0.0.1:0 --job examples/demo.toml --state "$run/state" ${coordinator_tls[@]+"${coordinator_tls[@]}"} \
  >"$run/coordinator.out" 2>"$run/coordinator.log" &
coord=$!
pids+=("$coord")
# The coordinator prints its address on its first stdout line, its metrics URL on the second.
for _ in $(seq 300); do
  grep -q "^metrics on " "$run/coordinator.out" 2>/dev/null && break
  kill -0 "$coord" 2>/dev/null || { cat "$run/coordinator.log" >&2; exit 1; }
  sleep 0.1
done
url="$scheme://$(sed -n 's/^listening on //p' "$run/coordinator.out")"
echo "coordinator at $url (log: $run/coordinator.log)"
echo "  watch it with: $bin/stagecoach --coordinator $url$cli_tls status"
echo "  Prometheus metrics: $(sed -n 's/^metrics on //p' "$run/coordinator.out") (each worker's: see $run/worker-*.log)"
page="$(sed -n 's/^metrics on //p' "$run/coordinator.out")"; page="${page%/metrics}/"
if [ "$secure" = "--secure" ]; then
  echo "  status page: $page (a viewer's credentials, e.g. curl --cacert $c/ca.pem --cert $c/viewer.pem --key $c/viewer.key $page; docs/status-page.md)"
else
  echo "  status page: $page (open it in a browser while the job runs; docs/status-page.md)"
fi
workers=()
for i in 0 1; do
  if [ "$i" = 0 ]; then tls=(${worker0_tls[@]+"${worker0_tls[@]}"}); else tls=(${worker1_tls[@]+"${worker1_tls[@]}"}); fi
  "$bin/stagecoach-worker" join --coordinator "$url" ${tls[@]+"${tls[@]}"} --metrics-out "$run/worker-$i.jsonl" \
    2>"$run/worker-$i.log" >/dev/null &
  workers+=("$!"); pids+=("$!")
done
# Progress: what the coordinator decides, as it happens.
tail -n +1 -f "$run/coordinator.log" --pid "$coord" \
  | grep --line-buffered -E "forming a world|world running|step committed|stage transition|validation loss|checkpoint saved|loss spike|rolling back|generation ended|job finished|job failed" \
  | sed -u -E 's/^[^ ]+ +[A-Z]+ +([a-z_]+\{[^}]*\}: )?[a-z_:]+: //' &
pids+=("$!")
status=0
# The coordinator ends with the job; if every worker ends first (they could not start, say),
# the coordinator would wait for others: stop it and fail the demo.
while kill -0 "$coord" 2>/dev/null; do
  alive=0
  for w in "${workers[@]}"; do kill -0 "$w" 2>/dev/null && alive=1; done
  if [ "$alive" = 0 ]; then
    sleep 2
    kill -0 "$coord" 2>/dev/null || break
    echo "every worker stopped before the job ended:" >&2
    grep -h -m1 "^Error" "$run"/worker-*.log >&2 || true
    "$bin/stagecoach" --coordinator "$url"$cli_tls status >&2 || true
    kill "$coord" 2>/dev/null || true
    status=1
    break
  fi
  sleep 1
done
wait "$coord" || status=$?
for w in "${workers[@]}"; do wait "$w" || status=$?; done
tail -n +3 "$run/coordinator.out"
if [ "$status" -eq 0 ]; then
  echo "demo done: the ledger is in $run/state, each worker's steps in $run/worker-*.jsonl"
else
  echo "demo failed: see $run/coordinator.log and $run/worker-*.log" >&2
fi
exit "$status"
