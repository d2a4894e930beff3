//! Faults a run left alone meets, with the real binaries: every worker lost before the first
//! checkpoint, the state store (a real etcd) gone for 5 s and then for 30 s, and a loss spike
//! two steps after a stage brings new data. Each ends with the job complete and the ledger
//! exact.

use std::path::Path;
use std::time::{Duration, Instant};

use stagecoach_coordinator::store::local_etcd::LocalEtcd;
use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{
    coordinator, demo_corpus, finish, join_worker, micro, read_store, source_tokens, status,
    wait_for, wait_for_step, Proc, Stored, MIX,
};
use stagecoach_proto::v1;

/// Every step of `0..steps` committed once, no sample trained twice.
fn exact(store: &Stored, steps: u64) {
    assert_eq!(
        store.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..steps).collect::<Vec<_>>(),
        "every step committed once"
    );
    let mut all: Vec<(u32, u64)> = store
        .steps
        .iter()
        .flat_map(|s| s.samples.iter().map(|r| (r.source, r.index)))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a sample was trained in two committed steps");
}

fn workers(url: &str, d: &Path, name: &str, n: usize, extra: &[&str]) -> Vec<Proc> {
    (0..n)
        .map(|i| join_worker(url, d, &format!("{name}-{i}"), extra))
        .collect()
}

#[test]
fn every_worker_lost_before_the_first_checkpoint_starts_again_from_the_initial_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = micro("orphan", &data, 2)
        .stage("main", 30, 64, MIX)
        .set("checkpoints.every_steps", 1000)
        .write(d.join("orphan.toml"));
    let state = d.join("state");
    let (mut coord, url) = coordinator(&job, &state, &d.join("orphan.log"));
    let mut first = workers(&url, d, "first", 2, &[]);
    wait_for_step(&url, 8);
    for w in &mut first {
        w.child.kill().unwrap();
        let _ = w.child.wait();
    }
    let killed = Instant::now();
    let mut second = workers(&url, d, "second", 2, &[]);
    let s = wait_for(&url, Duration::from_secs(120), "training again", |s| {
        s["state"] == "running" && s["world_size"] == 2 && s["generation"].as_u64() >= Some(2)
    });
    println!(
        "every worker killed before the first checkpoint: training again after {:?} ({s})",
        killed.elapsed()
    );
    finish(&mut coord, &mut second, d, "orphan.log");
    let log = std::fs::read_to_string(d.join("orphan.log")).unwrap();
    assert!(log.contains("restoring the initial state"), "{log}");
    let store = read_store(state.to_str().unwrap(), "orphan");
    exact(&store, 30);
    assert!(
        store.rolled_back.len() >= 8,
        "the steps trained before the loss are set aside, not lost: {}",
        store.rolled_back.len()
    );
}

#[test]
fn the_state_store_may_go_away_for_5_and_for_30_seconds() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut etcd = rt.block_on(LocalEtcd::start()).expect("a local etcd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = micro("outage", &data, 2)
        .stage("main", 60, 64, MIX)
        .set("workers.lease_ms", 10_000)
        .write(d.join("outage.toml"));
    let (mut coord, url) = coordinator(&job, Path::new(&etcd.url), &d.join("outage.log"));
    let mut w = workers(&url, d, "w", 2, &[]);
    for (at, outage) in [(10u64, 5u64), (30, 30)] {
        wait_for_step(&url, at);
        etcd.kill();
        let down = Instant::now();
        // Training stops at the first commit the store cannot take, and says why.
        let held = wait_for(
            &url,
            Duration::from_secs(30),
            "an outage in the status",
            |s| s["pending_writes"].as_u64().unwrap_or(0) > 0,
        );
        assert_eq!(held["state"], "running", "{held}");
        assert!(
            held["detail"]
                .as_str()
                .unwrap_or("")
                .contains("unreachable"),
            "{held}"
        );
        let step_held = held["step"].as_u64().unwrap();
        std::thread::sleep(Duration::from_secs(outage).saturating_sub(down.elapsed()));
        let during = status(&url);
        assert_eq!(
            during["step"].as_u64(),
            Some(step_held),
            "no step committed during the outage"
        );
        rt.block_on(etcd.resume()).expect("etcd back");
        let back = Instant::now();
        wait_for_step(&url, step_held + 2);
        println!(
            "etcd down {outage} s at step {step_held}: training again {:?} after it came back",
            back.elapsed()
        );
    }
    finish(&mut coord, &mut w, d, "outage.log");
    let store = read_store(&etcd.url, "outage");
    exact(&store, 60);
    assert!(store.rolled_back.is_empty(), "an outage rolls nothing back");
}

