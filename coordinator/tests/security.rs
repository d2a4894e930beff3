//! The control plane over real TLS on loopback, with the certificates and tokens of
//! `stagecoach certs init`: a client that does not trust the coordinator's CA, or that has no
//! certificate under mutual TLS, cannot connect; each role can do what it may and nothing more
//! (viewer, operator, worker, by certificate and by token); an unauthenticated Register or
//! Session changes nothing and learns nothing; a worker id is bound to who registered it; what
//! an operator does is audited under its authenticated identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::auth::Auth;
use stagecoach_coordinator::driver::{Driver, Settings};
use stagecoach_coordinator::ledger::Ledger;
use stagecoach_coordinator::server::DriverHandle;
use stagecoach_coordinator::store::StoreError;
use stagecoach_coordinator::tls::ServerTls;
use stagecoach_coordinator::{certs, serve, Coordinator};
use stagecoach_core::spec::builder::JobBuilder;
use stagecoach_core::spec::JobFile;
use stagecoach_proto::connect::{AuthedChannel, ClientAuth};
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

/// A coordinator with a job, serving TLS with `dir`'s certificates: mutual TLS, and the tokens
/// of auth.toml when `tokens`. Returns its URL.
async fn start(dir: &Path, tokens: bool) -> String {
    let job = JobBuilder::bare()
        .set("model.preset", "micro")
        .set("schedule.peak_lr", 1e-3)
        .set("data.global_batch_tokens", 64)
        .set("data.micro_batch_tokens", 32)
        .set("workers.min", 2)
        .set("workers.max", 2)
        .source("a", "x")
        .stage("only", 3, 16, &[("a", 1.0)])
        .to_toml();
    let job: JobFile = toml::from_str(&job).unwrap();
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
    let auth_file = dir.join("auth.toml");
    let auth = Auth::load(tokens.then_some(auth_file.as_path()), true).unwrap();
    let tls = ServerTls::load(
        &dir.join("coordinator.pem"),
        &dir.join("coordinator.key"),
        Some(&dir.join("ca.pem")),
        auth.has_tokens(),
    )
    .unwrap();
    let coordinator = Arc::new(
        Coordinator::with_driver(
            "secure",
            DriverHandle {
                events,
                snapshot,
                leases,
            },
        )
        .with_auth(Arc::new(auth)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(
        async move { serve(listener, coordinator, Some(&tls), std::future::pending()).await },
    );
    url
}

/// What a client presents: a CA, and a certificate and key named `who` (in `dir`), and a
/// token file.
fn client(ca: &Path, dir: &Path, who: Option<&str>, token: Option<&str>) -> ClientAuth {
    let file = |ext: &str| who.map(|w| dir.join(format!("{w}.{ext}")));
    let token: Option<PathBuf> = token.map(|t| dir.join(format!("{t}.token")));
    ClientAuth::from_files(
        Some(ca),
        file("pem").as_deref(),
        file("key").as_deref(),
        token.as_deref(),
    )
    .unwrap()
}

async fn channel(url: &str, auth: &ClientAuth) -> Result<AuthedChannel, String> {
    let endpoint = auth.endpoint(url, Duration::from_secs(5)).unwrap();
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        auth.bearer(),
    ))
}

async fn control(url: &str, auth: &ClientAuth) -> ControlClient<AuthedChannel> {
    ControlClient::new(channel(url, auth).await.expect("a connection"))
}

async fn workers(url: &str, auth: &ClientAuth) -> WorkersClient<AuthedChannel> {
    WorkersClient::new(channel(url, auth).await.expect("a connection"))
}

fn register() -> v1::RegisterRequest {
    v1::RegisterRequest {
        name: "t".into(),
        backend: v1::CollectiveBackend::Tcp.into(),
        collective_address: "127.0.0.1:5001".into(),
        nccl_unique_id: vec![],
    }
}

fn pause() -> v1::PauseRequest {
    v1::PauseRequest {
        requested_by: "someone else@laptop".into(),
    }
}

