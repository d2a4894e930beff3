"""Sets the runs of bench/gpu/run.sh side by side as a markdown table.

  python3 bench/gpu/table.py RESULTS_DIR DEVICE_NAME > results.md

RESULTS_DIR holds one `<preset>.<impl>.json` per run (one JSON line, as `stagecoach-worker
bench-train` and bench/gpu/reference.py print it) or a `<preset>.<impl>.failed` file with the
reason. The ratio column is each run's tokens/s over PyTorch eager's for the same preset.
"""

import json
import pathlib
import sys

IMPLS = ["stagecoach", "pytorch-eager", "pytorch-compile"]


def gib(b):
    return f"{b / 2**30:.1f}" if b is not None else "n/a"


def main():
    root, device = pathlib.Path(sys.argv[1]), sys.argv[2]
    runs, failed, order = {}, {}, []
    for f in sorted(root.iterdir()):
        if f.suffix not in (".json", ".failed"):
            continue
        preset, impl = f.stem.rsplit(".", 1)
        if preset not in order:
            order.append(preset)
        if f.suffix == ".json":
            runs[(preset, impl)] = json.loads(f.read_text().strip().splitlines()[-1])
        else:
            failed[(preset, impl)] = " ".join(f.read_text().split())[:160]
    any_run = next(iter(runs.values()), None)
    print(f"# Training throughput on {device}: stagecoach worker vs PyTorch\n")
    if any_run:
        print(
            f"seq {any_run['seq_len']}, micro-batch {any_run['micro_batch']}, "
            f"accumulation {any_run['accumulation']}, {any_run['steps']} timed steps after "
            f"{any_run['warmup']} warm-up steps, random tokens. stagecoach: `stagecoach-worker "
            "bench-train --precision bf16 --fused-adamw` (bf16 matrix products and attention "
            "over fp32 weights, ATen's fused AdamW). PyTorch: transformers LlamaForCausalLM, "
            "sdpa attention, bf16 autocast, fused torch.optim.AdamW; compile: the same under "
            "torch.compile. FLOPs per token = 6N + 12 * layers * heads * head_dim * seq "
            "(PaLM's count; the causal mask not halved out); MFU against 989 TFLOP/s (dense bf16, H100/H200) on CUDA. GPU "
            "memory: total - free from the driver at the end of the run (caching allocators "
            "keep what they reserved, so about the peak, CUDA context included).\n"
        )
    print("| preset | implementation | tokens/s | vs PyTorch eager | MFU | GPU memory GiB | losses (first, last) |")
    print("|---|---|---|---|---|---|---|")
    for preset in order:
        base = runs.get((preset, "pytorch-eager"))
        for impl in IMPLS + sorted({i for p, i in list(runs) + list(failed) if p == preset} - set(IMPLS)):
            if (preset, impl) in failed:
                print(f"| {preset} | {impl} | failed: {failed[(preset, impl)]} | | | | |")
                continue
            r = runs.get((preset, impl))
            if r is None:
                continue
            tps = r["tokens_per_second"]
            ratio = f"{tps / base['tokens_per_second']:.2f}x" if base else "n/a"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            losses = r.get("losses") or []
            loss = f"{losses[0]:.3f}, {losses[-1]:.3f}" if losses else "n/a"
            print(f"| {preset} | {impl} | {tps:,.0f} | {ratio} | {mfu} | {gib(r.get('gpu_memory_used_bytes'))} | {loss} |")


if __name__ == "__main__":
    main()
