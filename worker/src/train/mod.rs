//! The training step, shared by the standalone `train` command and the coordinator-driven
//! worker: forward/backward over micro-batches, gradient all-reduce in buckets, global-norm
//! clipping, AdamW at the given learning rate; and the held-out evaluation (no update).
//!
//! A step's gradient is the mean over the *global* batch: each micro-batch's mean loss is
//! weighted by `its samples / global batch` before backward, and ranks sum their gradients, so
//! the update does not depend on how the batch was split between ranks or micro-batches.
//!
//! What a step trains with (sequence length, micro-batch, RoPE θ) comes from the curriculum
//! stage it belongs to, so it is given per call rather than fixed when the trainer is built.
//!
//! Beside the trainer: `reduce.rs`, what a step exchanges with the other ranks; `standalone.rs`,
//! the `train` command's loop through the curriculum; `bench.rs`, `bench-train`.

mod bench;
#[cfg(test)]
pub(crate) mod fixtures;
mod reduce;
mod standalone;
mod state;

pub use bench::{bench_train, train_flops_per_token, BenchOptions, BenchReport};
pub use standalone::{run_standalone, RunOptions, RunSummary};

use std::time::Instant;

use serde::Serialize;
use stagecoach_proto::v1;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::job::{self, Sources};
use crate::model::{Llama, ModelConfig, Precision};
use crate::optim::AdamW;
use reduce::{agree, all_reduce, flatten, for_each_bucket};

/// Seconds spent in each part of a step.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timing {
    pub data: f64,
    pub forward_backward: f64,
    pub allreduce: f64,
    pub optimizer: f64,
}

/// What one step did on this rank.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Sum over this rank's samples of their mean token loss.
    pub loss_sum: f64,
    pub samples: usize,
    /// Global gradient norm before clipping (rank 0's, which every rank uses).
    pub grad_norm: f64,
    /// Mean loss over the whole global batch (the same on every rank).
    pub global_loss: f64,
    /// The guard held: no update was applied (the same on every rank).
    pub skipped: bool,
    pub timing: Timing,
}

/// When a step's update is dropped: the global loss or gradient norm above a limit (0: no
/// limit), or either of them not finite (always: a NaN update would destroy the model).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Guard {
    pub max_loss: f64,
    pub max_grad_norm: f64,
}

impl Guard {
    /// The guard of a `Work` (none: only the non-finite rule).
    pub fn of(guard: Option<&v1::StepGuard>) -> Guard {
        guard.map_or_else(Guard::default, |g| Guard {
            max_loss: g.max_loss,
            max_grad_norm: g.max_grad_norm,
        })
    }

    /// Why the update must be dropped, if it must.
    pub fn holds(&self, global_loss: f64, grad_norm: f64) -> Option<String> {
        if !global_loss.is_finite() {
            return Some(format!("the global loss is {global_loss}"));
        }
        if !grad_norm.is_finite() {
            return Some(format!("the gradient norm is {grad_norm}"));
        }
        if self.max_loss > 0.0 && global_loss > self.max_loss {
            return Some(format!(
                "the global loss {global_loss:.4} is above the guard's {}",
                self.max_loss
            ));
        }
        if self.max_grad_norm > 0.0 && grad_norm > self.max_grad_norm {
            return Some(format!(
                "the gradient norm {grad_norm:.4} is above the guard's {}",
                self.max_grad_norm
            ));
        }
        None
    }
}

/// The shape of a step's (or an evaluation's) batches: tokens per sample, samples per
/// forward/backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub seq_len: usize,
    pub micro_batch: usize,
}

impl Shape {
    /// A shape with both sizes positive.
    pub fn new(seq_len: u32, micro_batch: u32) -> Result<Shape> {
        if seq_len == 0 || micro_batch == 0 {
            return Err(Error::Config(format!(
                "a step needs a positive seq_len and micro-batch size, got seq_len {seq_len} and micro-batch {micro_batch}"
            )));
        }
        Ok(Shape {
            seq_len: seq_len as usize,
            micro_batch: micro_batch as usize,
        })
    }

