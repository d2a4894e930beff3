//! The job driver: one task that owns the job's state (membership, the current world, the
//! sample plan, the step in flight) and reacts to events from worker sessions and to its lease
//! clock. gRPC handlers only forward events and relay messages, so no lock is held across an
//! `.await` and every decision is made in one place, in order.
//!
//! Life of a job: workers register and open sessions; when `min` are present a world forms
//! (generation + 1, ranks in registration order, up to `max`) and each member gets `World`;
//! when all answer `Ready` (at the committed step, with per-source sample counts that agree) the
//! plan is built and steps are dispatched: each step's global batch comes from the plan and is cut
//! into one contiguous slice per rank. When every rank reports `StepDone`, the step is committed
//! to the ledger and the next step goes out. A worker whose lease expires (no message for
//! `lease`) ends the generation: the survivors get `Stop` and leave their collective, the
//! uncommitted step is rewound, and a new world forms from whoever is left (if enough are).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stagecoach_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::plan::{rank_slice, Plan, SampleId};
use crate::schedule::Wsd;

/// Bytes of an NCCL unique id.
const NCCL_ID_BYTES: usize = 128;

/// Events the driver reacts to.
#[derive(Debug)]
pub enum Event {
    Register {
        request: v1::RegisterRequest,
        reply: oneshot::Sender<Result<v1::RegisterResponse, DriverError>>,
    },
    /// Session `session` opened for `worker_id`; messages for it go to `outbox`.
    Attach {
        worker_id: String,
        session: u64,
        outbox: mpsc::Sender<v1::CoordinatorMessage>,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    Message {
        worker_id: String,
        kind: v1::worker_message::Kind,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    /// Session `session` of `worker_id` ended (its lease still decides whether it is dead); a
    /// newer session of the same worker is left alone.
    Detach { worker_id: String, session: u64 },
}

/// Why the driver refused an event; the service maps these onto gRPC codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriverError {
    #[error("unknown worker {0:?}: register first")]
    UnknownWorker(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

/// Where committed steps go (the sample ledger in the state store).
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    async fn commit(&self, step: &v1::LedgerStep) -> Result<(), String>;
}

/// What a status query sees.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub state: i32,
    pub generation: u64,
    pub step: u64,
    pub total_steps: u64,
    /// Global loss of the last committed step (none before the first).
    pub loss: Option<f64>,
    pub workers_alive: u32,
    pub world_size: u32,
    pub detail: String,
}

/// Membership and timing settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Once `min` workers are present, how long to wait for more (up to `max`) before forming.
    pub rendezvous: Duration,
}

struct Member {
    address: String,
    backend: v1::CollectiveBackend,
    /// An unused NCCL unique id from this worker, for a world where it is rank 0.
    nccl_id: Vec<u8>,
    outbox: Option<mpsc::Sender<v1::CoordinatorMessage>>,
    /// The session `outbox` belongs to.
    session: u64,
    lease_until: Instant,
}

struct World {
    generation: u64,
    members: Vec<String>,
    ready: BTreeMap<String, v1::Ready>,
    running: bool,
    /// The step in flight: its number, samples, and the reports received so far (by rank).
    in_flight: Option<(u64, Vec<SampleId>, BTreeMap<u32, v1::StepDone>)>,
}

/// The driver's state. Create with [`Driver::new`], run with [`Driver::run`].
pub struct Driver {
    job: v1::JobSpec,
    settings: Settings,
    schedule: Wsd,
    ledger: Box<dyn Ledger>,
    next_id: u64,
    members: BTreeMap<String, Member>,
    /// Registration order of the live members.
    order: Vec<String>,
    world: Option<World>,
    generation: u64,
    /// When `min` workers became present while fewer than `max` were.
    forming_since: Option<Instant>,
    /// Why the last generation ended, shown while the next one forms.
    last_end: Option<String>,
    /// The plan at the last committed step, and the one dispatching.
    committed_plan: Option<Plan>,
    plan: Option<Plan>,
    /// Cursors to start the plan from once the sources' sizes are known.
    resume_cursors: Option<Vec<u64>>,
    step: u64,
    loss: Option<f64>,
    state: v1::JobState,
    detail: String,
    snapshot: watch::Sender<Snapshot>,
    metrics: Option<Arc<Metrics>>,
}

