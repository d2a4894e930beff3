//! Checkpoints, spikes and failures with real processes: a poisoned range of samples makes a
//! real loss spike that the coordinator rolls back; a job whose coordinator and worker are
//! killed resumes from its last checkpoint with the losses of the uninterrupted run; a job whose
//! coordinator alone is killed and restarted finishes with its workers reconnected.

use std::path::Path;
use std::time::{Duration, Instant};

use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{
    coordinator, coordinator_at, demo_corpus, finish, free_port, join_worker, micro, read_store,
    source_tokens, wait_for_step, JobBuilder, Proc, MIX,
};
use stagecoach_proto::v1;

/// A one-stage micro job of `steps` steps (8 samples of 64 tokens each), checkpoints every 10
/// steps under `dir`; callers add sections (e.g. [spikes]) with `set` and `write` it.
fn job(dir: &Path, name: &str, data: &Path, steps: u64, workers: u32) -> JobBuilder {
    micro(name, data, workers)
        .stage("only", steps, 64, MIX)
        .set("schedule.warmup_steps", 5)
        .set("data.seed", 11)
        .set("train.log_every", 5)
        .set("workers.lease_ms", 4000)
        .set("workers.rendezvous_ms", 1000)
        .set(
            "checkpoints.dir",
            dir.join(format!("{name}-checkpoints"))
                .to_string_lossy()
                .into_owned(),
        )
        .set("checkpoints.every_steps", 10)
        .set("checkpoints.keep", 3)
}

#[test]
fn a_poisoned_range_spikes_and_the_coordinator_rolls_back_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let path = job(d, "spike", &data, 60, 2)
        .set("spikes.window", 20)
        .set("spikes.min_steps", 10)
        .set("spikes.zscore", 5.0)
        .set("spikes.ratio", 1.5)
        .set("spikes.consecutive", 1)
        .set("spikes.ladder", vec!["rollback"])
        .set("spikes.skip_before", 0)
        .set("spikes.skip_after", 1)
        .write(d.join("spike.toml"));
    let spec = JobFile::load(&path).unwrap().to_proto();
    let tokens = source_tokens(&spec);

    // The samples of step 35, from the plan: poison exactly those.
    const POISONED: u64 = 35;
    let mut replay = Curriculum::new(&spec, &tokens).unwrap();
    let plan = (0..=POISONED)
        .map(|_| replay.next_step().unwrap())
        .last()
        .unwrap();
    let poison: Vec<String> = plan
        .samples
        .iter()
        .map(|s| format!("{}:{}..{}", s.source, s.index, s.index + 1))
        .collect();
    let mut args: Vec<&str> = vec![];
    for p in &poison {
        args.extend(["--poison", p]);
    }

    let state = d.join("state-spike");
    let (mut coord, url) = coordinator(&path, &state, &d.join("spike.log"));
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| join_worker(&url, d, &format!("spike-worker-{i}"), &args))
        .collect();
    finish(&mut coord, &mut workers, d, "spike.log");
    let store = read_store(state.to_str().unwrap(), "spike");

    // One rollback, detected at the poisoned step, to the checkpoint taken just before it.
    let rollbacks: Vec<&v1::SpikeEvent> = store
        .events
        .iter()
        .filter(|e| e.action() == v1::SpikeAction::Rollback)
        .collect();
    assert_eq!(rollbacks.len(), 1, "{:#?}", store.events);
    let e = rollbacks[0];
    println!(
        "spike at step {} (loss {:.3}, rolling mean {:.3} ± {:.3}, {}): rolled back to {} (step {}), skipped {} steps' data ({} samples) from step {}",
        e.detected_at, e.loss, e.mean, e.std, e.rule, e.rolled_back_to, e.resumed_at_step, e.skipped_steps, e.skipped_samples, e.skipped_from_step
    );
    assert_eq!((e.detected_at, e.first_step), (POISONED, POISONED));
    assert_eq!(e.resumed_at_step, 30);
    assert!(
        e.rolled_back_to.contains("step-00000030"),
        "{}",
        e.rolled_back_to
    );
    assert_eq!(
        (e.skipped_from_step, e.skipped_steps, e.skipped_samples),
        (35, 2, 16)
    );

    // The ledger: every step once, each the replay's samples, the skipped range never trained.
    assert_eq!(store.skipped.len(), 1);
    let skipped: Vec<(u32, u64)> = store.skipped[0]
        .samples
        .iter()
        .map(|s| (s.source, s.index))
        .collect();
    for s in &plan.samples {
        assert!(
            skipped.contains(&(s.source as u32, s.index)),
            "a poisoned sample was not skipped"
        );
    }
    let mut replay = Curriculum::new(&spec, &tokens).unwrap();
    assert_eq!(store.steps.len(), 60);
    for (i, entry) in store.steps.iter().enumerate() {
        assert_eq!(entry.step, i as u64);
        if entry.step == POISONED {
            let drawn: Vec<(u32, u64)> = replay
                .skip_batches(2)
                .iter()
                .map(|s| (s.source as u32, s.index))
                .collect();
            assert_eq!(
                drawn, skipped,
                "the skipped range is the plan's next two batches"
            );
        }
        let planned: Vec<(u32, u64)> = replay
            .next_step()
            .unwrap()
            .samples
            .iter()
            .map(|s| (s.source as u32, s.index))
            .collect();
        let got: Vec<(u32, u64)> = entry.samples.iter().map(|s| (s.source, s.index)).collect();
        assert_eq!(got, planned, "step {i}");
        assert!(
            got.iter().all(|s| !skipped.contains(s)),
            "step {i} trained a skipped sample"
        );
    }

    // The loss returns to its trend after the rollback.
    let mean = |r: std::ops::Range<usize>| {
        store.steps[r.clone()].iter().map(|s| s.loss).sum::<f64>() / r.len() as f64
    };
    let (before, after) = (mean(25..35), mean(37..47));
    println!("mean loss: steps 25-34 {before:.3}, steps 37-46 (after the rollback) {after:.3}");
    assert!(after < before * 1.1, "after {after} vs before {before}");
    assert!(
        store.checkpoints.len() <= 4,
        "retention keeps the last 3 (+ known-good)"
    );
}

