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

use crate::driver::{ControlReply, ControlRequest, Event};
use crate::workers::{ask, WorkersService};
use crate::Error;
use stagecoach_proto::v1::workers_server::WorkersServer;

/// What the coordinator knows about itself and its job. Shared by every RPC handler.
#[derive(Debug)]
pub struct Coordinator {
    job: String,
    started: Instant,
    /// The running job's driver, when this coordinator runs one.
    driver: Option<DriverHandle>,
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
            driver: None,
        }
    }

    /// A coordinator whose status and worker services are backed by a running driver.
    pub fn with_driver(job: impl Into<String>, driver: DriverHandle) -> Self {
        Self {
            driver: Some(driver),
            ..Self::new(job)
        }
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    /// The job's state: the driver's when it runs one, else waiting (no job).
    pub fn state(&self) -> JobState {
        self.driver
            .as_ref()
            .and_then(|d| JobState::try_from(d.snapshot.borrow().state).ok())
            .unwrap_or(JobState::Waiting)
    }

    /// The driver's latest snapshot, when this coordinator runs a job.
    pub fn driver_snapshot(&self) -> Option<crate::status::Snapshot> {
        self.driver.as_ref().map(|d| d.snapshot.borrow().clone())
    }

    /// Whole seconds since the coordinator was created.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Passes a control request to the driver and returns its answer.
    async fn control(&self, request: ControlRequest) -> Result<ControlReply, Status> {
        let Some(d) = &self.driver else {
            return Err(Status::failed_precondition(
                "this coordinator runs no job (start it with --job FILE)",
            ));
        };
        ask(&d.events, |reply| Event::Control { request, reply }).await
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
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let mut status = GetStatusResponse {
            job: self.job.clone(),
            state: self.state().into(),
            coordinator_version: crate::VERSION.to_owned(),
            uptime_seconds: self.uptime_seconds(),
            ..Default::default()
        };
        if let Some(d) = &self.driver {
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
        _request: Request<v1::ListStagesRequest>,
    ) -> Result<Response<v1::ListStagesResponse>, Status> {
        expect_reply!(self.control(ControlRequest::ListStages).await?, Stages)
    }

    async fn change_stage(
        &self,
        request: Request<v1::ChangeStageRequest>,
    ) -> Result<Response<v1::ChangeStageResponse>, Status> {
        let r = request.into_inner();
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
        let request = ControlRequest::ChangeStage {
            stage,
            requested_by: requester(r.requested_by),
        };
        expect_reply!(self.control(request).await?, StageChanged)
    }

    async fn set_mix(
        &self,
        request: Request<v1::SetMixRequest>,
    ) -> Result<Response<v1::SetMixResponse>, Status> {
        let r = request.into_inner();
        if r.weights.is_empty() {
            return Err(Status::invalid_argument(
                "no weights: give at least one source=weight",
            ));
        }
        let request = ControlRequest::SetMix {
            stage: r.stage,
            weights: r
                .weights
                .into_iter()
                .map(|w| (w.source, w.weight))
                .collect(),
            requested_by: requester(r.requested_by),
        };
        expect_reply!(self.control(request).await?, MixSet)
    }

    async fn pause(
        &self,
        request: Request<v1::PauseRequest>,
    ) -> Result<Response<v1::PauseResponse>, Status> {
        let requested_by = requester(request.into_inner().requested_by);
        expect_reply!(
            self.control(ControlRequest::Pause { requested_by }).await?,
            Paused
        )
    }

    async fn resume(
        &self,
        request: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::ResumeResponse>, Status> {
        let requested_by = requester(request.into_inner().requested_by);
        expect_reply!(
            self.control(ControlRequest::Resume { requested_by })
                .await?,
            Resumed
        )
    }

    async fn evaluate(
        &self,
        request: Request<v1::EvaluateRequest>,
    ) -> Result<Response<v1::EvaluateResponse>, Status> {
        let requested_by = requester(request.into_inner().requested_by);
        expect_reply!(
            self.control(ControlRequest::Evaluate { requested_by })
                .await?,
            Evaluating
        )
    }

    async fn checkpoint_now(
        &self,
        request: Request<v1::CheckpointNowRequest>,
    ) -> Result<Response<v1::CheckpointNowResponse>, Status> {
        let requested_by = requester(request.into_inner().requested_by);
        expect_reply!(
            self.control(ControlRequest::CheckpointNow { requested_by })
                .await?,
            CheckpointScheduled
        )
    }

    async fn list_checkpoints(
        &self,
        _request: Request<v1::ListCheckpointsRequest>,
    ) -> Result<Response<v1::ListCheckpointsResponse>, Status> {
        expect_reply!(
            self.control(ControlRequest::ListCheckpoints).await?,
            Checkpoints
        )
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::RollbackResponse>, Status> {
        let r = request.into_inner();
        let request = ControlRequest::Rollback {
            checkpoint: (!r.checkpoint.is_empty()).then_some(r.checkpoint),
            requested_by: requester(r.requested_by),
        };
        expect_reply!(self.control(request).await?, RolledBack)
    }

    async fn list_events(
        &self,
        _request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        expect_reply!(self.control(ControlRequest::ListEvents).await?, Events)
    }
}

/// The longest stage name a request may carry, in bytes (names have at most
/// `stagecoach_core::spec::MAX_NAME` characters of up to 4 bytes).
const MAX_NAME_BYTES: usize = 4 * stagecoach_core::spec::MAX_NAME;

/// Who asked, for the record: what the client said, or "unknown".
fn requester(given: String) -> String {
    if given.trim().is_empty() {
        "unknown".into()
    } else {
        given.chars().take(128).collect()
    }
}

/// Serves the coordinator's gRPC services on `listener` until `shutdown` resolves, then stops
/// accepting connections and returns once the open ones have finished.
///
/// The caller binds the listener, so it can bind port 0 and read the port back first.
pub async fn serve(
    listener: TcpListener,
    state: Arc<Coordinator>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    info!(%addr, job = %state.job(), "coordinator serving");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let workers = state
        .driver
        .as_ref()
        .map(|d| WorkersServer::new(WorkersService::new(d.events.clone(), d.leases.clone())));
    Server::builder()
        .add_service(ControlServer::from_arc(state))
        .add_optional_service(workers)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
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
