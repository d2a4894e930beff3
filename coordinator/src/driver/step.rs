//! Stepping: what comes next in a running world, the ranks' step reports, and committing a
//! finished step to the ledger.

use std::collections::BTreeMap;

use stagecoach_core::curriculum::StepPlan;
use stagecoach_core::plan::rank_slice;
use stagecoach_core::spike::Detector;
use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::info;

use super::persist::Write;
use super::{refs, send, Driver, Error};

impl Driver {
    /// What comes next in a running world: nothing while a step, an evaluation or a store write
    /// is pending or the job is paused; else an evaluation (asked for, or at a stage's end), the
    /// checkpoint of a stage's end, a stage change, the next step, or the end of the job.
    pub(super) async fn dispatch(&mut self) {
        let Some(world) = self.world.as_ref() else {
            return;
        };
        if !world.running
            || world.in_flight.is_some()
            || world.eval.is_some()
            || !self.pending.is_empty()
        {
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
        let stage_name = c.current_spec().name.clone();
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
        // Every stage's end and the last step are checkpointed (the state just evaluated), so
        // each can be exported; the job ends once the last one is written.
        if at_boundary && self.boundary_checkpoint(finished, &stage_name) {
            return;
        }
        if finished {
            return self.finish();
        }
        if let Some(who) = &self.paused {
            if self.state != v1::JobState::Paused {
                info!(step = self.step, by = %who, "paused");
            }
            self.state = v1::JobState::Paused;
            if !self.held {
                self.detail = format!("paused by {who} after step {}", self.step);
            }
            return;
        }
        if self.checkpoint_due() {
            self.start_checkpoint(None);
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
                        d.level_changed(t.step);
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
        world.dispatched_at = Some(Instant::now());
    }

    pub(super) async fn step_done(
        &mut self,
        worker_id: &str,
        done: v1::StepDone,
    ) -> Result<(), Error> {
        let rank = self.rank_in(worker_id, done.generation)?;
        let world = self.world.as_mut().expect("checked by rank_in");
        let n = world.members.len();
        let Some((plan, reports)) = world.in_flight.as_mut() else {
            return Err(Error::FailedPrecondition("no step is in flight".into()));
        };
        let step = plan.step;
        if done.step != step {
            return Err(Error::FailedPrecondition(format!(
                "report for step {}, but step {step} is in flight",
                done.step
            )));
        }
        let expected = rank_slice(plan.samples.len(), n, rank as usize).len() as u32;
        if done.samples != expected {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} reports {} samples for step {step}, it was given {expected}",
                done.samples
            )));
        }
        // A loss is a mean of cross-entropies: never negative. NaN, Inf or a negative loss or
        // gradient norm is only acceptable in a step whose update was dropped.
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        let numbers_sane = sane(done.loss_sum) && sane(done.global_loss) && sane(done.grad_norm);
        if !(done.skipped || numbers_sane) {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} reports a loss of {} (global {}) and a gradient norm of {} for step {step} and applied the update anyway; a loss and a norm are finite and never negative",
                done.loss_sum, done.global_loss, done.grad_norm
            )));
        }
        if reports.contains_key(&rank) {
            return Err(Error::FailedPrecondition(format!(
                "rank {rank} reported step {step} twice"
            )));
        }
        if let Some(other) = reports.values().next() {
            if other.skipped != done.skipped {
                return Err(Error::InvalidArgument(format!(
                    "rank {rank} reports skipped = {} for step {step}, another rank {}; the guard must decide the same everywhere",
                    done.skipped, other.skipped
                )));
            }
        }
        reports.insert(rank, done);
        if reports.len() < n {
            self.quiet = true;
            return Ok(());
        }
        let generation = world.generation;
        let took = world.dispatched_at.take().map(|t| t.elapsed());
        let (plan, reports) = world.in_flight.take().expect("in flight");
        if let Some(d) = took {
            self.step_took(d);
        }
        if self.commit(generation, plan, &reports).await && self.judge(&reports).await {
            self.dispatch().await;
        }
        Ok(())
    }

    /// Commits a step to the ledger with the loss of the global batch (the all-reduced loss
    /// the ranks report; from the reported samples for reports without it); false if the job
    /// failed on it.
    pub(super) async fn commit(
        &mut self,
        generation: u64,
        plan: StepPlan,
        reports: &BTreeMap<u32, v1::StepDone>,
    ) -> bool {
        let reported: u64 = reports.values().map(|r| u64::from(r.samples)).sum();
        let first = reports.values().next();
        let loss = match first.map(|r| r.global_loss) {
            Some(g) if g != 0.0 => g,
            _ => reports.values().map(|r| r.loss_sum).sum::<f64>() / reported.max(1) as f64,
        };
        let grad_norm = first.map_or(0.0, |r| r.grad_norm);
        let skipped = reports.values().any(|r| r.skipped);
        let state_digest = first.map_or(0, |r| r.state_digest);
        let c = self
            .curriculum
            .as_ref()
            .expect("a curriculum while running");
        // The samples are recorded as the plan's state before their draw (a reader draws them
        // again): a few numbers per source, whatever the global batch.
        let entry = v1::LedgerStep {
            step: plan.step,
            samples: vec![],
            draw: Some(plan.draw.clone()),
            cursors: c.cursors().to_vec(),
            loss,
            generation,
            stage: plan.stage.index,
            seq_len: plan.stage.seq_len,
            stage_taken: c.taken().to_vec(),
            grad_norm,
            lr: plan.lr,
            skipped,
            state_digest,
        };
        let committed = c.clone();
        if !self.persist(Write::Commit(entry)).await {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.step_committed(&self.job, &plan.samples, plan.stage.seq_len);
            m.epochs(committed.cursors(), &self.source_tokens);
            if !(loss.is_finite() && grad_norm.is_finite()) {
                m.nonfinite_step();
            }
        }
        self.committed = Some(committed);
        self.step = plan.step + 1;
        self.loss = Some(loss);
        self.record_loss(plan.step, loss, skipped);
        self.digest = (state_digest != 0).then_some(state_digest);
        self.failures.reset();
        self.rate.record(std::time::Instant::now(), 1);
        if self.step.is_multiple_of(self.job.log_every.max(1)) || self.step == self.job.total_steps
        {
            info!(step = self.step, loss, stage = %plan.stage_name, lr = plan.lr, generation, "step committed");
        }
        true
    }
}
