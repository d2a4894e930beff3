//! The driver left alone with faults, on tokio's paused clock: failures that repeat are
//! retried with backoff and then pause (or fail) the job with the worker's message; a
//! coordinator restart commits the step its workers finished instead of rolling back; ranks
//! that came back take the committed state from one that holds it; nobody holding it restores
//! a checkpoint (the initial state counts); a checkpoint that cannot be loaded is marked and
//! an earlier one used; a store outage holds training and it resumes by itself; a step nobody
//! reports times out; the end of every stage and of the job is checkpointed; messages from
//! outside the world change nothing.

use std::time::Duration;

use stagecoach_coordinator::driver::{ControlReply, ControlRequest, Policy, Resume};
use stagecoach_coordinator::Error;
use stagecoach_core::plan::samples_digest;
use stagecoach_core::recovery::{Exhausted, RecoveryConfig};
use stagecoach_core::retention::CheckpointConfig;
use stagecoach_proto::v1;
use stagecoach_proto::v1::coordinator_message::Kind as C;
use stagecoach_proto::v1::worker_message::Kind;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::*;

/// `job()` with leases long enough that no test here loses one while it waits.
fn patient(steps: u64) -> String {
    base()
        .set("workers.lease_ms", 600_000)
        .source("a", "x")
        .source("b", "y")
        .stage("only", steps, 16, &[("a", 0.5), ("b", 0.5)])
        .to_toml()
}

fn ready_at(generation: u64, step: u64, digest: u64) -> Kind {
    let Kind::Ready(mut r) = ready(generation) else {
        unreachable!()
    };
    r.step = step;
    r.state_digest = digest;
    Kind::Ready(r)
}

fn failed(generation: u64, kind: v1::FailureKind, reason: &str) -> Kind {
    Kind::Failed(v1::Failed {
        generation,
        reason: reason.into(),
        kind: kind.into(),
        ..Default::default()
    })
}

/// Registers and attaches two workers; returns their ids and inboxes.
async fn two(h: &Harness) -> (String, String, Inbox, Inbox) {
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let ia = h.attach(&a).await;
    let ib = h.attach(&b).await;
    (a, b, ia, ib)
}

type Inbox = mpsc::Receiver<v1::CoordinatorMessage>;

/// The next World on an inbox, skipping Stops (within two minutes: backoffs are long).
async fn world(inbox: &mut Inbox) -> v1::World {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), inbox.recv())
            .await
            .expect("a World within 2 minutes")
            .expect("an open session");
        match msg.kind.expect("kind") {
            C::World(w) => return w,
            C::Stop(_) => continue,
            other => panic!("expected World, got {other:?}"),
        }
    }
}

/// No message arrives on `inbox` within `secs` (of the paused clock).
async fn silent(inbox: &mut Inbox, secs: u64) {
    let got = tokio::time::timeout(Duration::from_secs(secs), inbox.recv()).await;
    assert!(got.is_err(), "expected no message, got {got:?}");
}

async fn events(h: &Harness) -> Vec<v1::SpikeEvent> {
    let ControlReply::Events(e) = h.control(ControlRequest::ListEvents).await.unwrap() else {
        panic!("expected Events")
    };
    e.events
}

#[tokio::test(start_paused = true)]
async fn a_deterministic_failure_is_retried_with_backoff_then_pauses_with_the_workers_message() {
    let h = Harness::with_job(&patient(3));
    let (a, b, mut ia, mut ib) = two(&h).await;
    let why = "shard x/part-0.ds: token id 60000 at token offset 48 is not below the vocabulary size 49152; fix the shard";
    let mut ended = None::<Instant>;
    let mut waits = vec![];
    for attempt in 1..=3u64 {
        let (wa, wb) = (world(&mut ia).await, world(&mut ib).await);
        if let Some(t) = ended {
            waits.push(t.elapsed());
        }
        assert_eq!((wa.generation, wb.generation), (attempt, attempt));
        h.send(&a, ready(attempt)).await.unwrap();
        h.send(&b, ready(attempt)).await.unwrap();
        let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work")
        };
        h.send(&a, failed(attempt, v1::FailureKind::Data, why))
            .await
            .unwrap();
        ended = Some(Instant::now());
    }
    // Two deterministic failures are retried, 0.5 s then 1 s apart; the third pauses.
    assert!(waits[0] >= Duration::from_millis(500), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(1000), "{waits:?}");
    let C::Stop(_) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    silent(&mut ia, 60).await;
    let s = h.snapshot();
    assert_eq!(s.state, v1::JobState::Paused as i32);
    assert!(
        s.detail.contains("token id 60000") && s.detail.contains("resume"),
        "{}",
        s.detail
    );
    let f = s.last_failure.expect("the failure is in the status");
    assert_eq!(
        (f.kind(), f.attempts, f.step),
        (v1::FailureKind::Data, 3, 0)
    );
    assert!(f.reason.contains("token id 60000"), "{}", f.reason);
    let e = events(&h).await;
    assert_eq!(e.last().unwrap().action(), v1::SpikeAction::FailurePause);
    assert!(e.last().unwrap().detail.contains("token id 60000"));
    // A person fixes the data and resumes: a world forms at once, with a fresh budget.
    h.control(ControlRequest::Resume {
        requested_by: "ana@h".into(),
    })
    .await
    .unwrap();
    let w = world(&mut ia).await;
    assert_eq!(w.generation, 4);
    world(&mut ib).await;
    h.send(&a, ready(4)).await.unwrap();
    h.send(&b, ready(4)).await.unwrap();
    for step in 0..3 {
        let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work")
        };
        h.send(&a, done(4, step, 2)).await.unwrap();
        h.send(&b, done(4, step, 2)).await.unwrap();
    }
    assert_eq!(h.snapshot().state, v1::JobState::Finished as i32);
}

