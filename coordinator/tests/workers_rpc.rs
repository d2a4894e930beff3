//! The `Workers` gRPC service over a real loopback socket: malformed or out-of-order RPCs get
//! InvalidArgument, NotFound or FailedPrecondition, and change nothing the status shows.

use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::driver::{Driver, Settings};
use stagecoach_coordinator::ledger::Ledger;
use stagecoach_coordinator::server::DriverHandle;
use stagecoach_coordinator::store::StoreError;
use stagecoach_coordinator::{serve, Coordinator};
use stagecoach_core::spec::builder::JobBuilder;
use stagecoach_core::spec::JobFile;
use stagecoach_proto::v1;
use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tonic::Code;

struct NoLedger;

#[async_trait::async_trait]
impl Ledger for NoLedger {
    async fn commit(&self, _: &v1::LedgerStep) -> Result<(), StoreError> {
        Ok(())
    }

    async fn save_curriculum(&self, _: &v1::CurriculumRecord) -> Result<(), StoreError> {
        Ok(())
    }
}

/// One stage of 3 steps of source a alone, two workers.
fn job() -> String {
    JobBuilder::bare()
        .set("model.preset", "micro")
        .set("schedule.peak_lr", 1e-3)
        .set("data.global_batch_tokens", 64)
        .set("data.micro_batch_tokens", 32)
        .set("workers.min", 2)
        .set("workers.max", 2)
        .source("a", "x")
        .stage("only", 3, 16, &[("a", 1.0)])
        .to_toml()
}

pub(crate) async fn start() -> String {
    let job: JobFile = toml::from_str(&job()).unwrap();
    let settings = Settings {
        min: 2,
        max: 2,
        lease: Duration::from_secs(10),
        heartbeat: Duration::from_secs(1),
        rendezvous: Duration::from_secs(1),
    };
    let (driver, snapshot) =
        Driver::new(job.to_proto(), settings, Box::new(NoLedger), None).unwrap();
    let leases = driver.leases();
    let (events, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(driver.run(rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let coordinator = Arc::new(Coordinator::with_driver(
        "rpc",
        DriverHandle {
            events,
            snapshot,
            leases,
        },
    ));
    tokio::spawn(serve(listener, coordinator, None, std::future::pending()));
    url
}

pub(crate) fn msg(worker_id: &str, kind: v1::worker_message::Kind) -> v1::WorkerMessage {
    v1::WorkerMessage {
        worker_id: worker_id.into(),
        kind: Some(kind),
    }
}

/// Opens a session sending `messages`; returns the status that ends the response stream.
pub(crate) async fn session_status(url: &str, messages: Vec<v1::WorkerMessage>) -> tonic::Status {
    let mut client = WorkersClient::connect(url.to_owned()).await.unwrap();
    let outcome = client.session(tokio_stream::iter(messages)).await;
    match outcome {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .expect("an answer")
                {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the session closed without an error"),
                    Err(status) => return status,
                }
            }
        }
    }
}

#[tokio::test]
async fn malformed_rpcs_get_clear_codes_and_change_nothing() {
    use v1::worker_message::Kind;
    let url = start().await;
    let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
    let mut control = ControlClient::connect(url.clone()).await.unwrap();
    let before = control
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();

    let register = |backend: v1::CollectiveBackend, addr: &str| v1::RegisterRequest {
        name: "t".into(),
        backend: backend.into(),
        collective_address: addr.into(),
        nccl_unique_id: vec![],
    };
    let no_backend = workers
        .register(register(v1::CollectiveBackend::Unspecified, "127.0.0.1:1"))
        .await;
    assert_eq!(no_backend.unwrap_err().code(), Code::InvalidArgument);
    let bad_address = workers
        .register(register(v1::CollectiveBackend::Tcp, "nowhere"))
        .await;
    assert_eq!(bad_address.unwrap_err().code(), Code::InvalidArgument);
    let short_nccl_id = workers
        .register(register(v1::CollectiveBackend::Nccl, ""))
        .await;
    assert_eq!(short_nccl_id.unwrap_err().code(), Code::InvalidArgument);

    // Sessions: the first message must be Hello, from a registered worker, and every later
    // message must carry the same worker id and be in order.
    let hb = || Kind::Heartbeat(v1::Heartbeat {});
    let hello = || Kind::Hello(v1::Hello {});
    assert_eq!(
        session_status(&url, vec![msg("w1", hb())]).await.code(),
        Code::InvalidArgument
    );
    assert_eq!(
        session_status(&url, vec![msg("w42", hello())]).await.code(),
        Code::NotFound
    );
    let after_bad = control
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after_bad.workers_alive, after_bad.generation),
        (before.workers_alive, before.generation)
    );

    let id = workers
        .register(register(v1::CollectiveBackend::Tcp, "127.0.0.1:5001"))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let other = msg("w999", hb());
    assert_eq!(
        session_status(&url, vec![msg(&id, hello()), other])
            .await
            .code(),
        Code::InvalidArgument
    );
    let early_ready = msg(
        &id,
        Kind::Ready(v1::Ready {
            generation: 1,
            ..Default::default()
        }),
    );
    assert_eq!(
        session_status(&url, vec![msg(&id, hello()), early_ready])
            .await
            .code(),
        Code::FailedPrecondition
    );
    let status = control
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.generation, status.world_size),
        (0, 0),
        "no world formed from refused messages"
    );
}

