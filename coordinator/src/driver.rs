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

use crate::curriculum::{Curriculum, CurriculumError, StepPlan};
use crate::metrics::Metrics;
use crate::plan::{rank_slice, SampleId};
use crate::spike::{CheckpointConfig, Detector, SpikeConfig, Verdict};

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
    /// A request from the control API.
    Control {
        request: ControlRequest,
        reply: oneshot::Sender<Result<ControlReply, DriverError>>,
    },
}

/// What the control API asks of the job.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlRequest {
    ListStages,
    /// `stage: None`: the next stage.
    ChangeStage {
        stage: Option<String>,
        requested_by: String,
    },
    SetMix {
        stage: String,
        weights: Vec<(String, f64)>,
        requested_by: String,
    },
    Pause {
        requested_by: String,
    },
    Resume {
        requested_by: String,
    },
    Evaluate {
        requested_by: String,
    },
    CheckpointNow {
        requested_by: String,
    },
    ListCheckpoints,
    /// `checkpoint: None`: the latest known-good one.
    Rollback {
        checkpoint: Option<String>,
        requested_by: String,
    },
    ListEvents,
}

/// The driver's answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ControlReply {
    Stages(v1::ListStagesResponse),
    StageChanged(v1::ChangeStageResponse),
    MixSet(v1::SetMixResponse),
    Paused(v1::PauseResponse),
    Resumed(v1::ResumeResponse),
    Evaluating(v1::EvaluateResponse),
    CheckpointScheduled(v1::CheckpointNowResponse),
    Checkpoints(v1::ListCheckpointsResponse),
    RolledBack(v1::RollbackResponse),
    Events(v1::ListEventsResponse),
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
    #[error("{0}")]
    NotFound(String),
}

impl From<CurriculumError> for DriverError {
    fn from(e: CurriculumError) -> DriverError {
        match e {
            CurriculumError::NotFound(m) => DriverError::NotFound(m),
            CurriculumError::Refused(m) => DriverError::FailedPrecondition(m),
            e => DriverError::InvalidArgument(e.to_string()),
        }
    }
}

/// Where committed steps and the curriculum's record go (the state store).
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    async fn commit(&self, step: &v1::LedgerStep) -> Result<(), String>;
    /// Replaces the curriculum's durable record (mixture edits, transitions, evaluations).
    async fn save_curriculum(&self, record: &v1::CurriculumRecord) -> Result<(), String>;
    /// Adds or replaces a checkpoint in the index.
    async fn put_checkpoint(&self, _record: &v1::CheckpointRecord) -> Result<(), String> {
        Ok(())
    }
    /// Removes a checkpoint from the index (its folder is gone).
    async fn delete_checkpoint(&self, _step: u64) -> Result<(), String> {
        Ok(())
    }
    /// Adds or replaces spike event number `index`.
    async fn put_event(&self, _index: u64, _event: &v1::SpikeEvent) -> Result<(), String> {
        Ok(())
    }
    /// A rollback (event `event`) to the state after `to_step` committed steps: the committed
    /// steps from `to_step` on move aside (kept, as rolled back), the last committed step is
    /// `to_step - 1` again.
    async fn rewind(&self, _to_step: u64, _event: u64) -> Result<(), String> {
        Ok(())
    }
    /// Records samples a rollback skipped.
    async fn put_skipped(&self, _range: &v1::SkippedRange) -> Result<(), String> {
        Ok(())
    }
}

/// The checkpoint and spike policy of a job, and what a restarted coordinator found of it.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub checkpoints: Option<CheckpointConfig>,
    pub spikes: Option<SpikeConfig>,
    /// The checkpoint index and the spike events so far (from the state store).
    pub index: Vec<v1::CheckpointRecord>,
    pub events: Vec<v1::SpikeEvent>,
}

/// A skip range waiting for the replay to reach it: at step `at`, draw `batches` global
/// batches without training them (for event `event`).
#[derive(Debug, Clone, Copy)]
struct PendingSkip {
    at: u64,
    batches: u64,
    event: usize,
}

/// Where a restarted coordinator picks the job up: its last committed step and the
/// curriculum's record.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub last: Option<v1::LedgerStep>,
    pub record: Option<v1::CurriculumRecord>,
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
    pub stage: String,
    pub stage_index: u32,
    pub stages: u32,
    pub tokens: u64,
    pub total_tokens: u64,
    /// The stage the budget moves to next, and the step it starts at.
    pub next_transition: Option<(String, u64)>,
    pub seq_len: u32,
    pub rope_theta: f64,
    pub lr: f64,
    /// Committed steps per second over the recent past.
    pub steps_per_second: Option<f64>,
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
    /// The step in flight: its plan and the reports received so far (by rank).
    in_flight: Option<(StepPlan, BTreeMap<u32, v1::StepDone>)>,
    /// The evaluation in flight.
    eval: Option<EvalInFlight>,
}

struct EvalInFlight {
    id: u64,
    trigger: &'static str,
    seq_len: u32,
    /// Per rank, the samples it was sent (its report must cover exactly those).
    sent: Vec<Vec<SampleId>>,
    reports: BTreeMap<u32, v1::EvalDone>,
}

/// Committed steps per second over the last few commits.
#[derive(Default)]
struct StepRate {
    times: std::collections::VecDeque<Instant>,
}

impl StepRate {
    const WINDOW: usize = 20;

    fn tick(&mut self) {
        if self.times.len() == Self::WINDOW {
            self.times.pop_front();
        }
        self.times.push_back(Instant::now());
    }

    fn reset(&mut self) {
        self.times.clear();
    }

    fn per_second(&self) -> Option<f64> {
        let (first, last) = (self.times.front()?, self.times.back()?);
        let secs = last.duration_since(*first).as_secs_f64();
        (self.times.len() >= 2 && secs > 0.0).then(|| (self.times.len() - 1) as f64 / secs)
    }
}

