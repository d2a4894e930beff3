//! Membership: registration, sessions attaching and detaching, leases, and routing each
//! worker message to the concern it belongs to. Every message is checked against the sender's
//! membership of the generation it names: a client outside the world cannot act on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use stagecoach_proto::v1;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Driver, Error};
use crate::error::clip;

/// Bytes of an NCCL unique id.
pub(super) const NCCL_ID_BYTES: usize = 128;

/// The longest `name` and `collective_address` a registration may carry.
const MAX_FIELD: usize = 256;

pub(super) struct Member {
    /// Who registered it (the authenticated caller): only it may open its sessions.
    pub(super) owner: String,
    pub(super) address: String,
    pub(super) backend: v1::CollectiveBackend,
    /// An unused NCCL unique id from this worker, for a world where it is rank 0.
    pub(super) nccl_id: Vec<u8>,
    pub(super) outbox: Option<mpsc::Sender<v1::CoordinatorMessage>>,
    /// The session `outbox` belongs to.
    pub(super) session: u64,
    pub(super) lease_until: Instant,
    /// A message to it could not be queued (its outbox is full or closed).
    pub(super) undeliverable: AtomicBool,
}

/// When each worker was last heard from, written by the session tasks as messages arrive, so
/// that a lease is renewed by the message itself, not by the driver getting to it: a driver
/// that is behind (a slow store write, a burst of reports) never expires a live worker.
#[derive(Debug, Default)]
pub struct LeaseBook(Mutex<HashMap<String, Instant>>);

impl LeaseBook {
    /// `worker_id` was heard from now.
    pub fn renew(&self, worker_id: &str) {
        let mut m = self.0.lock().expect("not poisoned");
        match m.get_mut(worker_id) {
            Some(t) => *t = Instant::now(),
            None => {
                m.insert(worker_id.to_owned(), Instant::now());
            }
        }
    }

    fn last(&self, worker_id: &str) -> Option<Instant> {
        self.0.lock().expect("not poisoned").get(worker_id).copied()
    }

    fn forget(&self, worker_id: &str) {
        self.0.lock().expect("not poisoned").remove(worker_id);
    }
}

/// A fresh worker id: a readable number and 64 random bits, so ids cannot be guessed.
fn worker_id(n: u64) -> String {
    let mut bytes = [0u8; 8];
    // The OS's generator; if it fails, the id stays unique by its number.
    let _ = getrandom::fill(&mut bytes);
    format!("w{n}-{:016x}", u64::from_le_bytes(bytes))
}