    /// The shape a curriculum stage trains with.
    pub fn of(stage: &v1::StepStage) -> Result<Shape> {
        Shape::new(stage.seq_len, stage.micro_batch_size)
    }
}

/// How a worker computes its steps: a property of its hardware, not of the job (every rank
/// computes the same update up to rounding either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPath {
    /// bf16 matrix products and attention over fp32 weights (see [`Precision`]).
    pub precision: Precision,
    /// ATen's fused AdamW kernel (see [`AdamW::set_fused`]).
    pub fused_adamw: bool,
}

/// The model, its optimizer and the data, owned by one thread.
pub struct Trainer {
    vs: VarStore,
    model: Llama,
    optimizer: AdamW,
    sources: Sources,
    device: Device,
    /// The θ the model was built with (the job's first stage's, else the model's own): what a
    /// stage's θ of 0 stands for.
    base_rope_theta: f64,
    /// The job the trainer was built for.
    job: v1::JobSpec,
}

impl Trainer {
    /// Builds the model (initialised from the job's seed, or loaded from its transformers
    /// folder), the optimizer, and opens the data.
    pub fn new(spec: &v1::JobSpec, device: Device) -> Result<Trainer> {
        if spec.threads > 0 {
            tch::set_num_threads(spec.threads as i32);
        }
        let config = job::model_config(spec)?;
        let sources = Sources::open(spec, &config)?;
        let base_rope_theta = config.rope_theta;
        let (vs, model) = initial_model(spec, config, device)?;
        let optimizer = AdamW::new(&vs, job::optimizer(spec)?)?;
        Ok(Trainer {
            vs,
            model,
            optimizer,
            sources,
            device,
            base_rope_theta,
            job: spec.clone(),
        })
    }

    /// Puts the trainer back to the state a fresh [`Trainer::new`] of the same job has at step
    /// 0, bit for bit: the parameters initialised from the job's seed (or loaded from its
    /// `[model] from` folder), a fresh optimizer (no step taken, zero moments), the RoPE θ of
    /// the first stage. The data, the fast path and fault injection stay as they are. Restoring
    /// "the checkpoint of step 0" is this. The parameters keep their tensors (the optimizer
    /// refers to them); a seeded initialisation holds one more copy of them while it runs.
    pub fn reinitialize(&mut self) -> Result<()> {
        if self.job.model_from.is_empty() {
            let config = job::model_config(&self.job)?;
            let (fresh, _model) = initial_model(&self.job, config, self.device)?;
            let initial = fresh.variables();
            tch::no_grad(|| -> Result<()> {
                for (name, mut dst) in self.vs.variables() {
                    let src = initial.get(&name).ok_or_else(|| {
                        Error::Config(format!("a fresh model of this job has no parameter {name}"))
                    })?;
                    dst.f_copy_(src)?;
                }
                Ok(())
            })?;
        } else {
            crate::hf::load(&mut self.vs, std::path::Path::new(&self.job.model_from))?;
        }
        self.optimizer.reset()?;
        self.model.set_rope_theta(self.base_rope_theta)
    }

    /// The job the trainer was built for.
    pub fn job(&self) -> &v1::JobSpec {
        &self.job
    }

