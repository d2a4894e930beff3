//! Checkpoints: when one is due, asking rank 0 for it, its report, and the index.

use stagecoach_proto::v1;
use tracing::{info, warn};

use super::{now_ms, send, Driver, DriverError};

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

    /// Asks rank 0 for a checkpoint of the state after the committed steps (it copies the state
    /// off before the next step's work, then writes in the background).
    pub(super) fn start_checkpoint(&mut self) {
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
        send(
            &self.members,
            &world.members[0],
            v1::coordinator_message::Kind::SaveCheckpoint(save),
        );
        self.saving = Some((id, record));
    }

    pub(super) async fn checkpoint_saved(
        &mut self,
        saved: v1::CheckpointSaved,
    ) -> Result<(), DriverError> {
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
        let gone = stagecoach_core::retention::to_delete(&self.index, keep);
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
    pub(super) fn find_checkpoint(
        &self,
        name: Option<&str>,
    ) -> Result<v1::CheckpointRecord, DriverError> {
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
}
