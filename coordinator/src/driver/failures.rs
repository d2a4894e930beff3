//! A generation that failed (a worker's `Failed`, a lost lease, a step that timed out, a
//! message that could not be delivered), and what the job does about it: fall back from a
//! checkpoint that cannot be loaded, back off before the next world, or, once the budget of
//! the step is spent, pause for a person or fail (`stagecoach_core::recovery`). Every failure
//! is in the status (`last_failure`), the log and the failures metric.

use std::time::Duration;

use stagecoach_core::clock::now_ms;
use stagecoach_core::recovery::{class, Decision, Exhausted};
use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::warn;

use super::Driver;
use crate::error::clip;

impl Driver {
    /// A generation failed because of `worker` (`kind`, `reason`; `checkpoint` when it could
    /// not load one). Ends the generation and decides when (or whether) the next one forms.
    pub(super) async fn failed(
        &mut self,
        worker: &str,
        kind: v1::FailureKind,
        reason: String,
        checkpoint: Option<String>,
    ) {
        if matches!(self.state, v1::JobState::Finished | v1::JobState::Failed) {
            return;
        }
        if let Some(m) = &self.metrics {
            m.failure(kind);
        }
        let mut failure = v1::Failure {
            worker: worker.to_owned(),
            kind: kind.into(),
            step: self.step,
            reason: clip(&reason, 2000),
            unix_ms: now_ms(),
            ..Default::default()
        };
        // A checkpoint that cannot be loaded is never tried again: go back to the one before.
        if kind == v1::FailureKind::Checkpoint {
            if let Some(path) =
                checkpoint.filter(|p| self.restore.as_ref().is_some_and(|r| &r.path == p))
            {
                failure.recovery = format!("checkpoint {path} cannot be loaded; falling back");
                self.last_failure = Some(failure);
                self.checkpoint_unloadable(&path, &reason).await;
                return;
            }
        }
        let decision = self.failures.record(&self.recovery, self.step, class(kind));
        failure.attempts = self.failures.attempts();
        match decision {
            Decision::Retry { after, attempt, of } => {
                failure.recovery = format!(
                    "a new world in {:.1} s (failure {attempt} of {of} allowed at step {})",
                    after.as_secs_f64(),
                    self.step
                );
                self.not_before = Some(Instant::now() + after);
                self.last_failure = Some(failure);
                self.end_generation(&reason).await;
            }
            Decision::Exhausted { attempts, then } => {
                let what = format!(
                    "{attempts} failures at step {} ([recovery] allows {} transient and {} deterministic); the last: {reason}",
                    self.step,
                    self.recovery.max_failures,
                    self.recovery.max_deterministic_failures
                );
                let event = v1::SpikeEvent {
                    detected_at: self.step,
                    first_step: self.step,
                    action: match then {
                        Exhausted::Pause => v1::SpikeAction::FailurePause,
                        Exhausted::Fail => v1::SpikeAction::FailureStop,
                    }
                    .into(),
                    requested_by: "coordinator".into(),
                    unix_ms: now_ms(),
                    detail: clip(&what, 2000),
                    ..Default::default()
                };
                self.record_event(event).await;
                match then {
                    Exhausted::Pause => {
                        failure.recovery = "paused: fix the cause, then `stagecoach resume`".into();
                        self.last_failure = Some(failure);
                        // Held first, so the end of this generation forms no other.
                        self.held = true;
                        self.end_generation(&reason).await;
                        self.hold(format!(
                            "paused after {what}; fix the cause, then `stagecoach resume`"
                        ))
                        .await;
                    }
                    Exhausted::Fail => {
                        failure.recovery =
                            "the job failed ([recovery] on_exhausted = \"fail\")".into();
                        self.last_failure = Some(failure);
                        self.fail(format!("stopped after {what}"));
                    }
                }
            }
        }
    }

    /// Pauses the job after failures: no world forms until `resume`.
    async fn hold(&mut self, detail: String) {
        warn!(%detail, "pausing the job");
        self.held = true;
        self.paused = Some("the coordinator (failures)".into());
        self.state = v1::JobState::Paused;
        self.detail = detail;
        let _ = self.save_record().await;
    }

    /// `resume` after failures: a fresh budget, and a world may form at once.
    pub(super) fn release(&mut self) {
        self.held = false;
        self.failures.reset();
        self.not_before = None;
    }

    /// Ends the generation whose step in flight has run past its timeout.
    pub(super) async fn check_step_timeout(&mut self) {
        let Some(world) = self.world.as_ref() else {
            return;
        };
        let Some(started) = world.dispatched_at else {
            return;
        };
        let timeout = self.recovery.step_timeout(self.median_step());
        if started.elapsed() < timeout {
            return;
        }
        let missing: Vec<String> = match &world.in_flight {
            Some((_, reports)) => world
                .members
                .iter()
                .enumerate()
                .filter(|(rank, _)| !reports.contains(*rank as u32))
                .map(|(_, id)| id.clone())
                .collect(),
            None => world.members.clone(),
        };
        let what = if world.eval.is_some() {
            "the evaluation"
        } else {
            "step"
        };
        let reason = format!(
            "{what} {} got no report from {} within {:.0} s ([recovery] step_timeout_ms)",
            self.step,
            missing.join(", "),
            timeout.as_secs_f64()
        );
        if let Some(m) = &self.metrics {
            m.step_timeout();
        }
        let worker = missing.first().cloned().unwrap_or_default();
        self.failed(&worker, v1::FailureKind::Transient, reason, None)
            .await;
    }

    /// The median of the recent step durations (dispatch to commit).
    fn median_step(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.step_times.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }

    /// Records how long a step took, for the step timeout.
    pub(super) fn step_took(&mut self, d: Duration) {
        if self.step_times.len() == 32 {
            self.step_times.pop_front();
        }
        self.step_times.push_back(d);
    }
}