    /// The name of the job's stage `index`, if it has one.
    pub fn stage_name(&self, index: u32) -> Option<&str> {
        self.job.stages.get(index as usize).map(|s| s.name.as_str())
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Switches the precision and the optimizer's kernel of the following steps.
    pub fn set_fast_path(&mut self, fast: FastPath) -> Result<()> {
        self.optimizer.set_fused(fast.fused_adamw)?;
        self.model.set_precision(fast.precision);
        Ok(())
    }

    pub fn fast_path(&self) -> FastPath {
        FastPath {
            precision: self.model.precision(),
            fused_adamw: self.optimizer.is_fused(),
        }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Replaces the training samples in `ranges` with noise (fault injection for tests).
    pub fn set_poison(&mut self, ranges: Vec<crate::fault::Poison>) -> Result<()> {
        self.sources.set_poison(ranges)
    }

    /// What a checkpoint is taken from and restored into.
    pub fn state(&self) -> crate::checkpoint::State<'_> {
        crate::checkpoint::State {
            vs: &self.vs,
            optimizer: &self.optimizer,
            config: self.model.config(),
        }
    }

    /// The RoPE θ the model computes with now.
    pub fn rope_theta(&self) -> f64 {
        self.model.config().rope_theta
    }

    /// `theta`, with 0 standing for the θ the model was built with.
    pub fn resolve_rope_theta(&self, theta: f64) -> f64 {
        if theta == 0.0 {
            self.base_rope_theta
        } else {
            theta
        }
    }

    /// Sets the RoPE θ of the following steps (0: the θ the model was built with). The tables
    /// are recomputed only when θ changes.
    pub fn set_rope_theta(&mut self, theta: f64) -> Result<()> {
        self.model.set_rope_theta(self.resolve_rope_theta(theta))
    }

    /// Makes every rank's parameters identical: rank 0's values win (the others contribute zeros).
    pub fn broadcast_parameters(&mut self, comm: &mut dyn Collective) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
        let rank0 = comm.rank() == 0;
        tch::no_grad(|| -> Result<()> {
            for_each_bucket(&tensors, |group| {
                let flat = flatten(group, |t| {
                    if rank0 {
                        t.detach().to_kind(Kind::Float)
                    } else {
                        t.zeros_like().to_kind(Kind::Float)
                    }
                });
                all_reduce(comm, flat, group)
            })
        })
    }

    /// One optimizer step over `samples` (`(source, token offset)`, this rank's share of a
    /// global batch of `global_batch` samples), read and run in `shape`, unless `guard` holds
    /// (then the step is taken without its update: see [`StepResult::skipped`]). On error no
    /// update is applied and the gradients are cleared.
    pub fn step(
        &mut self,
        samples: &[(usize, u64)],
        shape: Shape,
        global_batch: usize,
        lr: f64,
        guard: Guard,
        comm: &mut dyn Collective,
    ) -> Result<StepResult> {
        let result = self.try_step(samples, shape, global_batch, lr, guard, comm);
        if result.is_err() {
            self.optimizer.zero_grad();
        }
        result
    }

