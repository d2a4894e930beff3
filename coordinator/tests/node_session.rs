//! `NodeSession` over a real loopback socket: the workers of a node inside one stream train as
//! they would on sessions of their own (through `stagecoach_proto::relay`, what a node agent
//! runs), and what one of them does wrong ends its session alone, with the status its own
//! session would have ended with.

use std::time::Duration;

use stagecoach_proto::relay::{Relay, RelaySession};
use stagecoach_proto::v1;
use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tonic::Code;

use crate::workers_rpc::{msg, start};

fn register(port: u16) -> v1::RegisterRequest {
    v1::RegisterRequest {
        name: format!("node-rank-{port}"),
        backend: v1::CollectiveBackend::Tcp.into(),
        collective_address: format!("127.0.0.1:{port}"),
        nccl_unique_id: vec![],
    }
}

/// A worker with no model: `Ready` for every world, `StepDone` at once for every `Work`, with
/// the numbers every rank agrees on. Returns the steps it was given work for.
async fn simulate(mut session: RelaySession, source: String) -> Vec<u64> {
    use v1::coordinator_message::Kind;
    use v1::worker_message::Kind as Up;
    let mut steps = vec![];
    loop {
        let message = match session.message().await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return steps,
        };
        let reply = match message.kind {
            Some(Kind::World(w)) => Up::Ready(v1::Ready {
                generation: w.generation,
                sources: vec![v1::SourceSize {
                    name: source.clone(),
                    num_tokens: 1 << 30,
                    eval_tokens: 0,
                }],
                step: w.restore.as_ref().map_or(w.start_step, |r| r.step),
                state_digest: 7,
                ..Default::default()
            }),
            Some(Kind::Work(work)) => {
                steps.push(work.step);
                let samples = work.samples.len() as u32;
                Up::StepDone(v1::StepDone {
                    generation: work.generation,
                    step: work.step,
                    loss_sum: 2.5 * f64::from(samples),
                    samples,
                    grad_norm: 1.0,
                    global_loss: 2.5,
                    state_digest: 7,
                    ..Default::default()
                })
            }
            Some(Kind::Stop(s)) if s.reason() != v1::StopReason::GenerationEnded => return steps,
            _ => continue,
        };
        if session.send(reply).await.is_err() {
            return steps;
        }
    }
}

/// Two workers registered apart and attached through one relay (one node session) form the
/// world and commit steps from the reports that came up together.
#[tokio::test]
async fn two_workers_in_one_node_session_form_a_world_and_commit_steps() {
    let url = start().await;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let relay = Relay::new(WorkersClient::with_interceptor(channel, Default::default()));
    let mut client = relay.client();
    let mut sims = vec![];
    for port in [5101, 5102] {
        let reg = client.register(register(port)).await.unwrap().into_inner();
        let source = reg.job.as_ref().unwrap().sources[0].name.clone();
        let hold = stagecoach_proto::relay::hold(&reg);
        assert!(
            hold > Duration::ZERO && hold <= Duration::from_millis(reg.heartbeat_ms),
            "{hold:?}"
        );
        let session = relay.session(reg.worker_id, hold).await.unwrap();
        sims.push(tokio::spawn(simulate(session, source)));
    }
    let mut control = ControlClient::connect(url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = control
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.state() == v1::JobState::Finished || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (status.state(), status.step),
        (v1::JobState::Finished, 3),
        "{status:?}"
    );
    assert_eq!(status.workers_alive, 2, "{status:?}");
    assert_eq!(
        status.generation, 1,
        "one world, never re-formed: {status:?}"
    );
    for sim in sims {
        let steps = tokio::time::timeout(Duration::from_secs(10), sim)
            .await
            .expect("the job's end ends each session")
            .unwrap();
        assert_eq!(steps, [0, 1, 2], "every step's work, once, in order");
    }
}

/// A node session's downstream, and what came down that no one asked for yet.
struct Down {
    stream: tonic::Streaming<v1::NodeDown>,
    seen: Vec<v1::NodeMessage>,
}

impl Down {
    /// The next message, from what was seen first.
    async fn next(&mut self) -> v1::NodeMessage {
        while self.seen.is_empty() {
            let down = tokio::time::timeout(Duration::from_secs(10), self.stream.message())
                .await
                .expect("an answer within 10 s")
                .expect("the node session goes on")
                .expect("the node session stays open");
            self.seen = down.messages;
        }
        self.seen.remove(0)
    }

