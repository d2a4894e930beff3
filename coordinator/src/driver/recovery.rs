//! Recovery: the spike detector's verdict on each committed step, rollbacks to a checkpoint,
//! bringing every rank to one checkpoint when they disagree, and the skip range after a spike.

use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spike::Verdict;
use stagecoach_proto::v1;
use tracing::{info, warn};

use super::persist::Write;
use super::step::Reports;
use super::sync::shown_checkpoint;
use super::{now_ms, refs, Driver};

/// A skip range waiting for the replay to reach it: at step `at`, draw `batches` global
/// batches without training them (for event `event`).
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingSkip {
    pub(super) at: u64,
    pub(super) batches: u64,
    pub(super) event: usize,
}

impl Driver {
    /// Feeds a committed step to the spike detector and acts on its verdict; false if the job
    /// must not dispatch on (a rollback or a pause took over).
    pub(super) async fn judge(&mut self, reports: &Reports) -> bool {
        let Some(d) = self.detector.as_mut() else {
            return true;
        };
        let step = self.step - 1;
        let first = reports.first();
        let loss = first.map_or(f64::NAN, |r| r.global_loss);
        let loss = if loss == 0.0 {
            self.loss.unwrap_or(f64::NAN)
        } else {
            loss
        };
        let grad_norm = first.map_or(0.0, |r| r.grad_norm);
        let skipped = reports.skipped;
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
                // A spike rolls back to a real checkpoint (the initial state is for restoring
                // a world nobody holds the state of, not worth a spike's rollback: it pauses).
                let good = |limit: u64| {
                    self.index
                        .iter()
                        .rev()
                        .find(|r| r.known_good && r.unloadable.is_empty() && r.step <= limit)
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
                let range = cfg.skip_range(first_step, step);
                let (from, to) = ((*range.start()).max(target.step), *range.end());
                let batches = to.saturating_sub(from).saturating_add(1);
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
                    skipped_steps: batches,
                    lr_factor: cfg.lr_factor,
                    lr_steps: cfg.lr_steps,
                    requested_by: "coordinator".into(),
                    unix_ms: now_ms(),
                    ..Default::default()
                };
                let lr = (cfg.lr_factor != 1.0 && cfg.lr_steps > 0)
                    .then_some((cfg.lr_factor, from.saturating_add(cfg.lr_steps)));
                self.rollback(target, event, Some((from, batches))).await;
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

    pub(super) async fn pause_for(
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

    pub(super) async fn record_event(&mut self, event: v1::SpikeEvent) -> usize {
        if let Some(m) = &self.metrics {
            m.spike(event.action());
        }
        self.events.push(event);
        let index = self.events.len() - 1;
        let event = self.events[index].clone();
        self.persist(Write::PutEvent(index as u64, event)).await;
        index
    }

    /// Takes every rank back to `target`: the committed steps after it are set aside in the
    /// ledger, the curriculum and the step counter rewind to it, `skip` (from step, batches)
    /// is drawn without training when the replay gets there, and a new world loads the
    /// checkpoint.
    pub(super) async fn rollback(
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
            if !self.persist(Write::DeleteCheckpoint(r.step)).await {
                return;
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
        let reason = format!(
            "rolling back to {} (step {})",
            shown_checkpoint(&target.path),
            target.step
        );
        self.end_world_for_restore(&reason).await;
    }

    /// Rewinds the ledger, the curriculum and the step counter to the state of `target`.
    pub(super) async fn rewind_to(&mut self, target: &v1::CheckpointRecord, event: u64) -> bool {
        let rewind = Write::Rewind {
            to_step: target.step,
            event,
        };
        if !self.persist(rewind).await {
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
                    shown_checkpoint(&target.path)
                ));
                return false;
            }
        }
        self.step = target.step;
        self.digest = (target.state_digest != 0).then_some(target.state_digest);
        self.loss = (!target.loss.is_nan()).then_some(target.loss);
        self.lineage = target.path.clone();
        self.restore = Some(v1::CheckpointRef {
            path: target.path.clone(),
            step: target.step,
            stage: target.stage,
            cursors: target.cursors.clone(),
        });
        // A checkpoint being written belongs to the abandoned lineage: its folder goes too.
        if let Some(s) = self.saving.take() {
            self.discarded.push(s.id);
            self.abandoned.push(s.record.path);
        }
        self.save_record().await
    }

    /// Nobody holds the committed state: every rank loads the latest loadable known-good
    /// checkpoint at or before it (the initial state when there is none).
    pub(super) async fn restore_latest(&mut self, why: &str) {
        let target = self.latest_good(self.step);
        let shown = shown_checkpoint(&target.path);
        warn!(%why, to = %shown, step = target.step, "restoring a checkpoint on every rank");
        let events = self.events.len() as u64;
        if !self.rewind_to(&target, events).await {
            return;
        }
        if let Some(m) = &self.metrics {
            m.restore();
        }
        self.end_world_for_restore(&format!("{why}; restoring {shown} (step {})", target.step))
            .await;
    }

    /// Ends the current world without committing what is in flight; the next one restores.
    pub(super) async fn end_world_for_restore(&mut self, reason: &str) {
        if let Some(world) = self.world.as_mut() {
            world.in_flight = None;
            world.eval = None;
        }
        self.end_generation(reason).await;
    }

    /// Draws a rollback's skip range, records it as skipped, and goes on.
    pub(super) async fn skip_range(&mut self, skip: PendingSkip) -> bool {
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
        if !self.persist(Write::PutSkipped(range)).await {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.skipped_samples(samples.len() as u64);
        }
        self.committed = self.curriculum.clone();
        if let Some(e) = self.events.get_mut(skip.event) {
            e.skipped_samples = samples.len() as u64;
            let e = e.clone();
            if !self.persist(Write::PutEvent(skip.event as u64, e)).await {
                return false;
            }
        }
        true
    }
}