impl Driver {
    pub(super) async fn register(
        &mut self,
        request: v1::RegisterRequest,
        identity: String,
    ) -> Result<v1::RegisterResponse, Error> {
        if request.name.len() > MAX_FIELD || request.collective_address.len() > MAX_FIELD {
            return Err(Error::InvalidArgument(format!(
                "name and collective_address may hold at most {MAX_FIELD} bytes (got {} and {})",
                request.name.len(),
                request.collective_address.len()
            )));
        }
        if request.backend() == v1::CollectiveBackend::Tcp
            && request
                .collective_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(Error::InvalidArgument(format!(
                "collective_address {:?} is not host:port (the TCP backend needs the address peers connect to)",
                request.collective_address
            )));
        }
        let backend = request.backend();
        if backend == v1::CollectiveBackend::Nccl && request.nccl_unique_id.len() != NCCL_ID_BYTES {
            return Err(Error::InvalidArgument(format!(
                "an NCCL worker must send a {NCCL_ID_BYTES}-byte unique id, got {} bytes",
                request.nccl_unique_id.len()
            )));
        }
        if matches!(self.state, v1::JobState::Finished | v1::JobState::Failed) {
            return Err(Error::JobOver {
                finished: self.state == v1::JobState::Finished,
                detail: clip(&self.detail, 300),
            });
        }
        // A worker that registers again (its session broke, or it restarted on the same
        // address) supersedes its old id at once: no world waits a lease for a ghost.
        // Only by the same identity: another caller cannot push a worker out.
        let superseded: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                !m.address.is_empty()
                    && m.address == request.collective_address
                    && m.owner == identity
            })
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(other) = self
            .members
            .iter()
            .find(|(id, m)| m.backend != backend && !superseded.contains(id))
        {
            return Err(Error::FailedPrecondition(format!(
                "this job's workers use the {:?} backend, this one {backend:?}; start every worker on the same kind of device",
                other.1.backend
            )));
        }
        let id = worker_id(self.next_id);
        self.next_id += 1;
        for old in superseded {
            info!(worker = %old, new = %id, "a worker registered again on the same address; its old id is dropped");
            self.drop_member(&old, &format!("worker {old} registered again as {id}"))
                .await;
        }
        info!(worker = %id, name = %request.name, address = %request.collective_address, "worker registered");
        self.members.insert(
            id.clone(),
            Member {
                owner: identity,
                address: request.collective_address,
                backend,
                nccl_id: request.nccl_unique_id,
                outbox: None,
                session: 0,
                lease_until: Instant::now() + self.settings.lease,
                undeliverable: AtomicBool::new(false),
            },
        );
        self.order.push(id.clone());
        self.leases.renew(&id);
        Ok(v1::RegisterResponse {
            worker_id: id,
            lease_ms: self.settings.lease.as_millis() as u64,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u64,
            job: Some(self.job.clone()),
        })
    }

    /// Forgets a member; if it was in the current world, that generation has failed.
    async fn drop_member(&mut self, id: &str, why: &str) {
        self.members.remove(id);
        self.order.retain(|o| o != id);
        self.leases.forget(id);
        if self
            .world
            .as_ref()
            .is_some_and(|w| w.members.iter().any(|m| m == id))
        {
            self.failed(id, v1::FailureKind::Transient, why.to_owned(), None)
                .await;
        }
    }

    pub(super) async fn message(
        &mut self,
        worker_id: &str,
        kind: v1::worker_message::Kind,
    ) -> Result<(), Error> {
        use v1::worker_message::Kind;
        let member = self
            .members
            .get_mut(worker_id)
            .ok_or_else(|| Error::UnknownWorker(clip(worker_id, 80)))?;
        member.lease_until = Instant::now() + self.settings.lease;
        let about = match &kind {
            Kind::Ready(r) => Some(r.generation),
            Kind::StepDone(d) => Some(d.generation),
            Kind::EvalDone(d) => Some(d.generation),
            Kind::Failed(f) if f.generation > 0 => Some(f.generation),
            _ => None,
        };
        if about.is_some_and(|g| self.ended(g)) {
            debug!(worker = %worker_id, generation = about, "a message about an ended generation; dropped");
            return Ok(());
        }
        match kind {
            Kind::Hello(_) | Kind::Heartbeat(_) => Ok(()),
            Kind::Ready(ready) => self.ready(worker_id, ready).await,
            Kind::StepDone(done) => self.step_done(worker_id, done).await,
            Kind::EvalDone(done) => self.eval_done(worker_id, done).await,
            Kind::CheckpointSaved(saved) => self.checkpoint_saved(worker_id, saved).await,
            Kind::Failed(f) => self.worker_failed(worker_id, f).await,
        }
    }

    /// A worker left its world on an error, or could not start at all (generation 0, outside
    /// any world). Only a member of the generation it names can end it.
    async fn worker_failed(&mut self, worker_id: &str, f: v1::Failed) -> Result<(), Error> {
        let reason = clip(&f.reason, 2000);
        let checkpoint = (!f.checkpoint.is_empty()).then(|| f.checkpoint.clone());
        if f.generation == 0 {
            // It could not set up (its data, its device): it is going away. Say why in status,
            // and count it, so workers that all fail so do not leave the job waiting unseen.
            warn!(worker = %worker_id, %reason, "a worker could not start");
            let why = format!("worker {worker_id} could not start: {reason}");
            self.members.remove(worker_id);
            self.order.retain(|o| o != worker_id);
            self.leases.forget(worker_id);
            self.failed(worker_id, f.kind(), why, checkpoint).await;
            return Ok(());
        }
        self.rank_in(worker_id, f.generation)?;
        let why = format!("worker {worker_id} failed: {reason}");
        self.failed(worker_id, f.kind(), why, checkpoint).await;
        Ok(())
    }

    /// Expires the members not heard from for a lease (the session tasks' book, or the driver's
    /// own record, whichever is later).
    pub(super) async fn check_leases(&mut self) {
        let now = Instant::now();
        let lease = self.settings.lease;
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(id, m)| {
                let heard = self.leases.last(id).map(|t| t + lease);
                heard.map_or(m.lease_until, |h| h.max(m.lease_until)) <= now
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            warn!(worker = %id, "lease expired");
            self.drop_member(&id, &format!("worker {id} lost its lease"))
                .await;
        }
    }

    /// Ends the generation of a member a message could not be queued for.
    pub(super) async fn reap_undeliverable(&mut self) {
        let Some(world) = self.world.as_ref() else {
            for m in self.members.values() {
                m.undeliverable.store(false, Ordering::Relaxed);
            }
            return;
        };
        let lost = world
            .members
            .iter()
            .find(|id| {
                self.members
                    .get(*id)
                    .is_some_and(|m| m.undeliverable.load(Ordering::Relaxed))
            })
            .cloned();
        for m in self.members.values() {
            m.undeliverable.store(false, Ordering::Relaxed);
        }
        if let Some(id) = lost {
            let why = format!(
                "a message to worker {id} could not be queued (its session is gone or not reading)"
            );
            self.failed(&id, v1::FailureKind::Transient, why, None)
                .await;
        }
    }
}
