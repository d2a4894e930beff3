//! The coordinator's state and its `Control` gRPC service.

use std::future::Future;
use std::sync::Arc;

use stagecoach_proto::v1;
use stagecoach_proto::v1::control_server::{Control, ControlServer};
use stagecoach_proto::v1::{GetStatusRequest, GetStatusResponse, JobState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{Auth, Caller, Need};
use crate::driver::{ControlReply, ControlRequest, Event};
use crate::workers::{ask, WorkersService};
use crate::Error;
use stagecoach_proto::v1::workers_server::WorkersServer;

/// What the coordinator knows about itself and its job. Shared by every RPC handler.
#[derive(Debug)]
pub struct Coordinator {
    job: String,
    started: Instant,
    /// The running job's driver, once this coordinator runs one (at start, or when a replica
    /// wins the election).
    driver: std::sync::OnceLock<DriverHandle>,
    /// Who may call what (every handler checks its caller first).
    auth: Arc<Auth>,
    /// With several replicas (`--ha`): this one's URL and the election as it sees it. A replica
    /// without a driver stands by and answers every call with the leader's URL.
    replicas: Option<Replicas>,
    /// True once a driver runs here.
    leading: watch::Sender<bool>,
}

/// A replica's view of its peers (`--ha`).
#[derive(Debug, Clone)]
pub struct Replicas {
    pub advertise: String,
    pub candidates: watch::Receiver<crate::ha::Candidates>,
}

/// How the services reach a running [`Driver`](crate::driver::Driver).
#[derive(Debug, Clone)]
pub struct DriverHandle {
    pub events: tokio::sync::mpsc::Sender<crate::driver::Event>,
    pub snapshot: watch::Receiver<crate::status::Snapshot>,
    /// Where the session tasks renew the leases of the workers they hear from.
    pub leases: Arc<crate::driver::LeaseBook>,
}

impl Coordinator {
    /// A coordinator for `job`, started now, waiting for workers.
    pub fn new(job: impl Into<String>) -> Self {
        Self {
            job: job.into(),
            started: Instant::now(),
            driver: std::sync::OnceLock::new(),
            auth: Arc::new(Auth::open()),
            replicas: None,
            leading: watch::channel(false).0,
        }
    }

    /// A replica of `job` that stands by until [`Coordinator::lead`].
    pub fn standby(job: impl Into<String>, replicas: Replicas) -> Self {
        Self {
            replicas: Some(replicas),
            ..Self::new(job)
        }
    }

    /// Starts serving `driver`'s job (a standby that won the election). Only once.
    pub fn lead(&self, driver: DriverHandle) {
        if self.driver.set(driver).is_ok() {
            self.leading.send_replace(true);
        }
    }

    /// Whether a driver runs here, as it changes (for `/readyz`).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Resolves once a driver runs here (at once if one does).
    pub async fn until_leading(&self) {
        let mut leading = self.leading.subscribe();
        let _ = leading.wait_for(|l| *l).await;
    }

    /// The driver, when this coordinator runs one.
    pub(crate) fn driver(&self) -> Option<&DriverHandle> {
        self.driver.get()
    }

    /// Whether this replica stands by (several replicas, and another leads or none yet).
    pub fn standing_by(&self) -> bool {
        self.replicas.is_some() && self.driver.get().is_none()
    }

    /// Lets a call through, or, on a standby, answers it with where the leader is. Only an
    /// authenticated caller (any role) learns the leader's URL.
    pub fn gate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(replicas) = self
            .replicas
            .as_ref()
            .filter(|_| self.driver.get().is_none())
        else {
            return Ok(());
        };
        self.auth.authenticated(request)?;
        let leader = replicas.candidates.borrow().leader.clone();
        let leader = leader.filter(|l| *l != replicas.advertise);
        let mut status = Status::unavailable(match &leader {
            Some(l) => format!("this coordinator stands by; the leader is {l}"),
            None => "this coordinator stands by and no replica leads yet (an election is under way); try again".to_owned(),
        });
        let value = leader
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| tonic::metadata::MetadataValue::from_static(""));
        status
            .metadata_mut()
            .insert(stagecoach_proto::LEADER_METADATA, value);
        Err(status)
    }

    /// Checks callers with `auth` (an open coordinator by default).
    pub fn with_auth(mut self, auth: Arc<Auth>) -> Self {
        self.auth = auth;
        self
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// A coordinator whose status and worker services are backed by a running driver.
    pub fn with_driver(job: impl Into<String>, driver: DriverHandle) -> Self {
        let c = Self::new(job);
        c.lead(driver);
        c
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    /// The job's state: the driver's when it runs one, else waiting (no job).
    pub fn state(&self) -> JobState {
        self.driver
            .get()
            .and_then(|d| JobState::try_from(d.snapshot.borrow().state).ok())
            .unwrap_or(JobState::Waiting)
    }

    /// The driver's latest snapshot, when this coordinator runs a job.
    pub fn driver_snapshot(&self) -> Option<crate::status::Snapshot> {
        self.driver.get().map(|d| d.snapshot.borrow().clone())
    }

    /// Whole seconds since the coordinator was created.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Passes a control request to the driver and returns its answer.
    async fn control(&self, request: ControlRequest) -> Result<ControlReply, Status> {
        let Some(d) = self.driver.get() else {
            return Err(Status::failed_precondition(
                "this coordinator runs no job (start it with --job FILE)",
            ));
        };
        ask(&d.events, |reply| Event::Control { request, reply }).await
    }

    /// A change an operator asks for: checks the caller, records who asked (the authenticated
    /// identity; on an open coordinator what the client says) and the outcome in the audit log
    /// and metric, and passes it to the driver.
    async fn operate<T>(
        &self,
        request: &Request<T>,
        action: &'static str,
        given_by: String,
        make: impl FnOnce(String) -> ControlRequest,
    ) -> Result<ControlReply, Status> {
        let caller = self.permitted(request, action)?;
        let who = match caller.role {
            None => requester(given_by),
            Some(_) => caller.describe(),
        };
        let reply = self.control(make(who.clone())).await;
        audit(action, if reply.is_ok() { "done" } else { "failed" }, &who);
        reply
    }

    /// The caller, if it may change the job; a refusal is audited.
    fn permitted<T>(&self, request: &Request<T>, action: &'static str) -> Result<Caller, Status> {
        self.auth
            .check(request, Need::Operate)
            .inspect_err(|status| {
                audit(
                    action,
                    "refused",
                    &format!("{} ({})", peer(request), status.message()),
                );
            })
    }

    /// A read a viewer may do: checks the caller.
    fn view<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.auth.check(request, Need::View).map(|_| ())
    }
}

