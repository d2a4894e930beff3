//! Membership: registration, sessions attaching and detaching, leases, and routing each
//! worker message to the concern it belongs to.

use stagecoach_proto::v1;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Driver, DriverError};

/// Bytes of an NCCL unique id.
pub(super) const NCCL_ID_BYTES: usize = 128;

pub(super) struct Member {
    pub(super) address: String,
    pub(super) backend: v1::CollectiveBackend,
    /// An unused NCCL unique id from this worker, for a world where it is rank 0.
    pub(super) nccl_id: Vec<u8>,
    pub(super) outbox: Option<mpsc::Sender<v1::CoordinatorMessage>>,
    /// The session `outbox` belongs to.
    pub(super) session: u64,
    pub(super) lease_until: Instant,
}

impl Driver {
    pub(super) fn register(
        &mut self,
        request: v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, DriverError> {
        if request.backend() == v1::CollectiveBackend::Tcp
            && request
                .collective_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(DriverError::InvalidArgument(format!(
                "collective_address {:?} is not host:port (the TCP backend needs the address peers connect to)",
                request.collective_address
            )));
        }
        let backend = request.backend();
        if backend == v1::CollectiveBackend::Nccl && request.nccl_unique_id.len() != NCCL_ID_BYTES {
            return Err(DriverError::InvalidArgument(format!(
                "an NCCL worker must send a {NCCL_ID_BYTES}-byte unique id, got {} bytes",
                request.nccl_unique_id.len()
            )));
        }
        if let Some(other) = self.members.values().find(|m| m.backend != backend) {
            return Err(DriverError::FailedPrecondition(format!(
                "this job's workers use the {:?} backend, this one {backend:?}; start every worker on the same kind of device",
                other.backend
            )));
        }
        if matches!(self.state, v1::JobState::Finished | v1::JobState::Failed) {
            return Err(DriverError::FailedPrecondition(format!(
                "the job is over ({})",
                self.detail
            )));
        }
        let id = format!("w{}", self.next_id);
        self.next_id += 1;
        info!(worker = %id, name = %request.name, address = %request.collective_address, "worker registered");
        self.members.insert(
            id.clone(),
            Member {
                address: request.collective_address,
                backend,
                nccl_id: request.nccl_unique_id,
                outbox: None,
                session: 0,
                lease_until: Instant::now() + self.settings.lease,
            },
        );
        self.order.push(id.clone());
        Ok(v1::RegisterResponse {
            worker_id: id,
            lease_ms: self.settings.lease.as_millis() as u64,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u64,
            job: Some(self.job.clone()),
        })
    }

    pub(super) async fn message(
        &mut self,
        worker_id: &str,
        kind: v1::worker_message::Kind,
    ) -> Result<(), DriverError> {
        use v1::worker_message::Kind;
        let member = self
            .members
            .get_mut(worker_id)
            .ok_or_else(|| DriverError::UnknownWorker(worker_id.into()))?;
        member.lease_until = Instant::now() + self.settings.lease;
        match kind {
            Kind::Hello(_) | Kind::Heartbeat(_) => Ok(()),
            Kind::Ready(ready) => self.ready(worker_id, ready).await,
            Kind::StepDone(done) => self.step_done(worker_id, done).await,
            Kind::EvalDone(done) => self.eval_done(worker_id, done).await,
            Kind::CheckpointSaved(saved) => self.checkpoint_saved(saved).await,
            Kind::Failed(f) => {
                let current = self.world.as_ref().map(|w| w.generation);
                if current == Some(f.generation) {
                    self.end_generation(&format!("worker {worker_id} failed: {}", f.reason))
                        .await;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn check_leases(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.lease_until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            warn!(worker = %id, "lease expired");
            self.members.remove(&id);
            self.order.retain(|o| o != &id);
            if self.world.as_ref().is_some_and(|w| w.members.contains(&id)) {
                self.end_generation(&format!("worker {id} lost its lease"))
                    .await;
            }
        }
    }
}
