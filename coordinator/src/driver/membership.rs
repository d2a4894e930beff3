//! Membership: registration, sessions attaching and detaching, leases, and routing each
//! worker message to the concern it belongs to. Every message is checked against the sender's
//! membership of the generation it names: a client outside the world cannot act on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    pub(super) outbox: Option<Outbox>,
    /// The session `outbox` belongs to.
    pub(super) session: u64,
    pub(super) lease_until: Instant,
    /// A message to it could not be queued (its outbox is full or closed).
    pub(super) undeliverable: AtomicBool,
}

/// Where the driver queues a member's messages: the stream of its own session, or that of the
/// node session it is attached to, which the node's workers share, each message tagged with its
/// worker's id. Either way a message that cannot be queued at once is not delivered: the driver
/// never waits on a session.
#[derive(Debug, Clone)]
pub enum Outbox {
    Session(mpsc::Sender<v1::CoordinatorMessage>),
    Node {
        queue: mpsc::Sender<v1::NodeMessage>,
        worker_id: String,
        /// Which node session (the number its attachment got): a step's Work for the members
        /// on one node session goes as one `NodeWork` when `combined` is set.
        node: u64,
        /// The node session splits `NodeWork`s (`NodeUp.combined`); it may say so later.
        combined: Arc<AtomicBool>,
    },
}

impl Outbox {
    /// Queues `message`; on a full or closed queue, why not.
    pub(super) fn try_send(&self, message: v1::CoordinatorMessage) -> Result<(), String> {
        match self {
            Outbox::Session(tx) => tx.try_send(message).map_err(|e| e.to_string()),
            Outbox::Node {
                queue, worker_id, ..
            } => queue
                .try_send(v1::NodeMessage {
                    worker_id: worker_id.clone(),
                    kind: Some(v1::node_message::Kind::Message(message)),
                })
                .map_err(|e| format!("node session: {e}")),
        }
    }
}

/// The members by id, and whether a message to any of them could not be queued since the
/// driver last looked (see [`send`](super::send)).
#[derive(Default)]
pub(super) struct Members {
    map: foldhash::HashMap<String, Member>,
    pub(super) any_undeliverable: AtomicBool,
}

