"""Reference computations in PyTorch/transformers for the worker's numerical tests.

The Rust tests write inputs as safetensors, run one of these commands with the project's venv
python, and compare what comes back with their own results.

  hf-logits MODEL_DIR INPUTS OUT      logits of transformers' LlamaForCausalLM loaded from MODEL_DIR
                                      (our checkpoint) on INPUTS["input_ids"]
  hf-init CONFIG_JSON MODEL_DIR INPUTS OUT
                                      build a randomly initialised LlamaForCausalLM from CONFIG_JSON,
                                      save it to MODEL_DIR (save_pretrained) and its logits to OUT
  adamw INPUTS OUT                    torch.optim.AdamW + clip_grad_norm_ over the steps in INPUTS
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


def adamw(inputs_path, out_path):
    t = load_file(inputs_path)
    hp = t["hparams"].double().tolist()  # beta1, beta2, eps, weight_decay, max_norm
    lrs = t["lrs"].double().tolist()
    names = sorted(k[len("param.") :] for k in t if k.startswith("param."))
    params = {n: torch.nn.Parameter(t["param." + n].clone()) for n in names}
    decay = [params[n] for n in names if params[n].dim() >= 2]
    no_decay = [params[n] for n in names if params[n].dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp[3]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lrs[0], betas=(hp[0], hp[1]), eps=hp[2], foreach=False, fused=False,
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"hf-logits": hf_logits, "hf-init": hf_init, "adamw": adamw}[cmd](*args)
