//! The job driver: one task that owns the job's state (membership, the current world, the
//! sample plan, the step in flight, evaluations, checkpoints, spike verdicts and rollbacks) and
//! reacts to events from worker sessions, the control API and its clock.
//!
//! **Invariant: one task owns all job state.** Everything below is `&mut self` of one
//! [`Driver`], run by one task ([`Driver::run`]). gRPC handlers only forward [`Event`]s and
//! relay messages, so no lock is held across an `.await` and every decision is made in one
//! place, in order. A submodule is a concern of that one task, not a separate actor:
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the state ([`Driver`]), its construction, the event loop, status publishing, the job's end |
//! | `events.rs` | what the driver is asked ([`Event`], [`ControlRequest`]) and answers |
//! | `membership.rs` | registration, sessions, leases, routing worker messages |
//! | `world.rs` | world formation, `Ready`, the start and end of a generation |
//! | `step.rs` | dispatching the next step, step reports, committing to the ledger |
//! | `eval.rs` | held-out evaluations |
//! | `checkpoints.rs` | when to checkpoint, rank 0's reports, the index |
//! | `recovery.rs` | spike verdicts, rollbacks, restoring a checkpoint, skip ranges |
//! | `control.rs` | requests from the control API |
//! | `failures.rs` | a generation that failed: the failure budget, backoff, pause or fail |
//! | `persist.rs` | every write to the state store, queued in order through outages |
//! | `sync.rs` | bringing ranks to one state: a step the ledger lost, a state sync, a restore |
//! | `history.rs` | what the status page sees beyond the snapshot: the loss history, the workers |
//!
//! Life of a job: workers register and open sessions; when `min` are present a world forms
//! (generation + 1, ranks in registration order, up to `max`) and each member gets `World`;
//! when all answer `Ready` (at the committed step, with per-source sample counts that agree) the
//! plan is built and steps are dispatched: each step's global batch comes from the plan and is cut
//! into one contiguous slice per rank. When every rank reports `StepDone`, the step is committed
//! to the ledger and the next step goes out. A worker whose lease expires (no message for
//! `lease`) ends the generation: the survivors get `Stop` and leave their collective, the
//! uncommitted step is rewound, and a new world forms from whoever is left (if enough are).

mod checkpoints;
mod control;
mod eval;
mod events;
mod failures;
pub mod history;
mod membership;
mod persist;
mod recovery;
mod step;
mod sync;
mod world;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::ledger::sample_refs as refs;
use stagecoach_core::clock::now_ms;
use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::metrics::Throughput;
use stagecoach_core::recovery::{Failures, RecoveryConfig};
use stagecoach_core::retention::CheckpointConfig;
use stagecoach_core::spike::Detector;
use stagecoach_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

pub use events::{ControlReply, ControlRequest, Event, Policy, Resume, Settings};
pub use membership::{Lease, LeaseBook, Outbox};

use crate::Error;

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::status::Snapshot;
use checkpoints::Saving;
use membership::{Members, Roster};
use persist::{Pending, Write};
use recovery::PendingSkip;
use world::World;

/// Why [`Driver::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The event channel closed (the coordinator is shutting down).
    Closed,
    /// Another coordinator leads now: this one's writes are fenced off. It has sent and written
    /// nothing since it noticed; the process must step down.
    Deposed(String),
}

/// The driver's state. Create with [`Driver::new`], run with [`Driver::run`].
pub struct Driver {
    job: v1::JobSpec,
    settings: Settings,
    ledger: Box<dyn Ledger>,
    next_id: u64,
    members: Members,
    /// Indexes over `members`.
    roster: Roster,
    /// The roster version the status page's view was last built from, and when.
    workers_published: std::sync::Mutex<((u64, u64), Option<Instant>)>,
    /// The last event changed nothing the snapshot shows (a heartbeat, a step report that did
    /// not complete its step): publishing is skipped.
    quiet: bool,
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
    /// Committed steps per second over the last few commits.
    rate: Throughput,
    lr: f64,
    /// Tokens per source (from the workers), to rebuild the curriculum at a checkpoint.
    source_tokens: Vec<u64>,
    checkpoints: Option<CheckpointConfig>,
    /// The checkpoint index, by step.
    index: Vec<v1::CheckpointRecord>,
    /// The checkpoint being written: its request id and its record-to-be.
    saving: Option<Saving>,
    /// Checkpoints asked for in generations that ended before rank 0 answered.
    late_saves: Vec<Saving>,
    /// Failed writes of the checkpoint of one step (a stage's end): the step and their count.
    boundary_failures: (u64, u32),
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
    /// The loss history and the workers, for the status page.
    view: watch::Sender<history::View>,
    metrics: Option<Arc<Metrics>>,
    /// The digest of the committed state (the ranks' state after the last committed step);
    /// `None` at step 0 and when the ledger does not know it.
    digest: Option<u64>,
    /// The job's `[recovery]` policy and the failures since the last committed step.
    recovery: RecoveryConfig,
    failures: Failures,
    /// The last failure, for status.
    last_failure: Option<v1::Failure>,
    /// The job stopped trying after failures (paused by them): no world forms until `resume`.
    held: bool,
    /// No world forms before this: the backoff after a failure.
    not_before: Option<Instant>,
    /// Writes the state store has not taken yet (an outage), in order.
    pending: Pending,
    /// Why this driver stopped leading (a fenced write was refused): once set, nothing more is
    /// sent or written, and [`Driver::run`] returns.
    deposed: Option<String>,
    /// Leases, renewed by the session tasks as each message arrives.
    leases: Arc<LeaseBook>,
    /// How long recent steps took from dispatch to commit, for the step timeout.
    step_times: VecDeque<Duration>,
    /// The window of "forming a world" lines: when it began, the lines in it, and the worlds
    /// formed without a line since the last one.
    form_log: (Option<Instant>, u32, u64),
}

