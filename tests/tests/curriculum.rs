//! The curriculum with real processes: the shipped demo job through every stage with two
//! workers, and a manual `stage next` from the CLI in the middle of a stage. Both check the
//! ledger against a replay of the plan, so no sample is lost, repeated or reordered.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stagecoach_coordinator::ledger::StoreLedger;
use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{bin, cli, coordinator, join_worker, micro, source_tokens, status, Proc, MIX};
use stagecoach_proto::v1;

/// Writes a corpus big enough that no source wraps around within the demo job (the prose
/// source, the most used, gets about 1.2M tokens; the demo trains about 0.95M of it).
fn corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let out = Command::new(bin("stagecoach-worker"))
        .args([
            "demo-corpus",
            "--docs",
            "2500",
            "--valid-docs",
            "40",
            "--output",
        ])
        .arg(&data)
        .output()
        .expect("run stagecoach-worker demo-corpus");
    assert!(
        out.status.success(),
        "demo-corpus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

struct Run {
    job: v1::JobSpec,
    steps: Vec<v1::LedgerStep>,
    record: v1::CurriculumRecord,
    /// Per worker: (step, seq_len, rope θ) of every step it trained.
    trained: Vec<Vec<(u64, u64, f64)>>,
}

/// Starts a coordinator and two workers on `job`, runs `during` while they train, waits for
/// the end, and reads the ledger and the curriculum record back from the state store.
fn run(dir: &Path, job: &Path, during: impl FnOnce(&str)) -> Run {
    let state = dir.join("state");
    let log = dir.join("coordinator.log");
    let (mut coord, url) = coordinator(job, &state, &log);
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            let metrics = dir.join(format!("worker-{i}.jsonl"));
            join_worker(
                &url,
                dir,
                &format!("worker-{i}"),
                &["--metrics-out", metrics.to_str().unwrap()],
            )
        })
        .collect();
    during(&url);
    let status = coord.wait(Duration::from_secs(900));
    let coord_log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "coordinator failed:\n{coord_log}");
    for (i, w) in workers.iter_mut().enumerate() {
        let status = w.wait(Duration::from_secs(60));
        let log = std::fs::read_to_string(dir.join(format!("worker-{i}.log"))).unwrap();
        assert!(status.success(), "worker {i} failed:\n{log}");
    }
    let spec = JobFile::load(job).unwrap().to_proto();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (steps, record) = rt.block_on(async {
        let store = stagecoach_coordinator::store::open(state.to_str().unwrap())
            .await
            .unwrap();
        let ledger = StoreLedger::new(store, spec.name.clone());
        (
            ledger.steps().await.unwrap(),
            ledger
                .curriculum()
                .await
                .unwrap()
                .expect("a curriculum record"),
        )
    });
    let trained = (0..2)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("worker-{i}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        v["step"].as_u64().unwrap(),
                        v["seq_len"]
                            .as_u64()
                            .expect("seq_len in the worker's step record"),
                        v["rope_theta"]
                            .as_f64()
                            .expect("rope_theta in the worker's step record"),
                    )
                })
                .collect()
        })
        .collect();
    Run {
        job: spec,
        steps,
        record,
        trained,
    }
}