    fn try_step(
        &mut self,
        samples: &[(usize, u64)],
        shape: Shape,
        global_batch: usize,
        lr: f64,
        guard: Guard,
        comm: &mut dyn Collective,
    ) -> Result<StepResult> {
        if global_batch < samples.len() || global_batch == 0 {
            return Err(Error::Config(format!(
                "a global batch of {global_batch} samples cannot hold this rank's {}",
                samples.len()
            )));
        }
        let mut timing = Timing::default();
        // Summed on the device and read once per step: reading each micro-batch's loss would
        // wait for the device every micro-batch.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        for chunk in samples.chunks(shape.micro_batch) {
            let t0 = Instant::now();
            let batch = self
                .sources
                .batch(chunk, shape.seq_len)?
                .to_device(self.device);
            timing.data += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let loss = self.model.loss(&batch)?;
            (&loss * (chunk.len() as f64 / global_batch as f64)).f_backward()?;
            loss_sum += loss.detach().to_kind(Kind::Double) * chunk.len() as f64;
            timing.forward_backward += t1.elapsed().as_secs_f64();
        }
        let loss_sum = loss_sum.f_double_value(&[])?;
        // A non-finite loss is not an error here: every rank must still take part in the
        // all-reduces below, and the guard then drops the update on every rank alike.
        let t2 = Instant::now();
        if comm.world_size() > 1 {
            let grads: Vec<Tensor> = self
                .optimizer
                .params()
                .iter()
                .map(|p| p.param.grad())
                .collect();
            tch::no_grad(|| {
                for_each_bucket(&grads, |group| {
                    all_reduce(comm, flatten(group, |g| g.to_kind(Kind::Float)), group)
                })
            })?;
        }
        let t3 = Instant::now();
        let local_norm = self.optimizer.grad_norm();
        timing.optimizer = t3.elapsed().as_secs_f64();
        let t4 = Instant::now();
        let agreed = agree(comm, loss_sum, samples.len(), local_norm)?;
        timing.allreduce = (t3 - t2 + t4.elapsed()).as_secs_f64();
        let t5 = Instant::now();
        let skipped = match guard.holds(agreed.global_loss, agreed.grad_norm) {
            Some(why) => {
                tracing::warn!("step skipped (no update applied): {why}");
                true
            }
            None => {
                self.optimizer.clip_to(agreed.grad_norm);
                self.optimizer.step(lr);
                false
            }
        };
        self.optimizer.zero_grad();
        timing.optimizer += t5.elapsed().as_secs_f64();
        Ok(StepResult {
            loss_sum,
            samples: samples.len(),
            grad_norm: agreed.grad_norm,
            global_loss: agreed.global_loss,
            skipped,
            timing,
        })
    }

    /// Each held-out sample's mean token loss (the training loss, without gradient), in the
    /// order of `samples` (`(source, token offset in its eval folder)`), computed in `shape` at
    /// RoPE θ `rope_theta` (0: the model's own). The model, its θ for training and the optimizer
    /// are as they were afterwards, whatever the outcome.
    pub fn evaluate(
        &mut self,
        samples: &[(usize, u64)],
        shape: Shape,
        rope_theta: f64,
    ) -> Result<Vec<f64>> {
        let training_theta = self.rope_theta();
        self.set_rope_theta(rope_theta)?;
        let losses = tch::no_grad(|| -> Result<Vec<f64>> {
            let mut out = Vec::with_capacity(samples.len());
            for chunk in samples.chunks(shape.micro_batch) {
                let batch = self
                    .sources
                    .eval_batch(chunk, shape.seq_len)?
                    .to_device(self.device);
                let losses = self.model.sample_losses(&batch)?.to_kind(Kind::Double);
                out.extend(Vec::<f64>::try_from(&losses.to_device(Device::Cpu))?);
            }
            Ok(out)
        });
        self.model.set_rope_theta(training_theta)?;
        losses
    }
}

/// The model of `spec` at step 0 on `device`: initialised N(0, init_std) from the job's seed
/// (libtorch's global generator, seeded here), or loaded from the job's transformers folder.
fn initial_model(
    spec: &v1::JobSpec,
    config: ModelConfig,
    device: Device,
) -> Result<(VarStore, Llama)> {
    tch::manual_seed(spec.init_seed as i64);
    let mut vs = VarStore::new(device);
    let model = Llama::new(&vs, config)?;
    if !spec.model_from.is_empty() {
        crate::hf::load(&mut vs, std::path::Path::new(&spec.model_from))?;
    }
    Ok((vs, model))
}