/// Requests wrong in every way a client can get them wrong: each gets the right code and a
/// message short enough to read (whatever the size of the input it quotes), the coordinator
/// stays up, and nothing the status shows changes.
#[tokio::test]
async fn requests_bad_in_every_way_are_refused_with_short_clear_statuses() {
    use v1::change_stage_request::Target;
    use v1::worker_message::Kind;
    let url = start().await;
    let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
    let mut control = ControlClient::connect(url.clone()).await.unwrap();
    let status = |c: &mut ControlClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.get_status(v1::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = status(&mut control).await;
    let huge = "x".repeat(3 << 20);
    let mut results: Vec<(&str, Code, tonic::Status)> = vec![];
    let mut check = |what: &'static str, want: Code, got: tonic::Status| {
        results.push((what, want, got));
    };

    // The control API.
    let change = |target: Option<Target>| v1::ChangeStageRequest {
        target,
        requested_by: "t".into(),
    };
    for (what, target, want) in [
        ("stage change naming nothing", None, Code::InvalidArgument),
        (
            "stage change with next = false",
            Some(Target::Next(false)),
            Code::InvalidArgument,
        ),
        (
            "stage change to the empty name",
            Some(Target::Stage(String::new())),
            Code::InvalidArgument,
        ),
        (
            "stage change to a 3 MB name",
            Some(Target::Stage(huge.clone())),
            Code::InvalidArgument,
        ),
        (
            "stage change before the curriculum starts",
            Some(Target::Stage("only".into())),
            Code::FailedPrecondition,
        ),
    ] {
        check(
            what,
            want,
            control.change_stage(change(target)).await.unwrap_err(),
        );
    }
    let mix = |stage: &str, weights: Vec<(&str, f64)>| v1::SetMixRequest {
        stage: stage.into(),
        weights: weights
            .into_iter()
            .map(|(s, w)| v1::SourceWeight {
                source: s.into(),
                weight: w,
            })
            .collect(),
        requested_by: "t".into(),
    };
    check(
        "mix with no weights",
        Code::InvalidArgument,
        control.set_mix(mix("only", vec![])).await.unwrap_err(),
    );
    check(
        // No stage has that name: NotFound before the curriculum starts as after.
        "mix of a 3 MB stage",
        Code::NotFound,
        control
            .set_mix(mix(&huge, vec![("a", 1.0)]))
            .await
            .unwrap_err(),
    );
    check(
        "mix with a NaN weight",
        Code::InvalidArgument,
        control
            .set_mix(mix("only", vec![("a", f64::NAN)]))
            .await
            .unwrap_err(),
    );
    let rollback = v1::RollbackRequest {
        checkpoint: huge.clone(),
        requested_by: "t".into(),
    };
    check(
        "rollback to a 3 MB checkpoint name",
        Code::FailedPrecondition,
        control.rollback(rollback).await.unwrap_err(),
    );
    check(
        "evaluation of a job without held-out data",
        Code::FailedPrecondition,
        control
            .evaluate(v1::EvaluateRequest {
                requested_by: "t".into(),
            })
            .await
            .unwrap_err(),
    );
    check(
        "checkpoint of a job without checkpoints",
        Code::FailedPrecondition,
        control
            .checkpoint_now(v1::CheckpointNowRequest {
                requested_by: "t".into(),
            })
            .await
            .unwrap_err(),
    );
    check(
        "resume of a job not paused",
        Code::FailedPrecondition,
        control
            .resume(v1::ResumeRequest {
                requested_by: "t".into(),
            })
            .await
            .unwrap_err(),
    );

    // Registration.
    let register =
        |name: &str, addr: &str, backend: v1::CollectiveBackend, id: Vec<u8>| v1::RegisterRequest {
            name: name.into(),
            backend: backend.into(),
            collective_address: addr.into(),
            nccl_unique_id: id,
        };
    let tcp = v1::CollectiveBackend::Tcp;
    for (what, req, want) in [
        (
            "registration with a 3 MB name",
            register(&huge, "127.0.0.1:5001", tcp, vec![]),
            Code::InvalidArgument,
        ),
        (
            "registration with a 1 KB address",
            register("t", &"1".repeat(1024), tcp, vec![]),
            Code::InvalidArgument,
        ),
        (
            "registration with no backend",
            register(
                "t",
                "127.0.0.1:5001",
                v1::CollectiveBackend::Unspecified,
                vec![],
            ),
            Code::InvalidArgument,
        ),
        (
            "registration with an address that is no host:port",
            register("t", "my laptop", tcp, vec![]),
            Code::InvalidArgument,
        ),
        (
            "NCCL registration with a 3-byte id",
            register("t", "", v1::CollectiveBackend::Nccl, vec![1, 2, 3]),
            Code::InvalidArgument,
        ),
        (
            "NCCL registration with a 1 MB id",
            register("t", "", v1::CollectiveBackend::Nccl, vec![7; 1 << 20]),
            Code::InvalidArgument,
        ),
    ] {
        check(what, want, workers.register(req).await.unwrap_err());
    }

    // Sessions.
    let id = workers
        .register(register("t", "127.0.0.1:5001", tcp, vec![]))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let hello = || Kind::Hello(v1::Hello {});
    let empty = v1::WorkerMessage {
        worker_id: id.clone(),
        kind: None,
    };
    let sessions: Vec<(&'static str, Vec<v1::WorkerMessage>, Code)> = vec![
        (
            "a session that starts with a heartbeat",
            vec![msg(&id, Kind::Heartbeat(v1::Heartbeat {}))],
            Code::InvalidArgument,
        ),
        (
            "a session of a worker never registered",
            vec![msg("w77-0000000000000000", hello())],
            Code::NotFound,
        ),
        (
            "a session of a 1 MB worker id",
            vec![msg(&"w".repeat(1 << 20), hello())],
            Code::NotFound,
        ),
        (
            "a message for another worker",
            vec![msg(&id, hello()), msg(&huge[..1 << 20], hello())],
            Code::InvalidArgument,
        ),
        (
            "a message with no kind",
            vec![msg(&id, hello()), empty],
            Code::InvalidArgument,
        ),
        (
            "a Failed for a generation that does not exist",
            vec![
                msg(&id, hello()),
                msg(
                    &id,
                    Kind::Failed(v1::Failed {
                        generation: 5,
                        reason: huge.clone(),
                        ..Default::default()
                    }),
                ),
            ],
            Code::FailedPrecondition,
        ),
        (
            "a StepDone with no world",
            vec![
                msg(&id, hello()),
                msg(
                    &id,
                    Kind::StepDone(v1::StepDone {
                        generation: 1,
                        step: 0,
                        samples: 1,
                        ..Default::default()
                    }),
                ),
            ],
            Code::FailedPrecondition,
        ),
        (
            "an EvalDone with no world",
            vec![
                msg(&id, hello()),
                msg(
                    &id,
                    Kind::EvalDone(v1::EvalDone {
                        generation: 1,
                        id: 3,
                        ..Default::default()
                    }),
                ),
            ],
            Code::FailedPrecondition,
        ),
        (
            "a CheckpointSaved nobody asked for",
            vec![
                msg(&id, hello()),
                msg(
                    &id,
                    Kind::CheckpointSaved(v1::CheckpointSaved {
                        generation: 1,
                        id: 9,
                        ..Default::default()
                    }),
                ),
            ],
            Code::FailedPrecondition,
        ),
        (
            "a Ready before any world",
            vec![
                msg(&id, hello()),
                msg(
                    &id,
                    Kind::Ready(v1::Ready {
                        generation: 1,
                        ..Default::default()
                    }),
                ),
            ],
            Code::FailedPrecondition,
        ),
    ];
    for (what, messages, want) in sessions {
        check(what, want, session_status(&url, messages).await);
    }

    assert!(results.len() >= 28, "{} cases", results.len());
    for (what, want, got) in &results {
        assert_eq!(got.code(), *want, "{what}: {got:?}");
        assert!(!got.message().is_empty(), "{what}: no message");
        assert!(
            got.message().len() <= 1200,
            "{what}: a message of {} bytes",
            got.message().len()
        );
    }
    let after = status(&mut control).await;
    assert_eq!(
        (after.state, after.generation, after.step, after.world_size),
        (
            before.state,
            before.generation,
            before.step,
            before.world_size
        ),
    );
    assert_eq!(after.workers_alive, 1, "only the one good registration");
}

/// A heartbeat renews the lease in the session task and never reaches the driver; one from a
/// worker that is no longer a member (here superseded by its own new registration on the same
/// address) ends its session with NotFound, naming it, so the worker registers again instead
/// of heartbeating into the void.
#[tokio::test]
async fn a_heartbeat_from_a_worker_no_longer_a_member_ends_its_session() {
    use v1::worker_message::Kind;
    let url = start().await;
    let mut workers = WorkersClient::connect(url.clone()).await.unwrap();
    let register = v1::RegisterRequest {
        name: "t".into(),
        backend: v1::CollectiveBackend::Tcp.into(),
        collective_address: "127.0.0.1:5001".into(),
        nccl_unique_id: vec![],
    };
    let old = workers
        .register(register.clone())
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(msg(&old, Kind::Hello(v1::Hello {}))).await.unwrap();
    let mut stream = workers
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(msg(&old, Kind::Heartbeat(v1::Heartbeat {})))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(
        quiet.is_err(),
        "a member's heartbeat gets no answer: {quiet:?}"
    );
    let new = workers
        .register(register)
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    assert_ne!(old, new);
    tx.send(msg(&old, Kind::Heartbeat(v1::Heartbeat {})))
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an answer")
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains(&old), "{}", status.message());
}
