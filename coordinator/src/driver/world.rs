//! World formation: a new generation from the attached workers, their `Ready` answers, the
//! start of training in that world, and the end of a generation.

use std::collections::BTreeMap;
use std::time::Duration;

use stagecoach_core::curriculum::{Curriculum, StepPlan};
use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::{info, warn};

use super::eval::EvalInFlight;
use super::membership::NCCL_ID_BYTES;
use super::step::{Reports, Routes};
use super::{send, Driver, Error, Resume};

pub(super) struct World {
    pub(super) generation: u64,
    pub(super) members: Vec<String>,
    /// Each member's rank, by worker id.
    pub(super) ranks: foldhash::HashMap<String, u32>,
    /// Each member's `Ready`, by worker id.
    pub(super) ready: BTreeMap<String, v1::Ready>,
    pub(super) running: bool,
    /// The step in flight: its plan and the reports received so far (by rank).
    pub(super) in_flight: Option<(StepPlan, Reports)>,
    /// The evaluation in flight.
    pub(super) eval: Option<EvalInFlight>,
    /// When the step (or evaluation) in flight was sent: the step timeout counts from it.
    pub(super) dispatched_at: Option<Instant>,
    /// The ranks are taking one rank's state (`SyncState`); their next `Ready` follows it.
    pub(super) syncing: bool,
    /// How a step's Work reaches the ranks, kept from step to step.
    pub(super) routes: Option<Routes>,
}

/// "forming a world" is logged for the first `FORM_LOG_BURST` worlds of each `FORM_LOG_EVERY`;
/// the others are counted in the next line.
const FORM_LOG_EVERY: Duration = Duration::from_secs(60);
const FORM_LOG_BURST: u32 = 5;

impl Driver {
    /// Whether a message about `generation` comes too late: that generation has ended (a
    /// newer one exists, or none runs now). Such messages are dropped without an error, so a
    /// worker that finishes a step or fails just as its generation ends keeps its session.
    pub(super) fn ended(&self, generation: u64) -> bool {
        match &self.world {
            Some(w) => generation < w.generation,
            None => generation <= self.generation,
        }
    }

