//! The coordinator's gRPC service and the CLI's logic, driven in-process over real loopback
//! sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::{cli, serve, Coordinator, Error};
use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::{GetStatusRequest, JobState};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
        let task = tokio::spawn(serve(listener, state, async {
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