/// The driver's state. Create with [`Driver::new`], run with [`Driver::run`].
pub struct Driver {
    job: v1::JobSpec,
    settings: Settings,
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
    /// The curriculum at the last committed step, and the one planning (built when the first
    /// world is ready: it needs the sizes of the sources).
    committed: Option<Curriculum>,
    curriculum: Option<Curriculum>,
    /// What to build it from after a restart.
    resume: Option<Resume>,
    /// Held-out tokens per source, from the workers.
    eval_tokens: Vec<u64>,
    /// Who paused the job, while it is paused.
    paused: Option<String>,
    /// Who asked for an evaluation that has not run yet.
    eval_wanted: Option<String>,
    /// The step of the last evaluation, so a boundary is evaluated once.
    last_eval_step: Option<u64>,
    next_eval_id: u64,
    rate: StepRate,
    lr: f64,
    /// Tokens per source (from the workers), to rebuild the curriculum at a checkpoint.
    source_tokens: Vec<u64>,
    checkpoints: Option<CheckpointConfig>,
    /// The checkpoint index, by step.
    index: Vec<v1::CheckpointRecord>,
    /// The checkpoint being written: its request id and its record-to-be.
    saving: Option<(u64, v1::CheckpointRecord)>,
    /// Checkpoints asked for in generations that ended before rank 0 answered.
    late_saves: Vec<(u64, v1::CheckpointRecord)>,
    /// Checkpoints asked for in a lineage a rollback abandoned: their reports are ignored.
    discarded: Vec<u64>,
    /// Who asked for a checkpoint that has not been requested from rank 0 yet.
    checkpoint_wanted: Option<String>,
    next_checkpoint_id: u64,
    /// The checkpoint this run last restored from: the parent of the next one.
    lineage: String,
    /// Folders of checkpoints a rollback left behind (after its target), to delete with the
    /// next checkpoint.
    abandoned: Vec<String>,
    /// What the next world loads before it trains.
    restore: Option<v1::CheckpointRef>,
    detector: Option<Detector>,
    events: Vec<v1::SpikeEvent>,
    skip: Option<PendingSkip>,
    /// After a rollback: the LR factor and the step it holds until.
    lr_scale: Option<(f64, u64)>,
    /// Steps committed (the next step to commit).
    step: u64,
    loss: Option<f64>,
    state: v1::JobState,
    detail: String,
    snapshot: watch::Sender<Snapshot>,
    metrics: Option<Arc<Metrics>>,
}

