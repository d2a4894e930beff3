//! Worker failure with real processes: kill -9 one worker of a three-worker job. The survivors
//! leave their collective with an error, the coordinator ends the generation and forms a new one
//! with the two survivors (same global batch), the job completes, and the ledger still holds
//! every step's samples once.

use std::path::Path;
use std::time::{Duration, Instant};

use stagecoach_coordinator::ledger::StoreLedger;
use stagecoach_e2e::{coordinator, demo_corpus, join_worker, status, JobBuilder, Proc};

const STEPS: u64 = 40;
const COLLECTIVE_TIMEOUT_MS: u64 = 5000;

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn killing_a_worker_moves_the_job_to_a_new_generation_and_it_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = JobBuilder::new("kill")
        .set("schedule.warmup_steps", 0)
        .set("data.seed", 1)
        .source("prose", data.join("prose/train"))
        .source("code", data.join("code/train"))
        .stage("only", STEPS, 64, &[("prose", 0.6), ("code", 0.4)])
        .set("train.log_every", 5)
        .set("workers.min", 2)
        .set("workers.max", 3)
        .set("workers.rendezvous_ms", 4000)
        .set("workers.lease_ms", 3000)
        .set("workers.heartbeat_ms", 200)
        .set(
            "workers.collective_timeout_ms",
            COLLECTIVE_TIMEOUT_MS as i64,
        )
        .set(
            "checkpoints.dir",
            d.join("checkpoints").display().to_string(),
        )
        .write(d.join("job.toml"));
    let state = d.join("state");
    let (mut coord, url) = coordinator(&job, &state, &d.join("coordinator.log"));
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| {
            let metrics = d.join(format!("worker-{i}.jsonl"));
            join_worker(
                &url,
                d,
                &format!("worker-{i}"),
                &["--metrics-out", metrics.to_str().unwrap()],
            )
        })
        .collect();

    // Let the three-worker world train a few steps, then kill -9 the third worker.
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(&d.join("worker-2.jsonl")) < 5 {
        assert!(
            Instant::now() < deadline,
            "the three-worker world did not train"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&url)["world_size"], 3);
    workers[2].child.kill().unwrap();
    let killed = Instant::now();
    // First the generation ends (the survivor's all-reduce fails on the dead peer), then, after
    // the rendezvous wait for a replacement, generation 2 forms with the survivor.
    let (mut ended, mut formed) = (None, None);
    while formed.is_none() {
        let s = status(&url);
        let detail = s["detail"].as_str().unwrap_or_default();
        if ended.is_none()
            && (detail.contains("generation 1 ended") || s["generation"].as_u64() >= Some(2))
        {
            ended = Some(killed.elapsed());
        }
        if s["generation"].as_u64() >= Some(2) {
            formed = Some(killed.elapsed());
            assert_eq!(
                s["world_size"], 2,
                "the two survivors form the new world: {s}"
            );
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no new generation after the kill: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ended, formed) = (ended.unwrap(), formed.unwrap());
    // Training resumed: the survivors commit steps again.
    let at_formation = status(&url)["step"].as_u64().unwrap_or(0);
    let resumed = loop {
        let s = status(&url);
        if s["step"].as_u64().unwrap_or(0) > at_formation || s["state"] == "finished" {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(90),
            "no step after the new world: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "kill -9 of 1 of 3 workers: generation 1 ended after {ended:?}, generation 2 (2 workers) formed after {formed:?}, first step committed after {resumed:?}"
    );
    assert!(
        ended < Duration::from_millis(COLLECTIVE_TIMEOUT_MS) + Duration::from_secs(5),
        "the survivor should leave its collective within the collective timeout, took {ended:?}"
    );

    let finished = coord.wait(Duration::from_secs(180));
    let log = std::fs::read_to_string(d.join("coordinator.log")).unwrap();
    assert!(finished.success(), "the job did not complete:\n{log}");
    for w in &mut workers[..2] {
        assert!(
            w.wait(Duration::from_secs(30)).success(),
            "a survivor failed"
        );
    }
    let survivor = std::fs::read_to_string(d.join("worker-0.log")).unwrap();
    assert!(
        survivor.contains("leaving the collective") || survivor.contains("generation ended"),
        "the survivor should report leaving generation 1:\n{survivor}"
    );
    assert!(
        log.contains("generation ended") && log.contains("forming a world generation=2"),
        "{log}"
    );

    // Every step committed once, each with a full batch, no sample twice.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let steps = rt.block_on(async {
        let store = stagecoach_coordinator::store::open(state.to_str().unwrap())
            .await
            .unwrap();
        StoreLedger::new(store, "kill").steps().await.unwrap()
    });
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..STEPS).collect::<Vec<_>>()
    );
    assert!(steps.iter().all(|s| s.samples.len() == 8));
    assert!(steps.last().unwrap().generation >= 2);
    let mut all: Vec<(u32, u64)> = steps
        .iter()
        .flat_map(|s| s.samples.iter().map(|r| (r.source, r.index)))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a sample was trained in two committed steps");
}
