#!/usr/bin/env bash
# `make test`'s runner. cargo test runs its test binaries one after another, and many of ours
# spend part of their time waiting (for a lease to lapse, a scrape, an alert's `for:`, Slurm)
# while a core sits idle; run side by side, one's waits overlap another's work. This script builds every test binary once (`cargo test --no-run`, the same build as the
# binaries the end-to-end tests start), runs TEST_JOBS of them at a time (default 2), the doc
# tests among them, prints each one's whole output, as cargo would, when it ends, with its
# seconds and CPU seconds, and fails if any of them failed, naming each.
#
# Binaries start longest first, by the times of the last run in this checkout
# (target/test-times.tsv, written by a run without arguments); before any, the end-to-end
# tests first.
# Arguments go to every test binary (a name filter, `--nocapture`, ...).
set -uo pipefail
cd "$(dirname "$0")/.."

jobs=${TEST_JOBS:-2}
case "$jobs" in
  '' | *[!0-9]* | 0) echo "test: TEST_JOBS must be a whole number of at least 1, not '$jobs'" >&2; exit 2 ;;
esac
cargo=${CARGO:-cargo}
python=${PYTHON:-python3}
times=target/test-times.tsv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One line per test binary: package/kind/name, source path, executable, package folder.
if ! $cargo test --workspace --no-run --message-format=json-render-diagnostics >"$work/build.json"; then
  echo "test: the test build failed" >&2
  exit 101
fi
"$python" - "$work/build.json" "$times" >"$work/plan.tsv" <<'EOF'
import json, os, sys
build, times = sys.argv[1:3]
known = {}
if os.path.exists(times):
    for line in open(times):
        key, _, secs = line.rstrip("\n").rpartition("\t")
        try:
            known[key] = float(secs)
        except ValueError:
            pass
rows = []
for line in open(build):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m["profile"]["test"]:
        continue
    t = m["target"]
    pkg = m["package_id"].split("#")[-1].split("@")[0].rsplit("/", 1)[-1]
    key = f"{pkg}/{t['kind'][0]}/{t['name']}"
    src = os.path.relpath(t["src_path"])
    # Longest first: measured time, else end-to-end before the rest.
    rank = known.get(key, 1e6 if pkg == "stagecoach-e2e" else 1e5)
    rows.append((rank, key, src, m["executable"], os.path.dirname(m["manifest_path"])))
for rank, key, src, exe, dir in sorted(rows, key=lambda r: -r[0]):
    print(f"{key}\t{src}\t{exe}\t{dir}")
EOF
[ -s "$work/plan.tsv" ] || { echo "test: the build named no test binary" >&2; exit 101; }

# Runs one binary as cargo test would (in its package's folder, CARGO and CARGO_MANIFEST_DIR
# set); its output, and its exit status, seconds and CPU seconds (its own and its children's,
# the workers and services it started), into files named by $1. The doc tests are one more
# job: rustdoc builds them while the other binaries run.
run_one() {
  local n=$1 exe=$2 dir=$3; shift 3
  local start=$SECONDS rc
  if [ "$exe" = doc-tests ]; then
    $cargo test --workspace --doc -- "$@" >"$work/$n.out" 2>&1
  else
    (cd "$dir" && CARGO=$cargo_path CARGO_MANIFEST_DIR=$dir exec "$exe" "$@") >"$work/$n.out" 2>&1
  fi
  rc=$?
  # `times`' second line: the user and system time of this shell's finished children (in this
  # shell, not in a pipeline's subshell, whose children are its own).
  times >"$work/$n.times"
  local cpu
  cpu=$(sed -n 2p "$work/$n.times" | "$python" -c 'import re, sys
print(round(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read()))))')
  echo "$rc $((SECONDS - start)) $cpu" >"$work/$n.rc.part" && mv "$work/$n.rc.part" "$work/$n.rc"
}
cargo_path=$(command -v "$cargo")

mapfile -t plan <"$work/plan.tsv"
plan=("${plan[0]}" $'doc-tests\tdoc tests\tdoc-tests\t.' "${plan[@]:1}")
total=${#plan[@]}
declare -A running=()
next=0
done_count=0
failed=()
: >"$work/times.tsv"
while [ "$done_count" -lt "$total" ]; do
  while [ "${#running[@]}" -lt "$jobs" ] && [ "$next" -lt "$total" ]; do
    IFS=$'\t' read -r key src exe dir <<<"${plan[$next]}"
    run_one "$next" "$exe" "$dir" "$@" &
    running[$next]=$!
    next=$((next + 1))
  done
  wait -n 2>/dev/null || true
  for n in "${!running[@]}"; do
    [ -f "$work/$n.rc" ] || continue
    unset "running[$n]"
    IFS=$'\t' read -r key src exe dir <<<"${plan[$n]}"
    read -r rc secs cpu <"$work/$n.rc"
    echo "     Running $src ($exe) [${secs}s, ${cpu} CPU s]"
    cat "$work/$n.out"
    echo
    printf '%s\t%s\n' "$key" "$secs" >>"$work/times.tsv"
    [ "$rc" -eq 0 ] || failed+=("$src (exit $rc)")
    done_count=$((done_count + 1))
  done
done
# Only a whole run's times order the next one (a filtered run's say little of it).
[ "$#" -gt 0 ] || { mkdir -p "$(dirname "$times")" && cp "$work/times.tsv" "$times"; }

if [ "${#failed[@]}" -gt 0 ]; then
  echo "test: ${#failed[@]} of $total failed:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 101
fi
echo "test: all $((total - 1)) test binaries and the doc tests passed"