/// The reply of the kind a request expects (the driver answers each request with its own kind).
macro_rules! expect_reply {
    ($reply:expr, $kind:ident) => {
        match $reply {
            ControlReply::$kind(r) => Ok(Response::new(r)),
            other => Err(Status::internal(format!(
                "the driver answered {other:?} to a {} request",
                stringify!($kind)
            ))),
        }
    };
}

#[tonic::async_trait]
impl Control for Coordinator {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        self.view(&request)?;
        let mut status = GetStatusResponse {
            job: self.job.clone(),
            state: self.state().into(),
            coordinator_version: crate::VERSION.to_owned(),
            uptime_seconds: self.uptime_seconds(),
            ..Default::default()
        };
        if let Some(r) = &self.replicas {
            status.leader = r.advertise.clone();
            status.standbys = r
                .candidates
                .borrow()
                .standbys
                .iter()
                .filter(|s| **s != r.advertise)
                .cloned()
                .collect();
        }
        if let Some(d) = self.driver.get() {
            let s = d.snapshot.borrow().clone();
            status.state = s.state;
            status.generation = s.generation;
            status.step = s.step;
            status.total_steps = s.total_steps;
            status.loss = s.loss.unwrap_or(f64::NAN);
            status.workers_alive = s.workers_alive;
            status.world_size = s.world_size;
            status.detail = s.detail;
            status.stage = s.stage;
            status.stage_index = s.stage_index;
            status.stages = s.stages;
            status.tokens = s.tokens;
            status.total_tokens = s.total_tokens;
            status.seq_len = s.seq_len;
            status.rope_theta = s.rope_theta;
            status.lr = s.lr;
            status.steps_per_second = s.steps_per_second.unwrap_or(0.0);
            status.last_failure = s.last_failure.clone();
            status.pending_writes = s.pending_writes;
            status.next_transition = s.next_transition.map(|(to, at_step)| {
                let tokens_per_step = s.total_tokens / s.total_steps.max(1);
                let running = s.state == JobState::Running as i32;
                let eta_seconds = match s.steps_per_second {
                    Some(rate) if running && rate > 0.0 => {
                        at_step.saturating_sub(s.step) as f64 / rate
                    }
                    _ => -1.0,
                };
                v1::NextTransition {
                    to,
                    at_step,
                    at_tokens: at_step * tokens_per_step,
                    eta_seconds,
                }
            });
        }
        Ok(Response::new(status))
    }

    async fn list_stages(
        &self,
        request: Request<v1::ListStagesRequest>,
    ) -> Result<Response<v1::ListStagesResponse>, Status> {
        self.view(&request)?;
        expect_reply!(self.control(ControlRequest::ListStages).await?, Stages)
    }

    async fn change_stage(
        &self,
        request: Request<v1::ChangeStageRequest>,
    ) -> Result<Response<v1::ChangeStageResponse>, Status> {
        self.permitted(&request, "stage")?;
        let (request, r) = split(request);
        let stage = match r.target {
            Some(v1::change_stage_request::Target::Stage(name)) => {
                if name.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "stage is empty: name the stage to move to (`stage set NAME`), or ask for the next one (`stage next`)",
                    ));
                }
                if name.len() > MAX_NAME_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "a stage name of {} bytes; stage names have at most {} characters",
                        name.len(),
                        stagecoach_core::spec::MAX_NAME
                    )));
                }
                Some(name)
            }
            Some(v1::change_stage_request::Target::Next(true)) => None,
            Some(v1::change_stage_request::Target::Next(false)) | None => {
                return Err(Status::invalid_argument(
                    "say which stage: set `stage` to a stage name, or `next` to true",
                ))
            }
        };
        let reply = self
            .operate(&request, "stage", r.requested_by, |requested_by| {
                ControlRequest::ChangeStage {
                    stage,
                    requested_by,
                }
            })
            .await?;
        expect_reply!(reply, StageChanged)
    }

    async fn set_mix(
        &self,
        request: Request<v1::SetMixRequest>,
    ) -> Result<Response<v1::SetMixResponse>, Status> {
        self.permitted(&request, "mix")?;
        let (request, r) = split(request);
        if r.weights.is_empty() {
            return Err(Status::invalid_argument(
                "no weights: give at least one source=weight",
            ));
        }
        let weights: Vec<(String, f64)> = r
            .weights
            .into_iter()
            .map(|w| (w.source, w.weight))
            .collect();
        let reply = self
            .operate(&request, "mix", r.requested_by, |requested_by| {
                ControlRequest::SetMix {
                    stage: r.stage,
                    weights,
                    requested_by,
                }
            })
            .await?;
        expect_reply!(reply, MixSet)
    }

    async fn pause(
        &self,
        request: Request<v1::PauseRequest>,
    ) -> Result<Response<v1::PauseResponse>, Status> {
        let (request, r) = split(request);
        let reply = self
            .operate(&request, "pause", r.requested_by, |requested_by| {
                ControlRequest::Pause { requested_by }
            })
            .await?;
        expect_reply!(reply, Paused)
    }

    async fn resume(
        &self,
        request: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::ResumeResponse>, Status> {
        let (request, r) = split(request);
        let reply = self
            .operate(&request, "resume", r.requested_by, |requested_by| {
                ControlRequest::Resume { requested_by }
            })
            .await?;
        expect_reply!(reply, Resumed)
    }

    async fn evaluate(
        &self,
        request: Request<v1::EvaluateRequest>,
    ) -> Result<Response<v1::EvaluateResponse>, Status> {
        let (request, r) = split(request);
        let reply = self
            .operate(&request, "evaluate", r.requested_by, |requested_by| {
                ControlRequest::Evaluate { requested_by }
            })
            .await?;
        expect_reply!(reply, Evaluating)
    }

    async fn checkpoint_now(
        &self,
        request: Request<v1::CheckpointNowRequest>,
    ) -> Result<Response<v1::CheckpointNowResponse>, Status> {
        let (request, r) = split(request);
        let reply = self
            .operate(&request, "checkpoint", r.requested_by, |requested_by| {
                ControlRequest::CheckpointNow { requested_by }
            })
            .await?;
        expect_reply!(reply, CheckpointScheduled)
    }

    async fn list_checkpoints(
        &self,
        request: Request<v1::ListCheckpointsRequest>,
    ) -> Result<Response<v1::ListCheckpointsResponse>, Status> {
        self.view(&request)?;
        expect_reply!(
            self.control(ControlRequest::ListCheckpoints).await?,
            Checkpoints
        )
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::RollbackResponse>, Status> {
        let (request, r) = split(request);
        let checkpoint = (!r.checkpoint.is_empty()).then_some(r.checkpoint);
        let reply = self
            .operate(&request, "rollback", r.requested_by, |requested_by| {
                ControlRequest::Rollback {
                    checkpoint,
                    requested_by,
                }
            })
            .await?;
        expect_reply!(reply, RolledBack)
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        self.view(&request)?;
        expect_reply!(self.control(ControlRequest::ListEvents).await?, Events)
    }
}

/// The longest stage name a request may carry, in bytes (names have at most
/// `stagecoach_core::spec::MAX_NAME` characters of up to 4 bytes).
const MAX_NAME_BYTES: usize = 4 * stagecoach_core::spec::MAX_NAME;

/// A request's message, and a request of nothing that keeps its metadata and connection
/// (to check and audit the caller after taking the message apart).
fn split<T>(request: Request<T>) -> (Request<()>, T) {
    let (metadata, extensions, message) = request.into_parts();
    (Request::from_parts(metadata, extensions, ()), message)
}

/// Where a request came from, for the audit log of a refusal.
fn peer<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or("an unknown peer".to_owned(), |a| a.to_string())
}

