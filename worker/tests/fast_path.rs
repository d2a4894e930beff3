//! The GPU fast path's code, run on the CPU (libtorch has CPU kernels for both): ATen's fused
//! AdamW against our element-wise AdamW and against `torch.optim.AdamW(fused=True)`; bf16
//! compute against fp32; and `bench-train` end to end. The reference python is the project's
//! venv (`make test` points STAGECOACH_PYTHON at it).

use std::path::{Path, PathBuf};
use std::process::Command;

use stagecoach_worker::hf;
use stagecoach_worker::model::{Llama, ModelConfig, Precision};
use stagecoach_worker::optim::{AdamW, AdamWConfig};
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

fn read(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing from {}", path.display()))
        .1
}

/// max |a - b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.detach().to_kind(Kind::Double);
    let b = b.detach().to_kind(Kind::Double);
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

/// Two copies of the micro model with the same weights, the second's optimizer fused.
fn twins(precision: Precision) -> [(VarStore, Llama); 2] {
    let config = ModelConfig::preset("micro").unwrap();
    let a = VarStore::new(Device::Cpu);
    let model_a = Llama::new(&a, config.clone()).unwrap();
    let mut b = VarStore::new(Device::Cpu);
    let mut model_b = Llama::new(&b, config).unwrap();
    b.copy(&a).unwrap();
    model_b.set_precision(precision);
    [(a, model_a), (b, model_b)]
}

fn batches(vocab: i64, n: usize) -> Vec<Tensor> {
    let g = Tensor::randint(vocab, [n as i64, 3, 25], (Kind::Int64, Device::Cpu));
    (0..n as i64).map(|i| g.get(i)).collect()
}

/// Trains `model` on `batches` (one step each, learning rate from `lrs`) with clipping;
/// returns the losses.
fn train(model: &Llama, opt: &mut AdamW, batches: &[Tensor], lrs: &[f64]) -> Vec<f64> {
    batches
        .iter()
        .zip(lrs)
        .map(|(b, &lr)| {
            let loss = model.loss(b).unwrap();
            loss.backward();
            opt.clip_grad_norm();
            opt.step(lr);
            opt.zero_grad();
            loss.double_value(&[])
        })
        .collect()
}

/// The fused kernel gives our element-wise update (and the same moments and step count) over
/// several steps of a real model's gradients, weight decay on the matrices only, clipping on
/// some steps. Both optimizers get the same gradients each step (model A's, copied into model
/// B's), so that rounding differences do not compound through the training itself.
#[test]
fn fused_adamw_matches_the_element_wise_update() {
    let [(vs_a, model_a), (vs_b, model_b)] = twins(Precision::Fp32);
    let config = AdamWConfig {
        weight_decay: 0.1,
        grad_clip: 1.0,
        ..AdamWConfig::default()
    };
    let mut plain = AdamW::new(&vs_a, config.clone()).unwrap();
    let mut fused = AdamW::new(&vs_b, config).unwrap();
    fused.set_fused(true).unwrap();
    assert!(fused.is_fused() && !plain.is_fused());
    let data = batches(264, 6);
    let lrs = [1e-2, 3e-3, 1e-2, 5e-3, 2e-2, 1e-3];
    // Scaled losses make clipping act on some steps and not on others.
    let scales = [1.0, 0.01, 1.0, 0.02, 3.0, 0.05];
    let mut norms = Vec::new();
    for ((batch, &lr), &scale) in data.iter().zip(&lrs).zip(&scales) {
        (model_a.loss(batch).unwrap() * scale).backward();
        (model_b.loss(batch).unwrap() * scale).backward();
        tch::no_grad(|| {
            for (p, q) in plain.params().iter().zip(fused.params()) {
                q.param.grad().copy_(&p.param.grad());
            }
        });
        norms.push(plain.clip_grad_norm());
        assert_eq!(fused.clip_grad_norm(), *norms.last().unwrap());
        plain.step(lr);
        fused.step(lr);
        plain.zero_grad();
        fused.zero_grad();
    }
    assert!(
        norms.iter().any(|&n| n > 1.0) && norms.iter().any(|&n| n < 1.0),
        "{norms:?}"
    );
    assert_eq!(plain.step_count(), 6);
    assert_eq!(fused.step_count(), 6);
    let mut worst: f64 = 0.0;
    for (p, q) in plain.params().iter().zip(fused.params()) {
        assert_eq!(p.name, q.name);
        for (what, a, b) in [
            ("param", &p.param, &q.param),
            ("exp_avg", &p.exp_avg, &q.exp_avg),
            ("exp_avg_sq", &p.exp_avg_sq, &q.exp_avg_sq),
        ] {
            let rel = relative(b, a);
            worst = worst.max(rel);
            assert!(rel <= 1e-6, "{what} of {}: relative error {rel:e}", p.name);
        }
    }
    // Both weight-decay groups moved: the gains are not all 1 any more.
    let gain = &fused
        .params()
        .iter()
        .find(|p| p.name == "model.norm.weight")
        .unwrap()
        .param;
    assert!((gain - 1.0).abs().max().double_value(&[]) > 1e-4);
    println!(
        "fused vs element-wise AdamW over 6 steps: worst relative error {worst:.3e}; grad norms {norms:?}"
    );
}

