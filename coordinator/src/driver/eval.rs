//! Held-out evaluations: at every stage's end and on demand, between two steps.

use std::collections::BTreeMap;

use stagecoach_core::plan::{rank_slice, SampleId};
use stagecoach_proto::v1;
use tracing::{info, warn};

use super::{refs, send, Driver, Error};

pub(super) struct EvalInFlight {
    pub(super) id: u64,
    pub(super) trigger: &'static str,
    pub(super) seq_len: u32,
    /// Per rank, the samples it was sent (its report must cover exactly those).
    pub(super) sent: Vec<Vec<SampleId>>,
    pub(super) reports: BTreeMap<u32, v1::EvalDone>,
}

impl Driver {
    /// Sends every rank its share of the held-out samples (the first `eval_samples` windows of
    /// each source's eval folder, the same every time so evaluations compare).
    pub(super) fn start_eval(&mut self, trigger: &'static str) {
        let c = self.curriculum.as_ref().expect("a curriculum");
        let seq_len = if self.job.eval_seq_len > 0 {
            self.job.eval_seq_len
        } else {
            c.current_spec().seq_len
        };
        let len = u64::from(seq_len);
        let mut samples = vec![];
        for (source, &tokens) in self.eval_tokens.iter().enumerate() {
            let n = (tokens.saturating_sub(1) / len).min(u64::from(self.job.eval_samples));
            samples.extend((0..n).map(|k| SampleId {
                source,
                index: k * len,
            }));
        }
        if samples.is_empty() {
            warn!("no source has held-out data of {seq_len} tokens or more; not evaluating");
            self.last_eval_step = Some(self.step);
            self.eval_wanted = None;
            return;
        }
        let world = self.world.as_mut().expect("a running world");
        let id = self.next_eval_id;
        self.next_eval_id += 1;
        let n = world.members.len();
        let micro = (self.job.micro_batch_tokens / len).max(1) as u32;
        let sent: Vec<Vec<SampleId>> = (0..n)
            .map(|rank| samples[rank_slice(samples.len(), n, rank)].to_vec())
            .collect();
        for (rank, id_) in world.members.iter().enumerate() {
            let eval = v1::Evaluate {
                generation: world.generation,
                id,
                seq_len,
                rope_theta: c.current_spec().rope_theta,
                micro_batch_size: micro,
                samples: refs(&sent[rank]),
            };
            send(
                &self.members,
                id_,
                v1::coordinator_message::Kind::Evaluate(eval),
            );
        }
        info!(
            step = self.step,
            trigger,
            samples = samples.len(),
            "evaluating"
        );
        world.eval = Some(EvalInFlight {
            id,
            trigger,
            seq_len,
            sent,
            reports: BTreeMap::new(),
        });
    }

    pub(super) async fn eval_done(
        &mut self,
        worker_id: &str,
        done: v1::EvalDone,
    ) -> Result<(), Error> {
        let rank = self.rank_in(worker_id, done.generation)?;
        let world = self.world.as_mut().expect("checked by rank_in");
        let Some(eval) = world.eval.as_mut().filter(|e| e.id == done.id) else {
            return Err(Error::FailedPrecondition(format!(
                "no evaluation {} is in flight",
                done.id
            )));
        };
        if eval.reports.contains_key(&rank) {
            return Err(Error::FailedPrecondition(format!(
                "rank {rank} reported evaluation {} twice",
                done.id
            )));
        }
        let sent = &eval.sent[rank as usize];
        // Counted in u64: a report's counts are the sender's, and u32 sums of them can overflow.
        let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
        for s in sent {
            *expected.entry(s.source as u32).or_default() += 1;
        }
        let mut got: BTreeMap<u32, u64> = BTreeMap::new();
        for l in &done.losses {
            if !(l.loss_sum.is_finite() && l.loss_sum >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "rank {rank} reports a validation loss of {} for source {}; a loss is finite and never negative",
                    l.loss_sum, l.source
                )));
            }
            *got.entry(l.source).or_default() += u64::from(l.samples);
        }
        got.retain(|_, n| *n > 0);
        if got != expected {
            return Err(Error::InvalidArgument(crate::error::clip(
                &format!(
                    "rank {rank} reports samples per source {got:?} for evaluation {}, it was sent {expected:?}",
                    done.id
                ),
                600,
            )));
        }
        eval.reports.insert(rank, done);
        if eval.reports.len() < world.members.len() {
            return Ok(());
        }
        let eval = world.eval.take().expect("in flight");
        let mut sums = vec![(0.0f64, 0u32); self.job.sources.len()];
        for r in eval.reports.values() {
            for l in &r.losses {
                if let Some(s) = sums.get_mut(l.source as usize) {
                    s.0 += l.loss_sum;
                    s.1 += l.samples;
                }
            }
        }
        let c = self.curriculum.as_mut().expect("a curriculum");
        let losses: Vec<v1::SourceLoss> = sums
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(i, (sum, n))| v1::SourceLoss {
                source: self.job.sources[i].name.clone(),
                loss: sum / f64::from(*n),
                samples: *n,
            })
            .collect();
        let evaluation = v1::Evaluation {
            step: self.step,
            stage: c.current_spec().name.clone(),
            trigger: eval.trigger.into(),
            seq_len: eval.seq_len,
            losses,
            unix_ms: super::now_ms(),
        };
        let summary: Vec<String> = evaluation
            .losses
            .iter()
            .map(|l| format!("{}={:.4}", l.source, l.loss))
            .collect();
        info!(step = self.step, stage = %evaluation.stage, trigger = eval.trigger, losses = %summary.join(" "), "validation loss");
        if let Some(m) = &self.metrics {
            for l in &evaluation.losses {
                m.validation_loss(&l.source, l.loss);
            }
        }
        c.record_evaluation(evaluation.clone());
        if let Some(committed) = self.committed.as_mut() {
            committed.record_evaluation(evaluation);
        }
        self.last_eval_step = Some(self.step);
        self.eval_wanted = None;
        if self.save_record().await {
            self.dispatch().await;
        }
        Ok(())
    }
}
