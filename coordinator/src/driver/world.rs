//! World formation: a new generation from the attached workers, their `Ready` answers, the
//! start of training in that world, and the end of a generation.

use std::collections::BTreeMap;

use stagecoach_core::curriculum::Curriculum;
use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::{info, warn};

use super::eval::EvalInFlight;
use super::membership::NCCL_ID_BYTES;
use super::{send, Driver, DriverError, Resume};
use stagecoach_core::curriculum::StepPlan;

pub(super) struct World {
    pub(super) generation: u64,
    pub(super) members: Vec<String>,
    pub(super) ready: BTreeMap<String, v1::Ready>,
    pub(super) running: bool,
    /// The step in flight: its plan and the reports received so far (by rank).
    pub(super) in_flight: Option<(StepPlan, BTreeMap<u32, v1::StepDone>)>,
    /// The evaluation in flight.
    pub(super) eval: Option<EvalInFlight>,
}

impl Driver {
    /// The rank of `worker_id` in the current world of `generation`, or why there is none.
    pub(super) fn rank_in(&self, worker_id: &str, generation: u64) -> Result<u32, DriverError> {
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

    pub(super) async fn ready(
        &mut self,
        worker_id: &str,
        ready: v1::Ready,
    ) -> Result<(), DriverError> {
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
    pub(super) async fn start_world(&mut self) {
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

    pub(super) fn with_last_end(&self, waiting: String) -> String {
        match &self.last_end {
            Some(end) => format!("{end}; {waiting}"),
            None => waiting,
        }
    }
}