/// Our fused update equals torch.optim.AdamW(fused=True) + clip_grad_norm_ given the same
/// gradients, learning rates and parameter groups.
#[test]
fn fused_adamw_matches_torch_fused() {
    let dir = tempfile::tempdir().unwrap();
    let shapes: [(&str, &[i64]); 3] = [
        ("a.weight", &[16, 8]),
        ("a.norm.weight", &[8]),
        ("b.weight", &[3, 5, 4]),
    ];
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let params: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, s)| {
            let (path, leaf) = n.rsplit_once('.').unwrap();
            let p = path.split('.').fold(root.clone(), |p, c| p / c);
            let init = Init::Randn {
                mean: 0.0,
                stdev: 0.5,
            };
            (n.to_string(), p.var(leaf, s, init))
        })
        .collect();
    let config = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let lrs = [1e-2, 5e-3, 2e-2, 1e-3];
    let scales = [0.05, 3.0, 0.02, 5.0];
    let grads: Vec<Vec<Tensor>> = scales
        .iter()
        .map(|s| {
            params
                .iter()
                .map(|(_, p)| Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * *s)
                .collect()
        })
        .collect();
    let mut inputs: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (format!("param.{n}"), p.detach().copy()))
        .collect();
    for (step, gs) in grads.iter().enumerate() {
        for ((n, _), g) in params.iter().zip(gs) {
            inputs.push((format!("grad.{step}.{n}"), g.copy()));
        }
    }
    inputs.push(("lrs".into(), Tensor::from_slice(&lrs)));
    let (b1, b2) = config.betas;
    let hp = [b1, b2, config.eps, config.weight_decay, config.grad_clip];
    inputs.push(("hparams".into(), Tensor::from_slice(&hp)));
    let (in_path, out_path) = (
        dir.path().join("in.safetensors"),
        dir.path().join("out.safetensors"),
    );
    hf::write_safetensors(&in_path, &inputs).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/reference.py");
    let out = Command::new(python())
        .arg(script)
        .args([
            "adamw".as_ref(),
            in_path.as_os_str(),
            out_path.as_os_str(),
            "fused".as_ref(),
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "reference.py adamw fused failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut opt = AdamW::new(&vs, config).unwrap();
    opt.set_fused(true).unwrap();
    for (gs, &lr) in grads.iter().zip(&lrs) {
        let loss = params
            .iter()
            .zip(gs)
            .map(|((_, p), g)| (p * g).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b);
        loss.backward();
        opt.clip_grad_norm();
        opt.step(lr);
        opt.zero_grad();
    }
    let mut worst: f64 = 0.0;
    for p in opt.params() {
        for (what, ours) in [
            ("param", &p.param),
            ("exp_avg", &p.exp_avg),
            ("exp_avg_sq", &p.exp_avg_sq),
        ] {
            let rel = relative(ours, &read(&out_path, &format!("{what}.{}", p.name)));
            worst = worst.max(rel);
            assert!(rel <= 1e-6, "{what}.{}: relative error {rel:e}", p.name);
        }
    }
    println!("fused AdamW vs torch fused AdamW over 4 steps: worst relative error {worst:.3e}");
}

/// bf16 compute: losses within bf16 rounding of fp32's on the same data and initialisation,
/// weights, gradients and moments fp32, and the computation really is in bf16 (the logits
/// differ from fp32's).
#[test]
fn bf16_training_tracks_fp32_and_keeps_fp32_state() {
    let [(vs_a, model_a), (vs_b, model_b)] = twins(Precision::Bf16);
    assert_eq!(model_b.precision(), Precision::Bf16);
    let data = batches(264, 5);
    let probe = data[0].narrow(1, 0, 24);
    let fp32_logits = tch::no_grad(|| model_a.forward(&probe).unwrap());
    let bf16_logits = tch::no_grad(|| model_b.forward(&probe).unwrap());
    assert_eq!(bf16_logits.kind(), Kind::BFloat16);
    let logit_error = relative(&bf16_logits, &fp32_logits);
    assert!(
        logit_error > 0.0 && logit_error < 5e-2,
        "bf16 logits relative error {logit_error:e}"
    );

    let mut opt_a = AdamW::new(&vs_a, AdamWConfig::default()).unwrap();
    let mut opt_b = AdamW::new(&vs_b, AdamWConfig::default()).unwrap();
    // A gradient exists (and is fp32) after a bf16 backward.
    model_b.loss(&data[0]).unwrap().backward();
    for p in opt_b.params() {
        assert_eq!(p.param.grad().kind(), Kind::Float, "grad of {}", p.name);
    }
    opt_b.zero_grad();
    let lrs = [3e-3; 5];
    let la = train(&model_a, &mut opt_a, &data, &lrs);
    let lb = train(&model_b, &mut opt_b, &data, &lrs);
    for (i, (a, b)) in la.iter().zip(&lb).enumerate() {
        assert!((a - b).abs() <= 2e-2 * a, "step {i}: fp32 {a} vs bf16 {b}");
    }
    // Both learned: the first batch's loss fell after the five steps.
    let after = |m: &Llama| tch::no_grad(|| m.loss(&data[0]).unwrap().double_value(&[]));
    let (after_a, after_b) = (after(&model_a), after(&model_b));
    assert!(
        after_a < la[0] && after_b < lb[0],
        "fp32 {} -> {after_a}, bf16 {} -> {after_b}",
        la[0],
        lb[0]
    );
    for p in opt_b.params() {
        for t in [&p.param, &p.exp_avg, &p.exp_avg_sq] {
            assert_eq!(t.kind(), Kind::Float, "{}", p.name);
        }
    }
    println!(
        "losses fp32 {la:?}\nlosses bf16 {lb:?}\nbf16 logits relative error {logit_error:.3e}"
    );
}

#[test]
fn precision_names_parse_and_bad_ones_say_what_to_use() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::Fp32);
    let err = "fp8".parse::<Precision>().unwrap_err().to_string();
    assert!(err.contains("fp8") && err.contains("fp32 or bf16"), "{err}");
}

