//! The job driver at the event level, on tokio's paused clock: world formation, step dispatch
//! and commit, refusal of malformed or out-of-order messages (with no state change), and lease
//! expiry ending a generation; the curriculum: budget and manual stage transitions, evaluations at
//! stage ends, pause and resume.

use std::time::Duration;

use stagecoach_coordinator::driver::{ControlReply, ControlRequest, Event, Policy};
use stagecoach_coordinator::Error;
use stagecoach_core::retention::CheckpointConfig;
use stagecoach_core::spike::{Rung, SpikeConfig};
use stagecoach_proto::v1;
use stagecoach_proto::v1::worker_message::Kind;
use tokio::sync::{mpsc, oneshot};

use crate::common::*;

#[tokio::test(start_paused = true)]
async fn a_world_forms_trains_and_commits_every_step() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    let (C::World(wa), C::World(wb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected World")
    };
    assert_eq!(
        (wa.generation, wa.rank, wb.rank, wa.world_size),
        (1, 0, 1, 2)
    );
    // Each rank is told the address of the next one in the ring, and no other.
    assert_eq!(
        (wa.next_peer.as_str(), wb.next_peer.as_str()),
        ("127.0.0.1:5002", "127.0.0.1:5001")
    );
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    for step in 0..3 {
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work")
        };
        assert_eq!(
            (x.step, y.step, x.samples.len(), y.samples.len()),
            (step, step, 2, 2)
        );
        h.send(&a, done(1, step, 2)).await.unwrap();
        h.send(&b, done(1, step, 2)).await.unwrap();
    }
    let C::Stop(s) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(s.reason(), v1::StopReason::JobFinished);
    let ledger = h.ledger.0.lock().unwrap().clone();
    assert_eq!(ledger.iter().map(|s| s.step).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(ledger
        .iter()
        .all(|s| s.samples.len() == 4 && (s.loss - 2.0).abs() < 1e-12));
    assert_eq!(
        ledger[2].cursors.iter().sum::<u64>(),
        12 * 16,
        "tokens consumed"
    );
    assert!(ledger.iter().all(|s| s.stage == 0 && s.seq_len == 16));
    assert_eq!(h.snapshot().state, v1::JobState::Finished as i32);
    // A worker that comes now is told, in a form a program can read, that there is nothing
    // left to do.
    let late: tonic::Status = h.register("127.0.0.1:5003").await.unwrap_err().into();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        late.metadata()
            .get(stagecoach_proto::JOB_OVER_METADATA)
            .map(|v| v.to_str().unwrap()),
        Some("finished")
    );
    assert!(
        late.message().contains("the job is over"),
        "{}",
        late.message()
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_and_out_of_order_messages_are_refused_without_effect() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    // A TCP worker without a usable address.
    assert!(matches!(
        h.register("not an address").await,
        Err(Error::InvalidArgument(_))
    ));
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    // Unknown worker.
    assert!(matches!(
        h.send("w99", Kind::Heartbeat(v1::Heartbeat {})).await,
        Err(Error::UnknownWorker(_))
    ));
    // Ready before any world exists.
    assert!(matches!(
        h.send(&a, ready(1)).await,
        Err(Error::FailedPrecondition(_))
    ));
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    // Wrong generation; wrong number of source sizes.
    assert!(matches!(
        h.send(&a, ready(7)).await,
        Err(Error::FailedPrecondition(_))
    ));
    let short = Kind::Ready(v1::Ready {
        generation: 1,
        step: 0,
        sources: vec![],
        next_nccl_unique_id: vec![],
        ..Default::default()
    });
    assert!(matches!(
        h.send(&a, short).await,
        Err(Error::InvalidArgument(_))
    ));
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    let before = h.snapshot();
    // A report for a step not in flight, a wrong sample count, a non-finite loss, a duplicate.
    assert!(matches!(
        h.send(&a, done(1, 5, 2)).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        h.send(&a, done(1, 0, 3)).await,
        Err(Error::InvalidArgument(_))
    ));
    let nan = Kind::StepDone(v1::StepDone {
        generation: 1,
        step: 0,
        loss_sum: f64::NAN,
        samples: 2,
        grad_norm: 0.0,
        ..Default::default()
    });
    assert!(matches!(
        h.send(&a, nan).await,
        Err(Error::InvalidArgument(_))
    ));
    h.send(&a, done(1, 0, 2)).await.unwrap();
    assert!(matches!(
        h.send(&a, done(1, 0, 2)).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert_eq!(h.snapshot(), before, "refused messages change nothing");
    assert!(h.ledger.0.lock().unwrap().is_empty());
    // The valid report completes the step.
    h.send(&b, done(1, 0, 2)).await.unwrap();
    assert_eq!(h.ledger.0.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_ends_the_generation_and_survivors_are_stopped() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let c = h.register("127.0.0.1:5003").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    let mut ic = h.attach(&c).await;
    // a keeps heartbeating and c joins as a spare; b falls silent.
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.send(&a, Kind::Heartbeat(v1::Heartbeat {})).await.unwrap();
        h.send(&c, Kind::Heartbeat(v1::Heartbeat {})).await.unwrap();
    }
    let C::Stop(s) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(
        (s.reason(), s.generation),
        (v1::StopReason::GenerationEnded, 1)
    );
    assert!(
        s.detail.contains(&b) && s.detail.contains("lease"),
        "{}",
        s.detail
    );
    // A new generation forms from the survivors (a and the spare c), rewound to step 0.
    let (C::World(wa), C::World(wc)) = (next(&mut ia).await, next(&mut ic).await) else {
        panic!("expected World")
    };
    assert_eq!((wa.generation, wc.generation, wa.start_step), (2, 2, 0));
    assert_eq!(h.snapshot().generation, 2);
    // b's late report is for a generation that ended.
    assert!(h.send(&b, done(1, 0, 2)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_step_finished_by_a_survivor_is_committed_when_the_generation_ends() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    // a finished step 0 (so its all-reduce completed on every rank); b dies before reporting.
    h.send(&a, done(1, 0, 2)).await.unwrap();
    let failed = Kind::Failed(v1::Failed {
        generation: 1,
        reason: "peer reset".into(),
        ..Default::default()
    });
    h.send(&b, failed).await.unwrap();
    let C::Stop(s) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(s.reason(), v1::StopReason::GenerationEnded);
    let ledger = h.ledger.0.lock().unwrap().clone();
    assert_eq!(ledger.len(), 1, "step 0 was finished, so it is committed");
    assert_eq!(
        (ledger[0].step, ledger[0].samples.len(), ledger[0].loss),
        (0, 4, 2.0)
    );
    let snap = h.snapshot();
    assert_eq!((snap.step, snap.state), (1, v1::JobState::Waiting as i32));
}

#[tokio::test(start_paused = true)]
async fn nccl_worlds_carry_rank_0s_unique_id_and_each_id_serves_one_world() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    let register = |id_byte: u8, len: usize| {
        let events = h.events.clone();
        async move {
            let (reply, rx) = oneshot::channel();
            let request = v1::RegisterRequest {
                name: "gpu".into(),
                backend: v1::CollectiveBackend::Nccl.into(),
                collective_address: String::new(),
                nccl_unique_id: vec![id_byte; len],
            };
            events
                .send(Event::Register {
                    request,
                    identity: "anonymous".into(),
                    reply,
                })
                .await
                .unwrap();
            rx.await.unwrap()
        }
    };
    assert!(
        matches!(register(1, 7).await, Err(Error::InvalidArgument(_))),
        "a short id is refused"
    );
    let a = register(1, 128).await.unwrap().worker_id;
    let b = register(2, 128).await.unwrap().worker_id;
    // A TCP worker cannot join an NCCL job.
    assert!(matches!(
        h.register("127.0.0.1:5003").await,
        Err(Error::FailedPrecondition(_))
    ));
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    let (C::World(wa), C::World(wb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected World")
    };
    assert_eq!(wa.nccl_unique_id, vec![1; 128]);
    assert_eq!(
        wb.nccl_unique_id,
        vec![1; 128],
        "every rank gets rank 0's id"
    );
    // Ready must bring a fresh id for a later world.
    assert!(matches!(
        h.send(&a, ready(1)).await,
        Err(Error::InvalidArgument(_))
    ));
    let fresh = |byte: u8| {
        let Kind::Ready(mut r) = ready(1) else {
            unreachable!()
        };
        r.next_nccl_unique_id = vec![byte; 128];
        Kind::Ready(r)
    };
    h.send(&a, fresh(3)).await.unwrap();
    h.send(&b, fresh(4)).await.unwrap();
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    // b's collective fails; the next world (the same two workers) uses a's fresh id, not the
    // spent one.
    let failed = Kind::Failed(v1::Failed {
        generation: 1,
        reason: "NCCL error".into(),
        ..Default::default()
    });
    h.send(&b, failed).await.unwrap();
    let C::Stop(_) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    let C::World(w2) = next(&mut ia).await else {
        panic!("expected World")
    };
    assert_eq!((w2.generation, w2.rank), (2, 0));
    assert_eq!(w2.nccl_unique_id, vec![3; 128]);
}

#[tokio::test(start_paused = true)]
async fn the_end_of_an_old_session_does_not_detach_a_newer_one() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::start();
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let _old = h.attach(&a).await; // session 1
    let mut ia = h.attach(&a).await; // session 2 replaces it
    let old_session = h.sessions.get() - 1;
    h.events
        .send(Event::Detach {
            worker_id: a.clone(),
            session: old_session,
        })
        .await
        .unwrap();
    let mut ib = h.attach(&b).await;
    // a is still attached through its new session, so the world forms with both.
    let (C::World(wa), C::World(wb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected World")
    };
    assert_eq!((wa.world_size, wb.world_size), (2, 2));
}

/// Answers an Evaluate with a loss of 3.0 per sample (per source it was sent).
fn eval_done(generation: u64, e: &v1::Evaluate) -> Kind {
    let mut per: std::collections::BTreeMap<u32, u32> = Default::default();
    for s in &e.samples {
        *per.entry(s.source).or_default() += 1;
    }
    Kind::EvalDone(v1::EvalDone {
        generation,
        id: e.id,
        losses: per
            .into_iter()
            .map(|(source, n)| v1::EvalLoss {
                source,
                loss_sum: 3.0 * n as f64,
                samples: n,
            })
            .collect(),
    })
}

/// Registers two workers, forms generation 1, and sends both Ready.
async fn two_ready(
    h: &Harness,
) -> (
    String,
    String,
    mpsc::Receiver<v1::CoordinatorMessage>,
    mpsc::Receiver<v1::CoordinatorMessage>,
) {
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    h.send(&a, ready(1)).await.unwrap();
    h.send(&b, ready(1)).await.unwrap();
    (a, b, ia, ib)
}

#[tokio::test(start_paused = true)]
async fn stages_change_on_budget_with_an_evaluation_at_each_end_and_pause_holds_steps() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::with_job(&curriculum());
    let (a, b, mut ia, mut ib) = two_ready(&h).await;
    for step in 0..2 {
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work")
        };
        let stage = x.stage.unwrap();
        assert_eq!(
            (x.step, stage.index, stage.seq_len, stage.micro_batch_size),
            (step, 0, 16, 2)
        );
        assert_eq!(y.stage, x.stage, "every rank trains the same stage");
        assert!(
            x.samples.iter().chain(&y.samples).all(|s| s.source == 0),
            "stage one is a alone"
        );
        h.send(&a, done(1, step, 2)).await.unwrap();
        h.send(&b, done(1, step, 2)).await.unwrap();
    }
    // Stage one's budget is spent: first its evaluation, on both ranks.
    let (C::Evaluate(ea), C::Evaluate(eb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Evaluate")
    };
    assert_eq!((ea.seq_len, ea.samples.len() + eb.samples.len()), (16, 4));
    let offsets: Vec<(u32, u64)> = ea
        .samples
        .iter()
        .chain(&eb.samples)
        .map(|s| (s.source, s.index))
        .collect();
    assert_eq!(offsets, [(0, 0), (0, 16), (1, 0), (1, 16)]);
    // A report that does not match what the rank was sent is refused.
    let wrong = Kind::EvalDone(v1::EvalDone {
        generation: 1,
        id: ea.id,
        losses: vec![v1::EvalLoss {
            source: 1,
            loss_sum: 1.0,
            samples: 2,
        }],
    });
    assert!(matches!(
        h.send(&a, wrong).await,
        Err(Error::InvalidArgument(_))
    ));
    h.send(&a, eval_done(1, &ea)).await.unwrap();
    h.send(&b, eval_done(1, &eb)).await.unwrap();
    // Then stage two: twice the sequence length, half the samples, a new θ.
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    let stage = x.stage.unwrap();
    assert_eq!(
        (x.step, stage.index, stage.seq_len, stage.rope_theta),
        (2, 1, 32, 40000.0)
    );
    assert_eq!(
        (x.global_batch, x.samples.len(), stage.micro_batch_size),
        (2, 1, 1)
    );
    // Pause with step 2 in flight: it completes, nothing more is sent.
    let ControlReply::Paused(p) = h
        .control(ControlRequest::Pause {
            requested_by: "ana@h".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(p.step, 3);
    h.send(&a, done(1, 2, 1)).await.unwrap();
    h.send(&b, done(1, 2, 1)).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.send(&a, Kind::Heartbeat(v1::Heartbeat {})).await.unwrap();
        h.send(&b, Kind::Heartbeat(v1::Heartbeat {})).await.unwrap();
    }
    assert!(ia.try_recv().is_err(), "no work while paused");
    let snap = h.snapshot();
    assert_eq!((snap.state, snap.step), (v1::JobState::Paused as i32, 3));
    assert!(snap.detail.contains("ana@h"), "{}", snap.detail);
    h.control(ControlRequest::Resume {
        requested_by: "ana@h".into(),
    })
    .await
    .unwrap();
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!(x.step, 3);
    h.send(&a, done(1, 3, 1)).await.unwrap();
    h.send(&b, done(1, 3, 1)).await.unwrap();
    // The last stage ends with the job: one more evaluation, then the end.
    let (C::Evaluate(ea), C::Evaluate(eb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Evaluate")
    };
    h.send(&a, eval_done(1, &ea)).await.unwrap();
    h.send(&b, eval_done(1, &eb)).await.unwrap();
    let C::Stop(s) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert_eq!(s.reason(), v1::StopReason::JobFinished);

    let stages = h.stages().await;
    let causes: Vec<_> = stages
        .transitions
        .iter()
        .map(|t| (t.step, t.tokens, t.cause()))
        .collect();
    assert_eq!(
        causes,
        [
            (0, 0, v1::TransitionCause::Start),
            (2, 128, v1::TransitionCause::Budget)
        ]
    );
    assert_eq!(stages.evaluations.len(), 2);
    assert_eq!(
        (
            stages.evaluations[0].step,
            stages.evaluations[0].stage.as_str(),
            stages.evaluations[0].trigger.as_str()
        ),
        (2, "one", "stage end")
    );
    assert!(stages.evaluations[1]
        .losses
        .iter()
        .all(|l| l.loss == 3.0 && l.samples == 2));
    assert_eq!(
        (stages.stages[0].end_step, stages.stages[1].start_step),
        (2, 2)
    );
    let tokens: Vec<u64> = stages.stages[0].tokens.iter().map(|t| t.tokens).collect();
    assert_eq!(
        tokens,
        [128, 0],
        "stage one trained 8 samples of 16 tokens of a"
    );
    let ledger = h.ledger.0.lock().unwrap().clone();
    let shape: Vec<(u32, u32, usize)> = ledger
        .iter()
        .map(|s| (s.stage, s.seq_len, s.samples.len()))
        .collect();
    assert_eq!(shape, [(0, 16, 4), (0, 16, 4), (1, 32, 2), (1, 32, 2)]);
    let record = h
        .ledger
        .1
        .lock()
        .unwrap()
        .clone()
        .expect("the record is saved");
    assert_eq!(
        (
            record.transitions.len(),
            record.evaluations.len(),
            record.paused
        ),
        (2, 2, false)
    );
}

#[tokio::test(start_paused = true)]
async fn stage_next_from_the_api_switches_every_rank_at_the_next_step() {
    use v1::coordinator_message::Kind as C;
    let h = Harness::with_job(&curriculum());
    // Before any world, there is no curriculum to change.
    assert!(matches!(
        h.control(ControlRequest::ChangeStage {
            stage: None,
            requested_by: "x".into()
        })
        .await,
        Err(Error::FailedPrecondition(_))
    ));
    // But a request that can never be granted says why at once, not "try again then".
    let refusal = |r: Result<ControlReply, Error>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("granted before any world"),
    };
    let why = refusal(
        h.control(ControlRequest::ChangeStage {
            stage: Some("nine".into()),
            requested_by: "x".into(),
        })
        .await,
    );
    assert!(
        why.contains("no stage named \"nine\"; the stages are one, two"),
        "{why}"
    );
    let set_mix = |stage: &str, w: &[(&str, f64)]| ControlRequest::SetMix {
        stage: stage.into(),
        weights: w.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
        requested_by: "x".into(),
    };
    let why = refusal(h.control(set_mix("nine", &[("a", 1.0)])).await);
    assert!(why.contains("no stage named \"nine\""), "{why}");
    let why = refusal(h.control(set_mix("two", &[("z", 1.0)])).await);
    assert!(
        why.contains("no source named \"z\"; the sources are a, b"),
        "{why}"
    );
    let why = refusal(h.control(set_mix("two", &[("a", 0.7)])).await);
    assert!(why.contains("the weights sum to 0.7"), "{why}");
    // A malformed mixture is the request's fault whatever the job's state: InvalidArgument,
    // not FailedPrecondition (which tells a client that retrying later might succeed).
    for bad in [
        &[("a", f64::NAN), ("b", 1.0)][..],
        &[("a", -0.5), ("b", 1.5)],
        &[("a", 0.5), ("a", 0.5)],
        &[("z", 1.0)],
        &[("a", 0.7)],
    ] {
        match h.control(set_mix("two", bad)).await {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("{bad:?}: expected InvalidArgument, got {other:?}"),
        }
    }
    let why = refusal(h.control(set_mix("two", &[("a", 1.0)])).await);
    assert!(why.contains("try again then"), "{why}");
    let (a, b, mut ia, mut ib) = two_ready(&h).await;
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    let ControlReply::StageChanged(c) = h
        .control(ControlRequest::ChangeStage {
            stage: None,
            requested_by: "ana@h".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (c.from.as_str(), c.to.as_str(), c.effective_step),
        ("one", "two", 1)
    );
    assert!(matches!(
        h.control(ControlRequest::ChangeStage {
            stage: Some("nine".into()),
            requested_by: "x".into()
        })
        .await,
        Err(Error::NotFound(_))
    ));
    h.send(&a, done(1, 0, 2)).await.unwrap();
    h.send(&b, done(1, 0, 2)).await.unwrap();
    let (C::Evaluate(ea), C::Evaluate(eb)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("the stage ends with its evaluation")
    };
    h.send(&a, eval_done(1, &ea)).await.unwrap();
    h.send(&b, eval_done(1, &eb)).await.unwrap();
    let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!(
        (x.step, x.stage.unwrap().index, y.stage.unwrap().index),
        (1, 1, 1)
    );
    // A mixture for an ended stage is refused; for the current one it applies at the next step.
    let mix = |stage: &str, w: &[(&str, f64)]| ControlRequest::SetMix {
        stage: stage.into(),
        weights: w.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
        requested_by: "ana@h".into(),
    };
    assert!(matches!(
        h.control(mix("one", &[("a", 1.0)])).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        h.control(mix("two", &[("a", 0.7)])).await,
        Err(Error::InvalidArgument(_))
    ));
    let ControlReply::MixSet(m) = h.control(mix("two", &[("b", 1.0)])).await.unwrap() else {
        panic!()
    };
    assert_eq!(m.effective_step, 2);
    h.send(&a, done(1, 1, 1)).await.unwrap();
    h.send(&b, done(1, 1, 1)).await.unwrap();
    // Once step 1 is committed, the history shows who moved the job on, and when.
    let stages = h.stages().await;
    let t = stages.transitions.get(1).cloned().unwrap();
    assert_eq!(
        (t.step, t.cause(), t.requested_by.as_str()),
        (1, v1::TransitionCause::ManualNext, "ana@h")
    );
    let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert!(x.samples.iter().chain(&y.samples).all(|s| s.source == 1));
}

/// One stage of 30 steps of source a alone.
fn long() -> String {
    base()
        .source("a", "x")
        .stage("only", 30, 16, &[("a", 1.0)])
        .to_toml()
}

fn done_with_loss(generation: u64, step: u64, samples: u32, loss: f64) -> Kind {
    Kind::StepDone(v1::StepDone {
        generation,
        step,
        loss_sum: loss * samples as f64,
        samples,
        grad_norm: 1.0,
        global_loss: loss,
        ..Default::default()
    })
}

#[tokio::test(start_paused = true)]
async fn a_spike_rolls_every_rank_back_to_the_checkpoint_and_skips_its_data() {
    use v1::coordinator_message::Kind as C;
    let policy = Policy {
        checkpoints: Some(CheckpointConfig {
            dir: "ck".into(),
            every_steps: 10,
            keep: 3,
        }),
        spikes: Some(SpikeConfig {
            window: 10,
            min_steps: 5,
            zscore: 4.0,
            ratio: 1.5,
            ladder: vec![Rung::Rollback],
            skip_before: 0,
            skip_after: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = Harness::with_policy(&long(), policy);
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    let one_source = || {
        Kind::Ready(v1::Ready {
            generation: 1,
            sources: vec![v1::SourceSize {
                name: "a".into(),
                num_tokens: 100 * 16 + 1,
                eval_tokens: 0,
            }],
            ..Default::default()
        })
    };
    h.send(&a, one_source()).await.unwrap();
    h.send(&b, one_source()).await.unwrap();
    let mut first_run = vec![];
    for step in 0..16u64 {
        if step == 10 {
            // The checkpoint goes to rank 0 only, before step 10's work.
            let C::SaveCheckpoint(save) = next(&mut ia).await else {
                panic!("expected SaveCheckpoint")
            };
            assert_eq!((save.step, save.path.as_str()), (10, "ck/step-00000010-g1"));
            assert_eq!(save.cursors, [10 * 4 * 16]);
            let saved = Kind::CheckpointSaved(v1::CheckpointSaved {
                generation: 1,
                id: save.id,
                path: save.path.clone(),
                blocking_seconds: 0.01,
                write_seconds: 0.2,
                bytes: 1000,
                error: String::new(),
            });
            h.send(&a, saved).await.unwrap();
        }
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work at step {step}")
        };
        assert_eq!(x.step, step);
        first_run.push([x.samples.clone(), y.samples.clone()].concat());
        // A steady loss with a little noise, then a spike at step 15.
        let loss = if step == 15 {
            9.0
        } else {
            2.0 + 0.01 * (step % 3) as f64
        };
        h.send(&a, done_with_loss(1, step, 2, loss)).await.unwrap();
        h.send(&b, done_with_loss(1, step, 2, loss)).await.unwrap();
    }
    // The spike ends the generation; the next world restores the checkpoint of step 10.
    let C::Stop(stop) = next(&mut ia).await else {
        panic!("expected Stop")
    };
    assert!(stop.detail.contains("rolling back"), "{}", stop.detail);
    let C::Stop(_) = next(&mut ib).await else {
        panic!("expected Stop")
    };
    let (ma, mb) = (next(&mut ia).await, next(&mut ib).await);
    let (C::World(wa), C::World(wb)) = (ma.clone(), mb.clone()) else {
        panic!("expected World, got {ma:?} and {mb:?}")
    };
    let restore = wa.restore.clone().expect("a checkpoint to restore");
    assert_eq!(
        (restore.step, restore.path.as_str()),
        (10, "ck/step-00000010-g1")
    );
    assert_eq!(
        wb.restore, wa.restore,
        "every rank loads the same checkpoint"
    );
    assert_eq!((wa.generation, wa.start_step), (2, 10));
    assert_eq!(h.snapshot().step, 10);
    let ready = |r: &mut v1::Ready| {
        r.generation = 2;
        r.step = 10;
    };
    for id in [&a, &b] {
        let Kind::Ready(mut r) = one_source() else {
            unreachable!()
        };
        ready(&mut r);
        h.send(id, Kind::Ready(r)).await.unwrap();
    }
    // Steps 10..15 train the same samples again; from step 15 the data of steps 15 and 16 of
    // the first run is skipped.
    for step in 10..17u64 {
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work at step {step}")
        };
        assert_eq!(x.step, step);
        let samples = [x.samples, y.samples].concat();
        if step < 15 {
            assert_eq!(samples, first_run[step as usize], "step {step} replays");
        } else {
            assert_ne!(samples, first_run[15], "step {step} skips the spike's data");
        }
        h.send(&a, done_with_loss(2, step, 2, 2.0)).await.unwrap();
        h.send(&b, done_with_loss(2, step, 2, 2.0)).await.unwrap();
    }
    let aside = h.ledger.2.lock().unwrap().clone();
    assert_eq!(
        aside.iter().map(|s| s.step).collect::<Vec<_>>(),
        (10..16).collect::<Vec<_>>(),
        "the rolled-back steps are set aside"
    );
    let skipped = h.ledger.3.lock().unwrap().clone();
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (
            skipped[0].at_step,
            skipped[0].batches,
            skipped[0].samples.len()
        ),
        (15, 2, 8)
    );
    assert_eq!(
        skipped[0].samples[..4],
        first_run[15][..],
        "the spike's own samples are skipped"
    );
    let ledger = h.ledger.0.lock().unwrap().clone();
    assert_eq!(
        ledger.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..17).collect::<Vec<_>>()
    );
    let ControlReply::Events(events) = h.control(ControlRequest::ListEvents).await.unwrap() else {
        panic!()
    };
    let e = &events.events[0];
    assert_eq!(e.action(), v1::SpikeAction::Rollback);
    assert_eq!(
        (
            e.detected_at,
            e.resumed_at_step,
            e.skipped_from_step,
            e.skipped_steps,
            e.skipped_samples
        ),
        (15, 10, 15, 2, 8)
    );
    let ControlReply::Checkpoints(index) =
        h.control(ControlRequest::ListCheckpoints).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(index.checkpoints.len(), 1);
    assert!(index.checkpoints[0].known_good);
}

#[tokio::test(start_paused = true)]
async fn a_manual_rollback_replays_from_the_checkpoint() {
    use v1::coordinator_message::Kind as C;
    let policy = Policy {
        checkpoints: Some(CheckpointConfig {
            dir: "ck".into(),
            every_steps: 4,
            keep: 3,
        }),
        spikes: Some(SpikeConfig {
            window: 10,
            min_steps: 3,
            ladder: vec![Rung::Rollback],
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = Harness::with_policy(&long(), policy);
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    let ready = |generation: u64, step: u64| {
        Kind::Ready(v1::Ready {
            generation,
            step,
            sources: vec![v1::SourceSize {
                name: "a".into(),
                num_tokens: 100 * 16 + 1,
                eval_tokens: 0,
            }],
            ..Default::default()
        })
    };
    // Nothing to roll back to before the first checkpoint.
    h.send(&a, ready(1, 0)).await.unwrap();
    h.send(&b, ready(1, 0)).await.unwrap();
    assert!(matches!(
        h.control(ControlRequest::Rollback {
            checkpoint: None,
            requested_by: "ana@h".into()
        })
        .await,
        Err(Error::NotFound(_))
    ));
    let mut first_run = vec![];
    for step in 0..6u64 {
        if step == 4 {
            let C::SaveCheckpoint(save) = next(&mut ia).await else {
                panic!("expected SaveCheckpoint")
            };
            let saved = Kind::CheckpointSaved(v1::CheckpointSaved {
                generation: 1,
                id: save.id,
                path: save.path,
                ..Default::default()
            });
            h.send(&a, saved).await.unwrap();
        }
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work at step {step}")
        };
        first_run.push([x.samples, y.samples].concat());
        h.send(&a, done_with_loss(1, step, 2, 2.0)).await.unwrap();
        h.send(&b, done_with_loss(1, step, 2, 2.0)).await.unwrap();
    }
    // Step 6 is in flight; a person rolls back to the checkpoint of step 4.
    let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    let ControlReply::RolledBack(r) = h
        .control(ControlRequest::Rollback {
            checkpoint: Some("4".into()),
            requested_by: "ana@h".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((r.step, r.checkpoint.as_str()), (4, "ck/step-00000004-g1"));
    for inbox in [&mut ia, &mut ib] {
        let C::Stop(_) = next(inbox).await else {
            panic!("expected Stop")
        };
        let C::World(w) = next(inbox).await else {
            panic!("expected World")
        };
        assert_eq!(w.restore.unwrap().step, 4);
    }
    h.send(&a, ready(2, 4)).await.unwrap();
    h.send(&b, ready(2, 4)).await.unwrap();
    // The replay trains the same samples (a manual rollback skips nothing).
    for step in 4..6u64 {
        let (C::Work(x), C::Work(y)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work at step {step}")
        };
        assert_eq!([x.samples, y.samples].concat(), first_run[step as usize]);
        h.send(&a, done_with_loss(2, step, 2, 2.0)).await.unwrap();
        h.send(&b, done_with_loss(2, step, 2, 2.0)).await.unwrap();
    }
    let ControlReply::Events(events) = h.control(ControlRequest::ListEvents).await.unwrap() else {
        panic!()
    };
    assert_eq!(events.events[0].action(), v1::SpikeAction::ManualRollback);
    assert_eq!(events.events[0].requested_by, "ana@h");
    // An unknown checkpoint is refused and changes nothing.
    assert!(matches!(
        h.control(ControlRequest::Rollback {
            checkpoint: Some("ck/nowhere".into()),
            requested_by: "x".into()
        })
        .await,
        Err(Error::NotFound(_))
    ));
    let (C::Work(x), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
        panic!("expected Work")
    };
    assert_eq!(x.step, 6);
}

#[tokio::test(start_paused = true)]
async fn a_spike_with_no_checkpoint_to_roll_back_to_pauses_the_job_and_says_why() {
    use v1::coordinator_message::Kind as C;
    let policy = Policy {
        checkpoints: Some(CheckpointConfig {
            dir: "ck".into(),
            every_steps: 0,
            keep: 3,
        }),
        spikes: Some(SpikeConfig {
            window: 10,
            min_steps: 3,
            ladder: vec![Rung::Rollback],
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = Harness::with_policy(&long(), policy);
    let a = h.register("127.0.0.1:5001").await.unwrap().worker_id;
    let b = h.register("127.0.0.1:5002").await.unwrap().worker_id;
    let mut ia = h.attach(&a).await;
    let mut ib = h.attach(&b).await;
    next(&mut ia).await;
    next(&mut ib).await;
    for id in [&a, &b] {
        let ready = Kind::Ready(v1::Ready {
            generation: 1,
            sources: vec![v1::SourceSize {
                name: "a".into(),
                num_tokens: 100 * 16 + 1,
                eval_tokens: 0,
            }],
            ..Default::default()
        });
        h.send(id, ready).await.unwrap();
    }
    for step in 0..6u64 {
        let (C::Work(_), C::Work(_)) = (next(&mut ia).await, next(&mut ib).await) else {
            panic!("expected Work at step {step}")
        };
        let loss = if step == 5 {
            9.0
        } else {
            2.0 + 0.01 * (step % 2) as f64
        };
        h.send(&a, done_with_loss(1, step, 2, loss)).await.unwrap();
        h.send(&b, done_with_loss(1, step, 2, loss)).await.unwrap();
    }
    let snap = h.snapshot();
    assert_eq!(snap.state, v1::JobState::Paused as i32);
    assert!(
        snap.detail.contains("no known-good checkpoint"),
        "{}",
        snap.detail
    );
    assert!(ia.try_recv().is_err(), "no work while paused");
    let ControlReply::Events(events) = h.control(ControlRequest::ListEvents).await.unwrap() else {
        panic!()
    };
    assert_eq!(events.events[0].action(), v1::SpikeAction::Pause);
    assert_eq!(events.events[0].detected_at, 5);
}
