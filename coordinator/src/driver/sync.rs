//! Bringing every rank of a new world to the committed state before it trains, losing as
//! little as possible:
//!
//! 1. **A step the ledger lost.** A coordinator that restarted (or a store write that never
//!    landed) can find its ranks one step past the ledger: they finished the step in flight.
//!    The plan is deterministic, so when every rank that is ahead reports the same last step
//!    (same samples as the plan gives for its old rank, same global loss, gradient norm and
//!    resulting state digest), that step is committed from their reports instead of rolled
//!    back.
//! 2. **Ranks that came back.** A rank whose state is not the committed one (a restarted
//!    worker, a spare that missed steps) takes the state of a rank that holds it, over the
//!    collective (`SyncState`), and nobody rolls back.
//! 3. **Nobody holds it** (every worker restarted): every rank loads the latest loadable,
//!    known-good checkpoint at or before the committed step; the job's initial state (step 0)
//!    always counts as one, so no job fails for lack of a checkpoint.
//!
//! The committed state is known by its digest: ranks report the digest of their state with
//! every step and `Ready`, the ledger keeps it per step and the index per checkpoint.

use stagecoach_core::plan::{rank_slice, samples_digest};
use stagecoach_proto::v1;
use tracing::{info, warn};

use super::step::Reports;
use super::Driver;

impl Driver {
    /// True when every rank holds the committed state and training can start; otherwise a
    /// recovery is under way (a sync, a restore) or the generation failed.
    pub(super) async fn agree(&mut self) -> bool {
        let world = self.world.as_ref().expect("a world");
        let ready: Vec<(String, v1::Ready)> = world
            .members
            .iter()
            .map(|id| (id.clone(), world.ready[id].clone()))
            .collect();
        if let Some(r) = self.restore.clone() {
            return self.restored(&ready, &r).await;
        }
        if ready.iter().any(|(_, r)| r.step == self.step + 1)
            && self.recover_lost_step(&ready).await
        {
            info!(
                step = self.step,
                "the step the ledger lacked is committed from the ranks' reports"
            );
        }
        if matches!(self.state, v1::JobState::Failed) {
            return false;
        }
        let holders = self.holders(&ready);
        if holders.len() == ready.len() {
            if self.step > 0 {
                self.digest = Some(ready[0].1.state_digest);
            }
            return true;
        }
        if let Some(&source) = holders.first() {
            let behind: Vec<String> = ready
                .iter()
                .enumerate()
                .filter(|(i, _)| !holders.contains(i))
                .map(|(_, (id, r))| format!("{id} at step {}", r.step))
                .collect();
            info!(
                step = self.step,
                source_rank = source,
                behind = %behind.join(", "),
                "ranks take the committed state from a rank that holds it"
            );
            if self.step > 0 {
                self.digest = Some(ready[source].1.state_digest);
            }
            self.sync_from(source as u32);
            return false;
        }
        let steps: Vec<String> = ready
            .iter()
            .map(|(id, r)| format!("{id} at step {}", r.step))
            .collect();
        let why = format!(
            "no worker holds the state of step {} ({})",
            self.step,
            steps.join(", ")
        );
        self.restore_latest(&why).await;
        false
    }

    /// The ranks (by index) that hold the committed state: at the committed step, with its
    /// digest. Without a digest on record (the ledger does not know it), the largest group of
    /// ranks at the step that agree with each other.
    fn holders(&self, ready: &[(String, v1::Ready)]) -> Vec<usize> {
        let at_step = |i: &usize| ready[*i].1.step == self.step;
        match self.digest {
            Some(d) => (0..ready.len())
                .filter(|i| at_step(i) && ready[*i].1.state_digest == d)
                .collect(),
            None => {
                let mut best: Vec<usize> = vec![];
                for i in (0..ready.len()).filter(at_step) {
                    let group: Vec<usize> = (0..ready.len())
                        .filter(|j| {
                            at_step(j) && ready[*j].1.state_digest == ready[i].1.state_digest
                        })
                        .collect();
                    if group.len() > best.len() {
                        best = group;
                    }
                }
                best
            }
        }
    }

    /// Every rank takes the state of `source_rank`, then answers `Ready` again.
    fn sync_from(&mut self, source_rank: u32) {
        let step = self.step;
        let world = self.world.as_mut().expect("a world");
        world.syncing = true;
        world.ready.clear();
        let msg = v1::SyncState {
            generation: world.generation,
            source_rank,
            step,
        };
        for id in &world.members {
            super::send(
                &self.members,
                id,
                v1::coordinator_message::Kind::SyncState(msg),
            );
        }
        if let Some(m) = &self.metrics {
            m.state_sync();
        }
    }