    /// The rank of `worker_id` in the current world of `generation`, or why there is none.
    pub(super) fn rank_in(&self, worker_id: &str, generation: u64) -> Result<u32, Error> {
        let world = self
            .world
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("no world is formed".into()))?;
        if world.generation != generation {
            return Err(Error::FailedPrecondition(format!(
                "message for generation {generation}, but the current generation is {}",
                world.generation
            )));
        }
        world.ranks.get(worker_id).copied().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "worker {worker_id} is not in generation {generation}"
            ))
        })
    }

    pub(super) async fn ready(&mut self, worker_id: &str, ready: v1::Ready) -> Result<(), Error> {
        self.rank_in(worker_id, ready.generation)?;
        if ready.sources.len() != self.job.sources.len() {
            return Err(Error::InvalidArgument(format!(
                "ready with {} source sizes, the job has {} sources",
                ready.sources.len(),
                self.job.sources.len()
            )));
        }
        if let Some(last) = &ready.last_step {
            if !(last.global_loss.is_finite() || last.skipped) || last.grad_norm < 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "ready with a last step of loss {} and grad norm {}",
                    last.global_loss, last.grad_norm
                )));
            }
        }
        let world = self.world.as_ref().expect("checked by rank_in");
        if world.running {
            return Err(Error::FailedPrecondition(format!(
                "generation {} is already running",
                world.generation
            )));
        }
        let member = self.members.get_mut(worker_id).expect("checked by rank_in");
        if member.backend == v1::CollectiveBackend::Nccl {
            if ready.next_nccl_unique_id.len() != NCCL_ID_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "an NCCL worker's Ready must carry a fresh {NCCL_ID_BYTES}-byte unique id"
                )));
            }
            member.nccl_id = ready.next_nccl_unique_id.clone();
        }
        let world = self.world.as_mut().expect("checked by rank_in");
        world.ready.insert(worker_id.to_owned(), ready);
        if world.ready.len() == world.members.len() {
            world.syncing = false;
            self.start_world().await;
        }
        Ok(())
    }

    /// Everyone is ready: check they see the same data, build the curriculum, bring every
    /// rank to the committed state (`sync.rs`), then dispatch the first step.
    pub(super) async fn start_world(&mut self) {
        let world = self.world.as_ref().expect("a world");
        let (first_id, first) = world.ready.iter().next().expect("members");
        let first = first.clone();
        let first_id = first_id.clone();
        for (id, r) in &world.ready {
            if r.sources != first.sources {
                let msg = format!(
                    "workers see different data: {id} reports {:?}, {first_id} {:?}; every worker must read the same shard folders",
                    r.sources, first.sources
                );
                let id = id.clone();
                return self.failed(&id, v1::FailureKind::Config, msg, None).await;
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
                Err(e) => {
                    let msg = format!("the curriculum cannot start on this data: {e}");
                    return self
                        .failed(&first_id, v1::FailureKind::Config, msg, None)
                        .await;
                }
            }
        }
        if !self.agree().await {
            return;
        }
        self.restore = None;
        let world = self.world.as_mut().expect("a world");
        world.running = true;
        self.state = v1::JobState::Running;
        self.detail.clear();
        self.last_end = None;
        self.rate.clear();
        info!(
            generation = world.generation,
            world_size = world.members.len(),
            step = self.step,
            "world running"
        );
        self.dispatch().await;
    }

    pub(super) fn maybe_form_world(&mut self) {
        if self.world.is_some()
            || self.held
            || matches!(self.state, v1::JobState::Finished | v1::JobState::Failed)
        {
            return;
        }
        if let Some(at) = self.not_before {
            if Instant::now() < at {
                self.detail = self.with_last_end(format!(
                    "waiting {:.1} s before the next world",
                    at.saturating_duration_since(Instant::now()).as_secs_f64()
                ));
                return;
            }
            self.not_before = None;
        }
        let present = self.roster.attached as u32;
        if present < self.settings.min {
            self.forming_since = None;
            self.detail = self.with_last_end(format!(
                "waiting for workers: {present} of {} present",
                self.settings.min
            ));
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
        let members: Vec<String> = self
            .order
            .iter()
            .filter(|id| self.members[*id].outbox.is_some())
            .take(self.settings.max as usize)
            .cloned()
            .collect();
        self.generation += 1;
        // NCCL: rank 0's unused unique id, for every rank; it is spent on this world (the next
        // Ready brings a fresh one).
        let nccl_id =
            std::mem::take(&mut self.members.get_mut(&members[0]).expect("a member").nccl_id);
        self.log_forming(members.len());
        if let Some(m) = &self.metrics {
            m.generation_formed();
        }
        // Each rank learns only its ring neighbour: a World the same size at any world size,
        // where a list of every peer would make the generation's messages O(N²).
        let n = members.len();
        for (rank, id) in members.iter().enumerate() {
            let world = v1::World {
                generation: self.generation,
                rank: rank as u32,
                world_size: n as u32,
                nccl_unique_id: nccl_id.clone(),
                start_step: self.step,
                restore: self.restore.clone(),
                next_peer: self.members[&members[(rank + 1) % n]].address.clone(),
            };
            send(
                &self.members,
                id,
                v1::coordinator_message::Kind::World(world),
            );
        }
        let ranks = members
            .iter()
            .enumerate()
            .map(|(r, id)| (id.clone(), r as u32))
            .collect();
        self.world = Some(World {
            generation: self.generation,
            members,
            ranks,
            ready: BTreeMap::new(),
            running: false,
            in_flight: None,
            eval: None,
            dispatched_at: None,
            syncing: false,
            routes: None,
        });
    }

    /// "forming a world": the first [`FORM_LOG_BURST`] of every [`FORM_LOG_EVERY`], then one
    /// line a window saying how many formed without a line, so churn cannot flood the log.
    fn log_forming(&mut self, world_size: usize) {
        let (window, logged, skipped) = &mut self.form_log;
        if window.is_none_or(|t| t.elapsed() >= FORM_LOG_EVERY) {
            *window = Some(Instant::now());
            *logged = 0;
        }
        if *logged >= FORM_LOG_BURST {
            *skipped += 1;
            return;
        }
        *logged += 1;
        info!(
            generation = self.generation,
            world_size,
            formed_without_a_line = *skipped,
            "forming a world"
        );
        *skipped = 0;
    }

    /// Ends the current generation: survivors leave their collective, the step in flight is
    /// committed if any rank finished it (a finished step means its all-reduce completed, so
    /// every rank applied the same update) or else rewound, and a new world forms if enough
    /// workers remain.
    pub(super) async fn end_generation(&mut self, reason: &str) {
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
                detail: crate::error::clip(reason, 2000),
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

    pub(super) fn with_last_end(&self, waiting: String) -> String {
        match &self.last_end {
            Some(end) => format!("{end}; {waiting}"),
            None => waiting,
        }
    }
}
