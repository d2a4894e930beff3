//! `NodeSession` from a client nobody here wrote: `tests/python/node_client.py` (grpcio, stubs
//! generated from the .proto file) registers two simulated workers, holds both sessions in one
//! node session against the real coordinator binary, and trains the job to its end: every step
//! given to both once, in order, and each of two bad workers in the same node session refused
//! alone with the code its own session would get. Once as a client that takes a Work per
//! worker, once as one that says it splits `NodeWork`s and reports each step for both in one
//! `NodeStepDone`.

use std::process::Command;

use stagecoach_e2e::{coordinator, python, status, workspace_dir};

const STEPS: u64 = 6;

#[test]
fn a_grpcio_node_session_trains_two_workers_to_the_end_of_the_job() {
    train_through_a_grpcio_node_session(false);
}

#[test]
fn a_grpcio_node_session_with_one_work_and_one_report_per_step_trains_to_the_end() {
    train_through_a_grpcio_node_session(true);
}

fn train_through_a_grpcio_node_session(combined: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The workers are simulated: the coordinator plans from the sizes they report and never
    // reads the data itself.
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"[job]
name = "node-py"

[model]
preset = "micro"

[schedule]
peak_lr = 3e-3
warmup_steps = 1

[data]
seed = 1
global_batch_tokens = 128
micro_batch_tokens = 64

[workers]
min = 2
max = 2

[checkpoints]
dir = "{checkpoints}"

[[sources]]
name = "web"
path = "{data}"

[[stages]]
name = "main"
until = {{ steps = {STEPS} }}
seq_len = 64
mix = {{ web = 1.0 }}
"#,
            checkpoints = d.join("checkpoints").display(),
            data = d.join("data").display(),
        ),
    )
    .unwrap();
    let (_coordinator, url) = coordinator(&job, &d.join("state"), &d.join("coordinator.log"));
    let out = Command::new(python())
        .arg(workspace_dir().join("tests/python/node_client.py"))
        .arg("--proto-dir")
        .arg(workspace_dir().join("proto/proto"))
        .args(["--target", url.strip_prefix("http://").unwrap()])
        .args(combined.then_some("--combined"))
        .output()
        .unwrap();
    let log = || std::fs::read_to_string(d.join("coordinator.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the grpcio client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    println!("{got}");
    assert_eq!(
        got["refused"],
        serde_json::json!({"never-said-hello": "INVALID_ARGUMENT", "never-registered": "NOT_FOUND"}),
        "{got}"
    );
    let steps = got["steps"].as_object().unwrap();
    assert_eq!(steps.len(), 2, "{got}");
    for (worker, given) in steps {
        assert_eq!(
            given,
            &serde_json::json!((0..STEPS).collect::<Vec<_>>()),
            "{worker}: every step's work once, in order"
        );
    }
    assert_eq!(
        got["ended"],
        serde_json::json!({}),
        "no session ended early"
    );
    assert_eq!(got["checkpoint_asked_at"], STEPS, "{got}");
    // Combined, every step's work came as one NodeWork for both; else as a Work each.
    let node_works = if combined { STEPS } else { 0 };
    assert_eq!(got["node_works"], node_works, "{got}");
    let s = status(&url);
    assert_eq!(s["step"], STEPS, "every step committed: {s}\n{}", log());
    assert_eq!(s["generation"], 1, "one world throughout: {s}");
}