/// Runs the `resume` job alone with one worker; returns the ledger's losses.
fn uninterrupted(d: &Path, data: &Path) -> Vec<f64> {
    let path = job(d, "reference", data, 40, 1).write(d.join("reference.toml"));
    let state = d.join("state-reference");
    let (mut coord, url) = coordinator(&path, &state, &d.join("reference.log"));
    let mut w = vec![join_worker(&url, d, "reference-worker", &[])];
    finish(&mut coord, &mut w, d, "reference.log");
    read_store(state.to_str().unwrap(), "reference")
        .steps
        .iter()
        .map(|s| s.loss)
        .collect()
}

#[test]
fn a_job_killed_mid_run_resumes_from_its_checkpoint_with_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let reference = uninterrupted(d, &data);

    // The same job (same seeds, same data), killed -9 (coordinator and worker) after step 25.
    let text = std::fs::read_to_string(d.join("reference.toml"))
        .unwrap()
        .replace("name = \"reference\"", "name = \"resume\"")
        .replace("reference-checkpoints", "resume-checkpoints");
    let path = d.join("resume.toml");
    std::fs::write(&path, text).unwrap();
    let state = d.join("state-resume");
    let (mut coord, url) = coordinator(&path, &state, &d.join("resume-1.log"));
    let mut worker = join_worker(&url, d, "resume-worker-1", &[]);
    wait_for_step(&url, 25);
    worker.child.kill().unwrap();
    coord.child.kill().unwrap();
    let _ = (worker.child.wait(), coord.child.wait());

    // A new coordinator on the same state, a fresh worker: back to the checkpoint of step 20.
    let (mut coord, url) = coordinator(&path, &state, &d.join("resume-2.log"));
    let mut workers = vec![join_worker(&url, d, "resume-worker-2", &[])];
    finish(&mut coord, &mut workers, d, "resume-2.log");
    let log = std::fs::read_to_string(d.join("resume-2.log")).unwrap();
    assert!(log.contains("restoring a checkpoint"), "{log}");
    let store = read_store(state.to_str().unwrap(), "resume");
    assert_eq!(
        store.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    assert_eq!(reference.len(), store.steps.len());
    let mut worst = 0f64;
    for (s, want) in store.steps.iter().zip(&reference) {
        worst = worst.max((s.loss - want).abs());
    }
    println!(
        "resumed from a checkpoint: max |loss - uninterrupted loss| over 40 steps = {worst:.3e}"
    );
    assert!(worst <= 1e-6, "resumed losses differ by {worst}");
}

#[test]
fn a_restarted_coordinator_picks_the_job_up_with_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let path = job(d, "restart", &data, 60, 2).write(d.join("restart.toml"));
    let state = d.join("state-restart");
    // The workers must find the new coordinator at the same address.
    let listen = format!("127.0.0.1:{}", free_port());
    let start = |log: &str| coordinator_at(&path, &state, &d.join(log), &listen);
    let (mut coord, url) = start("restart-1.log");
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            join_worker(
                &url,
                d,
                &format!("restart-worker-{i}"),
                &["--reconnect-secs", "60"],
            )
        })
        .collect();
    wait_for_step(&url, 25);
    coord.child.kill().unwrap();
    let _ = coord.child.wait();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let (mut coord, _) = start("restart-2.log");
    wait_for_step(&url, 27);
    println!(
        "coordinator restarted: training again {:?} after the kill",
        killed.elapsed()
    );
    finish(&mut coord, &mut workers, d, "restart-2.log");
    let log = std::fs::read_to_string(d.join("restart-2.log")).unwrap();
    let store = read_store(state.to_str().unwrap(), "restart");
    assert_eq!(
        store.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>(),
        "every step committed once"
    );
    let recovered = log.contains("committed from the ranks' reports");
    println!(
        "the restarted coordinator {}",
        if recovered {
            "committed the step its workers had finished (a rank was a step ahead of the ledger)"
        } else {
            "continued from the workers' state (they were at the ledger's step)"
        }
    );
    // Nothing was rolled back: no checkpoint restored, no committed step set aside.
    assert!(!log.contains("restoring a checkpoint"), "{log}");
    assert_eq!(store.rolled_back.len(), 0, "steps set aside by the restart");
    // The steps after the restart were trained in worlds the new coordinator formed.
    let before = store.steps[..=25]
        .iter()
        .map(|s| s.generation)
        .max()
        .unwrap();
    assert!(
        store.steps.last().unwrap().generation > before,
        "generation {} after the restart, {before} before",
        store.steps.last().unwrap().generation
    );
}
