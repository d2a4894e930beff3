//! The `stagecoach-worker` command line as a user meets it: `inspect` refuses what training
//! refuses (and what it cannot tell without a model), and no command panics when its output
//! goes to a pipe whose reader is gone (`stagecoach-worker inspect DIR | head -1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use stagecoach_worker::shards::{ShardWriter, TokenSize};
use stagecoach_worker::tokenize::TextTokenizer;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stagecoach-worker"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("start stagecoach-worker")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small demo corpus under `dir/data`.
fn corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let out = run(worker()
        .args([
            "demo-corpus",
            "--docs",
            "40",
            "--valid-docs",
            "2",
            "--output",
        ])
        .arg(&data));
    assert!(out.status.success(), "{}", stderr(&out));
    data
}

fn ds_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ds"))
        .collect();
    files.sort();
    files
}

#[test]
fn inspect_summarises_a_folder_and_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let prose = data.join("prose").join("train");
    let out = run(worker().arg("inspect").arg(&prose));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("2-byte tokens  tokenizer stagecoach/bytes")
            && text.contains("--- first document"),
        "{text}"
    );

    // A shard without its .ds.metadata: its token size would be a guess.
    let shard = ds_files(&prose)[0].clone();
    let mut meta = shard.clone().into_os_string();
    meta.push(".metadata");
    std::fs::remove_file(&meta).unwrap();
    let out = run(worker().arg("inspect").arg(&prose));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{} has no .ds.metadata", shard.display()))
            && err.contains("pass --token-bytes 2 or 4"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Told the size, it reads it as training would.
    let out = run(worker()
        .arg("inspect")
        .arg(&prose)
        .args(["--token-bytes", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tokenizer (no metadata)"), "{text}");
    let out = run(worker()
        .arg("inspect")
        .arg(&prose)
        .args(["--token-bytes", "3"]));
    assert!(stderr(&out).contains("--token-bytes must be 2 or 4, got 3"));

    // Shards of zero tokens: nothing to train on, refused as training refuses them; an empty
    // shard beside others is listed as such.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let shard = |name: &str, docs: &[&[u32]]| {
        let mut w = ShardWriter::create(
            &empty.join(name),
            TokenSize::U16,
            TextTokenizer::Bytes.name(),
        )
        .unwrap();
        for d in docs {
            w.write_document(d).unwrap();
        }
        w.finish().unwrap();
    };
    shard("x.ds", &[]);
    let out = run(worker().arg("inspect").arg(&empty));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&empty.display().to_string()) && err.contains("hold no tokens"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let hello = TextTokenizer::Bytes.encode("hello").unwrap();
    shard("y.ds", &[&hello]);
    let out = run(worker().arg("inspect").arg(&empty));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("x.ds  0 documents  0 tokens") && text.contains("(empty: skipped"),
        "{text}"
    );
    assert!(
        text.contains("--- first document (start) ---\nhello"),
        "{text}"
    );
}

/// Every command that prints runs with its standard output a pipe nobody reads any more: it
/// exits 0 without a panic (as `... | head -1` needs).
#[test]
fn commands_exit_quietly_when_their_output_pipe_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"[job]
name = "pipe"
[model]
preset = "micro"
[schedule]
peak_lr = 1e-3
warmup_steps = 1
decay_start = {{ step = 2 }}
[data]
global_batch_tokens = 128
micro_batch_tokens = 128
[[sources]]
name = "prose"
path = "{p}"
[[stages]]
name = "main"
until = {{ steps = 3 }}
seq_len = 32
mix = {{ prose = 1.0 }}
[train]
threads = 1
log_every = 1
"#,
            p = data.join("prose").join("train").display()
        ),
    )
    .unwrap();
    let texts = dir.path().join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    std::fs::write(texts.join("a.txt"), "some text to tokenize").unwrap();
    let prose = data.join("prose").join("train").display().to_string();
    let job = job.display().to_string();
    let init = dir.path().join("init").display().to_string();
    let corpus2 = dir.path().join("corpus2").display().to_string();
    let tokens = dir.path().join("tokens").display().to_string();
    let texts = texts.display().to_string();
    let ids = dir.path().join("ids.safetensors");
    stagecoach_worker::hf::write_safetensors(
        &ids,
        &[(
            "input_ids".into(),
            tch::Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9]).view([1, 6]),
        )],
    )
    .unwrap();
    let ids = ids.display().to_string();
    let logits = dir.path().join("logits.safetensors").display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["inspect", &prose],
        vec!["train", "--config", &job],
        vec!["init", "--preset", "micro", "--output", &init],
        vec![
            "logits", "--model", &init, "--input", &ids, "--output", &logits,
        ],
        vec![
            "demo-corpus",
            "--docs",
            "3",
            "--valid-docs",
            "1",
            "--output",
            &corpus2,
        ],
        vec!["tokenize", &texts, "--output", &tokens],
        vec![
            "bench-train",
            "--preset",
            "micro",
            "--device",
            "cpu",
            "--seq",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        // The reader is gone before the command writes anything: every write fails with EPIPE.
        drop(reader);
        let out = worker()
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?}\n{err}", out.status);
    }
}