/// What a checkpoint restores: parameters, optimizer, model (for its shape and RoPE θ).
impl<'a> From<&'a mut Trainer> for crate::checkpoint::Target<'a> {
    fn from(t: &'a mut Trainer) -> Self {
        crate::checkpoint::Target {
            vs: &t.vs,
            optimizer: &mut t.optimizer,
            model: &mut t.model,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::job;
    use super::*;
    use crate::collective::Solo;

    fn parameters(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = t
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, p)| (n, p.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
    }

    #[test]
    fn sources_report_their_train_and_held_out_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trainer::new(&job(dir.path()), Device::Cpu).unwrap();
        let sizes = t.sources().sizes();
        assert_eq!(
            sizes,
            [
                v1::SourceSize {
                    name: "a".into(),
                    num_tokens: 160,
                    eval_tokens: 160
                },
                v1::SourceSize {
                    name: "b".into(),
                    num_tokens: 50,
                    eval_tokens: 0
                },
            ]
        );
    }

    #[test]
    fn evaluation_gives_the_training_loss_per_sample_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spec = job(dir.path());
        let mut evaluated = Trainer::new(&spec, Device::Cpu).unwrap();
        let mut untouched = Trainer::new(&spec, Device::Cpu).unwrap();
        assert!(same(&parameters(&evaluated), &parameters(&untouched)));
        // Windows of 33 tokens at token offsets; the one at 70 spans both files of "a".
        let samples = [(0, 0), (0, 31), (0, 70), (0, 127)];
        let shape = Shape::new(32, 3).unwrap();

        let losses = evaluated.evaluate(&samples, shape, 0.0).unwrap();
        assert_eq!(losses.len(), samples.len());
        for (&sample, &loss) in samples.iter().zip(&losses) {
            // The training loss of a batch of this one sample.
            let batch = evaluated.sources().batch(&[sample], 32).unwrap();
            let train = tch::no_grad(|| evaluated.model().loss(&batch).unwrap()).double_value(&[]);
            assert!(
                (loss - train).abs() <= 1e-6 * train,
                "{sample:?}: {loss} vs {train}"
            );
        }
        // At another θ the losses differ, and the training θ is restored afterwards.
        let at_40k = evaluated.evaluate(&samples, shape, 40_000.0).unwrap();
        assert!(at_40k
            .iter()
            .zip(&losses)
            .any(|(a, b)| (a - b).abs() > 1e-6));
        assert_eq!(evaluated.rope_theta(), 10_000.0);

        // The same step on both trainers: identical loss, gradient norm and update, so the
        // evaluations changed neither the model nor its optimizer nor its gradients.
        let a = evaluated
            .step(
                &samples,
                shape,
                samples.len(),
                1e-3,
                Guard::default(),
                &mut Solo,
            )
            .unwrap();
        let b = untouched
            .step(
                &samples,
                shape,
                samples.len(),
                1e-3,
                Guard::default(),
                &mut Solo,
            )
            .unwrap();
        assert_eq!((a.loss_sum, a.grad_norm), (b.loss_sum, b.grad_norm));
        assert!(same(&parameters(&evaluated), &parameters(&untouched)));
        // And the step's loss is the sum of the per-sample held-out losses (same windows).
        let sum: f64 = losses.iter().sum();
        assert!(
            (sum - a.loss_sum).abs() <= 1e-6 * sum,
            "{sum} vs {}",
            a.loss_sum
        );
    }

    fn optimizer_state(t: &Trainer) -> Vec<Tensor> {
        t.optimizer()
            .params()
            .iter()
            .flat_map(|p| [p.exp_avg.copy(), p.exp_avg_sq.copy()])
            .collect()
    }

    #[test]
    fn the_guard_names_its_rule() {
        let none = Guard::default();
        assert_eq!(none.holds(1e6, 1e6), None);
        assert!(none.holds(f64::NAN, 1.0).unwrap().contains("loss is NaN"));
        assert!(none
            .holds(1.0, f64::INFINITY)
            .unwrap()
            .contains("norm is inf"));
        let g = Guard {
            max_loss: 4.0,
            max_grad_norm: 2.0,
        };
        assert_eq!(g.holds(4.0, 2.0), None);
        assert!(g.holds(4.5, 1.0).unwrap().contains("above the guard's 4"));
        assert!(g.holds(1.0, 2.5).unwrap().contains("above the guard's 2"));
        assert_eq!(Guard::of(None), none);
    }

    /// Two ranks of a TCP ring: the guard drops the update on both alike (parameters, moments
    /// and AdamW's step count unchanged, skipped reported), the global loss is the same on both
    /// and is the batch's mean, and training then goes on.
    #[test]
    fn the_guard_skips_the_update_identically_on_two_ranks() {
        let dir = tempfile::tempdir().unwrap();
        let spec = job(dir.path());
        let ls: Vec<_> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let shape = Shape::new(16, 2).unwrap();
        let steps: [(Vec<(usize, u64)>, Guard); 4] = [
            (vec![(0, 0), (1, 0)], Guard::default()),
            (
                vec![(0, 16), (1, 16)],
                Guard {
                    max_loss: 0.5,
                    max_grad_norm: 0.0,
                },
            ),
            (
                vec![(0, 32), (1, 32)],
                Guard {
                    max_loss: 0.0,
                    max_grad_norm: 1e-3,
                },
            ),
            (vec![(0, 48), (1, 33)], Guard::default()),
        ];
        let ranks: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (spec, addrs, steps) = (spec.clone(), addrs.clone(), steps.clone());
                std::thread::spawn(move || {
                    let mut ring = crate::collective::tcp::TcpRing::connect(
                        rank,
                        2,
                        l,
                        addrs[(rank + 1) % 2],
                        crate::collective::tcp::TcpConfig::new(
                            1,
                            std::time::Duration::from_secs(30),
                        ),
                    )
                    .unwrap();
                    let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
                    let mut out = Vec::new();
                    for (samples, guard) in steps {
                        let (params, moments) = (parameters(&t), optimizer_state(&t));
                        let count = t.optimizer().step_count();
                        let r = t
                            .step(&samples[rank..=rank], shape, 2, 1e-2, guard, &mut ring)
                            .unwrap();
                        let unchanged = same(&params, &parameters(&t))
                            && moments
                                .iter()
                                .zip(optimizer_state(&t))
                                .all(|(a, b)| a.equal(&b));
                        out.push((r, unchanged, count, t.optimizer().step_count()));
                    }
                    (out, parameters(&t))
                })
            })
            .collect();
        let results: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
        let (r0, r1) = (&results[0].0, &results[1].0);
        for (i, (a, b)) in r0.iter().zip(r1).enumerate() {
            let skipped = i == 1 || i == 2;
            for (r, unchanged, before, after) in [a, b] {
                assert_eq!(r.skipped, skipped, "step {i}");
                assert_eq!(*unchanged, skipped, "step {i}: parameters and moments");
                assert_eq!(
                    *after,
                    before + u64::from(!skipped),
                    "step {i}: AdamW's count"
                );
            }
            assert_eq!(a.0.global_loss, b.0.global_loss, "step {i}");
            assert_eq!(a.0.grad_norm, b.0.grad_norm, "step {i}");
            assert_eq!(
                a.0.global_loss,
                (a.0.loss_sum + b.0.loss_sum) / 2.0,
                "step {i}"
            );
        }
        assert_eq!(r0[3].3, 2);
        assert!(
            same(&results[0].1, &results[1].1),
            "the ranks' models agree"
        );
    }

    /// A NaN loss (here from a NaN weight) is skipped, not an error: nothing is updated, and
    /// once the weight is sound again the next step trains.
    #[test]
    fn a_nan_loss_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(&job(dir.path()), Device::Cpu).unwrap();
        let shape = Shape::new(16, 2).unwrap();
        let samples = [(0, 0), (1, 0)];
        t.step(&samples, shape, 2, 1e-3, Guard::default(), &mut Solo)
            .unwrap();
        let mut norm = t.var_store().variables()["model.norm.weight"].shallow_clone();
        let saved = norm.detach().copy();
        let _ = tch::no_grad(|| norm.fill_(f64::NAN));
        let (params, moments) = (parameters(&t), optimizer_state(&t));
        let r = t
            .step(&samples, shape, 2, 1e-3, Guard::default(), &mut Solo)
            .unwrap();
        assert!(
            r.skipped && r.global_loss.is_nan() && r.loss_sum.is_nan(),
            "{r:?}"
        );
        assert_eq!(t.optimizer().step_count(), 1);
        for ((name, a), (_, b)) in params.iter().zip(&parameters(&t)) {
            let same_or_both_nan = a.isnan().equal(&b.isnan())
                && a.nan_to_num(0.0, None, None)
                    .equal(&b.nan_to_num(0.0, None, None));
            assert!(same_or_both_nan, "{name} changed");
        }
        assert!(moments
            .iter()
            .zip(optimizer_state(&t))
            .all(|(a, b)| a.equal(&b)));
        tch::no_grad(|| norm.copy_(&saved));
        let r = t
            .step(&samples, shape, 2, 1e-3, Guard::default(), &mut Solo)
            .unwrap();
        assert!(!r.skipped && r.global_loss.is_finite());
        assert_eq!(t.optimizer().step_count(), 2);
    }

    /// After training (moments, a step count, another RoPE θ), `reinitialize` gives exactly
    /// what a fresh trainer of the job has, and both then train the same step alike. (Here the
    /// job starts from a model folder; `tests/reinitialize.rs` checks a seeded start, alone in
    /// its process since libtorch's generator is global.)
    #[test]
    fn reinitialize_gives_the_state_of_a_fresh_trainer() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = job(dir.path());
        spec.rope_theta = 20_000.0;
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        let shape = Shape::new(16, 2).unwrap();
        let samples = [(0, 0), (1, 8), (0, 40)];
        t.set_fast_path(FastPath {
            precision: Precision::Fp32,
            fused_adamw: true,
        })
        .unwrap();
        for _ in 0..3 {
            t.step(&samples, shape, 3, 1e-2, Guard::default(), &mut Solo)
                .unwrap();
        }
        t.set_rope_theta(80_000.0).unwrap();
        let fresh = Trainer::new(&spec, Device::Cpu).unwrap();
        assert!(!same(&parameters(&t), &parameters(&fresh)));

        t.reinitialize().unwrap();
        assert!(same(&parameters(&t), &parameters(&fresh)));
        assert!(optimizer_state(&t)
            .iter()
            .zip(optimizer_state(&fresh))
            .all(|(a, b)| a.equal(&b)));
        assert_eq!(t.optimizer().step_count(), 0);
        assert_eq!((t.rope_theta(), fresh.rope_theta()), (20_000.0, 20_000.0));
        // The fast path is the worker's, not the job's state: kept.
        assert!(t.fast_path().fused_adamw);

        let mut fresh = fresh;
        fresh
            .set_fast_path(FastPath {
                precision: Precision::Fp32,
                fused_adamw: true,
            })
            .unwrap();
        let a = t
            .step(&samples, shape, 3, 1e-2, Guard::default(), &mut Solo)
            .unwrap();
        let b = fresh
            .step(&samples, shape, 3, 1e-2, Guard::default(), &mut Solo)
            .unwrap();
        assert_eq!((a.loss_sum, a.grad_norm), (b.loss_sum, b.grad_norm));
        assert!(same(&parameters(&t), &parameters(&fresh)));
    }

    /// The trainer's fast path (bf16 compute, fused AdamW) trains the job's steps within bf16
    /// rounding of the default path, and the optimizer state checkpoints rely on stays fp32.
    #[test]
    fn the_fast_path_trains_like_the_default_one() {
        let dir = tempfile::tempdir().unwrap();
        let spec = job(dir.path());
        let mut plain = Trainer::new(&spec, Device::Cpu).unwrap();
        let mut fast = Trainer::new(&spec, Device::Cpu).unwrap();
        assert_eq!(plain.fast_path(), FastPath::default());
        let wanted = FastPath {
            precision: Precision::Bf16,
            fused_adamw: true,
        };
        fast.set_fast_path(wanted).unwrap();
        assert_eq!(fast.fast_path(), wanted);
        let shape = Shape::new(16, 2).unwrap();
        for offset in [0u64, 16, 32, 48] {
            let samples = [(0, offset), (1, offset / 2), (0, offset + 3)];
            let a = plain
                .step(&samples, shape, 3, 1e-2, Guard::default(), &mut Solo)
                .unwrap();
            let b = fast
                .step(&samples, shape, 3, 1e-2, Guard::default(), &mut Solo)
                .unwrap();
            assert!(!b.skipped);
            assert!(
                (a.global_loss - b.global_loss).abs() <= 2e-2 * a.global_loss,
                "offset {offset}: {} vs {}",
                a.global_loss,
                b.global_loss
            );
        }
        assert_eq!(fast.optimizer().step_count(), 4);
        for p in fast.optimizer().params() {
            assert_eq!(
                (p.param.kind(), p.exp_avg.kind(), p.exp_avg_sq.kind()),
                (Kind::Float, Kind::Float, Kind::Float),
                "{}",
                p.name
            );
        }
    }

    /// A token the model has no embedding for is refused before the model runs, training or
    /// evaluating, with the shard file and the token's offset in it; nothing changes.
    #[test]
    fn a_token_outside_the_vocabulary_is_a_data_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = job(dir.path());
        // Source "b": 40 tokens, then a file whose token 7 (47 in the stream) is past micro's
        // 264 ids.
        let bad = dir.path().join("bad");
        std::fs::create_dir_all(&bad).unwrap();
        for (name, doc) in [
            ("00.ds", (0..40u32).collect::<Vec<_>>()),
            (
                "01.ds",
                (0..20).map(|i| if i == 7 { 300 } else { i }).collect(),
            ),
        ] {
            let mut w = crate::shards::ShardWriter::create(
                &bad.join(name),
                crate::shards::TokenSize::U16,
                "bytes",
            )
            .unwrap();
            w.write_document(&doc).unwrap();
            w.finish().unwrap();
        }
        spec.sources[1].path = bad.display().to_string();
        spec.sources[1].eval_path = bad.display().to_string();
        let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
        let before = parameters(&t);
        let shape = Shape::new(16, 2).unwrap();
        // A window before the bad token trains.
        t.step(
            &[(0, 0), (1, 30)],
            shape,
            2,
            1e-3,
            Guard::default(),
            &mut Solo,
        )
        .unwrap();
        let trained = parameters(&t);
        assert!(!same(&before, &trained));
        let file = bad.join("01.ds");
        let check = |err: Error| {
            let text = err.to_string();
            let Error::Data { path, offset, .. } = err else {
                panic!("not a data error: {text}")
            };
            assert_eq!((path, offset), (file.clone(), 7), "{text}");
            assert!(
                text.contains("token id 300 is outside the model's vocabulary of 264 ids"),
                "{text}"
            );
        };
        check(
            t.step(
                &[(0, 0), (1, 35)],
                shape,
                2,
                1e-3,
                Guard::default(),
                &mut Solo,
            )
            .unwrap_err(),
        );
        check(t.evaluate(&[(1, 40)], shape, 0.0).unwrap_err());
        assert!(same(&trained, &parameters(&t)));
        assert_eq!(t.optimizer().step_count(), 1);
    }

    #[test]
    fn bad_samples_and_stages_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(&job(dir.path()), Device::Cpu).unwrap();
        let shape = Shape::new(32, 2).unwrap();
        let before = parameters(&t);
        // Source "b" has no held-out folder.
        let err = t.evaluate(&[(1, 0)], shape, 0.0).unwrap_err().to_string();
        assert!(
            err.contains("\"b\"") && err.contains("no eval folder"),
            "{err}"
        );
        // No source 5.
        let err = t.evaluate(&[(5, 0)], shape, 0.0).unwrap_err().to_string();
        assert!(
            err.contains("source 5") && err.contains("2 sources"),
            "{err}"
        );
        // A window past the end of "b" (50 tokens).
        let err = t
            .step(&[(1, 20)], shape, 1, 1e-3, Guard::default(), &mut Solo)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokens 20..53") && err.contains("holds 50 tokens"),
            "{err}"
        );
        assert!(Shape::new(0, 4).is_err() && Shape::new(128, 0).is_err());
        assert!(t.evaluate(&[(0, 0)], shape, -1.0).is_err());
        assert_eq!(t.rope_theta(), 10_000.0);
        assert!(same(&before, &parameters(&t)));
    }
}