impl Driver {
    /// A driver for `job`, resuming at `step` with per-source `cursors` (zeros for a new job).
    pub fn new(
        job: v1::JobSpec,
        settings: Settings,
        ledger: Box<dyn Ledger>,
        step: u64,
        cursors: Option<Vec<u64>>,
    ) -> Result<(Driver, watch::Receiver<Snapshot>), crate::spec::SpecError> {
        let schedule = Wsd::from_job(&job)?;
        let (snapshot, rx) = watch::channel(Snapshot::default());
        let d = Driver {
            job,
            settings,
            schedule,
            ledger,
            next_id: 1,
            members: BTreeMap::new(),
            order: Vec::new(),
            world: None,
            generation: 0,
            forming_since: None,
            last_end: None,
            committed_plan: None,
            plan: None,
            resume_cursors: cursors,
            step,
            loss: None,
            state: v1::JobState::Waiting,
            detail: "waiting for workers".into(),
            snapshot,
            metrics: None,
        };
        d.publish();
        Ok((d, rx))
    }

    /// Also keeps `metrics` up to date.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Driver {
        metrics.job(&self.job);
        self.metrics = Some(metrics);
        self.publish();
        self
    }

    /// Runs until `events` closes or the job ends.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => break,
                },
                _ = tick.tick() => {
                    self.check_leases().await;
                    self.maybe_form_world();
                }
            }
            self.publish();
        }
    }

    async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Register { request, reply } => {
                let _ = reply.send(self.register(request));
            }
            Event::Attach {
                worker_id,
                session,
                outbox,
                reply,
            } => {
                let r = match self.members.get_mut(&worker_id) {
                    None => Err(DriverError::UnknownWorker(worker_id)),
                    Some(m) => {
                        m.outbox = Some(outbox);
                        m.session = session;
                        m.lease_until = Instant::now() + self.settings.lease;
                        Ok(())
                    }
                };
                let ok = r.is_ok();
                let _ = reply.send(r);
                if ok {
                    self.maybe_form_world();
                }
            }
            Event::Message {
                worker_id,
                kind,
                reply,
            } => {
                let r = self.message(&worker_id, kind).await;
                let _ = reply.send(r);
            }
            Event::Detach { worker_id, session } => {
                if let Some(m) = self
                    .members
                    .get_mut(&worker_id)
                    .filter(|m| m.session == session)
                {
                    m.outbox = None;
                }
            }
        }
    }

    fn register(
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

    async fn message(
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
            Kind::Ready(ready) => self.ready(worker_id, ready),
            Kind::StepDone(done) => self.step_done(worker_id, done).await,
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

    /// The rank of `worker_id` in the current world of `generation`, or why there is none.
    fn rank_in(&self, worker_id: &str, generation: u64) -> Result<u32, DriverError> {
        let world = self
            .world
            .as_ref()
            .ok_or_else(|| DriverError::FailedPrecondition("no world is formed".into()))?;
        if world.generation != generation {
            return Err(DriverError::FailedPrecondition(format!(
                "message for generation {generation}, but the current generation is {}",
                world.generation
            )));
        }
        world
            .members
            .iter()
            .position(|m| m == worker_id)
            .map(|r| r as u32)
            .ok_or_else(|| {
                DriverError::FailedPrecondition(format!(
                    "worker {worker_id} is not in generation {generation}"
                ))
            })
    }

    fn ready(&mut self, worker_id: &str, ready: v1::Ready) -> Result<(), DriverError> {
        self.rank_in(worker_id, ready.generation)?;
        if ready.sources.len() != self.job.sources.len() {
            return Err(DriverError::InvalidArgument(format!(
                "ready with {} source sizes, the job has {} sources",
                ready.sources.len(),
                self.job.sources.len()
            )));
        }
        let member = self.members.get_mut(worker_id).expect("checked by rank_in");
        if member.backend == v1::CollectiveBackend::Nccl {
            if ready.next_nccl_unique_id.len() != NCCL_ID_BYTES {
                return Err(DriverError::InvalidArgument(format!(
                    "an NCCL worker's Ready must carry a fresh {NCCL_ID_BYTES}-byte unique id"
                )));
            }
            member.nccl_id = ready.next_nccl_unique_id.clone();
        }
        let world = self.world.as_mut().expect("checked by rank_in");
        world.ready.insert(worker_id.to_owned(), ready);
        if world.ready.len() == world.members.len() && !world.running {
            self.start_world();
        }
        Ok(())
    }

    /// Everyone is ready: check they agree, build the plan, dispatch the first step.
    fn start_world(&mut self) {
        let world = self.world.as_ref().expect("a world");
        let first = world.ready.values().next().expect("members");
        for (id, r) in &world.ready {
            if r.step != self.step {
                let msg = format!(
                    "worker {id} is at step {} but the ledger's last committed step is {}; it cannot join without a checkpoint",
                    r.step, self.step
                );
                return self.fail(msg);
            }
            if r.sources != first.sources {
                let msg = format!(
                    "workers see different data: {id} reports {:?}, another {:?}",
                    r.sources, first.sources
                );
                return self.fail(msg);
            }
        }
        if self.plan.is_none() {
            let weights = self.job.sources.iter().map(|s| s.weight).collect();
            let sizes = first.sources.iter().map(|s| s.num_samples).collect();
            let cursors = self
                .resume_cursors
                .take()
                .unwrap_or_else(|| vec![0; self.job.sources.len()]);
            match Plan::new(weights, sizes, self.job.data_seed, cursors) {
                Ok(p) => {
                    self.committed_plan = Some(p.clone());
                    self.plan = Some(p);
                }
                Err(e) => return self.fail(format!("data mixture: {e}")),
            }
        }
        let world = self.world.as_mut().expect("a world");
        world.running = true;
        self.state = v1::JobState::Running;
        self.detail.clear();
        self.last_end = None;
        info!(
            generation = world.generation,
            world_size = world.members.len(),
            step = self.step,
            "world running"
        );
        self.dispatch();
    }

    /// Sends the next step's slices to every rank.
    fn dispatch(&mut self) {
        if self.step >= self.job.total_steps {
            return self.finish();
        }
        let (Some(world), Some(plan)) = (self.world.as_mut(), self.plan.as_mut()) else {
            return;
        };
        let batch = self.job.global_batch as usize;
        let samples = plan.take(batch);
        let lr = self.schedule.lr(self.step);
        let n = world.members.len();
        for (rank, id) in world.members.iter().enumerate() {
            let slice = &samples[rank_slice(batch, n, rank)];
            let work = v1::Work {
                generation: world.generation,
                step: self.step,
                samples: slice
                    .iter()
                    .map(|s| v1::SampleRef {
                        source: s.source as u32,
                        index: s.index,
                    })
                    .collect(),
                lr,
                global_batch: batch as u32,
            };
            send(&self.members, id, v1::coordinator_message::Kind::Work(work));
        }
        world.in_flight = Some((self.step, samples, BTreeMap::new()));
    }

    async fn step_done(&mut self, worker_id: &str, done: v1::StepDone) -> Result<(), DriverError> {
        let rank = self.rank_in(worker_id, done.generation)?;
        let world = self.world.as_mut().expect("checked by rank_in");
        let n = world.members.len();
        let Some((step, samples, reports)) = world.in_flight.as_mut() else {
            return Err(DriverError::FailedPrecondition(
                "no step is in flight".into(),
            ));
        };
        if done.step != *step {
            return Err(DriverError::FailedPrecondition(format!(
                "report for step {}, but step {step} is in flight",
                done.step
            )));
        }
        let expected = rank_slice(samples.len(), n, rank as usize).len() as u32;
        if done.samples != expected {
            return Err(DriverError::InvalidArgument(format!(
                "rank {rank} reports {} samples for step {step}, it was given {expected}",
                done.samples
            )));
        }
        if !done.loss_sum.is_finite() {
            return Err(DriverError::InvalidArgument(format!(
                "rank {rank} reports a loss of {}",
                done.loss_sum
            )));
        }
        if reports.contains_key(&rank) {
            return Err(DriverError::FailedPrecondition(format!(
                "rank {rank} reported step {step} twice"
            )));
        }
        reports.insert(rank, done);
        if reports.len() < n {
            return Ok(());
        }
        let generation = world.generation;
        let (step, samples, reports) = world.in_flight.take().expect("in flight");
        if self.commit(generation, step, samples, &reports).await {
            self.dispatch();
        }
        Ok(())
    }

    /// Commits `step` to the ledger with the loss over the reported samples; false (and the job
    /// failed) if the ledger cannot be written.
    async fn commit(
        &mut self,
        generation: u64,
        step: u64,
        samples: Vec<SampleId>,
        reports: &BTreeMap<u32, v1::StepDone>,
    ) -> bool {
        let reported: u32 = reports.values().map(|r| r.samples).sum();
        let loss = reports.values().map(|r| r.loss_sum).sum::<f64>() / f64::from(reported.max(1));
        let plan = self.plan.as_ref().expect("a plan while running");
        let entry = v1::LedgerStep {
            step,
            samples: samples
                .iter()
                .map(|s| v1::SampleRef {
                    source: s.source as u32,
                    index: s.index,
                })
                .collect(),
            cursors: plan.cursors().to_vec(),
            loss,
            generation,
        };
        if let Err(e) = self.ledger.commit(&entry).await {
            self.fail(format!("cannot write the ledger: {e}"));
            return false;
        }
        if let Some(m) = &self.metrics {
            m.step_committed(&self.job, &samples);
        }
        self.committed_plan = Some(plan.clone());
        self.step = step + 1;
        self.loss = Some(loss);
        if self.step.is_multiple_of(self.job.log_every.max(1)) || self.step == self.job.total_steps
        {
            info!(step = self.step, loss, generation, "step committed");
        }
        true
    }

    fn maybe_form_world(&mut self) {
        if self.world.is_some()
            || matches!(self.state, v1::JobState::Finished | v1::JobState::Failed)
        {
            return;
        }
        let attached: Vec<String> = self
            .order
            .iter()
            .filter(|id| self.members[*id].outbox.is_some())
            .cloned()
            .collect();
        let present = attached.len() as u32;
        if present < self.settings.min {
            self.forming_since = None;
            self.detail = format!(
                "waiting for workers: {present} of {} present",
                self.settings.min
            );
            return;
        }
        if present < self.settings.max {
            let since = *self.forming_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.settings.rendezvous {
                self.detail = self.with_last_end(format!(
                    "{present} workers present; waiting up to {:?} for up to {}",
                    self.settings.rendezvous, self.settings.max
                ));
                return;
            }
        }
        self.forming_since = None;
        let members: Vec<String> = attached
            .into_iter()
            .take(self.settings.max as usize)
            .collect();
        self.generation += 1;
        let peers: Vec<String> = members
            .iter()
            .map(|id| self.members[id].address.clone())
            .collect();
        // NCCL: rank 0's unused unique id, for every rank; it is spent on this world (the next
        // Ready brings a fresh one).
        let nccl_id =
            std::mem::take(&mut self.members.get_mut(&members[0]).expect("a member").nccl_id);
        info!(
            generation = self.generation,
            world_size = members.len(),
            "forming a world"
        );
        for (rank, id) in members.iter().enumerate() {
            let world = v1::World {
                generation: self.generation,
                rank: rank as u32,
                world_size: members.len() as u32,
                peers: peers.clone(),
                nccl_unique_id: nccl_id.clone(),
                start_step: self.step,
            };
            send(
                &self.members,
                id,
                v1::coordinator_message::Kind::World(world),
            );
        }
        self.world = Some(World {
            generation: self.generation,
            members,
            ready: BTreeMap::new(),
            running: false,
            in_flight: None,
        });
    }

    async fn check_leases(&mut self) {
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

    /// Ends the current generation: survivors leave their collective, the step in flight is
    /// committed if any rank finished it (a finished step means its all-reduce completed, so
    /// every rank applied the same update) or else rewound, and a new world forms if enough
    /// workers remain.
    async fn end_generation(&mut self, reason: &str) {
        let Some(mut world) = self.world.take() else {
            return;
        };
        if let Some((step, samples, reports)) = world.in_flight.take() {
            if !reports.is_empty() {
                warn!(
                    step,
                    reported = reports.len(),
                    "committing the step in flight: a rank finished it"
                );
                if !self.commit(world.generation, step, samples, &reports).await {
                    return;
                }
            }
        }
        warn!(generation = world.generation, reason, "generation ended");
        if let Some(m) = &self.metrics {
            m.generation_ended();
        }
        for id in &world.members {
            let stop = v1::Stop {
                reason: v1::StopReason::GenerationEnded.into(),
                generation: world.generation,
                detail: reason.to_owned(),
            };
            send(&self.members, id, v1::coordinator_message::Kind::Stop(stop));
        }
        self.plan = self.committed_plan.clone();
        if !matches!(self.state, v1::JobState::Finished | v1::JobState::Failed) {
            self.state = v1::JobState::Waiting;
            self.detail = format!("generation {} ended: {reason}", world.generation);
            self.last_end = Some(self.detail.clone());
        }
        self.maybe_form_world();
    }

    fn with_last_end(&self, waiting: String) -> String {
        match &self.last_end {
            Some(end) => format!("{end}; {waiting}"),
            None => waiting,
        }
    }

    fn finish(&mut self) {
        info!(
            step = self.step,
            loss = self.loss.unwrap_or(f64::NAN),
            "job finished"
        );
        self.state = v1::JobState::Finished;
        self.detail = format!("finished at step {}", self.step);
        self.stop_all(v1::StopReason::JobFinished);
    }

    fn fail(&mut self, detail: String) {
        warn!(%detail, "job failed");
        self.state = v1::JobState::Failed;
        self.detail = detail;
        self.stop_all(v1::StopReason::JobFailed);
    }

    fn stop_all(&mut self, reason: v1::StopReason) {
        let generation = self
            .world
            .as_ref()
            .map_or(self.generation, |w| w.generation);
        for id in self.order.clone() {
            let stop = v1::Stop {
                reason: reason.into(),
                generation,
                detail: self.detail.clone(),
            };
            send(
                &self.members,
                &id,
                v1::coordinator_message::Kind::Stop(stop),
            );
        }
        self.world = None;
    }

    fn publish(&self) {
        let snapshot = Snapshot {
            state: self.state.into(),
            generation: self.generation,
            step: self.step,
            total_steps: self.job.total_steps,
            loss: self.loss,
            workers_alive: self.members.len() as u32,
            world_size: self.world.as_ref().map_or(0, |w| w.members.len() as u32),
            detail: self.detail.clone(),
        };
        if let Some(m) = &self.metrics {
            m.observe(&snapshot);
        }
        self.snapshot.send_if_modified(|s| {
            let changed = *s != snapshot;
            *s = snapshot;
            changed
        });
    }
}

/// Queues a message for a member; a full or closed outbox is logged (its lease decides its fate).
fn send(members: &BTreeMap<String, Member>, id: &str, kind: v1::coordinator_message::Kind) {
    let Some(outbox) = members.get(id).and_then(|m| m.outbox.as_ref()) else {
        warn!(worker = %id, "no session to send to");
        return;
    };
    if let Err(e) = outbox.try_send(v1::CoordinatorMessage { kind: Some(kind) }) {
        warn!(worker = %id, error = %e, "cannot queue a message");
    }
}
