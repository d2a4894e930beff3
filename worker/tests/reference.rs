//! Numerical checks against PyTorch and transformers (the project's venv python; `make setup`
//! installs it and `make test` points STAGECOACH_PYTHON at it).

use std::path::{Path, PathBuf};
use std::process::Command;

use stagecoach_core::schedule::{DecayShape, Wsd};
use stagecoach_proto::v1;
use stagecoach_worker::checkpoint::{self, Meta, Request};
use stagecoach_worker::collective::Solo;
use stagecoach_worker::hf;
use stagecoach_worker::model::{Llama, ModelConfig};
use stagecoach_worker::optim::{AdamW, AdamWConfig};
use stagecoach_worker::shards::{ShardWriter, TokenSize};
use stagecoach_worker::train::{Guard, Shape, Trainer};
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    let p = std::env::var_os("STAGECOACH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        p.exists(),
        "no reference python at {} (run `make setup`, or set STAGECOACH_PYTHON)",
        p.display()
    );
    p
}

fn reference(args: &[&Path]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/reference.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tokens(vocab: i64, path: &Path) -> Tensor {
    tch::manual_seed(123);
    let ids = Tensor::randint(vocab, [2, 24], (Kind::Int64, Device::Cpu));
    hf::write_safetensors(path, &[("input_ids".into(), ids.shallow_clone())]).unwrap();
    ids
}

fn read(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Our random model, saved as a transformers folder, loaded by transformers: same logits. With
/// `switch_theta`, the model first runs at its preset's RoPE θ and is then switched to that θ (as
/// a context-extension stage does), and transformers builds it with that θ.
fn ours_to_transformers(preset: &str, switch_theta: Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ModelConfig::preset(preset).unwrap();
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(&vs, cfg.clone()).unwrap();
    // Non-trivial RMSNorm gains, so their names and use are checked too.
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("norm.weight") {
                let _ = t.uniform_(0.5, 1.5);
            }
        }
    });
    let (inputs, out) = (
        dir.path().join("inputs.safetensors"),
        dir.path().join("logits.safetensors"),
    );
    let ids = tokens(cfg.vocab_size, &inputs);
    if let Some(theta) = switch_theta {
        // The tables are filled at the preset's θ first, as in a run that changes stage.
        let _ = tch::no_grad(|| model.forward(&ids).unwrap());
        model.set_rope_theta(theta).unwrap();
        cfg.rope_theta = theta;
    }
    let model_dir = dir.path().join("model");
    hf::save(&vs, &cfg, &model_dir).unwrap();
    reference(&[Path::new("hf-logits"), &model_dir, &inputs, &out]);
    let ours = tch::no_grad(|| model.forward(&ids).unwrap());
    let err = max_abs(&ours, &read(&out, "logits"));
    println!(
        "{preset} (RoPE θ {}): ours -> transformers, max |logit difference| = {err:.3e}",
        cfg.rope_theta
    );
    assert!(err <= 1e-4, "{preset}: max abs logit error {err}");
}

/// A random transformers model, saved by save_pretrained, loaded by us: same logits.
fn transformers_to_ours(preset: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::preset(preset).unwrap();
    let cfg_path = dir.path().join("llama_config.json");
    std::fs::write(&cfg_path, hf::config_json(&cfg, Kind::Float).to_string()).unwrap();
    let model_dir = dir.path().join("model");
    let (inputs, out) = (
        dir.path().join("inputs.safetensors"),
        dir.path().join("logits.safetensors"),
    );
    let ids = tokens(cfg.vocab_size, &inputs);
    reference(&[Path::new("hf-init"), &cfg_path, &model_dir, &inputs, &out]);
    let loaded_cfg = hf::read_config(&model_dir.join("config.json")).unwrap();
    assert_eq!(loaded_cfg.hidden_size, cfg.hidden_size);
    assert_eq!(loaded_cfg.num_key_value_heads, cfg.num_key_value_heads);
    let mut vs = VarStore::new(Device::Cpu);
    let model = Llama::new(&vs, loaded_cfg).unwrap();
    hf::load(&mut vs, &model_dir).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids).unwrap());
    let err = max_abs(&ours, &read(&out, "logits"));
    println!("{preset}: transformers -> ours, max |logit difference| = {err:.3e}");
    assert!(err <= 1e-4, "{preset}: max abs logit error {err}");
}

#[test]
fn logits_match_transformers_micro_gqa_both_directions() {
    let cfg = ModelConfig::preset("micro").unwrap();
    assert!(
        cfg.num_key_value_heads < cfg.num_attention_heads,
        "micro must exercise GQA"
    );
    ours_to_transformers("micro", None);
    transformers_to_ours("micro");
}

