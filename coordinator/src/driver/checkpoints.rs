//! Checkpoints: when one is due (every N steps, on demand, at every stage's end and at the
//! job's end), asking rank 0 for it, its report, the index, and what to restore when one
//! cannot be loaded. The job's initial state (step 0: the seeded initialisation or
//! `[model] from`, a fresh optimizer) counts as a checkpoint that is always there.

use stagecoach_proto::v1;
use tracing::{info, warn};

use super::persist::Write;
use super::sync::shown_checkpoint;
use super::{now_ms, send, Driver, Error};
use crate::error::clip;

/// A checkpoint asked of a rank and not confirmed yet.
#[derive(Debug, Clone)]
pub(super) struct Saving {
    pub(super) id: u64,
    pub(super) record: v1::CheckpointRecord,
    /// The worker asked to write it, and its collective address: only its report counts (the
    /// same process registered again under a new id keeps its address).
    pub(super) worker: String,
    pub(super) address: String,
}

/// Attempts at writing the checkpoint of one step (a stage's end, the job's end) before the job
/// goes on without it.
const BOUNDARY_ATTEMPTS: u32 = 2;

impl Driver {
    /// Whether a checkpoint should be taken before the next step.
    pub(super) fn checkpoint_due(&self) -> bool {
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

    /// At a stage's end or the job's end: asks for the checkpoint of this step unless the index
    /// has it. True when the caller must wait (for an earlier write to finish first, or, at the
    /// job's end, for this one).
    pub(super) fn boundary_checkpoint(&mut self, finished: bool, stage: &str) -> bool {
        if self.checkpoints.is_none() || self.step == 0 {
            return false;
        }
        if self.index.iter().any(|r| r.step == self.step) {
            return false;
        }
        if self.boundary_failures.0 == self.step && self.boundary_failures.1 >= BOUNDARY_ATTEMPTS {
            return false;
        }
        if let Some(s) = &self.saving {
            // This step's checkpoint is being written (wait for it only at the end), or an
            // earlier one is (wait, then ask for this one).
            return s.record.step != self.step || finished;
        }
        let trigger = if finished {
            "end of the job".to_owned()
        } else {
            format!("end of stage {stage}")
        };
        self.start_checkpoint(Some(trigger));
        finished
    }

    /// Asks rank 0 for a checkpoint of the state after the committed steps (it copies the state
    /// off before the next step's work, then writes in the background).
    pub(super) fn start_checkpoint(&mut self, trigger: Option<String>) {
        let (Some(cfg), Some(world), Some(c)) = (
            &self.checkpoints,
            self.world.as_ref(),
            self.committed.as_ref(),
        ) else {
            return;
        };
        let trigger = match (trigger, self.checkpoint_wanted.take()) {
            (Some(t), Some(who)) => format!("{t}, on demand ({who})"),
            (Some(t), None) => t,
            (None, Some(who)) => format!("on demand ({who})"),
            (None, None) => format!("every {} steps", cfg.every_steps),
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
            state_digest: self.digest.unwrap_or(0),
            ..Default::default()
        };
        let mut with_new = self.index.clone();
        with_new.push(record.clone());
        let mut delete = stagecoach_core::retention::to_delete(&with_new, cfg.keep);
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
        let worker = world.members[0].clone();
        let address = self
            .members
            .get(&worker)
            .map(|m| m.address.clone())
            .unwrap_or_default();
        send(
            &self.members,
            &worker,
            v1::coordinator_message::Kind::SaveCheckpoint(save),
        );
        self.saving = Some(Saving {
            id,
            record,
            worker,
            address,
        });
    }

    pub(super) async fn checkpoint_saved(
        &mut self,
        worker_id: &str,
        saved: v1::CheckpointSaved,
    ) -> Result<(), Error> {
        let address = self.members.get(worker_id).map(|m| m.address.as_str());
        let asked_of = |s: &Saving| {
            s.id == saved.id
                && (s.worker == worker_id
                    || (!s.address.is_empty() && address == Some(s.address.as_str())))
        };
        let saving = if self.saving.as_ref().is_some_and(asked_of) {
            self.saving.take().expect("checked")
        } else if self.discarded.contains(&saved.id) {
            return Ok(());
        } else if let Some(i) = self.late_saves.iter().position(asked_of) {
            // Asked for in a generation that has ended since; the write finished anyway.
            self.late_saves.swap_remove(i)
        } else {
            return Err(Error::FailedPrecondition(format!(
                "checkpoint {} was not asked of worker {worker_id}",
                saved.id
            )));
        };
        let mut record = saving.record;
        if !saved.error.is_empty() {
            warn!(path = %record.path, error = %clip(&saved.error, 500), "checkpoint failed; the earlier ones are intact");
            if let Some(m) = &self.metrics {
                m.checkpoint_failed();
            }
            let (step, n) = self.boundary_failures;
            self.boundary_failures = (record.step, if step == record.step { n + 1 } else { 1 });
            self.dispatch().await;
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
        if !self.persist(Write::PutCheckpoint(record)).await {
            return Ok(());
        }
        // The worker deleted these folders once the new one was in place.
        let gone = stagecoach_core::retention::to_delete(&self.index, keep);
        for path in gone {
            if let Some(r) = self.index.iter().find(|r| r.path == path).cloned() {
                self.index.retain(|x| x.path != path);
                if !self.persist(Write::DeleteCheckpoint(r.step)).await {
                    return Ok(());
                }
            }
        }
        // A stage's end or the job's end may have been waiting for this write.
        self.dispatch().await;
        Ok(())
    }

    /// The checkpoint `name` (a path or a step; step 0 is the job's initial state when no
    /// checkpoint holds it), or the latest known-good loadable one at or before the committed
    /// step. For a person's rollback: without a name it never picks the initial state.
    pub(super) fn find_checkpoint(
        &self,
        name: Option<&str>,
    ) -> Result<v1::CheckpointRecord, Error> {
        let Some(n) = name else {
            let good = self.latest_good(self.step);
            if good.path.is_empty() {
                return Err(Error::NotFound(
                    "no known-good checkpoint to roll back to (`stagecoach rollback 0` goes back to the job's initial state)".into(),
                ));
            }
            return Ok(good);
        };
        let found = self
            .index
            .iter()
            .find(|r| r.path == n || n.parse::<u64>().is_ok_and(|s| s == r.step));
        match found {
            Some(r) if !r.unloadable.is_empty() => Err(Error::FailedPrecondition(format!(
                "checkpoint {} cannot be loaded ({}); choose another (`stagecoach checkpoints`)",
                r.path, r.unloadable
            ))),
            Some(r) => Ok(r.clone()),
            None if n.parse::<u64>() == Ok(0) => Ok(self.initial_state()),
            None => {
                let known: Vec<String> = self
                    .index
                    .iter()
                    .map(|r| format!("{} (step {})", r.path, r.step))
                    .collect();
                Err(Error::NotFound(format!(
                    "no checkpoint {:?} in the index; the checkpoints are: {} (0: the initial state)",
                    clip(n, 200),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        clip(&known.join(", "), 600)
                    }
                )))
            }
        }
    }

    /// The latest known-good, loadable checkpoint at or before step `limit`; the job's initial
    /// state when there is none.
    pub(super) fn latest_good(&self, limit: u64) -> v1::CheckpointRecord {
        self.index
            .iter()
            .rev()
            .find(|r| r.known_good && r.unloadable.is_empty() && r.step <= limit)
            .cloned()
            .unwrap_or_else(|| self.initial_state())
    }

    /// The job's initial state as a checkpoint record: step 0, the empty path.
    pub(super) fn initial_state(&self) -> v1::CheckpointRecord {
        v1::CheckpointRecord {
            step: 0,
            known_good: true,
            loss: f64::NAN,
            trigger: "the initial state".into(),
            cursors: vec![0; self.job.sources.len()],
            ..Default::default()
        }
    }

    /// A worker could not load checkpoint `path`: it is marked unloadable (kept in the index,
    /// never restored again) and every rank goes back to the previous loadable known-good one.
    pub(super) async fn checkpoint_unloadable(&mut self, path: &str, why: &str) {
        warn!(%path, %why, "a checkpoint cannot be loaded; falling back to the one before");
        let Some(r) = self.index.iter_mut().find(|r| r.path == path) else {
            // The initial state itself cannot be made (the model folder is gone, say): that
            // is the job's configuration, not a checkpoint to fall back from.
            let why = format!("the initial state cannot be built: {why}");
            return Box::pin(self.failed("", v1::FailureKind::Config, why, None)).await;
        };
        r.unloadable = clip(why, 500);
        let record = r.clone();
        if !self.persist(Write::PutCheckpoint(record.clone())).await {
            return;
        }
        let target = self.latest_good(record.step);
        let event = v1::SpikeEvent {
            detected_at: self.step,
            first_step: record.step,
            action: v1::SpikeAction::CheckpointFallback.into(),
            rolled_back_to: target.path.clone(),
            resumed_at_step: target.step,
            requested_by: "coordinator".into(),
            unix_ms: now_ms(),
            detail: clip(
                &format!(
                    "{path} cannot be loaded ({why}); restoring {} of step {}",
                    shown_checkpoint(&target.path),
                    target.step
                ),
                2000,
            ),
            ..Default::default()
        };
        let index = self.record_event(event).await;
        // The skip a rollback to `path` was to draw belongs to the steps after `path`; a target
        // further back replays those steps first, and the skip still happens at its step.
        if !self.rewind_to(&target, index as u64).await {
            return;
        }
        self.end_world_for_restore(&format!(
            "{} cannot be loaded; restoring {}",
            path,
            shown_checkpoint(&target.path)
        ))
        .await;
    }
}
