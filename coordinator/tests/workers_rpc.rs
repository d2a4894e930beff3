//! The `Workers` gRPC service over a real loopback socket: malformed or out-of-order RPCs get
//! InvalidArgument, NotFound or FailedPrecondition, and change nothing the status shows.

use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::driver::{Driver, Settings};
use stagecoach_coordinator::ledger::Ledger;
use stagecoach_coordinator::server::DriverHandle;
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
    async fn commit(&self, _: &v1::LedgerStep) -> Result<(), String> {
        Ok(())
    }

    async fn save_curriculum(&self, _: &v1::CurriculumRecord) -> Result<(), String> {
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

async fn start() -> String {
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
    let (events, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(driver.run(rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let coordinator = Arc::new(Coordinator::with_driver(
        "rpc",
        DriverHandle { events, snapshot },
    ));
    tokio::spawn(serve(listener, coordinator, std::future::pending()));
    url
}

fn msg(worker_id: &str, kind: v1::worker_message::Kind) -> v1::WorkerMessage {
    v1::WorkerMessage {
        worker_id: worker_id.into(),
        kind: Some(kind),
    }
}

/// Opens a session sending `messages`; returns the status that ends the response stream.
async fn session_status(url: &str, messages: Vec<v1::WorkerMessage>) -> tonic::Status {
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
