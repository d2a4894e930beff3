"""Reference computations in PyTorch/transformers for the worker's numerical tests.

The Rust tests write inputs as safetensors, run one of these commands with the project's venv
python, and compare what comes back with their own results.

  hf-logits MODEL_DIR INPUTS OUT      logits of transformers' LlamaForCausalLM loaded from MODEL_DIR
                                      (our checkpoint) on INPUTS["input_ids"]
  hf-init CONFIG_JSON MODEL_DIR INPUTS OUT
                                      build a randomly initialised LlamaForCausalLM from CONFIG_JSON,
                                      save it to MODEL_DIR (save_pretrained) and its logits to OUT
  adamw INPUTS OUT [fused]            torch.optim.AdamW + clip_grad_norm_ over the steps in INPUTS
                                      ("fused": AdamW(fused=True), ATen's fused kernel)
  train-tokenizer TEXT OUT_JSON       train a small byte-level BPE tokenizer.json on TEXT (HF tokenizers)
  encode TOKENIZER_JSON JSONL OUT     token ids of each line's "text", each followed by <|endoftext|>
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def logits_of(model, inputs_path):
    ids = load_file(inputs_path)["input_ids"].long()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def hf_logits(model_dir, inputs_path, out_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    save_file({"logits": logits_of(model, inputs_path)}, out_path)


def hf_init(config_path, model_dir, inputs_path, out_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(config_path) as f:
        cfg = LlamaConfig(**json.load(f))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    # Non-trivial RMSNorm gains, so loading them is exercised too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(model_dir, safe_serialization=True)
    save_file({"logits": logits_of(model, inputs_path)}, out_path)


def adamw(inputs_path, out_path, kernel="single"):
    t = load_file(inputs_path)
    hp = t["hparams"].double().tolist()  # beta1, beta2, eps, weight_decay, max_norm
    lrs = t["lrs"].double().tolist()
    names = sorted(k[len("param.") :] for k in t if k.startswith("param."))
    params = {n: torch.nn.Parameter(t["param." + n].clone()) for n in names}
    decay = [params[n] for n in names if params[n].dim() >= 2]
    no_decay = [params[n] for n in names if params[n].dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp[3]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lrs[0], betas=(hp[0], hp[1]), eps=hp[2],
        foreach=False if kernel != "fused" else None, fused=kernel == "fused",
    )
    norms = []
    for step, lr in enumerate(lrs):
        for n in names:
            params[n].grad = t[f"grad.{step}.{n}"].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), hp[4], foreach=False)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    out = {"param." + n: params[n].detach().contiguous() for n in names}
    for n in names:
        st = opt.state[params[n]]
        out["exp_avg." + n] = st["exp_avg"].contiguous()
        out["exp_avg_sq." + n] = st["exp_avg_sq"].contiguous()
    out["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    save_file(out, out_path)


def train_tokenizer(text_path, out_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([text_path], trainer)
    tok.save(out_path)


def encode(tokenizer_path, jsonl_path, out_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    eos = tok.token_to_id("<|endoftext|>")
    ids = []
    with open(jsonl_path) as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [eos]
    save_file({"ids": torch.tensor(ids, dtype=torch.int64)}, out_path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    commands = {"hf-logits": hf_logits, "hf-init": hf_init, "adamw": adamw,
                "train-tokenizer": train_tokenizer, "encode": encode}
    commands[cmd](*args)