fn bench(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stagecoach-worker"))
        .args([
            "bench-train",
            "--device",
            "cpu",
            "--preset",
            "micro",
            "--seq",
            "32",
            "--micro-batch",
            "2",
            "--accumulation",
            "2",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--log-every",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench-train {extra:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `bench-train` on the CPU in both precisions and both optimizers: one JSON line, a positive
/// throughput, the loss read every step (warm-up included) and falling, MFU only with a peak.
#[test]
fn bench_train_reports_one_json_line() {
    let config = ModelConfig::preset("micro").unwrap();
    for extra in [
        &[][..],
        &["--precision", "bf16", "--fused-adamw", "--peak-tflops", "1"][..],
    ] {
        let r = bench(extra);
        let tps = r["tokens_per_second"].as_f64().unwrap();
        assert!(tps > 0.0, "{r}");
        let losses: Vec<f64> = r["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 5, "{r}");
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[4] < losses[0],
            "{r}"
        );
        let flops = r["flops_per_token"].as_f64().unwrap();
        // 6N plus the attention term, 12 * layers * (heads * head_dim) * seq.
        let n = config.num_parameters() as f64;
        assert_eq!(flops, 6.0 * n + 12.0 * 2.0 * 64.0 * 32.0);
        if extra.is_empty() {
            assert_eq!(r["precision"], "fp32");
            assert_eq!(r["fused_adamw"], false);
            assert!(r["mfu"].is_null(), "{r}");
        } else {
            assert_eq!(r["precision"], "bf16");
            assert_eq!(r["fused_adamw"], true);
            let mfu = r["mfu"].as_f64().unwrap();
            assert!((mfu - tps * flops / 1e12).abs() <= 1e-9 * mfu, "{r}");
        }
        assert!(r["gpu_memory_used_bytes"].is_null(), "{r}");
    }
}
