//! The coordinator's gRPC service and the CLI's logic, driven in-process over real loopback
//! sockets.

use stagecoach_proto::v1::change_stage_request::Target;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stagecoach_coordinator::{cli, serve, Coordinator, Error};
use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::control_server::{Control, ControlServer};
use stagecoach_proto::v1::{
    ChangeStageRequest, ChangeStageResponse, CheckpointNowRequest, CheckpointNowResponse,
    CheckpointRecord, EvaluateRequest, EvaluateResponse, GetStatusRequest, GetStatusResponse,
    JobState, ListCheckpointsRequest, ListCheckpointsResponse, ListEventsRequest,
    ListEventsResponse, ListStagesRequest, ListStagesResponse, PauseRequest, PauseResponse,
    ResumeRequest, ResumeResponse, RollbackRequest, RollbackResponse, SetMixRequest,
    SetMixResponse, SourceWeight, SpikeAction, SpikeEvent, StageInfo, Transition, TransitionCause,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

/// A coordinator serving on an ephemeral loopback port.
struct TestServer {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

impl TestServer {
    async fn start(job: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let state = Arc::new(Coordinator::new(job));
        let task = tokio::spawn(serve(listener, state, None, async {
            let _ = stopped.await;
        }));
        Self { url, stop, task }
    }

    /// Asks the server to stop and waits until it has.
    async fn shut_down(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// An address on which nothing listens: bound to find a free port, then released.
fn unused_url() -> String {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!("http://{addr}")
}

#[tokio::test]
async fn get_status_over_loopback() {
    let server = TestServer::start("llama-8b").await;

    let mut client = ControlClient::connect(server.url.clone()).await.unwrap();
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.job, "llama-8b");
    assert_eq!(status.state(), JobState::Waiting);
    assert_eq!(status.coordinator_version, env!("CARGO_PKG_VERSION"));
    assert!(
        status.uptime_seconds < 60,
        "uptime {}",
        status.uptime_seconds
    );

    let json = cli::status(&server.url, true).await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["job"], "llama-8b");
    assert_eq!(json["state"], "waiting");

    // The address without a scheme works too.
    let text = cli::status(server.url.trim_start_matches("http://"), false)
        .await
        .unwrap();
    assert!(
        text.starts_with("job:      llama-8b\nstate:    waiting\n"),
        "{text}"
    );

    let url = server.url.clone();
    // An idle client connection does not hold up a graceful shutdown.
    tokio::time::timeout(Duration::from_secs(10), server.shut_down())
        .await
        .expect("shutdown waited on an idle client");
    drop(client);
    let err = cli::status(&url, false).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn cli_reports_an_unreachable_coordinator_clearly() {
    let url = unused_url();

    let err = cli::status(&url, false).await.unwrap_err();

    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_eq!(cli::exit_code(&err), cli::EXIT_UNREACHABLE);
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach the coordinator at {url}: connection refused; is stagecoach-coordinator \
             running? (set --coordinator or STAGECOACH_COORDINATOR)"
        )
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
}

/// What a [`FakeControl`] was asked.
#[derive(Debug, Clone, PartialEq)]
enum Asked {
    ChangeStage(ChangeStageRequest),
    SetMix(SetMixRequest),
    Pause(PauseRequest),
    Resume(ResumeRequest),
    Evaluate(EvaluateRequest),
    CheckpointNow(CheckpointNowRequest),
    Rollback(RollbackRequest),
}

/// A `Control` service with set answers that records every command: the CLI's side of the
/// protocol, tested without a job.
struct FakeControl {
    asked: Mutex<Vec<Asked>>,
    /// The current stage, as `GetStatus` reports it.
    stage: String,
    /// `SetMix`'s answer.
    mix_effective_step: u64,
    /// Refuse every command with this.
    refusal: Option<(Code, &'static str)>,
}

impl FakeControl {
    fn new(stage: &str, mix_effective_step: u64) -> Self {
        FakeControl {
            asked: Mutex::new(Vec::new()),
            stage: stage.into(),
            mix_effective_step,
            refusal: None,
        }
    }

    fn ask(&self, asked: Asked) -> Result<(), Status> {
        self.asked.lock().unwrap().push(asked);
        match self.refusal {
            Some((code, message)) => Err(Status::new(code, message)),
            None => Ok(()),
        }
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Control for FakeControl {
    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Ok(Response::new(GetStatusResponse {
            job: "fake".into(),
            stage: self.stage.clone(),
            stages: 3,
            ..Default::default()
        }))
    }

    async fn list_stages(
        &self,
        _: Request<ListStagesRequest>,
    ) -> Result<Response<ListStagesResponse>, Status> {
        let stage = |index, name: &str, until_step| StageInfo {
            index,
            name: name.into(),
            until_step,
            until_tokens: until_step * 1_000,
            seq_len: 128,
            mix: vec![SourceWeight {
                source: "prose".into(),
                weight: 1.0,
            }],
            ..Default::default()
        };
        let mut first = stage(0, "stable-1", 120);
        first.started = true;
        Ok(Response::new(ListStagesResponse {
            stages: vec![first, stage(1, "stable-2", 240), stage(2, "decay", 300)],
            transitions: vec![Transition {
                to: "stable-1".into(),
                cause: TransitionCause::Start.into(),
                requested_by: "coordinator".into(),
                ..Default::default()
            }],
            evaluations: Vec::new(),
            current: 0,
            step: 7,
        }))
    }

    async fn change_stage(
        &self,
        request: Request<ChangeStageRequest>,
    ) -> Result<Response<ChangeStageResponse>, Status> {
        let r = request.into_inner();
        self.ask(Asked::ChangeStage(r.clone()))?;
        let to = match r.target {
            Some(Target::Stage(name)) => name,
            _ => "stable-2".to_owned(),
        };
        Ok(Response::new(ChangeStageResponse {
            from: self.stage.clone(),
            to,
            effective_step: 120,
        }))
    }

    async fn set_mix(
        &self,
        request: Request<SetMixRequest>,
    ) -> Result<Response<SetMixResponse>, Status> {
        self.ask(Asked::SetMix(request.into_inner()))?;
        Ok(Response::new(SetMixResponse {
            effective_step: self.mix_effective_step,
        }))
    }

    async fn pause(
        &self,
        request: Request<PauseRequest>,
    ) -> Result<Response<PauseResponse>, Status> {
        self.ask(Asked::Pause(request.into_inner()))?;
        Ok(Response::new(PauseResponse { step: 41 }))
    }

    async fn resume(
        &self,
        request: Request<ResumeRequest>,
    ) -> Result<Response<ResumeResponse>, Status> {
        self.ask(Asked::Resume(request.into_inner()))?;
        Ok(Response::new(ResumeResponse { step: 41 }))
    }

    async fn evaluate(
        &self,
        request: Request<EvaluateRequest>,
    ) -> Result<Response<EvaluateResponse>, Status> {
        self.ask(Asked::Evaluate(request.into_inner()))?;
        Ok(Response::new(EvaluateResponse { step: 42 }))
    }

    async fn checkpoint_now(
        &self,
        request: Request<CheckpointNowRequest>,
    ) -> Result<Response<CheckpointNowResponse>, Status> {
        self.ask(Asked::CheckpointNow(request.into_inner()))?;
        Ok(Response::new(CheckpointNowResponse { step: 43 }))
    }

    async fn list_checkpoints(
        &self,
        _: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let record = |step, stage, known_good| CheckpointRecord {
            step,
            path: format!("ck/step-{step:08}"),
            stage,
            loss: 2.5,
            known_good,
            trigger: "every 50 steps".into(),
            ..Default::default()
        };
        Ok(Response::new(ListCheckpointsResponse {
            checkpoints: vec![record(50, 0, true), record(150, 1, false)],
        }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let r = request.into_inner();
        self.ask(Asked::Rollback(r.clone()))?;
        let step = r.checkpoint.parse().unwrap_or(50);
        Ok(Response::new(RollbackResponse {
            checkpoint: format!("ck/step-{step:08}"),
            step,
        }))
    }

    async fn list_events(
        &self,
        _: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        Ok(Response::new(ListEventsResponse {
            events: vec![SpikeEvent {
                detected_at: 160,
                first_step: 158,
                loss: 6.0,
                mean: 2.5,
                std: 0.1,
                rule: "loss z-score 35.0 > 6".into(),
                action: SpikeAction::Rollback.into(),
                rolled_back_to: "ck/step-00000050".into(),
                resumed_at_step: 50,
                skipped_from_step: 156,
                skipped_steps: 7,
                skipped_samples: 112,
                lr_factor: 1.0,
                ..Default::default()
            }],
        }))
    }
}

/// Serves `fake` on an ephemeral loopback port until the returned task is aborted.
async fn serve_fake(fake: Arc<FakeControl>) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ControlServer::from_arc(fake))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (url, task)
}

fn weights(pairs: &[(&str, f64)]) -> Vec<SourceWeight> {
    pairs
        .iter()
        .map(|(source, weight)| SourceWeight {
            source: (*source).into(),
            weight: *weight,
        })
        .collect()
}

#[tokio::test]
async fn cli_commands_say_who_asks_and_what_happens() {
    let fake = Arc::new(FakeControl::new("stable-1", 131));
    let (url, server) = serve_fake(fake.clone()).await;
    let me = cli::requested_by();

    assert_eq!(
        cli::change_stage(&url, None).await.unwrap(),
        "stage stable-1 → stable-2 at step 120"
    );
    assert_eq!(
        cli::change_stage(&url, Some("decay")).await.unwrap(),
        "stage stable-1 → decay at step 120"
    );
    let mix = weights(&[("prose", 0.6), ("code", 0.4)]);
    assert_eq!(
        cli::set_mix(&url, "stable-1", mix.clone()).await.unwrap(),
        "mix of stable-1 set to prose=0.60 code=0.40, from step 131"
    );
    assert_eq!(
        cli::pause(&url).await.unwrap(),
        "paused after step 41: no further step starts until `stagecoach resume`"
    );
    assert_eq!(cli::resume(&url).await.unwrap(), "resumed at step 41");
    assert_eq!(
        cli::evaluate(&url).await.unwrap(),
        "evaluation requested: it runs after step 42; `stagecoach stages` shows its losses"
    );
    assert_eq!(
        fake.asked(),
        [
            Asked::ChangeStage(ChangeStageRequest {
                target: Some(Target::Next(true)),
                requested_by: me.clone(),
            }),
            Asked::ChangeStage(ChangeStageRequest {
                target: Some(Target::Stage("decay".into())),
                requested_by: me.clone(),
            }),
            Asked::SetMix(SetMixRequest {
                stage: "stable-1".into(),
                weights: mix,
                requested_by: me.clone(),
            }),
            Asked::Pause(PauseRequest {
                requested_by: me.clone(),
            }),
            Asked::Resume(ResumeRequest {
                requested_by: me.clone(),
            }),
            Asked::Evaluate(EvaluateRequest { requested_by: me }),
        ]
    );

    // The read commands render what the coordinator answers.
    let stages: serde_json::Value =
        serde_json::from_str(&cli::stages(&url, true).await.unwrap()).unwrap();
    assert_eq!(stages["step"], 7);
    assert_eq!(stages["stages"][0]["status"], "current");
    assert_eq!(stages["stages"][2]["name"], "decay");
    assert_eq!(stages["transitions"][0]["cause"], "start");
    let text = cli::stages(&url, false).await.unwrap();
    assert!(text.starts_with("step 7, stage 1/3 (stable-1)\n"), "{text}");
    server.abort();
}

#[tokio::test]
async fn checkpoint_and_rollback_commands_say_what_happens() {
    let fake = Arc::new(FakeControl::new("stable-1", 0));
    let (url, server) = serve_fake(fake.clone()).await;
    let me = cli::requested_by();

    assert_eq!(
        cli::checkpoint_now(&url).await.unwrap(),
        "checkpoint requested: it holds the state after step 43; `stagecoach checkpoints` lists \
         it once written"
    );
    assert_eq!(
        cli::rollback(&url, None).await.unwrap(),
        "rolling back to ck/step-00000050 (step 50): every rank reloads it and training resumes \
         at step 50"
    );
    assert_eq!(
        cli::rollback(&url, Some(" 150 ")).await.unwrap(),
        "rolling back to ck/step-00000150 (step 150): every rank reloads it and training \
         resumes at step 150"
    );
    // An empty argument is no argument: the latest known-good checkpoint.
    cli::rollback(&url, Some("")).await.unwrap();
    assert_eq!(
        fake.asked(),
        [
            Asked::CheckpointNow(CheckpointNowRequest {
                requested_by: me.clone(),
            }),
            Asked::Rollback(RollbackRequest {
                checkpoint: String::new(),
                requested_by: me.clone(),
            }),
            Asked::Rollback(RollbackRequest {
                checkpoint: "150".into(),
                requested_by: me.clone(),
            }),
            Asked::Rollback(RollbackRequest {
                checkpoint: String::new(),
                requested_by: me,
            }),
        ]
    );

    // The index, with the stage names `ListStages` gives.
    let text = cli::checkpoints(&url, false).await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("step  path              stage"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("  50  ck/step-00000050  stable-1  2.5000  yes"),
        "{text}"
    );
    assert!(
        lines[2].starts_with(" 150  ck/step-00000150  stable-2  2.5000  -"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "latest known-good: ck/step-00000050 (step 50); `stagecoach rollback` goes there"
        ),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli::checkpoints(&url, true).await.unwrap()).unwrap();
    assert_eq!(json["latest_known_good"], "ck/step-00000050");
    assert_eq!(json["checkpoints"][1]["stage_name"], "stable-2");

    let json: serde_json::Value =
        serde_json::from_str(&cli::events(&url, true).await.unwrap()).unwrap();
    assert_eq!(json["events"][0]["action"], "rollback");
    assert_eq!(json["events"][0]["skipped_samples"], 112);
    let text = cli::events(&url, false).await.unwrap();
    assert!(text.starts_with("detected at  first step"), "{text}");
    assert!(
        text.contains("rollback  ck/step-00000050 (step 50)  steps 156..=162 (112 samples)"),
        "{text}"
    );
    server.abort();
}

#[tokio::test]
async fn mix_set_says_when_the_mixture_applies() {
    // An upcoming stage: the coordinator has no step to give yet.
    let fake = Arc::new(FakeControl::new("stable-1", 0));
    let (url, server) = serve_fake(fake).await;
    let mix = weights(&[("prose", 1.0)]);
    assert_eq!(
        cli::set_mix(&url, "decay", mix.clone()).await.unwrap(),
        "mix of decay set to prose=1.00; applies when decay starts"
    );
    // The current stage of a job that has not trained a step yet: from step 0.
    assert_eq!(
        cli::set_mix(&url, "stable-1", mix).await.unwrap(),
        "mix of stable-1 set to prose=1.00, from step 0"
    );
    server.abort();
}

#[tokio::test]
async fn cli_passes_on_the_coordinators_refusal() {
    let message = "no stage named \"decay-2\"; the stages are stable-1, stable-2, decay";
    let fake = Arc::new(FakeControl {
        refusal: Some((Code::NotFound, message)),
        ..FakeControl::new("stable-1", 0)
    });
    let (url, server) = serve_fake(fake).await;
    let err = cli::change_stage(&url, Some("decay-2")).await.unwrap_err();
    assert!(
        matches!(&err, Error::Refused { code: Code::NotFound, message: m } if m == message),
        "{err:?}"
    );
    assert_eq!(cli::exit_code(&err), 1);
    assert_eq!(
        err.to_string(),
        format!("the coordinator refused: {message}")
    );
    let err = cli::rollback(&url, Some("7")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Refused {
                code: Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(cli::exit_code(&err), 1);
    server.abort();

    // A coordinator without a job refuses every command, and says how to give it one.
    let server = TestServer::start("idle").await;
    for err in [
        cli::change_stage(&server.url, None).await.unwrap_err(),
        cli::set_mix(&server.url, "a", weights(&[("a", 1.0)]))
            .await
            .unwrap_err(),
        cli::pause(&server.url).await.unwrap_err(),
        cli::stages(&server.url, false).await.unwrap_err(),
        cli::checkpoint_now(&server.url).await.unwrap_err(),
        cli::checkpoints(&server.url, false).await.unwrap_err(),
        cli::rollback(&server.url, None).await.unwrap_err(),
        cli::events(&server.url, false).await.unwrap_err(),
    ] {
        let Error::Refused { code, message } = &err else {
            panic!("not a refusal: {err:?}");
        };
        assert_eq!(*code, Code::FailedPrecondition);
        assert!(message.contains("--job FILE"), "{message}");
        assert_eq!(cli::exit_code(&err), 1);
    }
    server.shut_down().await;
}

#[tokio::test]
async fn every_command_reports_an_unreachable_coordinator() {
    let url = unused_url();
    let errors = [
        cli::stages(&url, true).await.unwrap_err(),
        cli::change_stage(&url, None).await.unwrap_err(),
        cli::change_stage(&url, Some("decay")).await.unwrap_err(),
        cli::set_mix(&url, "decay", weights(&[("prose", 1.0)]))
            .await
            .unwrap_err(),
        cli::pause(&url).await.unwrap_err(),
        cli::resume(&url).await.unwrap_err(),
        cli::evaluate(&url).await.unwrap_err(),
        cli::checkpoint_now(&url).await.unwrap_err(),
        cli::checkpoints(&url, false).await.unwrap_err(),
        cli::rollback(&url, None).await.unwrap_err(),
        cli::rollback(&url, Some("100")).await.unwrap_err(),
        cli::events(&url, true).await.unwrap_err(),
    ];
    for err in errors {
        assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
        assert_eq!(cli::exit_code(&err), cli::EXIT_UNREACHABLE);
        assert!(
            err.to_string()
                .starts_with(&format!("cannot reach the coordinator at {url}: ")),
            "{err}"
        );
    }
}
