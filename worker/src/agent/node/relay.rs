//! `join --devices LIST --relay`: the agent carries its workers' sessions to the coordinator
//! over one `NodeSession` ([`stagecoach_proto::relay`]), so that the coordinator handles one
//! message per node where it would one per rank.
//!
//! The agent serves the `Workers` service on loopback for its children: `Register` goes to the
//! coordinator as it came (its answer, refusals and their metadata included, comes back as it
//! was), a `Session` becomes one worker's session inside the node session. The children reach
//! the agent at `--coordinator http://127.0.0.1:PORT` with a token made for this agent's run
//! (`STAGECOACH_TOKEN` in their environment; nothing else on the host can speak for them),
//! and only the agent holds the coordinator's TLS material and token.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use stagecoach_proto::connect::ClientAuth;
use stagecoach_proto::relay::{hold, Relay};
use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_client::WorkersClient;
use stagecoach_proto::v1::workers_server::{Workers, WorkersServer};
use tokio::sync::Mutex;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::error::{Error, Result};

/// The options a child must not get from the agent's command line when the agent relays: the
/// coordinator it reaches is the agent, with the agent's token.
pub const RELAYED: &[&str] = &["--coordinator", "--ca", "--cert", "--key", "--token-file"];

/// How long connecting to the coordinator may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's loopback server for its children; it stops when dropped.
pub struct LocalRelay {
    /// Where the children reach it.
    pub url: String,
    /// The token they present.
    pub token: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for LocalRelay {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts the loopback server that relays to the coordinator at `coordinator` with `auth`.
pub async fn start(coordinator: &str, auth: &ClientAuth) -> Result<LocalRelay> {
    if coordinator.contains(',') {
        return Err(Error::Config(format!(
            "--relay carries the sessions to one coordinator, and --coordinator names several ({coordinator}): give one URL, or leave --relay out so that each worker follows the replicas' leader itself"
        )));
    }
    let endpoint = auth
        .endpoint(coordinator, CONNECT_TIMEOUT)
        .map_err(|e| Error::Config(e.0))?;
    // Lazily: the coordinator may start after the agent, as it may for a worker.
    let channel = endpoint.tcp_nodelay(true).connect_lazy();
    let relay = Relay::new(WorkersClient::with_interceptor(channel, auth.bearer()));
    let token = hex(&rand::random::<[u8; 32]>());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| Error::Config(format!("the relay cannot listen on loopback: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("the relay's address: {e}")))?;
    let service = LocalWorkers {
        relay: Arc::new(relay),
        expected: format!("Bearer {token}").into_bytes(),
        registered: Arc::new(Mutex::new(std::collections::HashMap::new())),
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(WorkersServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        debug!(?served, "the relay's server ended");
    });
    let url = format!("http://{address}");
    info!(relay = %url, coordinator, "node agent: relaying the workers' sessions over one node session");
    Ok(LocalRelay { url, token, server })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal in time whatever the content (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Workers` service the children call.
struct LocalWorkers {
    relay: Arc<Relay>,
    expected: Vec<u8>,
    /// How long each registered worker's heartbeats may wait (from its registration).
    registered: Arc<Mutex<std::collections::HashMap<String, Duration>>>,
}

impl LocalWorkers {
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(presented, &self.expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this is a node agent's relay: only the workers it started may call it",
            ))
        }
    }
}

/// The most workers whose registration the relay remembers (a node has a rank per device; a
/// restarted worker registers again under a new id).
const REMEMBERED: usize = 4096;

#[tonic::async_trait]
impl Workers for LocalWorkers {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        self.check(&request)?;
        let answer = self
            .relay
            .client()
            .register(request.into_inner())
            .await?
            .into_inner();
        let mut registered = self.registered.lock().await;
        if registered.len() >= REMEMBERED {
            registered.clear();
        }
        registered.insert(answer.worker_id.clone(), hold(&answer));
        Ok(Response::new(answer))
    }

    type SessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.check(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session closed before its Hello"))?;
        if !matches!(first.kind, Some(v1::worker_message::Kind::Hello(_))) {
            return Err(Status::invalid_argument(
                "the first session message must be Hello",
            ));
        }
        // A worker that registered through another agent run (or not at all) gets no hold:
        // its heartbeats go at once.
        let hold = self
            .registered
            .lock()
            .await
            .get(&first.worker_id)
            .copied()
            .unwrap_or_default();
        let session = self.relay.session(first.worker_id, hold).await?;
        let (sender, down) = session.into_parts();
        // The child's messages go up until it closes its side; then its session ends (the
        // sender dropped), as a closed Session does.
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if sender.send(message).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(down),
        )))
    }

    type NodeSessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::NodeDown, Status>> + Send>>;

    async fn node_session(
        &self,
        _request: Request<Streaming<v1::NodeUp>>,
    ) -> Result<Response<Self::NodeSessionStream>, Status> {
        Err(Status::unimplemented(
            "a node agent's relay carries Session calls; NodeSession goes to the coordinator",
        ))
    }
}