/// RoPE θ switched mid-run (a context-extension stage) gives the logits transformers computes
/// for a model configured with that θ.
#[test]
fn logits_after_a_rope_theta_switch_match_transformers() {
    ours_to_transformers("micro", Some(250_000.0));
}

#[test]
fn logits_match_transformers_smollm2_135m_both_directions() {
    ours_to_transformers("smollm2-135m", None);
    transformers_to_ours("smollm2-135m");
}

/// AdamW + WSD + global-norm clipping over several steps equals torch.optim.AdamW +
/// clip_grad_norm_ given the same gradients and learning rates.
#[test]
fn adamw_wsd_clipping_matches_torch() {
    let dir = tempfile::tempdir().unwrap();
    let shapes: [(&str, &[i64]); 4] = [
        ("a.weight", &[16, 8]),
        ("b.weight", &[8, 8]),
        ("b.norm.weight", &[8]),
        ("c.weight", &[3, 5, 4]),
    ];
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let params: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, s)| {
            let (path, leaf) = n.rsplit_once('.').unwrap();
            let p = path.split('.').fold(root.clone(), |p, c| p / c);
            (
                n.to_string(),
                p.var(
                    leaf,
                    s,
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.5,
                    },
                ),
            )
        })
        .collect();
    let schedule = Wsd {
        peak_lr: 1e-2,
        warmup_steps: 2,
        total_steps: 6,
        decay_steps: 2,
        decay: DecayShape::OneMinusSqrt,
        min_lr: 1e-3,
    };
    let config = AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let lrs: Vec<f64> = (0..6).map(|s| schedule.lr(s)).collect();
    let mut inputs: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (format!("param.{n}"), p.detach().copy()))
        .collect();
    // Gradient scales alternate so that clipping is active on some steps and not on others.
    let scales = [0.05, 3.0, 0.02, 5.0, 0.1, 2.0];
    let grads: Vec<Vec<Tensor>> = scales
        .iter()
        .map(|s| {
            params
                .iter()
                .map(|(_, p)| Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * *s)
                .collect()
        })
        .collect();
    for (step, gs) in grads.iter().enumerate() {
        for ((n, _), g) in params.iter().zip(gs) {
            inputs.push((format!("grad.{step}.{n}"), g.copy()));
        }
    }
    inputs.push(("lrs".into(), Tensor::from_slice(&lrs)));
    let hp = [
        config.betas.0,
        config.betas.1,
        config.eps,
        config.weight_decay,
        config.grad_clip,
    ];
    inputs.push(("hparams".into(), Tensor::from_slice(&hp)));
    let (in_path, out_path) = (
        dir.path().join("adamw_in.safetensors"),
        dir.path().join("adamw_out.safetensors"),
    );
    hf::write_safetensors(&in_path, &inputs).unwrap();
    reference(&[Path::new("adamw"), &in_path, &out_path]);

    let mut opt = AdamW::new(&vs, config).unwrap();
    let mut norms = Vec::new();
    for (step, gs) in grads.iter().enumerate() {
        // d/dp sum(p * g) = g exactly: the gradients are the reference's.
        let loss = params
            .iter()
            .zip(gs)
            .map(|((_, p), g)| (p * g).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b);
        loss.backward();
        norms.push(opt.clip_grad_norm());
        opt.step(schedule.lr(step as u64));
        opt.zero_grad();
    }
    let reference_norms: Vec<f64> = Vec::try_from(read(&out_path, "grad_norms")).unwrap();
    for (ours, theirs) in norms.iter().zip(&reference_norms) {
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs,
            "grad norm {ours} vs {theirs}"
        );
    }
    assert!(
        norms.iter().any(|&n| n > 1.0) && norms.iter().any(|&n| n < 1.0),
        "clipping both on and off: {norms:?}"
    );
    let mut worst: f64 = 0.0;
    for p in opt.params() {
        for (what, ours) in [
            ("param", &p.param),
            ("exp_avg", &p.exp_avg),
            ("exp_avg_sq", &p.exp_avg_sq),
        ] {
            let theirs = read(&out_path, &format!("{what}.{}", p.name));
            let rel = max_abs(&ours.detach(), &theirs) / theirs.abs().max().double_value(&[]);
            worst = worst.max(rel);
            assert!(rel <= 1e-6, "{what}.{}: relative error {rel:e}", p.name);
        }
    }
    println!(
        "AdamW over {} steps: worst relative error {worst:.3e}; grad norms {norms:?}",
        lrs.len()
    );
}