    /// Reads until `worker_id`'s session ends: its status; the messages passed over are kept.
    async fn ended(&mut self, worker_id: &str) -> (Code, String) {
        let mut passed = vec![];
        loop {
            let m = self.next().await;
            if m.worker_id == worker_id {
                if let Some(v1::node_message::Kind::Ended(end)) = &m.kind {
                    passed.append(&mut self.seen);
                    self.seen = passed;
                    return (Code::from(end.code), end.message.clone());
                }
            }
            passed.push(m);
        }
    }
}

/// Registers a worker for each of `ports` (their collective addresses) and opens a node
/// session, attaching none yet: their ids, the session's sending half and its downstream.
async fn node_of(
    url: &str,
    ports: [u16; 2],
) -> (Vec<String>, tokio::sync::mpsc::Sender<v1::NodeUp>, Down) {
    let mut workers = WorkersClient::connect(url.to_owned()).await.unwrap();
    let mut ids = vec![];
    for port in ports {
        let reg = workers.register(register(port)).await.unwrap().into_inner();
        ids.push(reg.worker_id);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stream = workers
        .node_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (
        ids,
        tx,
        Down {
            stream,
            seen: vec![],
        },
    )
}

fn coordinator_message(m: v1::NodeMessage) -> Option<(String, v1::coordinator_message::Kind)> {
    match m.kind {
        Some(v1::node_message::Kind::Message(v1::CoordinatorMessage { kind: Some(k) })) => {
            Some((m.worker_id, k))
        }
        _ => None,
    }
}

/// Every way a node session's worker can be wrong ends that worker's session with the code its
/// own session would get (an unregistered worker NotFound, a message before Hello or an empty
/// one InvalidArgument, a message about a world it is not in FailedPrecondition), and the node
/// session goes on for the others, which still form the world.
#[tokio::test]
async fn a_bad_message_ends_only_its_workers_session() {
    use v1::worker_message::Kind;
    let url = start().await;
    let (ids, tx, mut down) = node_of(&url, [5201, 5202]).await;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let up = |messages: Vec<v1::WorkerMessage>| v1::NodeUp {
        messages,
        ..Default::default()
    };
    let hello = || Kind::Hello(v1::Hello {});
    let beat = || Kind::Heartbeat(v1::Heartbeat {});

    tx.send(up(vec![msg("w42", hello())])).await.unwrap();
    let (code, why) = down.ended("w42").await;
    assert_eq!(code, Code::NotFound, "{why}");

    tx.send(up(vec![msg(&a, beat())])).await.unwrap();
    let (code, why) = down.ended(&a).await;
    assert_eq!(code, Code::InvalidArgument, "{why}");
    assert!(why.contains("Hello"), "{why}");

    let empty = v1::WorkerMessage {
        worker_id: a.clone(),
        kind: None,
    };
    tx.send(up(vec![msg(&a, hello()), empty])).await.unwrap();
    let (code, why) = down.ended(&a).await;
    assert_eq!(code, Code::InvalidArgument, "{why}");

    // Both attached, then a claims a world that does not exist: only a's session ends.
    let early = Kind::Ready(v1::Ready {
        generation: 9,
        ..Default::default()
    });
    tx.send(up(vec![msg(&a, hello()), msg(&b, hello()), msg(&a, early)]))
        .await
        .unwrap();
    let (code, why) = down.ended(&a).await;
    assert_eq!(code, Code::FailedPrecondition, "{why}");

    // a attaches again: the two form the world (the job wants two), and each gets its World
    // over the node session that is still open.
    tx.send(up(vec![msg(&a, hello()), msg(&b, beat())]))
        .await
        .unwrap();
    let mut worlds = std::collections::BTreeMap::new();
    while worlds.len() < 2 {
        if let Some((id, v1::coordinator_message::Kind::World(w))) =
            coordinator_message(down.next().await)
        {
            worlds.insert(id, w.rank);
        }
    }
    let ranks: std::collections::BTreeSet<u32> = worlds.values().copied().collect();
    assert_eq!(ranks, [0, 1].into(), "{worlds:?}");
    assert!(
        worlds.contains_key(&a) && worlds.contains_key(&b),
        "{worlds:?}"
    );

    // Closing a worker on the node detaches it, as a closed session does: b is ready, then
    // closed, then a is ready; the step's Work cannot be queued for b, so the generation ends
    // and a is told.
    let ready = |generation| {
        Kind::Ready(v1::Ready {
            generation,
            sources: vec![v1::SourceSize {
                name: "a".into(),
                num_tokens: 1 << 30,
                eval_tokens: 0,
            }],
            state_digest: 7,
            ..Default::default()
        })
    };
    tx.send(v1::NodeUp {
        messages: vec![msg(&b, ready(1))],
        closed: vec![b.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(up(vec![msg(&a, ready(1))])).await.unwrap();
    let mut seen = vec![];
    let stop = loop {
        match coordinator_message(down.next().await) {
            Some((id, v1::coordinator_message::Kind::Stop(s))) if id == a => break s,
            Some((id, kind)) => seen.push(format!("{id}: {kind:?}")),
            None => {}
        }
    };
    assert_eq!(stop.reason(), v1::StopReason::GenerationEnded, "{stop:?}");
    assert!(
        !seen.iter().any(|m| m.starts_with(&b)),
        "nothing for b after its close: {seen:?}"
    );
    let status = ControlClient::connect(url)
        .await
        .unwrap()
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let failure = status
        .last_failure
        .expect("the generation's end is a failure");
    assert!(failure.reason.contains(&b), "{failure:?}");
}

/// The Work of a node session's workers that comes down as one `NodeWork` (NodeUp.combined).
fn node_work(m: v1::NodeMessage) -> Option<v1::NodeWork> {
    match m.kind {
        Some(v1::node_message::Kind::Work(w)) => Some(w),
        _ => None,
    }
}

/// A `NodeUp` of a node session that splits `NodeWork`s.
fn combined(messages: Vec<v1::WorkerMessage>) -> v1::NodeUp {
    v1::NodeUp {
        messages,
        combined: true,
        ..Default::default()
    }
}

/// Sends `hellos` (attaching workers so that `ids` are all attached), waits for the World of
/// each and answers them: the first `NodeWork` that comes down. No worker gets a Work of its own.
async fn form(
    down: &mut Down,
    tx: &tokio::sync::mpsc::Sender<v1::NodeUp>,
    ids: &[String],
    hellos: Vec<v1::WorkerMessage>,
) -> v1::NodeWork {
    tx.send(combined(hellos)).await.unwrap();
    let mut generation = 0;
    let mut told = std::collections::BTreeSet::new();
    while told.len() < ids.len() {
        if let Some((id, v1::coordinator_message::Kind::World(w))) =
            coordinator_message(down.next().await)
        {
            generation = w.generation;
            told.insert(id);
        }
    }
    let ready = v1::worker_message::Kind::Ready(v1::Ready {
        generation,
        sources: vec![v1::SourceSize {
            name: "a".into(),
            num_tokens: 1 << 30,
            eval_tokens: 0,
        }],
        state_digest: 7,
        ..Default::default()
    });
    let readies = ids.iter().map(|id| msg(id, ready.clone())).collect();
    tx.send(combined(readies)).await.unwrap();
    loop {
        let m = down.next().await;
        assert!(
            coordinator_message(m.clone())
                .is_none_or(|(_, k)| !matches!(k, v1::coordinator_message::Kind::Work(_))),
            "a Work of its own for a worker of a combined node session: {m:?}"
        );
        if let Some(w) = node_work(m) {
            return w;
        }
    }
}

/// A node session that says it splits `NodeWork`s gets each step's Work for all its workers
/// as one, in rank order, and reports the step for all of them in one `NodeStepDone`. A summed
/// report that speaks for a worker not attached to it, or whose sample count is not what its
/// ranks were given, ends the sessions it speaks for, with a status that says what is wrong;
/// a worker's own session cannot carry one at all.
#[tokio::test]
async fn a_node_gets_one_work_per_step_and_reports_it_in_one_message() {
    use v1::worker_message::Kind;
    let url = start().await;
    let (ids, tx, mut down) = node_of(&url, [5301, 5302]).await;
    let up = combined;
    let hello = || Kind::Hello(v1::Hello {});
    let report = |work: &v1::Work, samples: u32, also: Vec<String>| {
        Kind::NodeStepDone(v1::NodeStepDone {
            done: Some(v1::StepDone {
                generation: work.generation,
                step: work.step,
                loss_sum: 2.5 * f64::from(samples),
                samples,
                grad_norm: 1.0,
                global_loss: 2.5,
                state_digest: 7,
                ..Default::default()
            }),
            also,
        })
    };
    let hellos = ids.iter().map(|id| msg(id, hello())).collect();
    let first = form(&mut down, &tx, &ids, hellos).await;
    let work = first.work.clone().unwrap();
    assert_eq!(work.step, 0, "{first:?}");
    let mut named = first.workers.clone();
    named.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(named, want, "both workers, once each: {first:?}");
    assert_eq!(
        first.samples,
        [2, 2],
        "the job's 4 samples, 2 a rank: {first:?}"
    );
    assert_eq!(work.samples.len(), 4, "{first:?}");
    let (rank0, rank1) = (first.workers[0].clone(), first.workers[1].clone());

    // One summed report for both commits the step: the next step's NodeWork comes.
    tx.send(up(vec![msg(&rank0, report(&work, 4, vec![rank1.clone()]))]))
        .await
        .unwrap();
    let second = loop {
        if let Some(w) = node_work(down.next().await) {
            break w;
        }
    };
    let work = second.work.clone().unwrap();
    assert_eq!(work.step, 1, "{second:?}");
    assert_eq!(second.workers, first.workers, "{second:?}");

    // A report that speaks for a worker this node session never attached.
    tx.send(up(vec![msg(
        &rank0,
        report(&work, 4, vec!["a-stranger".into()]),
    )]))
    .await
    .unwrap();
    let (code, why) = down.ended(&rank0).await;
    assert_eq!(code, Code::InvalidArgument, "{why}");
    assert!(
        why.contains("a-stranger") && why.contains("not attached"),
        "{why}"
    );

    // rank 0 attaches again (its world waits for it, step 1 still in flight), and a report
    // one sample short for both ends both.
    tx.send(up(vec![
        msg(&rank0, hello()),
        msg(&rank0, report(&work, 3, vec![rank1.clone()])),
    ]))
    .await
    .unwrap();
    for id in [&rank0, &rank1] {
        let (code, why) = down.ended(id).await;
        assert_eq!(code, Code::InvalidArgument, "{why}");
        assert!(
            why.contains("ranks 0 and 1 report 3 samples for step 1, they were given 4"),
            "{why}"
        );
    }

    // On a worker's own session, a report for others is refused.
    let status = crate::workers_rpc::session_status(
        &url,
        vec![
            msg(&rank0, hello()),
            msg(&rank0, report(&work, 4, vec![rank1.clone()])),
        ],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("NodeSession"), "{status:?}");
}

/// A node session renews each attached worker's lease as its messages arrive, and a heartbeat
/// from one that is no longer a member (here superseded by a new registration on its address)
/// ends that worker's session with NotFound, naming it; the node's other worker goes on.
#[tokio::test]
async fn a_heartbeat_in_a_node_session_from_a_worker_no_longer_a_member_ends_its_session() {
    use v1::worker_message::Kind;
    let url = start().await;
    let (ids, tx, mut down) = node_of(&url, [5301, 5302]).await;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let up = |messages: Vec<v1::WorkerMessage>| v1::NodeUp {
        messages,
        ..Default::default()
    };
    let beat = || Kind::Heartbeat(v1::Heartbeat {});
    tx.send(up(vec![
        msg(&a, Kind::Hello(v1::Hello {})),
        msg(&b, Kind::Hello(v1::Hello {})),
        msg(&a, beat()),
        msg(&b, beat()),
    ]))
    .await
    .unwrap();
    // Members' heartbeats get no answer (a World may come: the two make a world).
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let m = down.next().await;
            if matches!(m.kind, Some(v1::node_message::Kind::Ended(_))) {
                return m;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "no session ends: {quiet:?}");

    let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
    let new = workers
        .register(register(5301))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    assert_ne!(new, a);
    tx.send(up(vec![msg(&a, beat()), msg(&b, beat())]))
        .await
        .unwrap();
    let (code, why) = down.ended(&a).await;
    assert_eq!(code, Code::NotFound, "{why}");
    assert!(why.contains(&a), "{why}");
    // b is still attached and a member: a message of its own is judged, not refused as a
    // stranger's (a Ready for a world that does not exist is a FailedPrecondition).
    let early = Kind::Ready(v1::Ready {
        generation: 99,
        ..Default::default()
    });
    tx.send(up(vec![msg(&b, early)])).await.unwrap();
    let (code, why) = down.ended(&b).await;
    assert_eq!(code, Code::FailedPrecondition, "{why}");
}