/// Replays the plan from the job and the recorded manual transitions and checks the ledger is
/// exactly that: every step once, in order, with the planned samples at the planned stage; and
/// that no token of any source was a training target twice.
fn check_ledger(run: &Run, data_tokens: &[u64]) {
    let mut replay = Curriculum::new(&run.job, data_tokens).unwrap();
    let manual: BTreeMap<u64, &v1::Transition> = run
        .record
        .transitions
        .iter()
        .filter(|t| {
            matches!(
                t.cause(),
                v1::TransitionCause::ManualNext | v1::TransitionCause::ManualSet
            )
        })
        .map(|t| (t.step, t))
        .collect();
    assert_eq!(
        run.steps.len() as u64,
        run.job.total_steps,
        "every step committed"
    );
    let mut targets = HashSet::new();
    for (i, entry) in run.steps.iter().enumerate() {
        assert_eq!(entry.step, i as u64, "steps in order, each once");
        if let Some(t) = manual.get(&entry.step) {
            replay.request_stage(Some(&t.to), &t.requested_by).unwrap();
        }
        let plan = replay.next_step().expect("the replay has this step");
        assert_eq!(entry.stage, plan.stage.index, "step {i}: stage");
        assert_eq!(entry.seq_len, plan.stage.seq_len, "step {i}: seq_len");
        let planned: Vec<(u32, u64)> = plan
            .samples
            .iter()
            .map(|s| (s.source as u32, s.index))
            .collect();
        let got: Vec<(u32, u64)> = entry.samples.iter().map(|s| (s.source, s.index)).collect();
        assert_eq!(
            got, planned,
            "step {i}: the ledger holds the planned samples"
        );
        for s in &entry.samples {
            for t in s.index + 1..=s.index + u64::from(entry.seq_len) {
                assert!(
                    targets.insert((s.source, t)),
                    "token {t} of source {} trained twice",
                    s.source
                );
            }
        }
    }
    assert!(replay.next_step().is_none());
    // The no-repeat check above means something only within one pass over each source.
    let last = run.steps.last().unwrap();
    assert_eq!(last.cursors.len(), data_tokens.len());
    for (i, (&cursor, &tokens)) in last.cursors.iter().zip(data_tokens).enumerate() {
        assert!(
            cursor < tokens,
            "source {i} wrapped around: {cursor} of {tokens} tokens"
        );
    }
}