    /// After a restore every rank must be at the checkpoint's step with one state.
    async fn restored(&mut self, ready: &[(String, v1::Ready)], r: &v1::CheckpointRef) -> bool {
        let off = ready.iter().find(|(_, x)| x.step != r.step).cloned();
        let split = ready
            .iter()
            .find(|(_, x)| x.state_digest != ready[0].1.state_digest)
            .cloned();
        let what = r.path.clone();
        let problem = match (off, split) {
            (Some((id, x)), _) => Some((
                id,
                format!(
                    "worker reports step {} after restoring {} of step {}",
                    x.step,
                    shown_checkpoint(&what),
                    r.step
                ),
            )),
            (None, Some((id, _))) => Some((
                id,
                format!(
                    "the ranks hold different states after restoring {}",
                    shown_checkpoint(&what)
                ),
            )),
            (None, None) => None,
        };
        if let Some((id, msg)) = problem {
            self.failed(&id, v1::FailureKind::State, msg, None).await;
            return false;
        }
        self.digest = (r.step > 0).then_some(ready[0].1.state_digest);
        true
    }

    /// Commits the step the ranks ahead of the ledger all finished, if their reports agree with
    /// each other and with the plan. True when it was committed.
    async fn recover_lost_step(&mut self, ready: &[(String, v1::Ready)]) -> bool {
        let ahead: Vec<&v1::Ready> = ready
            .iter()
            .map(|(_, r)| r)
            .filter(|r| r.step == self.step + 1)
            .collect();
        let Some(first) = ahead.first().and_then(|r| r.last_step) else {
            return false;
        };
        let agree = ahead.iter().all(|r| {
            r.state_digest == ahead[0].state_digest
                && r.last_step.as_ref().is_some_and(|l| {
                    l.step == self.step
                        && l.global_loss.to_bits() == first.global_loss.to_bits()
                        && l.grad_norm.to_bits() == first.grad_norm.to_bits()
                        && l.skipped == first.skipped
                })
        });
        if !agree || self.skip.is_some_and(|s| s.at == self.step) {
            warn!(
                step = self.step,
                "ranks ahead of the ledger do not agree on the step; not committing it"
            );
            return false;
        }
        // Plan the step as the lost coordinator did, on a copy, and check each rank's samples.
        let Some(mut c) = self.curriculum.clone() else {
            return false;
        };
        if c.finished() {
            return false;
        }
        let mut transitions = vec![];
        while let Some(change) = c.due() {
            match c.apply(change) {
                Ok(t) => transitions.push(t),
                Err(_) => return false,
            }
        }
        let plan = c.plan_step();
        let mut ranks_seen = vec![];
        for r in &ahead {
            let (rank, n) = (r.last_rank as usize, r.last_world_size as usize);
            if n == 0 || rank >= n || ranks_seen.contains(&rank) {
                return false;
            }
            ranks_seen.push(rank);
            let slice = &plan.samples[rank_slice(plan.samples.len(), n, rank)];
            let digest = samples_digest(slice.iter().map(|s| (s.source as u32, s.index)));
            if digest != r.last_samples_digest {
                warn!(
                    step = self.step,
                    rank,
                    "a rank trained other samples than the plan gives; not committing its step"
                );
                return false;
            }
        }
        for t in &transitions {
            info!(step = t.step, from = %t.from, to = %t.to, "stage transition (of the recovered step)");
            if let Some(d) = self.detector.as_mut() {
                d.level_changed(t.step);
            }
            if let Some(m) = &self.metrics {
                m.transition(t.cause());
            }
        }
        if let Some(m) = &self.metrics {
            m.stage_changed(&c.current_spec().name, c.current() as u32);
        }
        self.curriculum = Some(c);
        let mut report = first;
        report.samples = plan.samples.len() as u32;
        report.loss_sum = first.global_loss * f64::from(report.samples);
        report.state_digest = ahead[0].state_digest;
        let mut reports = Reports::new(1);
        reports.add(&[0], report);
        let generation = first.generation;
        if !self.commit(generation, plan, &reports).await {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.step_recovered();
        }
        let _ = self.judge(&reports).await;
        true
    }
}

/// A checkpoint path for a message ("the initial state" for the empty path).
pub(super) fn shown_checkpoint(path: &str) -> String {
    if path.is_empty() {
        "the initial state".into()
    } else {
        path.to_owned()
    }
}