/// `stagecoach-worker tokenize --tokenizer tokenizer.json` writes the ids HF tokenizers gives.
#[test]
fn tokenize_with_tokenizer_json_matches_hf_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let docs = stagecoach_worker::corpus::generate(stagecoach_worker::corpus::Domain::Code, 3, 40);
    let text = dir.path().join("train.txt");
    std::fs::write(&text, docs.join("\n")).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    reference(&[Path::new("train-tokenizer"), &text, &tokenizer]);
    let jsonl = dir.path().join("docs.jsonl");
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let ids_path = dir.path().join("ids.safetensors");
    reference(&[Path::new("encode"), &tokenizer, &jsonl, &ids_path]);
    let theirs: Vec<i64> = Vec::try_from(read(&ids_path, "ids")).unwrap();

    let out = dir.path().join("shards");
    let status = Command::new(env!("CARGO_BIN_EXE_stagecoach-worker"))
        .args(["tokenize", "--no-shuffle", "--tokenizer"])
        .arg(&tokenizer)
        .arg("--output")
        .arg(&out)
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let folder = stagecoach_worker::shards::ShardFolder::open(
        &out,
        stagecoach_worker::shards::TokenSize::U16,
    )
    .unwrap();
    let shard = &folder.shards()[0];
    assert_eq!(shard.num_documents(), docs.len() as u64);
    let ours: Vec<i64> = (0..shard.num_documents())
        .flat_map(|d| shard.document(d).unwrap())
        .collect();
    assert!(
        ours.len() < text.metadata().unwrap().len() as usize,
        "BPE should compress"
    );
    assert_eq!(ours, theirs);
}

/// A job over one folder of byte-level shards, the micro preset (GQA).
fn micro_job(dir: &Path) -> v1::JobSpec {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut w = ShardWriter::create(&data.join("00.ds"), TokenSize::U16, "bytes").unwrap();
    let text: Vec<u32> = "The stage coach left at dawn and reached the river by noon. "
        .repeat(20)
        .bytes()
        .map(u32::from)
        .collect();
    w.write_document(&text).unwrap();
    w.finish().unwrap();
    v1::JobSpec {
        name: "export".into(),
        model_preset: "micro".into(),
        optimizer: Some(v1::OptimizerSpec {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }),
        seq_len: 32,
        sources: vec![v1::SourceSpec {
            name: "prose".into(),
            path: data.display().to_string(),
            eval_path: String::new(),
        }],
        threads: 1,
        init_seed: 5,
        ..Default::default()
    }
}

/// A checkpoint taken after a few training steps (at a stage's RoPE θ) is a transformers model
/// folder: `LlamaForCausalLM.from_pretrained` on the checkpoint folder itself, and on a folder
/// holding only its model.safetensors and config.json (what `stagecoach export` writes), gives
/// our model's logits.
#[test]
fn a_checkpoint_loads_in_transformers_with_our_logits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = micro_job(dir.path());
    let mut trainer = Trainer::new(&spec, Device::Cpu).unwrap();
    trainer.set_rope_theta(40_000.0).unwrap();
    for step in 0..4u64 {
        let samples: Vec<(usize, u64)> = (0..4).map(|i| (0, step * 64 + i * 16)).collect();
        let r = trainer
            .step(
                &samples,
                Shape::new(32, 2).unwrap(),
                4,
                3e-3,
                Guard::default(),
                &mut Solo,
            )
            .unwrap();
        assert!(!r.skipped);
    }
    let ckpt = dir.path().join("checkpoints").join("step-4");
    let meta = Meta {
        job: "export".into(),
        step: 4,
        cursors: vec![256],
        stage_taken: vec![16],
        ..Default::default()
    };
    checkpoint::save_sync(
        trainer.state(),
        &meta,
        &Request {
            path: ckpt.clone(),
            id: 0,
            delete: vec![],
        },
    )
    .unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in [checkpoint::MODEL, checkpoint::CONFIG] {
        std::fs::copy(ckpt.join(f), export.join(f)).unwrap();
    }
    let inputs = dir.path().join("inputs.safetensors");
    let ids = tokens(trainer.model_config().vocab_size, &inputs);
    let ours = tch::no_grad(|| trainer.model().forward(&ids).unwrap());
    for (what, folder) in [("checkpoint folder", &ckpt), ("exported folder", &export)] {
        let out = dir.path().join("logits.safetensors");
        reference(&[Path::new("hf-logits"), folder, &inputs, &out]);
        let err = max_abs(&ours, &read(&out, "logits"));
        println!(
            "checkpoint after 4 steps (micro, RoPE θ 40000), {what} loaded by transformers: max |logit difference| = {err:.3e}"
        );
        assert!(err <= 1e-4, "{what}: max abs logit error {err}");
    }
}