impl Driver {
    /// A driver for `job`, picking it up where `resume` says (a new job without one).
    pub fn new(
        job: v1::JobSpec,
        settings: Settings,
        ledger: Box<dyn Ledger>,
        resume: Option<Resume>,
    ) -> Result<(Driver, watch::Receiver<Snapshot>), crate::spec::SpecError> {
        crate::schedule::Wsd::from_job(&job)?;
        if job.stages.is_empty() {
            return Err(crate::spec::SpecError("the job has no stage".into()));
        }
        let step = resume
            .as_ref()
            .and_then(|r| r.last.as_ref())
            .map_or(0, |l| l.step + 1);
        // Generations keep counting across coordinator restarts.
        let generation = resume
            .as_ref()
            .and_then(|r| r.last.as_ref())
            .map_or(0, |l| l.generation);
        let paused = resume
            .as_ref()
            .and_then(|r| r.record.as_ref())
            .filter(|r| r.paused)
            .map(|_| "a previous coordinator".to_owned());
        let (snapshot, rx) = watch::channel(Snapshot::default());
        let d = Driver {
            job,
            settings,
            ledger,
            next_id: 1,
            members: BTreeMap::new(),
            order: Vec::new(),
            world: None,
            generation,
            forming_since: None,
            last_end: None,
            committed: None,
            curriculum: None,
            resume,
            eval_tokens: vec![],
            paused,
            eval_wanted: None,
            last_eval_step: None,
            next_eval_id: 1,
            rate: StepRate::default(),
            lr: 0.0,
            source_tokens: vec![],
            checkpoints: None,
            index: vec![],
            saving: None,
            late_saves: vec![],
            discarded: vec![],
            checkpoint_wanted: None,
            next_checkpoint_id: 1,
            lineage: String::new(),
            abandoned: vec![],
            restore: None,
            detector: None,
            events: vec![],
            skip: None,
            lr_scale: None,
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

    /// Checkpoints and spike handling as `policy` says.
    pub fn with_policy(mut self, policy: Policy) -> Driver {
        self.checkpoints = policy.checkpoints;
        self.detector = policy.spikes.map(Detector::new);
        self.index = policy.index;
        self.index.sort_by_key(|r| r.step);
        self.events = policy.events;
        self.lineage = self
            .index
            .iter()
            .rev()
            .find(|r| r.step <= self.step)
            .map(|r| r.path.clone())
            .unwrap_or_default();
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
            Event::Control { request, reply } => {
                let r = self.control(request).await;
                let _ = reply.send(r);
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

    async fn ready(&mut self, worker_id: &str, ready: v1::Ready) -> Result<(), DriverError> {
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
            self.start_world().await;
        }
        Ok(())
    }

    /// Everyone is ready: check they agree, build the curriculum, dispatch the first step.
    async fn start_world(&mut self) {
        let world = self.world.as_ref().expect("a world");
        let first = world.ready.values().next().expect("members").clone();
        for (id, r) in &world.ready {
            if r.sources != first.sources {
                let msg = format!(
                    "workers see different data: {id} reports {:?}, another {:?}",
                    r.sources, first.sources
                );
                return self.fail(msg);
            }
        }
        if self.curriculum.is_none() {
            let tokens: Vec<u64> = first.sources.iter().map(|s| s.num_tokens).collect();
            self.eval_tokens = first.sources.iter().map(|s| s.eval_tokens).collect();
            self.source_tokens = tokens.clone();
            let built = match self.resume.take() {
                Some(Resume {
                    last: Some(last),
                    record,
                }) => Curriculum::resume(&self.job, &tokens, &last, record.as_ref()),
                _ => Curriculum::new(&self.job, &tokens),
            };
            match built {
                Ok(c) => {
                    if let Some(m) = &self.metrics {
                        let spec = c.current_spec();
                        m.stage_changed(&spec.name, c.current() as u32);
                        if let Some(t) = c.transitions().last() {
                            m.transition(t.cause());
                        }
                    }
                    self.committed = Some(c.clone());
                    self.curriculum = Some(c);
                    if !self.save_record().await {
                        return;
                    }
                }
                Err(e) => return self.fail(format!("curriculum: {e}")),
            }
        }
        let world = self.world.as_ref().expect("a world");
        let behind: Vec<(String, u64)> = world
            .ready
            .iter()
            .filter(|(_, r)| r.step != self.step)
            .map(|(id, r)| (id.clone(), r.step))
            .collect();
        if let Some((id, step)) = behind.first() {
            if self.restore.is_some() {
                let msg = format!(
                    "worker {id} reports step {step} after restoring the checkpoint of step {}",
                    self.step
                );
                return self.fail(msg);
            }
            // Ranks must hold the same state: go back to a checkpoint they can all load.
            let why = format!(
                "worker {id} is at step {step}, the ledger at step {}",
                self.step
            );
            return self.restore_checkpoint(None, &why).await;
        }
        self.restore = None;
        let world = self.world.as_mut().expect("a world");
        world.running = true;
        self.state = v1::JobState::Running;
        self.detail.clear();
        self.last_end = None;
        self.rate.reset();
        info!(
            generation = world.generation,
            world_size = world.members.len(),
            step = self.step,
            "world running"
        );
        self.dispatch().await;
    }

    /// Writes the curriculum's record; false (and the job failed) if the store refuses.
    async fn save_record(&mut self) -> bool {
        let Some(c) = &self.curriculum else {
            return true;
        };
        let record = c.record(self.paused.is_some());
        if let Err(e) = self.ledger.save_curriculum(&record).await {
            self.fail(format!("cannot write the curriculum record: {e}"));
            return false;
        }
        true
    }

    /// What comes next in a running world: nothing while a step or an evaluation is in flight
    /// or the job is paused; else an evaluation (asked for, or at a stage's end), a stage change,
    /// the next step, or the end of the job.
    async fn dispatch(&mut self) {
        let Some(world) = self.world.as_ref() else {
            return;
        };
        if !world.running || world.in_flight.is_some() || world.eval.is_some() {
            return;
        }
        let Some(c) = self.curriculum.as_ref() else {
            return;
        };
        let (finished, due) = (c.finished(), c.due());
        let at_boundary = finished
            || due
                .as_ref()
                .is_some_and(|d| d.cause != v1::TransitionCause::MixChange);
        let evaluated_here = self.last_eval_step == Some(self.step);
        if self.job.eval_samples > 0 && !evaluated_here {
            if at_boundary {
                let trigger = if self.eval_wanted.is_some() {
                    "stage end, on demand"
                } else {
                    "stage end"
                };
                return self.start_eval(trigger);
            }
            if self.eval_wanted.is_some() {
                return self.start_eval("on demand");
            }
        }
        if finished {
            return self.finish();
        }
        if let Some(who) = &self.paused {
            if self.state != v1::JobState::Paused {
                info!(step = self.step, by = %who, "paused");
            }
            self.state = v1::JobState::Paused;
            self.detail = format!("paused by {who} after step {}", self.step);
            return;
        }
        if self.checkpoint_due() {
            self.start_checkpoint();
        }
        if let Some(skip) = self.skip.filter(|s| s.at == self.step) {
            self.skip = None;
            if !self.skip_range(skip).await {
                return;
            }
        }
        if let Some(change) = due {
            let c = self.curriculum.as_mut().expect("checked");
            match c.apply(change) {
                Ok(t) => {
                    info!(step = t.step, from = %t.from, to = %t.to, cause = ?t.cause(), by = %t.requested_by, detail = %t.detail, "stage transition");
                    // A new mixture, sequence length or RoPE θ moves the loss for good reasons.
                    if let Some(d) = self.detector.as_mut() {
                        d.reset_statistics();
                    }
                    if let Some(m) = &self.metrics {
                        m.stage_changed(&t.to, c.current() as u32);
                        m.transition(t.cause());
                    }
                }
                Err(e) => return self.fail(format!("stage transition: {e}")),
            }
            if !self.save_record().await {
                return;
            }
        }
        let c = self.curriculum.as_mut().expect("checked");
        let mut plan = c.plan_step();
        if let Some((factor, until)) = self.lr_scale {
            if plan.step < until {
                plan.lr *= factor;
            } else {
                self.lr_scale = None;
            }
        }
        self.lr = plan.lr;
        let guard = self
            .detector
            .as_ref()
            .map_or_else(v1::StepGuard::default, Detector::guard);
        let world = self.world.as_mut().expect("checked");
        let batch = plan.samples.len();
        let n = world.members.len();
        for (rank, id) in world.members.iter().enumerate() {
            let work = v1::Work {
                generation: world.generation,
                step: plan.step,
                samples: refs(&plan.samples[rank_slice(batch, n, rank)]),
                lr: plan.lr,
                global_batch: plan.global_batch,
                stage: Some(plan.stage),
                guard: Some(guard),
            };
            send(&self.members, id, v1::coordinator_message::Kind::Work(work));
        }
        world.in_flight = Some((plan, BTreeMap::new()));
    }

    /// Sends every rank its share of the held-out samples (the first `eval_samples` windows of
    /// each source's eval folder, the same every time so evaluations compare).
    fn start_eval(&mut self, trigger: &'static str) {
        let c = self.curriculum.as_ref().expect("a curriculum");
        let seq_len = if self.job.eval_seq_len > 0 {
            self.job.eval_seq_len
        } else {
            c.current_spec().seq_len
        };
        let len = u64::from(seq_len);
        let mut samples = vec![];
        for (source, &tokens) in self.eval_tokens.iter().enumerate() {
            let n = (tokens.saturating_sub(1) / len).min(u64::from(self.job.eval_samples));
            samples.extend((0..n).map(|k| SampleId {
                source,
                index: k * len,
            }));
        }
        if samples.is_empty() {
            warn!("no source has held-out data of {seq_len} tokens or more; not evaluating");
            self.last_eval_step = Some(self.step);
            self.eval_wanted = None;
            return;
        }
        let world = self.world.as_mut().expect("a running world");
        let id = self.next_eval_id;
        self.next_eval_id += 1;
        let n = world.members.len();
        let micro = (self.job.micro_batch_tokens / len).max(1) as u32;
        let sent: Vec<Vec<SampleId>> = (0..n)
            .map(|rank| samples[rank_slice(samples.len(), n, rank)].to_vec())
            .collect();
        for (rank, id_) in world.members.iter().enumerate() {
            let eval = v1::Evaluate {
                generation: world.generation,
                id,
                seq_len,
                rope_theta: c.current_spec().rope_theta,
                micro_batch_size: micro,
                samples: refs(&sent[rank]),
            };
            send(
                &self.members,
                id_,
                v1::coordinator_message::Kind::Evaluate(eval),
            );
        }
        info!(
            step = self.step,
            trigger,
            samples = samples.len(),
            "evaluating"
        );
        world.eval = Some(EvalInFlight {
            id,
            trigger,
            seq_len,
            sent,
            reports: BTreeMap::new(),
        });
    }

    async fn eval_done(&mut self, worker_id: &str, done: v1::EvalDone) -> Result<(), DriverError> {
        let rank = self.rank_in(worker_id, done.generation)?;
        let world = self.world.as_mut().expect("checked by rank_in");
        let Some(eval) = world.eval.as_mut().filter(|e| e.id == done.id) else {
            return Err(DriverError::FailedPrecondition(format!(
                "no evaluation {} is in flight",
                done.id
            )));
        };
        if eval.reports.contains_key(&rank) {
            return Err(DriverError::FailedPrecondition(format!(
                "rank {rank} reported evaluation {} twice",
                done.id
            )));
        }
        let sent = &eval.sent[rank as usize];
        let mut expected: BTreeMap<u32, u32> = BTreeMap::new();
        for s in sent {
            *expected.entry(s.source as u32).or_default() += 1;
        }
        let mut got: BTreeMap<u32, u32> = BTreeMap::new();
        for l in &done.losses {
            if !l.loss_sum.is_finite() {
                return Err(DriverError::InvalidArgument(format!(
                    "rank {rank} reports a validation loss of {} for source {}",
                    l.loss_sum, l.source
                )));
            }
            *got.entry(l.source).or_default() += l.samples;
        }
        got.retain(|_, n| *n > 0);
        if got != expected {
            return Err(DriverError::InvalidArgument(format!(
                "rank {rank} reports samples per source {got:?} for evaluation {}, it was sent {expected:?}",
                done.id
            )));
        }
        eval.reports.insert(rank, done);
        if eval.reports.len() < world.members.len() {
            return Ok(());
        }
        let eval = world.eval.take().expect("in flight");
        let mut sums = vec![(0.0f64, 0u32); self.job.sources.len()];
        for r in eval.reports.values() {
            for l in &r.losses {
                if let Some(s) = sums.get_mut(l.source as usize) {
                    s.0 += l.loss_sum;
                    s.1 += l.samples;
                }
            }
        }
        let c = self.curriculum.as_mut().expect("a curriculum");
        let losses: Vec<v1::SourceLoss> = sums
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(i, (sum, n))| v1::SourceLoss {
                source: self.job.sources[i].name.clone(),
                loss: sum / f64::from(*n),
                samples: *n,
            })
            .collect();
        let evaluation = v1::Evaluation {
            step: self.step,
            stage: c.current_spec().name.clone(),
            trigger: eval.trigger.into(),
            seq_len: eval.seq_len,
            losses,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let summary: Vec<String> = evaluation
            .losses
            .iter()
            .map(|l| format!("{}={:.4}", l.source, l.loss))
            .collect();
        info!(step = self.step, stage = %evaluation.stage, trigger = eval.trigger, losses = %summary.join(" "), "validation loss");
        if let Some(m) = &self.metrics {
            for l in &evaluation.losses {
                m.validation_loss(&l.source, l.loss);
            }
        }
        c.record_evaluation(evaluation.clone());
        if let Some(committed) = self.committed.as_mut() {
            committed.record_evaluation(evaluation);
        }
        self.last_eval_step = Some(self.step);
        self.eval_wanted = None;
        if self.save_record().await {
            self.dispatch().await;
        }
        Ok(())
    }

    async fn control(&mut self, request: ControlRequest) -> Result<ControlReply, DriverError> {
        if matches!(self.state, v1::JobState::Finished | v1::JobState::Failed)
            && request != ControlRequest::ListStages
        {
            return Err(DriverError::FailedPrecondition(format!(
                "the job is over ({})",
                self.detail
            )));
        }
        let reply = match request {
            ControlRequest::ListStages => {
                // The committed copy: what it shows matches the committed steps.
                let stages = match &self.committed {
                    Some(c) => v1::ListStagesResponse {
                        stages: c.stage_infos(),
                        transitions: c.transitions().to_vec(),
                        evaluations: c.evaluations().to_vec(),
                        current: c.current() as u32,
                        step: self.step,
                    },
                    // Not started yet: the plan as the job file gives it.
                    None => v1::ListStagesResponse {
                        stages: crate::curriculum::planned_stages(&self.job),
                        current: 0,
                        step: self.step,
                        ..Default::default()
                    },
                };
                return Ok(ControlReply::Stages(stages));
            }
            ControlRequest::ChangeStage {
                stage,
                requested_by,
            } => {
                self.started()?;
                let c = self.curriculum.as_mut().expect("started");
                let (from, to) = c.request_stage(stage.as_deref(), &requested_by)?;
                let effective_step = c.step();
                if let Some(committed) = self.committed.as_mut() {
                    // Keeps the request if the step in flight is abandoned and planned again.
                    let _ = committed.request_stage(stage.as_deref(), &requested_by);
                }
                info!(%from, %to, effective_step, by = %requested_by, "stage change requested");
                ControlReply::StageChanged(v1::ChangeStageResponse {
                    from,
                    to,
                    effective_step,
                })
            }
            ControlRequest::SetMix {
                stage,
                weights,
                requested_by,
            } => {
                self.started()?;
                let c = self.curriculum.as_mut().expect("started");
                let (index, aligned) = c.check_mix(&stage, &weights)?;
                let effective = c.set_mix(index, aligned.clone(), &requested_by)?;
                if let Some(committed) = self.committed.as_mut() {
                    let _ = committed.set_mix(index, aligned, &requested_by);
                }
                if effective.is_some() {
                    if let Some(m) = &self.metrics {
                        m.transition(v1::TransitionCause::MixChange);
                    }
                    if let Some(d) = self.detector.as_mut() {
                        d.reset_statistics();
                    }
                }
                info!(%stage, ?weights, by = %requested_by, "mixture changed");
                if !self.save_record().await {
                    return Err(DriverError::FailedPrecondition(self.detail.clone()));
                }
                ControlReply::MixSet(v1::SetMixResponse {
                    effective_step: effective.unwrap_or(0),
                })
            }
            ControlRequest::Pause { requested_by } => {
                if self.paused.is_none() {
                    info!(by = %requested_by, "pause requested");
                    self.paused = Some(requested_by);
                    if !self.save_record().await {
                        return Err(DriverError::FailedPrecondition(self.detail.clone()));
                    }
                }
                let in_flight = self.world.as_ref().is_some_and(|w| w.in_flight.is_some());
                self.dispatch().await;
                ControlReply::Paused(v1::PauseResponse {
                    step: self.step + u64::from(in_flight),
                })
            }
            ControlRequest::Resume { requested_by } => {
                if self.paused.take().is_none() {
                    return Err(DriverError::FailedPrecondition(
                        "the job is not paused".into(),
                    ));
                }
                info!(by = %requested_by, step = self.step, "resumed");
                if self.state == v1::JobState::Paused {
                    self.state = v1::JobState::Running;
                    self.detail.clear();
                }
                self.rate.reset();
                if !self.save_record().await {
                    return Err(DriverError::FailedPrecondition(self.detail.clone()));
                }
                self.dispatch().await;
                ControlReply::Resumed(v1::ResumeResponse { step: self.step })
            }
            ControlRequest::CheckpointNow { requested_by } => {
                if self.checkpoints.is_none() {
                    return Err(DriverError::FailedPrecondition(
                        "this job writes no checkpoints: add a [checkpoints] section to its job file".into(),
                    ));
                }
                self.started()?;
                info!(by = %requested_by, "checkpoint requested");
                self.checkpoint_wanted = Some(requested_by);
                let busy = self.world.as_ref().is_some_and(|w| w.in_flight.is_some());
                self.dispatch().await;
                ControlReply::CheckpointScheduled(v1::CheckpointNowResponse {
                    step: self.step + u64::from(busy),
                })
            }
            ControlRequest::ListCheckpoints => {
                ControlReply::Checkpoints(v1::ListCheckpointsResponse {
                    checkpoints: self.index.clone(),
                })
            }
            ControlRequest::ListEvents => ControlReply::Events(v1::ListEventsResponse {
                events: self.events.clone(),
            }),
            ControlRequest::Rollback {
                checkpoint,
                requested_by,
            } => {
                self.started()?;
                let target = self.find_checkpoint(checkpoint.as_deref())?;
                let event = v1::SpikeEvent {
                    detected_at: self.step,
                    action: v1::SpikeAction::ManualRollback.into(),
                    rolled_back_to: target.path.clone(),
                    resumed_at_step: target.step,
                    requested_by: requested_by.clone(),
                    unix_ms: now_ms(),
                    detail: format!("rollback asked for by {requested_by}"),
                    ..Default::default()
                };
                let reply = v1::RollbackResponse {
                    checkpoint: target.path.clone(),
                    step: target.step,
                };
                self.rollback(target, event, None).await;
                ControlReply::RolledBack(reply)
            }
            ControlRequest::Evaluate { requested_by } => {
                self.started()?;
                if self.job.eval_samples == 0 {
                    return Err(DriverError::FailedPrecondition(
                        "the job has no held-out data: give sources an eval folder and [data] eval_samples".into(),
                    ));
                }
                info!(by = %requested_by, "evaluation requested");
                self.eval_wanted = Some(requested_by);
                if self.last_eval_step == Some(self.step) {
                    // A fresh evaluation of the same weights gives the same numbers; still, the
                    // user asked: run it again.
                    self.last_eval_step = None;
                }
                let busy = self.world.as_ref().is_some_and(|w| w.in_flight.is_some());
                self.dispatch().await;
                ControlReply::Evaluating(v1::EvaluateResponse {
                    step: self.step + u64::from(busy),
                })
            }
        };
        Ok(reply)
    }

    /// Whether a checkpoint should be taken before the next step.
    fn checkpoint_due(&self) -> bool {
        let Some(cfg) = &self.checkpoints else {
            return false;
        };
        if self.saving.is_some() || self.step == 0 {
            return false;
        }
        let taken = self.index.iter().any(|r| r.step == self.step);
        !taken
            && (self.checkpoint_wanted.is_some()
                || (cfg.every_steps > 0 && self.step.is_multiple_of(cfg.every_steps)))
    }

    /// Asks rank 0 for a checkpoint of the state after the committed steps (it copies the state
    /// off before the next step's work, then writes in the background).
    fn start_checkpoint(&mut self) {
        let (Some(cfg), Some(world), Some(c)) = (
            &self.checkpoints,
            self.world.as_ref(),
            self.committed.as_ref(),
        ) else {
            return;
        };
        let trigger = match self.checkpoint_wanted.take() {
            Some(who) => format!("on demand ({who})"),
            None => format!("every {} steps", cfg.every_steps),
        };
        let path = cfg
            .dir
            .join(format!("step-{:08}-g{}", self.step, world.generation))
            .to_string_lossy()
            .into_owned();
        let record = v1::CheckpointRecord {
            step: self.step,
            path: path.clone(),
            parent: self.lineage.clone(),
            generation: world.generation,
            stage: c.current() as u32,
            cursors: c.cursors().to_vec(),
            stage_taken: c.taken().to_vec(),
            loss: self.loss.unwrap_or(f64::NAN),
            known_good: self.detector.as_ref().is_none_or(|d| !d.in_spike()),
            unix_ms: now_ms(),
            trigger,
            ..Default::default()
        };
        let mut with_new = self.index.clone();
        with_new.push(record.clone());
        let mut delete = crate::spike::to_delete(&with_new, cfg.keep);
        delete.append(&mut self.abandoned);
        let id = self.next_checkpoint_id;
        self.next_checkpoint_id += 1;
        let save = v1::SaveCheckpoint {
            generation: world.generation,
            id,
            step: self.step,
            path,
            job: self.job.name.clone(),
            stage: record.stage,
            cursors: record.cursors.clone(),
            stage_taken: record.stage_taken.clone(),
            parent: record.parent.clone(),
            delete,
        };
        info!(step = self.step, path = %save.path, trigger = %record.trigger, "checkpoint");
        send(
            &self.members,
            &world.members[0],
            v1::coordinator_message::Kind::SaveCheckpoint(save),
        );
        self.saving = Some((id, record));
    }

    async fn checkpoint_saved(&mut self, saved: v1::CheckpointSaved) -> Result<(), DriverError> {
        let mut record = if self.saving.as_ref().is_some_and(|(id, _)| *id == saved.id) {
            self.saving.take().expect("checked").1
        } else if self.discarded.contains(&saved.id) {
            return Ok(());
        } else if let Some(i) = self.late_saves.iter().position(|(id, _)| *id == saved.id) {
            // Asked for in a generation that has ended since; the write finished anyway.
            self.late_saves.swap_remove(i).1
        } else {
            return Err(DriverError::FailedPrecondition(format!(
                "checkpoint {} was not asked for",
                saved.id
            )));
        };
        if !saved.error.is_empty() {
            warn!(path = %record.path, error = %saved.error, "checkpoint failed; the earlier ones are intact");
            if let Some(m) = &self.metrics {
                m.checkpoint_failed();
            }
            return Ok(());
        }
        record.blocking_seconds = saved.blocking_seconds;
        record.write_seconds = saved.write_seconds;
        record.bytes = saved.bytes;
        if let Some(m) = &self.metrics {
            m.checkpoint_saved(
                record.step,
                saved.blocking_seconds,
                saved.write_seconds,
                saved.bytes,
            );
        }
        info!(step = record.step, path = %record.path, blocking_s = saved.blocking_seconds, write_s = saved.write_seconds, bytes = saved.bytes, "checkpoint saved");
        let keep = self.checkpoints.as_ref().map_or(u32::MAX, |c| c.keep);
        self.index.retain(|r| r.step != record.step);
        self.index.push(record.clone());
        self.index.sort_by_key(|r| r.step);
        if let Err(e) = self.ledger.put_checkpoint(&record).await {
            self.fail(format!("cannot write the checkpoint index: {e}"));
            return Ok(());
        }
        // The worker deleted these folders once the new one was in place.
        let gone = crate::spike::to_delete(&self.index, keep);
        for path in gone {
            if let Some(r) = self.index.iter().find(|r| r.path == path).cloned() {
                self.index.retain(|x| x.path != path);
                if let Err(e) = self.ledger.delete_checkpoint(r.step).await {
                    warn!(error = %e, "cannot remove a checkpoint from the index");
                }
            }
        }
        Ok(())
    }

    /// The checkpoint `name` (a path or a step), or the latest known-good one at or before the
    /// committed step.
    fn find_checkpoint(&self, name: Option<&str>) -> Result<v1::CheckpointRecord, DriverError> {
        let found = match name {
            Some(n) => self
                .index
                .iter()
                .find(|r| r.path == n || n.parse::<u64>().is_ok_and(|s| s == r.step)),
            None => self
                .index
                .iter()
                .rev()
                .find(|r| r.known_good && r.step <= self.step),
        };
        found.cloned().ok_or_else(|| {
            let known: Vec<String> = self
                .index
                .iter()
                .map(|r| format!("{} (step {})", r.path, r.step))
                .collect();
            DriverError::NotFound(match name {
                Some(n) => format!(
                    "no checkpoint {n:?} in the index; the checkpoints are: {}",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
                None => "no known-good checkpoint to roll back to".into(),
            })
        })
    }

    /// Feeds a committed step to the spike detector and acts on its verdict; false if the job
    /// must not dispatch on (a rollback or a pause took over).
    async fn judge(&mut self, reports: &BTreeMap<u32, v1::StepDone>) -> bool {
        let Some(d) = self.detector.as_mut() else {
            return true;
        };
        let step = self.step - 1;
        let first = reports.values().next();
        let loss = first.map_or(f64::NAN, |r| r.global_loss);
        let loss = if loss == 0.0 {
            self.loss.unwrap_or(f64::NAN)
        } else {
            loss
        };
        let grad_norm = first.map_or(0.0, |r| r.grad_norm);
        let skipped = reports.values().any(|r| r.skipped);
        match d.observe(step, loss, grad_norm, skipped) {
            Verdict::Normal => true,
            Verdict::Flagged { rule, mean, std } => {
                warn!(step, loss, grad_norm, %rule, mean, std, skipped, "loss spike flagged");
                if skipped {
                    let event = v1::SpikeEvent {
                        detected_at: step,
                        first_step: step,
                        loss,
                        grad_norm,
                        mean,
                        std,
                        rule,
                        action: v1::SpikeAction::SkipStep.into(),
                        requested_by: "coordinator".into(),
                        unix_ms: now_ms(),
                        detail: "the ranks dropped the step's update".into(),
                        ..Default::default()
                    };
                    self.record_event(event).await;
                }
                true
            }
            Verdict::Rollback {
                first_step,
                rule,
                mean,
                std,
            } => {
                // Best: a checkpoint before the whole skip range, so none of it was trained;
                // else one before the spike began.
                let before_skip = first_step.saturating_sub(d.config().skip_before);
                let good = |limit: u64| {
                    self.index
                        .iter()
                        .rev()
                        .find(|r| r.known_good && r.step <= limit)
                        .cloned()
                };
                let target = good(before_skip).or_else(|| good(first_step));
                let Some(target) = target else {
                    let reason = format!(
                        "a loss spike at step {step} ({rule}), and no known-good checkpoint at or before step {first_step} to roll back to"
                    );
                    self.pause_for(reason, step, loss, grad_norm, mean, std)
                        .await;
                    return false;
                };
                let cfg = d.config().clone();
                let from = first_step.saturating_sub(cfg.skip_before).max(target.step);
                let to = step + cfg.skip_after;
                let event = v1::SpikeEvent {
                    detected_at: step,
                    first_step,
                    loss,
                    grad_norm,
                    mean,
                    std,
                    rule,
                    action: v1::SpikeAction::Rollback.into(),
                    rolled_back_to: target.path.clone(),
                    resumed_at_step: target.step,
                    skipped_from_step: from,
                    skipped_steps: to + 1 - from,
                    lr_factor: cfg.lr_factor,
                    lr_steps: cfg.lr_steps,
                    requested_by: "coordinator".into(),
                    unix_ms: now_ms(),
                    ..Default::default()
                };
                let lr = (cfg.lr_factor != 1.0 && cfg.lr_steps > 0)
                    .then_some((cfg.lr_factor, from + cfg.lr_steps));
                self.rollback(target, event, Some((from, to + 1 - from)))
                    .await;
                self.lr_scale = lr;
                false
            }
            Verdict::Pause { reason } => {
                self.pause_for(reason, step, loss, grad_norm, f64::NAN, f64::NAN)
                    .await;
                false
            }
        }
    }

    async fn pause_for(
        &mut self,
        reason: String,
        step: u64,
        loss: f64,
        grad_norm: f64,
        mean: f64,
        std: f64,
    ) {
        warn!(%reason, "pausing the job");
        let event = v1::SpikeEvent {
            detected_at: step,
            first_step: step,
            loss,
            grad_norm,
            mean,
            std,
            action: v1::SpikeAction::Pause.into(),
            requested_by: "coordinator".into(),
            unix_ms: now_ms(),
            detail: reason.clone(),
            ..Default::default()
        };
        self.record_event(event).await;
        self.paused = Some(format!("the spike detector ({reason})"));
        let _ = self.save_record().await;
        self.dispatch().await;
    }

    async fn record_event(&mut self, event: v1::SpikeEvent) -> usize {
        if let Some(m) = &self.metrics {
            m.spike(event.action());
        }
        self.events.push(event);
        let index = self.events.len() - 1;
        if let Err(e) = self
            .ledger
            .put_event(index as u64, &self.events[index])
            .await
        {
            warn!(error = %e, "cannot record a spike event");
        }
        index
    }

    /// Takes every rank back to `target`: the committed steps after it are set aside in the
    /// ledger, the curriculum and the step counter rewind to it, `skip` (from step, batches)
    /// is drawn without training when the replay gets there, and a new world loads the
    /// checkpoint.
    async fn rollback(
        &mut self,
        target: v1::CheckpointRecord,
        event: v1::SpikeEvent,
        skip: Option<(u64, u64)>,
    ) {
        warn!(to = %target.path, step = target.step, detected_at = event.detected_at, ?skip, "rolling back");
        let automatic = event.action() == v1::SpikeAction::Rollback;
        let event_index = self.record_event(event).await;
        if let Some(d) = self.detector.as_mut() {
            // Only the detector's own rollbacks count towards its limit.
            if automatic {
                d.rolled_back(self.step);
            }
            d.rewind(target.step);
        }
        // Checkpoints after the target belong to the abandoned lineage.
        let later: Vec<v1::CheckpointRecord> = self
            .index
            .iter()
            .filter(|r| r.step > target.step)
            .cloned()
            .collect();
        for r in later {
            self.index.retain(|x| x.path != r.path);
            if let Err(e) = self.ledger.delete_checkpoint(r.step).await {
                warn!(error = %e, "cannot remove a checkpoint from the index");
            }
            self.abandoned.push(r.path);
        }
        if !self.rewind_to(&target, event_index as u64).await {
            return;
        }
        self.skip = skip.map(|(at, batches)| PendingSkip {
            at,
            batches,
            event: event_index,
        });
        let reason = format!("rolling back to {} (step {})", target.path, target.step);
        self.end_world_for_restore(&reason).await;
    }

    /// Rewinds the ledger, the curriculum and the step counter to the state of `target`.
    async fn rewind_to(&mut self, target: &v1::CheckpointRecord, event: u64) -> bool {
        if let Err(e) = self.ledger.rewind(target.step, event).await {
            self.fail(format!("cannot rewind the ledger: {e}"));
            return false;
        }
        let record = self
            .committed
            .as_ref()
            .map(|c| c.record(self.paused.is_some()));
        let last = v1::LedgerStep {
            step: target.step.saturating_sub(1),
            cursors: target.cursors.clone(),
            stage: target.stage,
            stage_taken: target.stage_taken.clone(),
            ..Default::default()
        };
        // `resume` continues after `last.step`; a checkpoint at step 0 has no step before it.
        let rebuilt = if target.step == 0 {
            Curriculum::new(&self.job, &self.source_tokens)
        } else {
            Curriculum::resume(&self.job, &self.source_tokens, &last, record.as_ref())
        };
        match rebuilt {
            Ok(c) => {
                self.committed = Some(c.clone());
                self.curriculum = Some(c);
            }
            Err(e) => {
                self.fail(format!(
                    "cannot rebuild the curriculum at {}: {e}",
                    target.path
                ));
                return false;
            }
        }
        self.step = target.step;
        self.loss = (!target.loss.is_nan()).then_some(target.loss);
        self.lineage = target.path.clone();
        self.restore = Some(v1::CheckpointRef {
            path: target.path.clone(),
            step: target.step,
            stage: target.stage,
            cursors: target.cursors.clone(),
        });
        // A checkpoint being written belongs to the abandoned lineage: its folder goes too.
        if let Some((id, r)) = self.saving.take() {
            self.discarded.push(id);
            self.abandoned.push(r.path);
        }
        self.save_record().await
    }

    /// Ranks disagree on their state: every one loads the latest checkpoint (or `name`).
    async fn restore_checkpoint(&mut self, name: Option<&str>, why: &str) {
        let target = match self.find_checkpoint(name) {
            Ok(t) => t,
            Err(_) => {
                return self.fail(format!(
                    "{why}, and there is no checkpoint to bring every rank to the same state"
                ))
            }
        };
        warn!(%why, to = %target.path, step = target.step, "restoring a checkpoint on every rank");
        let events = self.events.len() as u64;
        if !self.rewind_to(&target, events).await {
            return;
        }
        self.end_world_for_restore(&format!("{why}; restoring {}", target.path))
            .await;
    }

    /// Ends the current world without committing what is in flight; the next one restores.
    async fn end_world_for_restore(&mut self, reason: &str) {
        if let Some(world) = self.world.as_mut() {
            world.in_flight = None;
            world.eval = None;
        }
        self.end_generation(reason).await;
    }

    /// Draws a rollback's skip range, records it as skipped, and goes on.
    async fn skip_range(&mut self, skip: PendingSkip) -> bool {
        let Some(c) = self.curriculum.as_mut() else {
            return true;
        };
        let samples = c.skip_batches(skip.batches);
        let range = v1::SkippedRange {
            event: skip.event as u64,
            at_step: skip.at,
            samples: refs(&samples),
            batches: skip.batches,
        };
        info!(
            step = skip.at,
            batches = skip.batches,
            samples = samples.len(),
            "skipping the data around the spike"
        );
        if let Err(e) = self.ledger.put_skipped(&range).await {
            self.fail(format!("cannot record the skipped samples: {e}"));
            return false;
        }
        if let Some(m) = &self.metrics {
            m.skipped_samples(samples.len() as u64);
        }
        self.committed = self.curriculum.clone();
        if let Some(e) = self.events.get_mut(skip.event) {
            e.skipped_samples = samples.len() as u64;
            let e = e.clone();
            if let Err(err) = self.ledger.put_event(skip.event as u64, &e).await {
                warn!(error = %err, "cannot update a spike event");
            }
        }
        true
    }

    /// The curriculum, or why there is none yet.
    fn started(&self) -> Result<&Curriculum, DriverError> {
        self.curriculum.as_ref().ok_or_else(|| {
            DriverError::FailedPrecondition(format!(
                "the curriculum starts when the first world is ready ({}); try again then",
                self.detail
            ))
        })
    }

    async fn step_done(&mut self, worker_id: &str, done: v1::StepDone) -> Result<(), DriverError> {
        let rank = self.rank_in(worker_id, done.generation)?;
        let world = self.world.as_mut().expect("checked by rank_in");
        let n = world.members.len();
        let Some((plan, reports)) = world.in_flight.as_mut() else {
            return Err(DriverError::FailedPrecondition(
                "no step is in flight".into(),
            ));
        };
        let step = plan.step;
        if done.step != step {
            return Err(DriverError::FailedPrecondition(format!(
                "report for step {}, but step {step} is in flight",
                done.step
            )));
        }
        let expected = rank_slice(plan.samples.len(), n, rank as usize).len() as u32;
        if done.samples != expected {
            return Err(DriverError::InvalidArgument(format!(
                "rank {rank} reports {} samples for step {step}, it was given {expected}",
                done.samples
            )));
        }
        if !done.loss_sum.is_finite() && !done.skipped {
            return Err(DriverError::InvalidArgument(format!(
                "rank {rank} reports a loss of {} and applied the update anyway",
                done.loss_sum
            )));
        }
        if reports.contains_key(&rank) {
            return Err(DriverError::FailedPrecondition(format!(
                "rank {rank} reported step {step} twice"
            )));
        }
        if let Some(other) = reports.values().next() {
            if other.skipped != done.skipped {
                return Err(DriverError::InvalidArgument(format!(
                    "rank {rank} reports skipped = {} for step {step}, another rank {}; the guard must decide the same everywhere",
                    done.skipped, other.skipped
                )));
            }
        }
        reports.insert(rank, done);
        if reports.len() < n {
            return Ok(());
        }
        let generation = world.generation;
        let (plan, reports) = world.in_flight.take().expect("in flight");
        if self.commit(generation, plan, &reports).await && self.judge(&reports).await {
            self.dispatch().await;
        }
        Ok(())
    }

    /// Commits a step to the ledger with the loss over the reported samples; false (and the job
    /// failed) if the ledger cannot be written.
    async fn commit(
        &mut self,
        generation: u64,
        plan: StepPlan,
        reports: &BTreeMap<u32, v1::StepDone>,
    ) -> bool {
        let reported: u32 = reports.values().map(|r| r.samples).sum();
        let loss = reports.values().map(|r| r.loss_sum).sum::<f64>() / f64::from(reported.max(1));
        let grad_norm = reports.values().next().map_or(0.0, |r| r.grad_norm);
        let skipped = reports.values().any(|r| r.skipped);
        let c = self
            .curriculum
            .as_ref()
            .expect("a curriculum while running");
        let entry = v1::LedgerStep {
            step: plan.step,
            samples: refs(&plan.samples),
            cursors: c.cursors().to_vec(),
            loss,
            generation,
            stage: plan.stage.index,
            seq_len: plan.stage.seq_len,
            stage_taken: c.taken().to_vec(),
            grad_norm,
            lr: plan.lr,
            skipped,
        };
        if let Err(e) = self.ledger.commit(&entry).await {
            self.fail(format!("cannot write the ledger: {e}"));
            return false;
        }
        if let Some(m) = &self.metrics {
            m.step_committed(&self.job, &plan.samples, plan.stage.seq_len);
        }
        self.committed = Some(c.clone());
        self.step = plan.step + 1;
        self.loss = Some(loss);
        self.rate.tick();
        if self.step.is_multiple_of(self.job.log_every.max(1)) || self.step == self.job.total_steps
        {
            info!(step = self.step, loss, stage = %plan.stage_name, lr = plan.lr, generation, "step committed");
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
                restore: self.restore.clone(),
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
            eval: None,
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
        if let Some((plan, reports)) = world.in_flight.take() {
            if !reports.is_empty() {
                warn!(
                    step = plan.step,
                    reported = reports.len(),
                    "committing the step in flight: a rank finished it"
                );
                if !self.commit(world.generation, plan, &reports).await {
                    return;
                }
            }
        }
        if world.eval.take().is_some() {
            warn!("the evaluation in flight is abandoned; it runs again in the next world");
        }
        // Rank 0 may be gone: a checkpoint it has not confirmed no longer blocks the next one.
        if let Some(pending) = self.saving.take() {
            self.late_saves.push(pending);
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
        self.curriculum = self.committed.clone();
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
        let c = self.committed.as_ref();
        let stage = c.map_or(&self.job.stages[0], |c| c.current_spec());
        let snapshot = Snapshot {
            state: self.state.into(),
            generation: self.generation,
            step: self.step,
            total_steps: self.job.total_steps,
            loss: self.loss,
            workers_alive: self.members.len() as u32,
            world_size: self.world.as_ref().map_or(0, |w| w.members.len() as u32),
            detail: self.detail.clone(),
            stage: stage.name.clone(),
            stage_index: c.map_or(0, |c| c.current() as u32),
            stages: self.job.stages.len() as u32,
            tokens: self.step * self.job.global_batch_tokens,
            total_tokens: self.job.total_steps * self.job.global_batch_tokens,
            next_transition: c.map_or_else(
                || {
                    self.job
                        .stages
                        .get(1)
                        .map(|s| (s.name.clone(), self.job.stages[0].until_step))
                },
                |c| c.next_transition(),
            ),
            seq_len: stage.seq_len,
            rope_theta: stage.rope_theta,
            lr: self.lr,
            steps_per_second: self.rate.per_second(),
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn refs(samples: &[SampleId]) -> Vec<v1::SampleRef> {
    samples
        .iter()
        .map(|s| v1::SampleRef {
            source: s.source as u32,
            index: s.index,
        })
        .collect()
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