/// The code of a call's error, or Ok.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn mutual_tls_admits_each_role_to_what_it_may_do() {
    let certs_dir = tempfile::tempdir().unwrap();
    let d = certs_dir.path();
    certs::init(d, &[]).unwrap();
    let other = tempfile::tempdir().unwrap();
    certs::init(other.path(), &[]).unwrap();
    let url = start(d, false).await;
    let ca = d.join("ca.pem");

    // A client that trusts another CA does not get through the handshake.
    let wrong = client(&other.path().join("ca.pem"), d, Some("operator"), None);
    assert!(
        channel(&url, &wrong).await.is_err(),
        "a client of another CA connected"
    );
    // Under mutual TLS, a client without a certificate is refused by the handshake.
    let anonymous = client(&ca, d, None, None);
    let refused = match channel(&url, &anonymous).await {
        Err(_) => Code::Unavailable,
        Ok(c) => code(
            ControlClient::new(c)
                .get_status(v1::GetStatusRequest {})
                .await,
        ),
    };
    assert_ne!(
        refused,
        Code::Ok,
        "a client without a certificate was served"
    );
    // A certificate of another CA, trusting ours, is refused too.
    let forged = ClientAuth::from_files(
        Some(&ca),
        Some(&other.path().join("operator.pem")),
        Some(&other.path().join("operator.key")),
        None,
    )
    .unwrap();
    let forged_result = match channel(&url, &forged).await {
        Err(_) => Code::Unavailable,
        Ok(c) => code(ControlClient::new(c).pause(pause()).await),
    };
    assert_ne!(
        forged_result,
        Code::Ok,
        "a certificate of another CA paused the job"
    );

    let viewer = client(&ca, d, Some("viewer"), None);
    let operator = client(&ca, d, Some("operator"), None);
    let worker = client(&ca, d, Some("worker"), None);
    let mut as_viewer = control(&url, &viewer).await;
    assert_eq!(
        code(as_viewer.get_status(v1::GetStatusRequest {}).await),
        Code::Ok
    );
    assert_eq!(
        code(as_viewer.list_events(v1::ListEventsRequest {}).await),
        Code::Ok
    );
    assert_eq!(code(as_viewer.pause(pause()).await), Code::PermissionDenied);
    let mut as_worker = control(&url, &worker).await;
    assert_eq!(
        code(as_worker.get_status(v1::GetStatusRequest {}).await),
        Code::PermissionDenied
    );
    assert_eq!(code(as_worker.pause(pause()).await), Code::PermissionDenied);
    let mut operator_workers = workers(&url, &operator).await;
    assert_eq!(
        code(operator_workers.register(register()).await),
        Code::PermissionDenied
    );
    // The worker certificate registers, and learns the job.
    let reg = workers(&url, &worker)
        .await
        .register(register())
        .await
        .unwrap()
        .into_inner();
    assert!(reg.job.is_some());
    // The operator pauses: the audit trail names it, not what the client claimed.
    let mut as_operator = control(&url, &operator).await;
    assert_eq!(code(as_operator.pause(pause()).await), Code::Ok);
    let events = as_viewer
        .list_events(v1::ListEventsRequest {})
        .await
        .unwrap()
        .into_inner()
        .events;
    let audit = events
        .iter()
        .find(|e| e.action() == v1::SpikeAction::Control)
        .expect("an audit entry");
    assert_eq!(audit.requested_by, "operator operator (certificate)");
    assert!(audit.detail.starts_with("pause"), "{}", audit.detail);
    assert!(!events
        .iter()
        .any(|e| e.requested_by.contains("someone else")));
    let status = as_viewer
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.workers_alive, 1,
        "only the worker certificate registered"
    );
}

#[tokio::test]
async fn tokens_are_bound_to_their_roles_and_unauthenticated_workers_learn_nothing() {
    let certs_dir = tempfile::tempdir().unwrap();
    let d = certs_dir.path();
    certs::init(d, &[]).unwrap();
    let url = start(d, true).await;
    let ca = d.join("ca.pem");
    let token = |role: &str| client(&ca, d, None, Some(role));

    let mut viewer = control(&url, &token("viewer")).await;
    assert_eq!(
        code(viewer.get_status(v1::GetStatusRequest {}).await),
        Code::Ok
    );
    assert_eq!(code(viewer.pause(pause()).await), Code::PermissionDenied);
    let mut worker_as_control = control(&url, &token("worker")).await;
    assert_eq!(
        code(worker_as_control.get_status(v1::GetStatusRequest {}).await),
        Code::PermissionDenied
    );
    let mut operator = control(&url, &token("operator")).await;
    assert_eq!(code(operator.pause(pause()).await), Code::Ok);
    assert_eq!(
        code(
            operator
                .resume(v1::ResumeRequest {
                    requested_by: String::new()
                })
                .await
        ),
        Code::Ok
    );
    // A token nobody issued.
    let forged_dir = tempfile::tempdir().unwrap();
    std::fs::write(forged_dir.path().join("guess.token"), "0123456789abcdef\n").unwrap();
    let guess = client(&ca, forged_dir.path(), None, Some("guess"));
    let mut guessed = control(&url, &guess).await;
    assert_eq!(
        code(guessed.get_status(v1::GetStatusRequest {}).await),
        Code::Unauthenticated
    );

    // No token and no certificate (tokens make certificates optional): nothing is learnt,
    // but for whether the services are served (grpc.health.v1, for probes).
    let nobody = client(&ca, d, None, None);
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(&url, &nobody).await.unwrap());
    for service in ["", "stagecoach.v1.Control", "stagecoach.v1.Workers"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let mut w = workers(&url, &nobody).await;
    let refused = w.register(register()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        !refused.message().contains("micro"),
        "{}",
        refused.message()
    );
    let hello = v1::WorkerMessage {
        worker_id: "w1-0000000000000000".into(),
        kind: Some(v1::worker_message::Kind::Hello(v1::Hello {})),
    };
    let session = w.session(tokio_stream::iter(vec![hello.clone()])).await;
    assert_eq!(
        session.map(|_| ()).unwrap_err().code(),
        Code::Unauthenticated
    );

    // A worker id belongs to who registered it: another worker identity cannot hold its
    // session (here the worker certificate against an id the worker token registered).
    let id = workers(&url, &token("worker"))
        .await
        .register(register())
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let by_certificate = client(&ca, d, Some("worker"), None);
    let stolen = v1::WorkerMessage {
        worker_id: id,
        kind: Some(v1::worker_message::Kind::Hello(v1::Hello {})),
    };
    let session = workers(&url, &by_certificate)
        .await
        .session(tokio_stream::iter(vec![stolen]))
        .await;
    let status = match session {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = viewer
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.workers_alive, status.generation), (1, 0));
}