/// The demo job file with its data and checkpoint paths pointed at `data` and under `dir`.
/// The shipped demo job with every stage a third as long (and its warmup): the same stages,
/// mixtures, sequence lengths, RoPE θ and evaluations, in a third of the time.
fn demo_job(dir: &Path, data: &Path) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
    let text = std::fs::read_to_string(shipped)
        .unwrap()
        .replace("runs/demo/data", data.to_str().unwrap())
        .replace("runs/demo/", &format!("{}/", dir.display()));
    let third = |line: &str, key: &str, close: &str| -> Option<String> {
        let n: u64 = line
            .strip_prefix(key)?
            .strip_suffix(close)?
            .trim()
            .parse()
            .ok()?;
        Some(format!("{key}{}{close}", n / 3))
    };
    let mut shortened = 0;
    let text: String = text
        .lines()
        .map(|line| {
            let code = line.split('#').next().unwrap_or("").trim_end();
            match third(code, "until = { steps = ", " }")
                .or_else(|| third(code, "warmup_steps = ", ""))
            {
                Some(short) => {
                    shortened += 1;
                    short
                }
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(shortened, 6, "the demo's five stage budgets and its warmup");
    let path = dir.join("demo.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_demo_curriculum_runs_through_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let job = demo_job(dir.path(), &data);
    let run = run(dir.path(), &job, |_| {});
    let stages = &run.job.stages;

    // One transition per stage, each where the previous stage's budget ends.
    let got: Vec<(u64, &str, v1::TransitionCause)> = run
        .record
        .transitions
        .iter()
        .map(|t| (t.step, t.to.as_str(), t.cause()))
        .collect();
    let mut want = vec![(0, stages[0].name.as_str(), v1::TransitionCause::Start)];
    for w in stages.windows(2) {
        want.push((
            w[0].until_step,
            w[1].name.as_str(),
            v1::TransitionCause::Budget,
        ));
    }
    assert_eq!(got, want);
    for t in &run.record.transitions {
        assert_eq!(t.tokens, t.step * run.job.global_batch_tokens);
    }

    // Per stage, each source's share of the samples is its weight (the round-robin keeps every
    // prefix within one sample of the target).
    let mut start = 0;
    for (k, stage) in stages.iter().enumerate() {
        let steps = &run.steps[start as usize..stage.until_step as usize];
        let total: usize = steps.iter().map(|s| s.samples.len()).sum();
        for (i, w) in stage.weights.iter().enumerate() {
            let n = steps
                .iter()
                .flat_map(|s| &s.samples)
                .filter(|s| s.source == i as u32)
                .count();
            let expected = w * total as f64;
            println!(
                "stage {k} {:>14}: {:>10} {:>6} samples, expected {expected:>8.1} (weight {w})",
                stage.name, run.job.sources[i].name, n
            );
            assert!((n as f64 - expected).abs() <= 1.0, "stage {k} source {i}");
        }
        start = stage.until_step;
    }

    // The context-extension stage trains longer sequences with another RoPE θ, in the same
    // worker processes (each was started once and trained every step).
    let last = stages.last().unwrap();
    let first = &stages[0];
    assert!(last.seq_len > first.seq_len && last.rope_theta != first.rope_theta);
    for trained in &run.trained {
        assert_eq!(trained.len() as u64, run.job.total_steps);
        for &(step, seq_len, theta) in trained {
            let stage = stages.iter().find(|s| step < s.until_step).unwrap();
            assert_eq!(
                (seq_len, theta),
                (u64::from(stage.seq_len), stage.rope_theta),
                "step {step}"
            );
        }
    }

    // An evaluation at every stage's end, with a loss for every source with held-out data.
    let evals: Vec<(u64, &str)> = run
        .record
        .evaluations
        .iter()
        .map(|e| (e.step, e.stage.as_str()))
        .collect();
    let want: Vec<(u64, &str)> = stages
        .iter()
        .map(|s| (s.until_step, s.name.as_str()))
        .collect();
    assert_eq!(evals, want);
    for e in &run.record.evaluations {
        assert_eq!(e.losses.len(), run.job.sources.len());
        let line: Vec<String> = e
            .losses
            .iter()
            .map(|l| format!("{} {:.3}", l.source, l.loss))
            .collect();
        println!(
            "after {:>14} (step {}): {}",
            e.stage,
            e.step,
            line.join(", ")
        );
        assert!(e.losses.iter().all(|l| l.loss.is_finite() && l.loss > 0.0));
    }

    check_ledger(&run, &source_tokens(&run.job));
}

/// Two stages on the micro preset: `first` until step 200 at seq_len 64, then `second` until
/// step 240 at seq_len 128 with a new RoPE θ.
fn two_stage_job(dir: &Path, data: &Path) -> PathBuf {
    micro("manual", data, 2)
        .stage("first", 200, 64, MIX)
        .set("data.seed", 5)
        .set("train.log_every", 20)
        .stage(
            "second",
            240,
            128,
            &[("prose", 0.2), ("math", 0.6), ("code", 0.2)],
        )
        .stage_set("rope_theta", 40000.0)
        .set(
            "checkpoints.dir",
            dir.join("checkpoints").to_string_lossy().into_owned(),
        )
        .write(dir.join("manual.toml"))
}

#[test]
fn stage_next_from_the_cli_switches_both_ranks_at_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let job = two_stage_job(dir.path(), &data);
    let mut switched_at = 0;
    let run = run(dir.path(), &job, |url| {
        // Wait for the first stage to be under way, then ask for the next one.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(Instant::now() < deadline, "the job did not start");
            let s = status(url);
            if s["step"].as_u64().unwrap_or(0) >= 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = cli(url, &["stage", "next"]);
        println!("stagecoach stage next: {}", out.trim());
        let stages: serde_json::Value =
            serde_json::from_str(&cli(url, &["stages", "--json"])).unwrap();
        println!("stagecoach stages --json: {stages}");
    });
    let manual: Vec<&v1::Transition> = run
        .record
        .transitions
        .iter()
        .filter(|t| t.cause() == v1::TransitionCause::ManualNext)
        .collect();
    assert_eq!(manual.len(), 1, "{:?}", run.record.transitions);
    let t = manual[0];
    assert_eq!((t.from.as_str(), t.to.as_str()), ("first", "second"));
    assert!(t.step >= 5 && t.step < 200, "mid-stage: step {}", t.step);
    assert!(t.requested_by.contains('@'), "who: {}", t.requested_by);
    switched_at = switched_at.max(t.step);
    println!("switched at step {switched_at} ({} tokens)", t.tokens);

    // Both ranks trained every step, at seq_len 64 before the switch and 128 from it on.
    for trained in &run.trained {
        assert_eq!(trained.len() as u64, run.job.total_steps);
        for &(step, seq_len, theta) in trained {
            let want = if step < switched_at {
                (64, 10_000.0)
            } else {
                (128, 40_000.0)
            };
            assert_eq!((seq_len, theta), want, "step {step}");
        }
    }
    check_ledger(&run, &source_tokens(&run.job));
}