/// SmolLM2's stage 3: a spike right after new data enters. The second step of the second
/// stage is poisoned; the detector, which has no statistics of the new stage yet, flags it
/// against the stage before and rolls back to the stage's start.
#[test]
fn a_spike_on_the_second_step_of_a_stage_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let path = micro("stage3", &data, 2)
        .stage("first", 30, 64, MIX)
        .stage(
            "second",
            50,
            64,
            &[("prose", 0.3), ("math", 0.3), ("code", 0.4)],
        )
        .set("data.seed", 9)
        .set("checkpoints.every_steps", 10)
        .set("spikes.window", 20)
        .set("spikes.min_steps", 10)
        .set("spikes.zscore", 5.0)
        .set("spikes.ratio", 1.5)
        // The micro model's loss on noise is about twice its loss on text; the default (3x)
        // is for full-size runs, where a spike is larger (SmolLM2: 10.2 against 2.55).
        .set("spikes.carry_ratio", 1.5)
        .set("spikes.ladder", vec!["rollback"])
        .set("spikes.skip_before", 0)
        .set("spikes.skip_after", 1)
        .write(d.join("stage3.toml"));
    let spec = JobFile::load(&path).unwrap().to_proto();
    let tokens = source_tokens(&spec);
    const POISONED: u64 = 31;
    let mut replay = Curriculum::new(&spec, &tokens).unwrap();
    let plan = (0..=POISONED)
        .map(|_| replay.next_step().unwrap())
        .last()
        .unwrap();
    assert_eq!(plan.stage.index, 1, "step 31 is the second of stage two");
    let poison: Vec<String> = plan
        .samples
        .iter()
        .map(|s| format!("{}:{}..{}", s.source, s.index, s.index + 1))
        .collect();
    let mut args: Vec<&str> = vec![];
    for p in &poison {
        args.extend(["--poison", p]);
    }
    let state = d.join("state");
    let (mut coord, url) = coordinator(&path, &state, &d.join("stage3.log"));
    let mut w = workers(&url, d, "w", 2, &args);
    finish(&mut coord, &mut w, d, "stage3.log");
    let store = read_store(state.to_str().unwrap(), "stage3");
    let rollbacks: Vec<&v1::SpikeEvent> = store
        .events
        .iter()
        .filter(|e| e.action() == v1::SpikeAction::Rollback)
        .collect();
    assert_eq!(rollbacks.len(), 1, "{:#?}", store.events);
    let e = rollbacks[0];
    println!(
        "spike on the second step of a stage: step {} loss {:.3} ({}), rolled back to step {}",
        e.detected_at, e.loss, e.rule, e.resumed_at_step
    );
    assert_eq!((e.detected_at, e.first_step), (POISONED, POISONED));
    assert!(e.rule.contains("previous level"), "{}", e.rule);
    assert_eq!(e.resumed_at_step, 30);
    exact(&store, 50);
    for s in &store.steps {
        for r in &s.samples {
            assert!(
                !plan
                    .samples
                    .iter()
                    .any(|p| p.source as u32 == r.source && p.index == r.index),
                "step {} trained a poisoned sample",
                s.step
            );
        }
    }
}

/// Workers that cannot open the job's data say why before they exit: the status names the
/// folder while the job waits for workers that can; one more such worker past the
/// deterministic budget pauses the job for a person (no retry for ever), and each worker exits
/// with the same reason.
#[test]
fn workers_that_cannot_open_the_data_pause_the_job_with_the_folder_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("nowhere");
    let missing = data.join("prose/train").to_string_lossy().into_owned();
    let job = micro("nodata", &data, 2)
        .stage("main", 10, 64, MIX)
        .write(d.join("nodata.toml"));
    let (_coord, url) = coordinator(&job, &d.join("state"), &d.join("nodata.log"));
    let mut ws = workers(&url, d, "w", 2, &[]);
    let s = wait_for(&url, Duration::from_secs(60), "two failures", |s| {
        s["last_failure"]["attempts"] == 2
    });
    assert_eq!(s["state"], "waiting", "{s}");
    let failure = &s["last_failure"];
    assert_eq!(failure["kind"], "data", "{s}");
    let reason = failure["reason"].as_str().unwrap();
    assert!(
        reason.contains("could not start") && reason.contains(&missing),
        "{reason}"
    );
    for (i, w) in ws.iter_mut().enumerate() {
        let code = w.wait(Duration::from_secs(30));
        assert!(!code.success());
        let log = std::fs::read_to_string(d.join(format!("w-{i}.log"))).unwrap();
        assert!(log.contains(&missing), "{log}");
    }
    let _third = join_worker(&url, d, "third", &[]);
    let s = wait_for(&url, Duration::from_secs(60), "the pause", |s| {
        s["state"] == "paused"
    });
    assert!(
        s["detail"]
            .as_str()
            .unwrap()
            .contains("3 failures at step 0"),
        "{s}"
    );
    assert!(
        s["last_failure"]["recovery"]
            .as_str()
            .unwrap()
            .contains("stagecoach resume"),
        "{s}"
    );
    assert_eq!(s["step"], 0);
}
