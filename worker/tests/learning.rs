//! The worker learns: the tiny preset trained on the demo corpus, as a real process, brings the
//! loss well below where it started. A learning check, not a timing.

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

fn write_config(dir: &Path, data: &Path, steps: u64) -> std::path::PathBuf {
    let config = format!(
        r#"
[model]
preset = "tiny"

[schedule]
peak_lr = 3e-3
warmup_steps = {warmup}
decay_fraction = 0.2

[data]
seq_len = 128
micro_batch_size = 8
global_batch = 16
seed = 5
sources = [
  {{ name = "prose", path = "{d}/prose/train", weight = 0.5 }},
  {{ name = "math", path = "{d}/math/train", weight = 0.3 }},
  {{ name = "code", path = "{d}/code/train", weight = 0.2 }},
]

[train]
steps = {steps}
log_every = 20
threads = 2
"#,
        d = data.display(),
        warmup = steps / 10
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn tiny_preset_learns_the_demo_corpus() {
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

    let records: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 150);
    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    let first = loss(&records[0]);
    let last10: f64 = records[140..].iter().map(loss).sum::<f64>() / 10.0;
    println!("loss: first step {first:.4}, mean of the last 10 steps {last10:.4}");
    // Uniform guessing over the 264-id vocabulary costs ln(264) = 5.58 nats; random logits of
    // unit variance (the tiny preset's init) add about half a nat.
    assert!(
        (first - 264f64.ln()).abs() < 1.0,
        "initial loss {first} should be near ln(vocab)"
    );
    assert!(
        last10 < 0.5 * first,
        "loss did not fall well below its start: {first} -> {last10}"
    );
    // Every sample of every step came from the configured sources, in their shares.
    let per_source: Vec<u64> = (0..3)
        .map(|i| {
            records
                .iter()
                .map(|r| r["samples_per_source"][i].as_u64().unwrap())
                .sum()
        })
        .collect();
    assert_eq!(per_source.iter().sum::<u64>(), 150 * 16);
    for (count, weight) in per_source.iter().zip([0.5, 0.3, 0.2]) {
        assert!(
            (*count as f64 - weight * 2400.0).abs() <= 1.0,
            "{per_source:?}"
        );
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