impl Driver {
    /// A driver for `job`, picking it up where `resume` says (a new job without one).
    pub fn new(
        job: v1::JobSpec,
        settings: Settings,
        ledger: Box<dyn Ledger>,
        resume: Option<Resume>,
    ) -> Result<(Driver, watch::Receiver<Snapshot>), stagecoach_core::spec::SpecError> {
        stagecoach_core::schedule::Wsd::from_job(&job)?;
        if job.stages.is_empty() {
            return Err(stagecoach_core::spec::SpecError(
                "the job has no stage".into(),
            ));
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
        let digest = resume
            .as_ref()
            .and_then(|r| r.last.as_ref())
            .map(|l| l.state_digest)
            .filter(|d| *d != 0);
        let (snapshot, rx) = watch::channel(Snapshot::default());
        let d = Driver {
            job,
            settings,
            ledger,
            next_id: 1,
            members: Members::default(),
            roster: Roster::default(),
            workers_published: std::sync::Mutex::new(((u64::MAX, 0), None)),
            quiet: false,
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
            rate: Throughput::default(),
            lr: 0.0,
            source_tokens: vec![],
            checkpoints: None,
            index: vec![],
            saving: None,
            late_saves: vec![],
            boundary_failures: (0, 0),
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
            view: watch::Sender::new(history::View::default()),
            metrics: None,
            digest,
            recovery: RecoveryConfig::default(),
            failures: Failures::default(),
            last_failure: None,
            held: false,
            not_before: None,
            pending: Pending::default(),
            deposed: None,
            leases: Arc::new(LeaseBook::default()),
            step_times: VecDeque::new(),
            form_log: (None, 0, 0),
        };
        d.publish();
        Ok((d, rx))
    }

    /// What status queries see, as the driver publishes it.
    pub fn snapshot(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// What the status page sees beyond the snapshot (see [`history`]).
    pub fn view(&self) -> watch::Receiver<history::View> {
        self.view.subscribe()
    }

    /// The lease book the session tasks renew leases in (see [`LeaseBook`]).
    pub fn leases(&self) -> Arc<LeaseBook> {
        self.leases.clone()
    }

    /// Also keeps `metrics` up to date.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Driver {
        metrics.job(&self.job);
        metrics.settings(
            self.settings.min,
            self.checkpoints.as_ref().map_or(0, |c| c.every_steps),
        );
        self.metrics = Some(metrics);
        self.publish();
        self
    }

    /// Checkpoints, spike handling and recovery as `policy` says.
    pub fn with_policy(mut self, policy: Policy) -> Driver {
        self.recovery = policy.recovery;
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
        // Every step committed and the end-of-job checkpoint written: the job finished before
        // this driver (a coordinator restarted, a standby elected after the leader finished).
        if self.job.total_steps > 0
            && self.step >= self.job.total_steps
            && self.index.iter().any(|r| r.step == self.step)
        {
            self.state = v1::JobState::Finished;
            self.detail = format!("finished at step {}", self.step);
        }
        self
    }

    /// Runs until `events` closes. Besides events, a clock ticking every heartbeat drives
    /// leases, the step timeout, the backoff after a failure and the retries of store writes.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) -> RunEnd {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => break,
                },
                _ = tick.tick() => {
                    // A tick much later than due means this task was busy (a slow store
                    // write): judge leases at the next one, when the queue has caught up.
                    let late = last_tick.elapsed() > self.settings.heartbeat * 3;
                    last_tick = Instant::now();
                    if !late {
                        self.check_leases().await;
                    }
                    self.check_step_timeout().await;
                    self.retry_writes().await;
                    self.maybe_form_world();
                }
            }
            if let Some(reason) = self.deposed.take() {
                return RunEnd::Deposed(reason);
            }
            self.reap_undeliverable().await;
            if !std::mem::take(&mut self.quiet) {
                self.publish();
            }
        }
        RunEnd::Closed
    }

    pub(super) async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Register {
                request,
                identity,
                reply,
            } => {
                let r = self.register(request, identity).await;
                let _ = reply.send(r);
            }
            Event::Attach {
                worker_id,
                identity,
                session,
                outbox,
                reply,
            } => {
                let r = match self.members.get_mut(&worker_id) {
                    None => Err(Error::UnknownWorker(crate::error::clip(&worker_id, 80))),
                    Some(m) if m.owner != identity => Err(Error::PermissionDenied(format!(
                        "worker {worker_id} was registered by {}, not {identity}",
                        m.owner
                    ))),
                    Some(m) => {
                        m.session = session;
                        m.lease_until = Instant::now() + self.settings.lease;
                        m.undeliverable
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        self.set_outbox(&worker_id, Some(outbox));
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
            Event::Messages { messages, reply } => {
                let mut answers = Vec::with_capacity(messages.len());
                // The status is published after the batch if any of its messages wanted it.
                let mut loud = false;
                for (worker_id, kind) in messages {
                    answers.push(self.message(&worker_id, kind).await);
                    loud |= !std::mem::take(&mut self.quiet);
                    if self.deposed.is_some() {
                        // Deposed mid-batch: the rest stays unanswered, as the events still
                        // queued do, and the node session ends with the driver.
                        return;
                    }
                }
                self.quiet = !loud;
                let _ = reply.send(answers);
            }
            Event::Detach { worker_id, session } => {
                if self
                    .members
                    .get(&worker_id)
                    .is_some_and(|m| m.session == session)
                {
                    self.set_outbox(&worker_id, None);
                }
            }
            Event::Control { request, reply } => {
                let r = self.control(request).await;
                let _ = reply.send(r);
            }
        }
    }

    /// Writes the curriculum's record; false if the job failed on it.
    pub(super) async fn save_record(&mut self) -> bool {
        let Some(c) = &self.curriculum else {
            return true;
        };
        let record = c.record(self.paused.is_some());
        self.persist(Write::Curriculum(record)).await
    }

    pub(super) fn finish(&mut self) {
        info!(
            step = self.step,
            loss = self.loss.unwrap_or(f64::NAN),
            "job finished"
        );
        self.state = v1::JobState::Finished;
        self.detail = format!("finished at step {}", self.step);
        self.stop_all(v1::StopReason::JobFinished);
    }

    pub(super) fn fail(&mut self, detail: String) {
        warn!(%detail, "job failed");
        self.state = v1::JobState::Failed;
        self.detail = detail;
        self.stop_all(v1::StopReason::JobFailed);
    }

    pub(super) fn stop_all(&mut self, reason: v1::StopReason) {
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

    pub(super) fn publish(&self) {
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
            // An outage under way says more than the last detail, until the job is over: then
            // why it ended does.
            detail: match self.state {
                v1::JobState::Finished | v1::JobState::Failed => None,
                _ => self.pending.describe(),
            }
            .unwrap_or_else(|| self.detail.clone()),
            stage: stage.name.clone(),
            stage_index: c.map_or(0, |c| c.current() as u32),
            stages: self.job.stages.len() as u32,
            tokens: self.step.saturating_mul(self.job.global_batch_tokens),
            total_tokens: self
                .job
                .total_steps
                .saturating_mul(self.job.global_batch_tokens),
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
            steps_per_second: self.rate.rate(),
            last_failure: self.last_failure.clone(),
            pending_writes: self.pending.len() as u32,
        };
        if let Some(m) = &self.metrics {
            m.observe(&snapshot);
        }
        self.publish_workers();
        self.snapshot.send_if_modified(|s| {
            let changed = *s != snapshot;
            *s = snapshot;
            changed
        });
    }
}

/// Queues a message for a member. A member whose outbox is full or closed is marked
/// undeliverable: a message it will never see would leave a step waiting for it, so the
/// driver ends its generation after the event (see `reap_undeliverable`).
fn send(members: &Members, id: &str, kind: v1::coordinator_message::Kind) {
    let Some(member) = members.get(id) else {
        return;
    };
    let Some(outbox) = member.outbox.as_ref() else {
        warn!(worker = %id, "no session to send to");
        undeliverable(members, id);
        return;
    };
    if let Err(e) = outbox.try_send(v1::CoordinatorMessage { kind: Some(kind) }) {
        warn!(worker = %id, error = %e, "cannot queue a message");
        undeliverable(members, id);
    }
}

/// Marks a member undeliverable (see [`send`]).
fn undeliverable(members: &Members, id: &str) {
    if let Some(member) = members.get(id) {
        member
            .undeliverable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        members
            .any_undeliverable
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