/// One line of the audit trail (target `audit`), and its metric.
fn audit(action: &str, outcome: &str, who: &str) {
    info!(target: "audit", action, outcome, by = %who, "control request");
    crate::metrics::control_request(action, outcome);
}

/// Who asked, for the record: what the client said, or "unknown".
fn requester(given: String) -> String {
    if given.trim().is_empty() {
        "unknown".into()
    } else {
        given.chars().take(128).collect()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the coordinator's gRPC services on `listener` (over TLS with `tls`) until `shutdown`
/// resolves, then stops accepting connections and returns once the open ones have finished.
///
/// The caller binds the listener, so it can bind port 0 and read the port back first.
pub async fn serve(
    listener: TcpListener,
    state: Arc<Coordinator>,
    tls: Option<&crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    info!(%addr, job = %state.job(), tls = tls.is_some(), "coordinator serving");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serves_workers = state.driver().is_some() || state.replicas.is_some();
    let workers = serves_workers.then(|| {
        let gate = state.clone();
        tonic::service::interceptor::InterceptedService::new(
            WorkersServer::new(WorkersService::new(state.clone())),
            move |r: Request<()>| gate.gate(&r).map(|()| r),
        )
    });
    // grpc.health.v1 for probes and load balancers, open to every caller (it tells only whether
    // a service is served): the server as a whole (""), Control, and Workers once a job runs
    // here (a standby replica's Workers are not served until it leads).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ControlServer<Coordinator>>().await;
    health
        .set_not_serving::<WorkersServer<WorkersService>>()
        .await;
    let health_task = serves_workers.then(|| {
        let state = state.clone();
        AbortOnDrop(tokio::spawn(async move {
            state.until_leading().await;
            health.set_serving::<WorkersServer<WorkersService>>().await;
        }))
    });
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.grpc())?;
    }
    let gate = state.clone();
    let control = tonic::service::interceptor::InterceptedService::new(
        ControlServer::from_arc(state),
        move |r: Request<()>| gate.gate(&r).map(|()| r),
    );
    server
        .add_service(health_service)
        .add_service(control)
        .add_optional_service(workers)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    drop(health_task);
    info!("coordinator stopped");
    Ok(())
}

/// A future that resolves on the first Ctrl-C (SIGINT) or SIGTERM.
///
/// The signal handlers are installed by this call, not when the future is first polled, so a
/// signal that arrives right after start-up is not lost. Must be called inside a tokio runtime.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("interrupted; shutting down"),
            _ = terminate.recv() => info!("SIGTERM received; shutting down"),
        }
    })
}

/// A future that resolves on the first Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a handler nothing can ask us to stop; never resolve rather than stop now.
            std::future::pending::<()>().await;
        }
        info!("interrupted; shutting down");
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn get_status_reports_job_state_version_and_uptime() {
        let coordinator = Coordinator::new("llama");
        tokio::time::advance(Duration::from_secs(90)).await;

        let status = coordinator
            .get_status(Request::new(GetStatusRequest {}))
            .await
            .unwrap()
            .into_inner();

        assert_eq!(status.job, "llama");
        assert_eq!(status.state(), JobState::Waiting);
        assert_eq!(status.coordinator_version, crate::VERSION);
        assert_eq!(status.uptime_seconds, 90);
    }
}
