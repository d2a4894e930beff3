//! Control requests: what an operator asks of the job through the control API.

use stagecoach_core::curriculum::{aligned_weights, stage_index, Curriculum};
use stagecoach_proto::v1;
use tracing::info;

use super::{now_ms, ControlReply, ControlRequest, Driver, Error};

impl Driver {
    /// A control request, and, when it changed the job, its entry in the audit trail (an event
    /// with the caller's identity; a rollback has its own event).
    pub(super) async fn control(&mut self, request: ControlRequest) -> Result<ControlReply, Error> {
        let audit = audit_entry(&request);
        let reply = self.handle_control(request).await?;
        if let Some((who, what)) = audit {
            let detail = match &reply {
                ControlReply::StageChanged(r) => {
                    format!("{what}: {} → {} at step {}", r.from, r.to, r.effective_step)
                }
                ControlReply::Paused(r) => format!("{what} after step {}", r.step),
                ControlReply::Resumed(r) => format!("{what} at step {}", r.step),
                _ => what,
            };
            let event = v1::SpikeEvent {
                detected_at: self.step,
                action: v1::SpikeAction::Control.into(),
                requested_by: who,
                unix_ms: now_ms(),
                detail: crate::error::clip(&detail, 500),
                ..Default::default()
            };
            self.record_event(event).await;
        }
        Ok(reply)
    }

    async fn handle_control(&mut self, request: ControlRequest) -> Result<ControlReply, Error> {
        let read_only = matches!(
            request,
            ControlRequest::ListStages
                | ControlRequest::ListCheckpoints
                | ControlRequest::ListEvents
        );
        if matches!(self.state, v1::JobState::Finished | v1::JobState::Failed) && !read_only {
            return Err(Error::FailedPrecondition(format!(
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
                        stages: stagecoach_core::curriculum::planned_stages(&self.job),
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
                if stage.as_deref().is_some_and(|s| s.trim().is_empty()) {
                    return Err(Error::InvalidArgument(
                        "an empty stage name; name the stage to move to, or ask for the next one"
                            .into(),
                    ));
                }
                // Before the start, a name the job does not have is refused as such (after
                // it, the curriculum's own check says the same).
                if let (None, Some(name)) = (&self.curriculum, stage.as_deref()) {
                    stage_index(&self.job, name)?;
                }
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
                // Before the start, a stage or a mixture that cannot be is refused as such
                // (after it, `check_mix` says the same).
                if self.curriculum.is_none() {
                    stage_index(&self.job, &stage)?;
                    aligned_weights(&self.job, &weights)?;
                }
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
                    if let (Some(d), Some(step)) = (self.detector.as_mut(), effective) {
                        d.level_changed(step);
                    }
                }
                info!(%stage, ?weights, by = %requested_by, "mixture changed");
                if !self.save_record().await {
                    return Err(Error::FailedPrecondition(self.detail.clone()));
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
                        return Err(Error::FailedPrecondition(self.detail.clone()));
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
                    return Err(Error::FailedPrecondition("the job is not paused".into()));
                }
                info!(by = %requested_by, step = self.step, "resumed");
                let held = self.held;
                self.release();
                if self.state == v1::JobState::Paused {
                    self.state = if self.world.as_ref().is_some_and(|w| w.running) {
                        v1::JobState::Running
                    } else {
                        v1::JobState::Waiting
                    };
                    self.detail.clear();
                }
                self.rate.clear();
                if !self.save_record().await {
                    return Err(Error::FailedPrecondition(self.detail.clone()));
                }
                if held {
                    self.maybe_form_world();
                }
                self.dispatch().await;
                ControlReply::Resumed(v1::ResumeResponse { step: self.step })
            }
            ControlRequest::CheckpointNow { requested_by } => {
                if self.checkpoints.is_none() {
                    return Err(Error::FailedPrecondition(
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
                    return Err(Error::FailedPrecondition(
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

    /// The curriculum, or why there is none yet.
    pub(super) fn started(&self) -> Result<&Curriculum, Error> {
        self.curriculum.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the curriculum starts when the first world is ready ({}); try again then",
                self.detail
            ))
        })
    }
}

/// Who asked and what, for the audit trail of a request that changes the job.
fn audit_entry(request: &ControlRequest) -> Option<(String, String)> {
    let (who, what) = match request {
        ControlRequest::ChangeStage {
            stage,
            requested_by,
        } => (
            requested_by,
            match stage {
                Some(s) => format!("stage set {s}"),
                None => "stage next".to_owned(),
            },
        ),
        ControlRequest::SetMix {
            stage,
            weights,
            requested_by,
        } => {
            let w: Vec<String> = weights.iter().map(|(s, w)| format!("{s}={w}")).collect();
            (requested_by, format!("mix set {stage} {}", w.join(" ")))
        }
        ControlRequest::Pause { requested_by } => (requested_by, "pause".to_owned()),
        ControlRequest::Resume { requested_by } => (requested_by, "resume".to_owned()),
        ControlRequest::Evaluate { requested_by } => (requested_by, "evaluation".to_owned()),
        ControlRequest::CheckpointNow { requested_by } => (requested_by, "checkpoint".to_owned()),
        ControlRequest::ListStages
        | ControlRequest::ListCheckpoints
        | ControlRequest::ListEvents
        | ControlRequest::Rollback { .. } => return None,
    };
    Some((who.clone(), what))
}
