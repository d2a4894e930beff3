"""CPU training throughput: our worker against a PyTorch eager loop on the same model.

Both train the `tiny` preset (the same shapes: transformers' LlamaForCausalLM built from the
config.json our worker writes) with the same micro-batch, gradient accumulation, sequence length,
AdamW settings and thread count, in this one invocation. Warm-up steps are excluded. Our worker
reads its batches from the demo corpus shards; the PyTorch loop uses random tokens (no data cost).
Prints the ratio and appends a row to bench/results/cpu.md.

Usage: python bench/cpu.py --worker target/release/stagecoach-worker [--steps 40] [--warmup 5]
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

SEQ, MB, ACCUM, THREADS = 256, 8, 2, 2


def ours(worker, tmp, steps, warmup):
    data = os.path.join(tmp, "data")
    subprocess.run([worker, "demo-corpus", "--output", data, "--docs", "1500", "--valid-docs", "10"],
                   check=True, stdout=subprocess.DEVNULL)
    config = os.path.join(tmp, "bench.toml")
    with open(config, "w") as f:
        f.write(f"""
[model]
preset = "tiny"
[schedule]
peak_lr = 3e-3
warmup_steps = 5
[data]
micro_batch_tokens = {MB * SEQ}
global_batch_tokens = {MB * ACCUM * SEQ}
[[sources]]
name = "prose"
path = "{data}/prose/train"
[[sources]]
name = "code"
path = "{data}/code/train"
[[stages]]
name = "bench"
until = {{ steps = {steps + warmup} }}
seq_len = {SEQ}
mix = {{ prose = 0.5, code = 0.5 }}
[train]
log_every = 1000
threads = {THREADS}
""")
    metrics = os.path.join(tmp, "metrics.jsonl")
    subprocess.run([worker, "train", "--config", config, "--metrics-out", metrics], check=True,
                   stdout=subprocess.DEVNULL)
    recs = [json.loads(l) for l in open(metrics)]
    timed = recs[warmup:]
    secs = sum(MB * ACCUM * SEQ / r["tokens_per_second"] for r in timed)
    return len(timed) * MB * ACCUM * SEQ / secs


def pytorch(worker, tmp, steps, warmup):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = os.path.join(tmp, "init")
    subprocess.run([worker, "init", "--preset", "tiny", "--output", model_dir], check=True,
                   stdout=subprocess.DEVNULL)
    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        for _ in range(ACCUM):
            batch = torch.randint(0, vocab, (MB, SEQ + 1), generator=gen)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
            (loss / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return len(timed) * MB * ACCUM * SEQ / sum(timed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CI-class machine ({platform.machine()})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = pytorch(args.worker, tmp, args.steps, args.warmup)
        us = ours(args.worker, tmp, args.steps, args.warmup)
    ratio = us / ref
    print(f"tiny preset, seq {SEQ}, micro-batch {MB} x accumulation {ACCUM}, {THREADS} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"  stagecoach-worker : {us:10.0f} tokens/s")
    print(f"  PyTorch eager     : {ref:10.0f} tokens/s (torch {torch.__version__})")
    print(f"  ratio (ours / PyTorch) = {ratio:.2f}x")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# CPU training throughput: stagecoach-worker vs PyTorch eager\n\n"
                    "`make bench-cpu`; tiny preset, same model, batch, sequence length, AdamW and threads.\n\n"
                    "| date | machine | seq | micro-batch x accum | threads | ours tokens/s | PyTorch tokens/s | ratio |\n"
                    "|---|---|---|---|---|---|---|---|\n")
        f.write(f"| {datetime.date.today()} | {args.machine} | {SEQ} | {MB} x {ACCUM} | {THREADS} "
                f"| {us:.0f} | {ref:.0f} | {ratio:.2f}x |\n")
    print(f"recorded in {path}")


if __name__ == "__main__":
    sys.exit(main())