#[tokio::test(start_paused = true)]
async fn the_job_file_can_say_fail_instead_of_pause() {
    let policy = Policy {
        recovery: RecoveryConfig {
            max_deterministic_failures: 0,
            on_exhausted: Exhausted::Fail,
            ..RecoveryConfig::default()
        },
        ..Policy::default()
    };
    let h = Harness::with_policy(&patient(3), policy);
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    next(&mut ia).await;
    h.send(
        &b,
        failed(1, v1::FailureKind::Config, "no such device cuda:3"),
    )
    .await
    .unwrap();
    let C::Stop(stop) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(stop.reason(), v1::StopReason::JobFailed);
    let s = h.snapshot();
    assert_eq!(s.state, v1::JobState::Failed as i32);
    assert!(s.detail.contains("no such device cuda:3"), "{}", s.detail);
    assert_eq!(
        events(&h).await.last().unwrap().action(),
        v1::SpikeAction::FailureStop
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_have_a_larger_budget_and_generations_stay_few() {
    let h = Harness::with_job(&patient(3));
    let (a, b, mut ia, mut ib) = two(&h).await;
    let start = Instant::now();
    for g in 1..=9u64 {
        world(&mut ia).await;
        world(&mut ib).await;
        h.send(&a, ready(g)).await.unwrap();
        h.send(&b, ready(g)).await.unwrap();
        next(&mut ia).await;
        next(&mut ib).await;
        h.send(
            &a,
            failed(
                g,
                v1::FailureKind::Transient,
                "peer 127.0.0.1:5002 reset the connection",
            ),
        )
        .await
        .unwrap();
    }
    // Eight are retried (0.5 + 1 + 2 + 4 + 8 + 16 + 30 + 30 s of backoff); the ninth pauses.
    assert!(
        start.elapsed() >= Duration::from_millis(91_500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.snapshot().generation, 9);
    assert_eq!(h.snapshot().state, v1::JobState::Paused as i32);
}

/// Steps 0 to 4 committed; step 5 sent; the coordinator dies before its reports arrive.
/// Returns the ledger, what a restarted coordinator reads, and each rank's samples of step 5.
async fn run_until_step_5_is_lost() -> (MemLedger, Resume, Vec<Vec<v1::SampleRef>>) {
    let h = Harness::with_job(&patient(10));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    for step in 0..5 {
        let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work")
        };
        h.send(&a, done_at(1, step, 2, 11 + step)).await.unwrap();
        h.send(&b, done_at(1, step, 2, 11 + step)).await.unwrap();
    }
    let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!(x.step, 5);
    let ledger = h.ledger.clone();
    let record = ledger.1.lock().unwrap().clone();
    let resume = Resume {
        last: ledger.steps().last().cloned(),
        record,
    };
    (ledger, resume, vec![x.samples, y.samples])
}

fn done_at(generation: u64, step: u64, samples: u32, digest: u64) -> Kind {
    let Kind::StepDone(mut d) = done(generation, step, samples) else {
        unreachable!()
    };
    d.state_digest = digest;
    Kind::StepDone(d)
}

/// A rank that finished step 5 in generation 1 as `rank` of 2, with `samples`.
fn ahead(generation: u64, rank: u32, samples: &[v1::SampleRef], loss: f64) -> Kind {
    let Kind::Ready(mut r) = ready_at(generation, 6, 99) else {
        unreachable!()
    };
    r.last_step = Some(v1::StepDone {
        generation: 1,
        step: 5,
        loss_sum: loss * 2.0,
        samples: 2,
        grad_norm: 1.0,
        global_loss: loss,
        state_digest: 99,
        ..Default::default()
    });
    r.last_samples_digest = samples_digest(samples.iter().map(|s| (s.source, s.index)));
    r.last_rank = rank;
    r.last_world_size = 2;
    Kind::Ready(r)
}

#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_commits_the_step_its_workers_finished() {
    let (ledger, resume, samples) = run_until_step_5_is_lost().await;
    assert_eq!(ledger.steps().len(), 5);
    let h = Harness::resumed(
        &patient(10),
        Policy::default(),
        ledger.clone(),
        Some(resume),
    );
    let (a, b, mut ia, mut ib) = two(&h).await;
    let w = world(&mut ia).await;
    world(&mut ib).await;
    assert_eq!((w.start_step, w.restore.is_none()), (5, true));
    h.send(&a, ahead(w.generation, 0, &samples[0], 2.25))
        .await
        .unwrap();
    h.send(&b, ahead(w.generation, 1, &samples[1], 2.25))
        .await
        .unwrap();
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!(
        x.step, 6,
        "no rollback: step 5 was committed from the workers' reports"
    );
    let steps = ledger.steps();
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!((steps[5].loss, steps[5].state_digest), (2.25, 99));
    assert_eq!(
        steps[5].samples,
        [samples[0].clone(), samples[1].clone()].concat()
    );
    assert!(ledger.2.lock().unwrap().is_empty(), "nothing set aside");
}

#[tokio::test(start_paused = true)]
async fn ranks_that_disagree_on_the_lost_step_are_not_trusted() {
    let (ledger, resume, samples) = run_until_step_5_is_lost().await;
    let h = Harness::resumed(
        &patient(10),
        Policy::default(),
        ledger.clone(),
        Some(resume),
    );
    let (a, b, mut ia, mut ib) = two(&h).await;
    let w = world(&mut ia).await;
    world(&mut ib).await;
    // Rank 1 claims samples the plan does not give it.
    h.send(&a, ahead(w.generation, 0, &samples[0], 2.25))
        .await
        .unwrap();
    h.send(&b, ahead(w.generation, 1, &samples[0], 2.25))
        .await
        .unwrap();
    // Nobody holds the state of step 5 (both are past it): the initial state is restored.
    let w2 = world(&mut ia).await;
    let r = w2.restore.expect("a restore");
    assert_eq!((r.path.as_str(), r.step), ("", 0));
    assert_eq!(ledger.steps().len(), 0, "every step set aside to replay");
    assert_eq!(ledger.2.lock().unwrap().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_rank_that_came_back_takes_the_state_of_one_that_holds_it() {
    let h = Harness::with_job(&patient(10));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    for step in 0..3 {
        next(&mut ia).await;
        next(&mut ib).await;
        h.send(&a, done_at(1, step, 2, 7 + step)).await.unwrap();
        h.send(&b, done_at(1, step, 2, 7 + step)).await.unwrap();
    }
    next(&mut ia).await;
    // b restarts: a new process on the same address registers again (its old id is dropped at
    // once, ending the generation) and comes back at step 0.
    let b2 = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    assert_ne!(b2, b);
    let mut ib2 = h.attach(&b2).await;
    let w = world(&mut ia).await;
    assert_eq!(world(&mut ib2).await.generation, w.generation);
    h.send(&a, ready_at(w.generation, 3, 9)).await.unwrap();
    h.send(&b2, ready_at(w.generation, 0, 1234)).await.unwrap();
    let (C::SyncState(s), C::SyncState(_)) = (next(&mut ia).await, next(&mut ib2).await) else {
        panic!("expected SyncState")
    };
    assert_eq!((s.source_rank, s.step), (0, 3));
    h.send(&a, ready_at(w.generation, 3, 9)).await.unwrap();
    h.send(&b2, ready_at(w.generation, 3, 9)).await.unwrap();
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib2).await) else {
        panic!("expected Work")
    };
    assert_eq!(x.step, 3);
    assert!(h.ledger.2.lock().unwrap().is_empty(), "nothing rolled back");
    assert_eq!(h.ledger.steps().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn messages_from_outside_the_world_change_nothing() {
    let h = Harness::with_job(&patient(3));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    // A third client registers (it is a spare, not in generation 1) and claims a failure.
    let c = h.register("127.0.0.1:5003").await.unwrap().worker_id;
    let _ic = h.attach(&c).await;
    let claim = h
        .send(
            &c,
            failed(1, v1::FailureKind::Transient, "I say the world is over"),
        )
        .await;
    assert!(
        matches!(claim, Err(Error::FailedPrecondition(_))),
        "{claim:?}"
    );
    let stale = h
        .send(&a, failed(7, v1::FailureKind::Transient, "old news"))
        .await;
    assert!(
        matches!(stale, Err(Error::FailedPrecondition(_))),
        "{stale:?}"
    );
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!((x.generation, h.snapshot().generation), (1, 1));
    // A loss below zero is no loss: refused, nothing committed.
    let Kind::StepDone(mut d) = done(1, 0, 2) else {
        unreachable!()
    };
    d.loss_sum = -1.0;
    let bad = h.send(&a, Kind::StepDone(d)).await;
    assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    assert!(h.ledger.steps().is_empty());
    // An empty stage name is not "the next stage".
    let empty = h
        .control(ControlRequest::ChangeStage {
            stage: Some(String::new()),
            requested_by: "x".into(),
        })
        .await;
    assert!(matches!(empty, Err(Error::InvalidArgument(_))), "{empty:?}");
}

fn with_checkpoints(every: u64) -> Policy {
    Policy {
        checkpoints: Some(CheckpointConfig {
            dir: "ck".into(),
            every_steps: every,
            keep: 5,
        }),
        ..Policy::default()
    }
}

/// Answers a SaveCheckpoint on `inbox` as written.
async fn save(h: &Harness, id: &str, inbox: &mut Inbox) -> v1::SaveCheckpoint {
    let C::SaveCheckpoint(s) = next(inbox).await else {
        panic!("expected SaveCheckpoint")
    };
    let saved = Kind::CheckpointSaved(v1::CheckpointSaved {
        generation: s.generation,
        id: s.id,
        path: s.path.clone(),
        ..Default::default()
    });
    h.send(id, saved).await.unwrap();
    s
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_that_cannot_be_loaded_is_marked_and_the_one_before_is_restored() {
    let h = Harness::with_policy(&patient(10), with_checkpoints(2));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    for step in 0..5 {
        if step == 2 || step == 4 {
            save(&h, &a, &mut ia).await;
        }
        next(&mut ia).await;
        next(&mut ib).await;
        h.send(&a, done_at(1, step, 2, 50 + step)).await.unwrap();
        h.send(&b, done_at(1, step, 2, 50 + step)).await.unwrap();
    }
    // Step 5 is in flight.
    next(&mut ia).await;
    next(&mut ib).await;
    let ControlReply::RolledBack(r) = h
        .control(ControlRequest::Rollback {
            checkpoint: None,
            requested_by: "ana@h".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.step, 4);
    let w = world(&mut ia).await;
    world(&mut ib).await;
    assert_eq!(w.restore.as_ref().unwrap().path, "ck/step-00000004-g1");
    // Someone deleted that folder.
    let gone = Kind::Failed(v1::Failed {
        generation: w.generation,
        reason: "checkpoint ck/step-00000004-g1: no manifest.json".into(),
        kind: v1::FailureKind::Checkpoint.into(),
        checkpoint: "ck/step-00000004-g1".into(),
        ..Default::default()
    });
    h.send(&a, gone).await.unwrap();
    let w2 = world(&mut ia).await;
    world(&mut ib).await;
    assert_eq!(w2.restore.as_ref().unwrap().path, "ck/step-00000002-g1");
    let ControlReply::Checkpoints(index) =
        h.control(ControlRequest::ListCheckpoints).await.unwrap()
    else {
        panic!()
    };
    let four = index.checkpoints.iter().find(|c| c.step == 4).unwrap();
    assert!(four.unloadable.contains("no manifest.json"), "{four:?}");
    assert_eq!(
        events(&h).await.last().unwrap().action(),
        v1::SpikeAction::CheckpointFallback
    );
    // It is never chosen again.
    let again = h
        .control(ControlRequest::Rollback {
            checkpoint: Some("4".into()),
            requested_by: "ana@h".into(),
        })
        .await;
    assert!(
        matches!(again, Err(Error::FailedPrecondition(_))),
        "{again:?}"
    );
    h.send(&a, ready_at(w2.generation, 2, 51)).await.unwrap();
    h.send(&b, ready_at(w2.generation, 2, 51)).await.unwrap();
    let C::Work(x) = next(&mut ia).await else {
        panic!("expected Work")
    };
    assert_eq!(x.step, 2);
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_holds_training_and_it_resumes_by_itself() {
    let h = Harness::with_job(&patient(6));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    for step in 0..6 {
        next(&mut ia).await;
        next(&mut ib).await;
        if step == 2 {
            // The store goes away for its next 3 writes (under 2 s of retries).
            h.ledger.fail_next(3);
        }
        h.send(&a, done(1, step, 2)).await.unwrap();
        h.send(&b, done(1, step, 2)).await.unwrap();
        if step == 2 {
            // Nothing is dispatched while the commit waits; the status says why.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let s = h.snapshot();
            assert!(s.pending_writes > 0, "{s:?}");
            assert!(s.detail.contains("unreachable"), "{}", s.detail);
            assert_eq!(s.state, v1::JobState::Running as i32);
        }
    }
    let C::Stop(stop) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(stop.reason(), v1::StopReason::JobFinished);
    let steps: Vec<u64> = h.ledger.steps().iter().map(|s| s.step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4, 5], "every step once, in order");
    assert_eq!(h.snapshot().pending_writes, 0);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_stays_away_past_its_budget_fails_the_job_clearly() {
    let policy = Policy {
        recovery: RecoveryConfig {
            store_outage_ms: 3_000,
            ..RecoveryConfig::default()
        },
        ..Policy::default()
    };
    let h = Harness::with_policy(&patient(6), policy);
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    next(&mut ia).await;
    next(&mut ib).await;
    h.ledger.fail_next(u32::MAX);
    h.send(&a, done(1, 0, 2)).await.unwrap();
    h.send(&b, done(1, 0, 2)).await.unwrap();
    let C::Stop(stop) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(stop.reason(), v1::StopReason::JobFailed);
    assert!(
        stop.detail.contains("stayed unreachable for"),
        "{}",
        stop.detail
    );
    // The status says why the job ended, not that writes are still waiting.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let s = h.snapshot();
    assert_eq!(s.state, v1::JobState::Failed as i32);
    assert_eq!(s.detail, stop.detail);
}

#[tokio::test(start_paused = true)]
async fn a_step_nobody_reports_times_out_and_the_world_forms_again() {
    let policy = Policy {
        recovery: RecoveryConfig {
            step_timeout_ms: 2_000,
            ..RecoveryConfig::default()
        },
        ..Policy::default()
    };
    let h = Harness::with_policy(&patient(3), policy);
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    next(&mut ia).await;
    next(&mut ib).await;
    // a reports, b's Work was lost: nobody hears of it for 2 s.
    h.send(&a, done(1, 0, 2)).await.unwrap();
    let C::Stop(stop) = next(&mut ib).await else {
        panic!("expected Stop")
    };
    assert!(
        stop.detail.contains("no report from") && stop.detail.contains(&b),
        "{}",
        stop.detail
    );
    let w = world(&mut ia).await;
    assert_eq!(w.generation, 2);
    // a finished step 0, so it was committed when the generation ended.
    assert_eq!(h.ledger.steps().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn every_stage_end_and_the_last_step_are_checkpointed() {
    let text = base()
        .set("workers.lease_ms", 600_000)
        .source("a", "x")
        .source("b", "y")
        .stage("one", 2, 16, &[("a", 1.0)])
        .stage("two", 4, 16, &[("a", 0.5), ("b", 0.5)])
        .to_toml();
    let h = Harness::with_policy(&text, with_checkpoints(100));
    let (a, b, mut ia, mut ib) = two(&h).await;
    world(&mut ia).await;
    world(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    let mut saved = vec![];
    for step in 0..4 {
        if step == 2 {
            saved.push(save(&h, &a, &mut ia).await);
        }
        next(&mut ia).await;
        next(&mut ib).await;
        h.send(&a, done(1, step, 2)).await.unwrap();
        h.send(&b, done(1, step, 2)).await.unwrap();
    }
    // The job's end waits for its checkpoint.
    assert_eq!(h.snapshot().state, v1::JobState::Running as i32);
    saved.push(save(&h, &a, &mut ia).await);
    let C::Stop(stop) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(stop.reason(), v1::StopReason::JobFinished);
    let steps: Vec<u64> = saved.iter().map(|s| s.step).collect();
    assert_eq!(steps, [2, 4]);
    let ControlReply::Checkpoints(index) =
        h.control(ControlRequest::ListCheckpoints).await.unwrap()
    else {
        panic!()
    };
    let triggers: Vec<&str> = index
        .checkpoints
        .iter()
        .map(|c| c.trigger.as_str())
        .collect();
    assert_eq!(triggers, ["end of stage one", "end of the job"]);
}
