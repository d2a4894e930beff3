//! The worker learns: the tiny preset trained alone on the demo corpus through a two-stage
//! curriculum, as a real process, brings the loss well below where it started. A learning check,
//! not a timing.

use std::path::Path;
use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stagecoach-worker"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start stagecoach-worker");
    assert!(
        out.status.success(),
        "stagecoach-worker failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A two-stage curriculum over `steps` steps: the first four fifths at seq_len 128 over prose,
/// math and code, then a context extension to seq_len 256 with a larger RoPE θ over prose and the
/// long stories, during which the learning rate decays. 2,048 tokens per step throughout.
fn write_config(dir: &Path, data: &Path, steps: u64) -> std::path::PathBuf {
    let config = format!(
        r#"
[job]
name = "learning"

[model]
preset = "tiny"

[schedule]
peak_lr = 3e-3
warmup_steps = {warmup}
decay_start = {{ stage = "long-context" }}

[data]
seed = 5
global_batch_tokens = 2048
micro_batch_tokens = 1024

[[sources]]
name = "prose"
path = "{d}/prose/train"
eval = "{d}/prose/valid"

[[sources]]
name = "math"
path = "{d}/math/train"

[[sources]]
name = "code"
path = "{d}/code/train"

[[sources]]
name = "long"
path = "{d}/long/train"
eval = "{d}/long/valid"

[[stages]]
name = "stable"
until = {{ steps = {stable} }}
seq_len = 128
mix = {{ prose = 0.5, math = 0.3, code = 0.2 }}

[[stages]]
name = "long-context"
until = {{ steps = {steps} }}
seq_len = 256
rope_theta = 40000.0
mix = {{ prose = 0.3, long = 0.7 }}

[train]
log_every = 20
threads = 2
"#,
        d = data.display(),
        warmup = steps / 10,
        stable = steps * 4 / 5,
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn tiny_preset_learns_the_demo_corpus_through_a_context_extension() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    run(worker()
        .args([
            "demo-corpus",
            "--docs",
            "600",
            "--valid-docs",
            "20",
            "--output",
        ])
        .arg(&data));
    let config = write_config(dir.path(), &data, 150);
    let metrics = dir.path().join("metrics.jsonl");
    let stdout = run(worker()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--metrics-out")
        .arg(&metrics));
    assert!(
        stdout.contains("tokens/s"),
        "progress lines expected:\n{stdout}"
    );
    for line in [
        "stage 0 \"stable\" after 0 steps: seq_len 128, rope θ 10000, 16 samples per step in micro-batches of 8",
        "stage 1 \"long-context\" after 120 steps: seq_len 256, rope θ 40000, 8 samples per step in micro-batches of 4",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }

    let records: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 150);
    // Each stage trains with its own shape; the tokens per step stay as specified.
    for (i, r) in records.iter().enumerate() {
        let (index, stage, seq_len, theta, samples) = if i < 120 {
            (0, "stable", 128, 10_000.0, 16)
        } else {
            (1, "long-context", 256, 40_000.0, 8)
        };
        // Steps count from 0, as the coordinator's ledger (and `join`'s records) count them.
        assert_eq!(r["step"], i as u64, "{r}");
        assert_eq!(r["stage"], index, "{r}");
        assert_eq!(r["stage_name"], stage, "{r}");
        assert_eq!(r["seq_len"], seq_len, "{r}");
        assert_eq!(r["rope_theta"], theta, "{r}");
        assert_eq!(r["samples"].as_array().unwrap().len(), samples, "{r}");
        assert_eq!(r["tokens"], 2048 * (i as u64 + 1), "{r}");
    }
    // The learning rate holds through the first stage and decays over the last one.
    let lr = |i: usize| records[i]["lr"].as_f64().unwrap();
    assert_eq!(lr(60), lr(119));
    assert!((120..150).all(|i| lr(i) < lr(i - 1)));
    assert!(lr(149) < 0.1 * lr(119), "{} -> {}", lr(119), lr(149));

    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    let first = loss(&records[0]);
    let mean = |rs: &[serde_json::Value]| rs.iter().map(loss).sum::<f64>() / rs.len() as f64;
    let (end_of_stable, last10) = (mean(&records[110..120]), mean(&records[140..]));
    println!(
        "loss: first step {first:.4}, mean of steps 111-120 (seq_len 128) {end_of_stable:.4}, \
         mean of the last 10 steps (seq_len 256, rope θ 40000) {last10:.4}"
    );
    // Uniform guessing over the 264-id vocabulary costs ln(264) = 5.58 nats; random logits of
    // unit variance (the tiny preset's init) add about half a nat.
    assert!(
        (first - 264f64.ln()).abs() < 1.0,
        "initial loss {first} should be near ln(vocab)"
    );
    assert!(
        end_of_stable < 0.5 * first && last10 < 0.5 * first,
        "loss did not fall well below its start: {first} -> {end_of_stable} -> {last10}"
    );
    // Every sample came from its stage's sources, in their shares.
    let per_source = |steps: &[serde_json::Value]| -> Vec<u64> {
        (0..4)
            .map(|i| {
                steps
                    .iter()
                    .map(|r| r["samples_per_source"][i].as_u64().unwrap())
                    .sum()
            })
            .collect()
    };
    for (steps, weights, total) in [
        (&records[..120], [0.5, 0.3, 0.2, 0.0], 120.0 * 16.0),
        (&records[120..], [0.3, 0.0, 0.0, 0.7], 30.0 * 8.0),
    ] {
        let counts = per_source(steps);
        for (count, weight) in counts.iter().zip(weights) {
            assert!(
                (*count as f64 - weight * total).abs() <= 1.0,
                "{counts:?} for weights {weights:?}"
            );
        }
    }
}

#[test]
fn bad_config_and_corrupt_shards_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    run(worker()
        .args([
            "demo-corpus",
            "--docs",
            "30",
            "--valid-docs",
            "2",
            "--output",
        ])
        .arg(&data));
    let config = write_config(dir.path(), &data, 5);
    // Truncate one shard: training refuses with the file named.
    let shard = std::fs::read_dir(data.join("math/train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ds"))
        .unwrap();
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let out = worker()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&shard.display().to_string()) && err.contains("not a whole number"),
        "{err}"
    );

    // A misspelt key is named.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("seq_len", "seqlen"),
    )
    .unwrap();
    let out = worker()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seqlen"), "{err}");
}
