#!/usr/bin/env bash
# The GPU training benchmark: for each preset, our worker (`stagecoach-worker bench-train`,
# bf16 + fused AdamW) and the PyTorch reference (eager, then torch.compile) with the same seq,
# micro-batch and accumulation; then a markdown table naming the device. Builds nothing: the
# worker binary comes prebuilt (see bench/gpu/README.md). Each run is its own process with its
# own time limit, so an out-of-memory or a hang is recorded in the table and the rest go on.
#
#   bench/gpu/run.sh                      # on the GPU machine: results under $OUT (or bench/results/gpu-run)
#   bench/gpu/run.sh --dry-run            # the whole pipeline on the CPU in seconds (micro preset, seq 64)
#
# Options: --device D, --presets "P ...", --seq N, --micro-batch N, --accumulation N,
# --steps N, --warmup N, --log-every N, --no-compile / --compile, --bin PATH (default: the newest
# of .gpu/, target/release/ and target/debug/ stagecoach-worker), --python PATH, --out DIR,
# --run-timeout S (per run).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
device=cuda
presets="smollm2-135m smollm2-360m smollm2-1.7b"
seq=2048
micro_batch=4
accumulation=2
steps=10
warmup=3
log_every=5
compile=1
python=${PYTHON:-}
bin=
out=${OUT:-$repo/bench/results/gpu-run}
run_timeout=150

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run)
            # torch.compile is left out: compiling on a small CPU takes minutes (--compile adds it).
            device=cpu presets=micro seq=64 micro_batch=2 accumulation=2 steps=3 warmup=1
            log_every=1 compile=0 dry=1
            out=${OUT:-$(mktemp -d)}
            dry_python=$repo/.venv/bin/python
            ;;
        --device) device=$2; shift ;;
        --presets) presets=$2; shift ;;
        --seq) seq=$2; shift ;;
        --micro-batch) micro_batch=$2; shift ;;
        --accumulation) accumulation=$2; shift ;;
        --steps) steps=$2; shift ;;
        --warmup) warmup=$2; shift ;;
        --log-every) log_every=$2; shift ;;
        --no-compile) compile=0 ;;
        --compile) compile=1 ;;
        --bin) bin=$2; shift ;;
        --python) python=$2; shift ;;
        --out) out=$2; shift ;;
        --run-timeout) run_timeout=$2; shift ;;
        *) echo "run.sh: unknown option $1 (see the comment at the top of bench/gpu/run.sh)" >&2; exit 2 ;;
    esac
    shift
done

python=${python:-${dry_python:-python3}}
if [ -z "$bin" ]; then
    # The most recently built of the usual places.
    bin=$(ls -t "$repo/.gpu/stagecoach-worker" "$repo/target/release/stagecoach-worker" \
        "$repo/target/debug/stagecoach-worker" 2>/dev/null | head -n1 || true)
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "run.sh: no stagecoach-worker binary; build one as bench/gpu/README.md says, or pass --bin" >&2
    exit 2
fi

# The worker links libtorch from the torch wheel; on the GPU machine it is found through here.
torch_lib=$("$python" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if [ "${device%%:*}" = cuda ]; then
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
    name=${name:-CUDA device (nvidia-smi unavailable)}
else
    name="CPU ($(nproc) cores$(lscpu 2>/dev/null | sed -n 's/^Model name: *\(.*\)/, \1/p' | head -n1))"
fi

mkdir -p "$out"
echo "device: $name; results in $out" >&2
common=(--preset PRESET --seq "$seq" --micro-batch "$micro_batch" --accumulation "$accumulation"
        --steps "$steps" --warmup "$warmup" --log-every "$log_every" --device "$device")

# run NAME PRESET COMMAND...: the JSON line to $out/PRESET.NAME.json, or the reason to .failed.
run() {
    local impl=$1 preset=$2; shift 2
    local args=() a
    for a in "$@"; do args+=("${a//PRESET/$preset}"); done
    local log="$out/$preset.$impl.log"
    echo "== $preset $impl" >&2
    if timeout "$run_timeout" "${args[@]}" >"$out/$preset.$impl.out" 2>"$log"; then
        tail -n1 "$out/$preset.$impl.out" >"$out/$preset.$impl.json"
        cat "$out/$preset.$impl.json" >&2
    else
        local rc=$?
        local why
        why=$(grep -Eio 'out of memory|CUDA error[^"]*|error[^"]*' "$log" | head -n1 || true)
        [ "$rc" = 124 ] && why="timed out after ${run_timeout}s"
        echo "exit $rc: ${why:-see $preset.$impl.log}" >"$out/$preset.$impl.failed"
        echo "   failed: $(cat "$out/$preset.$impl.failed")" >&2
    fi
    rm -f "$out/$preset.$impl.out"
}

for preset in $presets; do
    run stagecoach "$preset" "$bin" bench-train "${common[@]}" --precision bf16 --fused-adamw
    run pytorch-eager "$preset" "$python" "$here/reference.py" "${common[@]}"
    if [ "$compile" = 1 ]; then
        run pytorch-compile "$preset" "$python" "$here/reference.py" "${common[@]}" --compile
    fi
    # Both sides must have built the same model.
    if [ -f "$out/$preset.stagecoach.json" ] && [ -f "$out/$preset.pytorch-eager.json" ]; then
        "$python" - "$out/$preset.stagecoach.json" "$out/$preset.pytorch-eager.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
if a["parameters"] != b["parameters"]:
    sys.exit(f"parameter counts differ: stagecoach {a['parameters']} vs pytorch {b['parameters']}")
EOF
    fi
done

"$python" "$here/table.py" "$out" "$name" >"$out/results.md"
cat "$out/results.md"
# On a GPU one preset may fail (out of memory) and the table says so; the dry run checks the
# pipeline itself, so there every side must have run.
if [ "${dry:-0}" = 1 ]; then
    failed=$(ls "$out"/*.failed 2>/dev/null || true)
    if [ -n "$failed" ]; then
        echo "run.sh --dry-run: these runs failed:" >&2
        for f in $failed; do echo "  $(basename "$f" .failed): $(cat "$f")" >&2; done
        exit 1
    fi
fi