impl std::ops::Deref for Members {
    type Target = foldhash::HashMap<String, Member>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Members {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// When each worker was last heard from, written by the session tasks as messages arrive, so
/// that a lease is renewed by the message itself, not by the driver getting to it: a driver
/// that is behind (a slow store write, a burst of reports) never expires a live worker.
///
/// Each member's entry is a [`Lease`] of its own: a session takes it once, when it attaches,
/// and renews it from then on without looking the worker up or taking the book's lock.
#[derive(Debug, Default)]
pub struct LeaseBook(Mutex<HashMap<String, Arc<Lease>>>);

/// One member's lease: when it was last heard from, and whether it is still a member.
#[derive(Debug)]
pub struct Lease {
    /// What `heard` counts from.
    since: Instant,
    /// Nanoseconds from `since` to when the worker was last heard from.
    heard: AtomicU64,
    /// Cleared when the worker stops being a member (its lease expired, or it was removed).
    member: AtomicBool,
}

impl Lease {
    fn new() -> Self {
        Lease {
            since: Instant::now(),
            heard: AtomicU64::new(0),
            member: AtomicBool::new(true),
        }
    }

    /// The worker was heard from now. False if it is no longer a member.
    pub fn renew(&self) -> bool {
        let ns = Instant::now()
            .saturating_duration_since(self.since)
            .as_nanos();
        self.heard
            .fetch_max(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.member.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.since + std::time::Duration::from_nanos(self.heard.load(Ordering::Relaxed))
    }
}

impl LeaseBook {
    /// `worker_id` was heard from now. False if it is not (or no longer) a member: its lease
    /// expired, or it never registered.
    pub fn renew(&self, worker_id: &str) -> bool {
        self.lease(worker_id).is_some_and(|l| l.renew())
    }

    /// The lease of member `worker_id`, for a session to renew as it hears from it.
    pub fn lease(&self, worker_id: &str) -> Option<Arc<Lease>> {
        self.0.lock().expect("not poisoned").get(worker_id).cloned()
    }

    /// A member registered now.
    fn insert(&self, worker_id: &str) {
        let old = self
            .0
            .lock()
            .expect("not poisoned")
            .insert(worker_id.to_owned(), Arc::new(Lease::new()));
        if let Some(old) = old {
            old.member.store(false, Ordering::Relaxed);
        }
    }

    fn last(&self, worker_id: &str) -> Option<Instant> {
        self.0
            .lock()
            .expect("not poisoned")
            .get(worker_id)
            .map(|l| l.last())
    }

    fn forget(&self, worker_id: &str) {
        let gone = self.0.lock().expect("not poisoned").remove(worker_id);
        if let Some(lease) = gone {
            lease.member.store(false, Ordering::Relaxed);
        }
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
        let key = (identity.clone(), request.collective_address.clone());
        let superseded = if request.collective_address.is_empty() {
            None
        } else {
            self.roster.by_address.get(&key).cloned()
        };
        let superseded_backend = superseded
            .as_ref()
            .and_then(|id| self.members.get(id))
            .map(|m| m.backend);
        if let Some(other) = self.roster.other_backend(backend, superseded_backend) {
            return Err(Error::FailedPrecondition(format!(
                "this job's workers use the {other:?} backend, this one {backend:?}; start every worker on the same kind of device"
            )));
        }
        let id = worker_id(self.next_id);
        self.next_id += 1;
        if let Some(old) = superseded {
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
        if !key.1.is_empty() {
            self.roster.by_address.insert(key, id.clone());
        }
        self.roster.added(backend);
        self.leases.insert(&id);
        Ok(v1::RegisterResponse {
            worker_id: id,
            lease_ms: self.settings.lease.as_millis() as u64,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u64,
            job: Some(self.job.clone()),
        })
    }

    /// Forgets a member; if it was in the current world, that generation has failed.
    async fn drop_member(&mut self, id: &str, why: &str) {
        self.remove_members(&[id.to_owned()]);
        if self
            .world
            .as_ref()
            .is_some_and(|w| w.ranks.contains_key(id))
        {
            self.failed(id, v1::FailureKind::Transient, why.to_owned(), None)
                .await;
        }
    }

    /// Forgets members, with one pass over the registration order for all of them.
    fn remove_members(&mut self, ids: &[String]) {
        for id in ids {
            let Some(m) = self.members.remove(id) else {
                continue;
            };
            self.leases.forget(id);
            self.roster.removed(&m, id);
        }
        if ids.len() == 1 {
            self.order.retain(|o| *o != ids[0]);
        } else {
            let gone: std::collections::HashSet<&String> = ids.iter().collect();
            self.order.retain(|o| !gone.contains(o));
        }
    }

    /// A session of `worker_id` is attached (`Some`) or gone (`None`).
    pub(super) fn set_outbox(&mut self, worker_id: &str, outbox: Option<Outbox>) {
        let Some(m) = self.members.get_mut(worker_id) else {
            return;
        };
        match (m.outbox.is_some(), outbox.is_some()) {
            (false, true) => self.roster.attached += 1,
            (true, false) => self.roster.attached -= 1,
            _ => {}
        }
        m.outbox = outbox;
        self.roster.version += 1;
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
            Kind::NodeStepDone(n) => n.done.as_ref().map(|d| d.generation),
            _ => None,
        };
        if about.is_some_and(|g| self.ended(g)) {
            debug!(worker = %worker_id, generation = about, "a message about an ended generation; dropped");
            return Ok(());
        }
        match kind {
            Kind::Hello(_) | Kind::Heartbeat(_) => {
                self.quiet = true;
                Ok(())
            }
            Kind::Ready(ready) => self.ready(worker_id, ready).await,
            Kind::StepDone(done) => self.step_done(&[worker_id], done).await,
            Kind::NodeStepDone(n) => {
                let done = n.done.ok_or_else(|| {
                    Error::InvalidArgument("a NodeStepDone without its StepDone".into())
                })?;
                // The others' leases were renewed in the lease book as the report arrived.
                let mut workers = Vec::with_capacity(1 + n.also.len());
                workers.push(worker_id);
                workers.extend(n.also.iter().map(String::as_str));
                self.step_done(&workers, done).await
            }
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
            self.remove_members(&[worker_id.to_owned()]);
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
        if expired.is_empty() {
            return;
        }
        // In id order, whatever the map's: the same expiries are reported the same way.
        let mut expired = expired;
        expired.sort_unstable();
        // All at once: thousands of leases can lapse together (a switch, a driver that was
        // stalled), and each removal alone would walk the registration order.
        let in_world = self.world.as_ref().and_then(|w| {
            expired
                .iter()
                .find(|id| w.ranks.contains_key(id.as_str()))
                .cloned()
        });
        for id in expired.iter().take(20) {
            warn!(worker = %id, "lease expired");
        }
        if expired.len() > 20 {
            warn!(more = expired.len() - 20, "more leases expired");
        }
        if let Some(m) = &self.metrics {
            m.leases_expired(expired.len() as u64);
        }
        self.remove_members(&expired);
        if let Some(id) = in_world {
            let why = if expired.len() == 1 {
                format!("worker {id} lost its lease")
            } else {
                format!(
                    "worker {id} and {} others lost their leases",
                    expired.len() - 1
                )
            };
            self.failed(&id, v1::FailureKind::Transient, why, None)
                .await;
        }
    }

    /// Ends the generation of a member a message could not be queued for.
    pub(super) async fn reap_undeliverable(&mut self) {
        // `send` raises the flag: most events send nothing that fails, and walking the world
        // after each of them would cost O(world) per message.
        if !self
            .members
            .any_undeliverable
            .swap(false, Ordering::Relaxed)
        {
            return;
        }
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

/// Indexes over the members, kept with them so that registering, attaching and forming a
/// world cost O(1) per worker rather than a walk over every member.
#[derive(Debug, Default)]
pub(super) struct Roster {
    /// Members with a session attached.
    pub(super) attached: usize,
    /// The member registered by an identity at a collective address.
    by_address: HashMap<(String, String), String>,
    /// Members per collective backend.
    backends: HashMap<i32, usize>,
    /// Counts changes to the members and their sessions (the status page's view follows it).
    pub(super) version: u64,
}

impl Roster {
    fn added(&mut self, backend: v1::CollectiveBackend) {
        *self.backends.entry(backend as i32).or_default() += 1;
        self.version += 1;
    }

    fn removed(&mut self, m: &Member, id: &str) {
        if m.outbox.is_some() {
            self.attached -= 1;
        }
        let key = (m.owner.clone(), m.address.clone());
        if self.by_address.get(&key).is_some_and(|x| x == id) {
            self.by_address.remove(&key);
        }
        if let Some(n) = self.backends.get_mut(&(m.backend as i32)) {
            *n -= 1;
        }
        self.version += 1;
    }

    /// A backend other than `backend` that some member uses (not counting the one member of
    /// backend `leaving` about to be replaced).
    fn other_backend(
        &self,
        backend: v1::CollectiveBackend,
        leaving: Option<v1::CollectiveBackend>,
    ) -> Option<v1::CollectiveBackend> {
        self.backends.iter().find_map(|(&b, &n)| {
            let n = n - usize::from(leaving.is_some_and(|l| l as i32 == b));
            (b != backend as i32 && n > 0)
                .then(|| v1::CollectiveBackend::try_from(b).unwrap_or_default())
        })
    }

    /// No member has a session any more (this driver stepped down).
    pub(super) fn detached_all(&mut self) {
        self.attached = 0;
        self.version += 1;
    }
}
