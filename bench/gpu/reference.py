"""PyTorch reference for the GPU training benchmark: transformers' LlamaForCausalLM with sdpa
attention, bf16 autocast over fp32 weights, fused torch.optim.AdamW, optionally torch.compile.

Prints one JSON line with the same fields as `stagecoach-worker bench-train`, so that
bench/gpu/table.py can set the two side by side. The model shapes are the worker's presets
(worker/src/model.rs); run.sh checks that both sides count the same parameters.

  python3 bench/gpu/reference.py --preset smollm2-135m --seq 2048 --micro-batch 4 \
      --accumulation 2 --steps 10 --warmup 3 --device cuda [--compile]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

# name: (layers, hidden, heads, kv heads, intermediate, vocab, head_dim), as ModelConfig::preset.
PRESETS = {
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, 64),
    "smollm2-360m": (32, 960, 15, 5, 2560, 49152, 64),
    "smollm2-1.7b": (24, 2048, 32, 32, 8192, 49152, 64),
    "tiny": (4, 128, 4, 2, 384, 264, 32),
    "micro": (2, 64, 4, 2, 176, 264, 16),
}


def flops_per_token(layers, heads, head_dim, params, seq):
    """6N + 12 * layers * heads * head_dim * seq (PaLM's count, the causal mask not halved out),
    as the worker's train::train_flops_per_token."""
    return 6.0 * params + 12.0 * layers * heads * head_dim * seq


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for the MFU (default: 989 on CUDA, none on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, ffn, vocab, head_dim = PRESETS[a.preset]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=max(2048, a.seq), rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True,
    )
    forward = torch.compile(model) if a.compile else model

    def loss_of(tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))

    host = [torch.randint(vocab, (a.micro_batch, a.seq + 1)) for _ in range(4)]
    if cuda:
        host = [t.pin_memory() for t in host]
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    losses, acc = [], torch.zeros((), device=device)
    micro = 0
    start = time.perf_counter()
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            start = time.perf_counter()
        for _ in range(a.accumulation):
            batch = host[micro % len(host)].to(device, non_blocking=True)
            micro += 1
            loss = loss_of(batch)
            (loss / a.accumulation).backward()
            acc += loss.detach() / a.accumulation
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, a.log_every) == 0:
            losses.append(float(acc) / max(1, a.log_every))
            acc.zero_()
    sync()
    seconds = time.perf_counter() - start
    tokens = a.steps * a.accumulation * a.micro_batch * a.seq
    tps = tokens / seconds
    fpt = flops_per_token(layers, heads, head_dim, n_params, a.seq)
    peak = a.peak_tflops if a.peak_tflops is not None else (989.0 if cuda else None)
    peak = peak * 1e12 if peak is not None else None
    used = None
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    print(json.dumps({
        "impl_name": "pytorch-compile" if a.compile else "pytorch-eager",
        "preset": a.preset,
        "parameters": n_params,
        "device": a.device,
        "precision": "bf16-autocast",
        "fused_adamw": True,
        "seq_len": a.seq,
        "micro_batch": a.micro_batch,
        "accumulation": a.accumulation,
        "steps": a.steps,
        "warmup": a.warmup,
        "seconds": seconds,
        "tokens_per_second": tps,
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak if peak else None,
        "peak_flops": peak,
        "gpu_memory_used_bytes": used,
        "torch_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "losses": losses,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
