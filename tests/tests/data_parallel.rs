//! Data-parallel training with real processes: a coordinator and N workers on the CPU backend.
//! Two workers give the same per-step losses as one worker with the same global batch, and the
//! ledger shows every sample of the plan's prefix trained exactly once.

use std::path::Path;
use std::time::Duration;

use stagecoach_coordinator::ledger::StoreLedger;
use stagecoach_core::plan::Plan;
use stagecoach_e2e::{coordinator, demo_corpus, join_worker, micro_job, Proc};

const STEPS: u64 = 20;

/// A ledger step: its global loss and its samples (source, index).
type LedgerStep = (f64, Vec<(u32, u64)>);
/// The samples one worker trained.
type Trained = Vec<(usize, u64)>;

/// Runs the job with `n` workers; returns the ledger's steps and each worker's trained samples.
fn run(dir: &Path, data: &Path, n: u32) -> (Vec<LedgerStep>, Vec<Trained>) {
    let job = micro_job(dir, &format!("job-{n}.toml"), "dp", data, STEPS, n);
    let state = dir.join(format!("state-{n}"));
    let (mut coord, url) = coordinator(&job, &state, &dir.join(format!("coordinator-{n}.log")));
    let mut workers: Vec<Proc> = (0..n)
        .map(|i| {
            let metrics = dir.join(format!("worker-{n}-{i}.jsonl"));
            join_worker(
                &url,
                dir,
                &format!("worker-{n}-{i}"),
                &["--metrics-out", metrics.to_str().unwrap()],
            )
        })
        .collect();
    let status = coord.wait(Duration::from_secs(300));
    let log = std::fs::read_to_string(dir.join(format!("coordinator-{n}.log"))).unwrap();
    assert!(status.success(), "coordinator failed:\n{log}");
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(30));
        assert!(status.success(), "a worker failed");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let steps = rt.block_on(async {
        let store = stagecoach_coordinator::store::open(state.to_str().unwrap())
            .await
            .unwrap();
        StoreLedger::new(store, "dp").steps().await.unwrap()
    });
    let ledger = steps
        .iter()
        .map(|s| {
            (
                s.loss,
                s.samples.iter().map(|r| (r.source, r.index)).collect(),
            )
        })
        .collect();
    let trained = (0..n)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("worker-{n}-{i}.jsonl")))
                .unwrap()
                .lines()
                .flat_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["samples"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap()))
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    (ledger, trained)
}

#[test]
fn two_workers_match_one_and_the_ledger_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = demo_corpus(dir.path());

    let (one, _) = run(dir.path(), &data, 1);
    let (two, trained) = run(dir.path(), &data, 2);
    assert_eq!(one.len(), STEPS as usize);
    assert_eq!(two.len(), STEPS as usize);
    for (step, ((l1, s1), (l2, s2))) in one.iter().zip(&two).enumerate() {
        let rel = (l1 - l2).abs() / l1.abs();
        println!("step {step}: 1 worker {l1:.6}, 2 workers {l2:.6}, relative difference {rel:.2e}");
        assert!(rel <= 1e-5, "step {step}: {l1} vs {l2}");
        assert_eq!(s1, s2, "both runs follow the same plan");
    }

    // The plan's prefix, computed independently: a source is its .ds files of 2-byte tokens
    // read as one stream, shuffled in blocks of seq_len (64) tokens.
    let tokens: Vec<u64> = ["prose", "math", "code"]
        .iter()
        .map(|s| {
            std::fs::read_dir(data.join(s).join("train"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "ds"))
                .map(|p| std::fs::metadata(p).unwrap().len() / 2)
                .sum()
        })
        .collect();
    let mut plan = Plan::new(3, 64, &tokens, vec![0; 3]).unwrap();
    plan.set_mix(vec![0.5, 0.3, 0.2], 64, vec![0; 3]).unwrap();
    let mut prefix: Vec<(usize, u64)> = plan
        .take((STEPS * 8) as usize)
        .into_iter()
        .map(|s| (s.source, s.index))
        .collect();
    let mut ledger: Vec<(usize, u64)> = two
        .iter()
        .flat_map(|(_, s)| s.iter().map(|&(a, b)| (a as usize, b)))
        .collect();
    let mut union: Vec<(usize, u64)> = trained.concat();
    assert_eq!(
        trained.iter().map(Vec::len).collect::<Vec<_>>(),
        [STEPS as usize * 4; 2],
        "each rank trained half"
    );
    union.sort();
    ledger.sort();
    prefix.sort();
    let before = union.len();
    union.dedup();
    assert_eq!(union.len(), before, "a sample was trained twice");
    assert_eq!(union, prefix, "the ranks' samples are the plan's prefix");
    assert_eq!(ledger, prefix, "the ledger records the plan's prefix");
}
