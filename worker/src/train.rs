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

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use stagecoach_core::curriculum::Curriculum;
use stagecoach_proto::v1;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, Solo};
use crate::error::{Error, IoContext, Result};
use crate::job::{self, Sources};
use crate::model::{Llama, ModelConfig, Precision};
use crate::optim::{AdamW, AdamWConfig};
use crate::steplog::{self, StepRecord};

/// Gradients are all-reduced in buckets of about this many bytes.
const BUCKET_BYTES: usize = 25 << 20;

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

/// What every rank of a step knows alike after [`agree`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Agreed {
    global_loss: f64,
    grad_norm: f64,
}

/// Each rank's report travels as 16-bit pieces of its bits, in its own slots of a buffer that
/// is zero elsewhere: whole numbers below 2^16 plus zeros sum exactly in f32 whatever the order
/// or the backend, so every rank decodes every rank's exact f64s.
const REPORT_SLOTS: usize = 12;

fn encode_u64(v: u64, out: &mut [f32]) {
    for (i, slot) in out.iter_mut().take(4).enumerate() {
        *slot = ((v >> (16 * i)) & 0xffff) as f32;
    }
}

fn decode_u64(slots: &[f32]) -> u64 {
    slots
        .iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, &s)| v | ((s as u64) << (16 * i)))
}

/// Shares this rank's loss sum, sample count and local gradient norm with every rank: the global
/// mean loss is the sum over ranks (in rank order) over the global sample count, and the gradient
/// norm is rank 0's (ranks hold the same all-reduced gradients; taking one rank's norm makes the
/// guard's and the clipping's decisions identical even if a norm differed in its last bit).
fn agree(
    comm: &mut dyn Collective,
    loss_sum: f64,
    samples: usize,
    grad_norm: f64,
) -> Result<Agreed> {
    let n = comm.world_size();
    if n == 1 {
        return Ok(Agreed {
            global_loss: loss_sum / samples.max(1) as f64,
            grad_norm,
        });
    }
    let mut buf = vec![0f32; n * REPORT_SLOTS];
    let mine = &mut buf[comm.rank() * REPORT_SLOTS..][..REPORT_SLOTS];
    encode_u64(loss_sum.to_bits(), &mut mine[0..4]);
    encode_u64(samples as u64, &mut mine[4..8]);
    encode_u64(grad_norm.to_bits(), &mut mine[8..12]);
    comm.all_reduce_sum(&mut buf)
        .map_err(|e| Error::Collective(e.to_string()))?;
    let (mut total_loss, mut total_samples) = (0.0, 0u64);
    for r in buf.chunks_exact(REPORT_SLOTS) {
        total_loss += f64::from_bits(decode_u64(&r[0..4]));
        total_samples += decode_u64(&r[4..8]);
    }
    Ok(Agreed {
        global_loss: total_loss / total_samples.max(1) as f64,
        grad_norm: f64::from_bits(decode_u64(&buf[8..12])),
    })
}

/// Calls `f` on consecutive groups of tensors of about [`BUCKET_BYTES`].
fn for_each_bucket(tensors: &[Tensor], mut f: impl FnMut(&[Tensor]) -> Result<()>) -> Result<()> {
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        bytes += t.numel() * 4;
        if bytes >= BUCKET_BYTES || i + 1 == tensors.len() {
            f(&tensors[start..=i])?;
            start = i + 1;
            bytes = 0;
        }
    }
    Ok(())
}

fn flatten(group: &[Tensor], f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let parts: Vec<Tensor> = group.iter().map(|t| f(t).reshape([-1])).collect();
    Tensor::cat(&parts, 0)
}

/// All-reduces `flat` and copies the result back into `group`.
fn all_reduce(comm: &mut dyn Collective, mut flat: Tensor, group: &[Tensor]) -> Result<()> {
    comm.all_reduce_tensor(&mut flat)
        .map_err(|e| Error::Collective(e.to_string()))?;
    let mut offset = 0;
    for t in group {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        dst.f_copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()))?;
        offset += n;
    }
    Ok(())
}

/// Options of a standalone run that are not part of the job file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `[train].device`.
    pub device: Option<String>,
    /// Stop after this many steps (the curriculum and its schedule keep their configured length).
    pub steps: Option<u64>,
    /// Write one JSON object per step here.
    pub metrics_out: Option<PathBuf>,
    /// Save the final weights as a transformers folder here.
    pub save: Option<PathBuf>,
    /// Precision and optimizer kernel.
    pub fast_path: FastPath,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Each step, as written to the metrics file.
    pub steps: Vec<StepRecord>,
    pub seconds: f64,
    pub source_names: Vec<String>,
    pub samples_per_source: Vec<u64>,
    /// Tokens trained from each source, in the job's source order.
    pub tokens_per_source: Vec<u64>,
}

/// Trains alone (world size 1) through the job's whole curriculum: the coordinator's planner
/// chooses each step's stage, samples and learning rate, exactly as it would for a cluster.
pub fn run_standalone(spec: &v1::JobSpec, opts: &RunOptions) -> Result<RunSummary> {
    let device = crate::device::parse(opts.device.as_deref().unwrap_or(&spec.device))?;
    let mut trainer = Trainer::new(spec, device)?;
    trainer.set_fast_path(opts.fast_path)?;
    let names = trainer.sources().names();
    let source_tokens = trainer.sources().num_tokens();
    let mut curriculum = Curriculum::new(spec, &source_tokens)
        .map_err(|e| Error::Config(format!("the curriculum cannot be planned: {e}")))?;
    let steps = opts.steps.unwrap_or(spec.total_steps).min(spec.total_steps);
    let c = trainer.model_config();
    println!(
        "training {} ({:.2}M parameters) on {device:?}: {steps} steps of {} tokens in {} stage(s), sources: {}",
        if spec.model_preset.is_empty() { &spec.model_from } else { &spec.model_preset },
        c.num_parameters() as f64 / 1e6,
        spec.global_batch_tokens,
        spec.stages.len(),
        names
            .iter()
            .zip(&source_tokens)
            .map(|(n, t)| format!("{n} ({t} tokens)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut metrics = match &opts.metrics_out {
        Some(p) => Some((
            std::io::BufWriter::new(std::fs::File::create(p).at(p)?),
            p.clone(),
        )),
        None => None,
    };
    let start = Instant::now();
    let mut records = Vec::with_capacity(steps as usize);
    let mut samples_total = vec![0u64; names.len()];
    let mut tokens_total = vec![0u64; names.len()];
    let mut tokens = 0u64;
    let mut stage: Option<u32> = None;
    let mut solo = Solo;
    while let Some(plan) = curriculum.next_step() {
        if plan.step >= steps {
            break;
        }
        let t0 = Instant::now();
        let shape = Shape::of(&plan.stage)?;
        if stage != Some(plan.stage.index) {
            trainer.set_rope_theta(plan.stage.rope_theta)?;
            stage = Some(plan.stage.index);
            println!(
                "stage {} {:?} after {} steps: seq_len {}, rope θ {}, {} samples per step in micro-batches of {}",
                plan.stage.index,
                plan.stage_name,
                plan.step,
                shape.seq_len,
                trainer.rope_theta(),
                plan.global_batch,
                shape.micro_batch
            );
        }
        let samples: Vec<(usize, u64)> = plan.samples.iter().map(|s| (s.source, s.index)).collect();
        let r = trainer.step(
            &samples,
            shape,
            plan.global_batch as usize,
            plan.lr,
            Guard::default(),
            &mut solo,
        )?;
        let step_tokens = (samples.len() * shape.seq_len) as u64;
        tokens += step_tokens;
        let per_source = steplog::per_source(&samples, names.len()).ok_or_else(|| {
            Error::Config(format!(
                "the planner chose a source past the job's {}",
                names.len()
            ))
        })?;
        for (s, n) in per_source.iter().enumerate() {
            samples_total[s] += n;
            tokens_total[s] += n * shape.seq_len as u64;
        }
        let rec = StepRecord {
            step: plan.step,
            stage: plan.stage.index,
            stage_name: Some(plan.stage_name.clone()),
            seq_len: plan.stage.seq_len,
            rope_theta: trainer.rope_theta(),
            loss: r.loss_sum / r.samples.max(1) as f64,
            global_loss: r.global_loss,
            lr: plan.lr,
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            generation: 0,
            rank: 0,
            tokens: Some(tokens),
            tokens_per_second: step_tokens as f64 / t0.elapsed().as_secs_f64(),
            samples_per_source: per_source,
            samples,
            timing: r.timing,
        };
        // Progress lines count steps done (1-based); the record counts from 0.
        let done = plan.step + 1;
        if done.is_multiple_of(spec.log_every.max(1))
            || plan.step == 0
            || done == steps
            || rec.skipped
        {
            println!(
                "step {:>5}/{steps}  {}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  tokens/s {:.0}{}",
                done,
                plan.stage_name,
                rec.loss,
                rec.lr,
                rec.grad_norm,
                rec.tokens_per_second,
                if rec.skipped {
                    "  (skipped: no update)"
                } else {
                    ""
                }
            );
        }
        if let Some((m, path)) = &mut metrics {
            rec.write_line(m).at(path.as_path())?;
        }
        records.push(rec);
    }
    if let Some((m, path)) = &mut metrics {
        m.flush().at(path.as_path())?;
    }
    if records.is_empty() {
        return Err(Error::Config(
            "the job trained no step (a curriculum of no steps, or --steps 0)".into(),
        ));
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(dir) = &opts.save {
        crate::hf::save(trainer.var_store(), trainer.model_config(), dir)?;
        println!(
            "saved the model as a transformers folder: {}",
            dir.display()
        );
    }
    Ok(RunSummary {
        steps: records,
        seconds,
        source_names: names,
        samples_per_source: samples_total,
        tokens_per_source: tokens_total,
    })
}

/// What `stagecoach-worker bench-train` measures: training throughput on random tokens.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    pub seq_len: usize,
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Timed steps.
    pub steps: usize,
    /// Steps run before the timing starts (allocator warm-up, kernel selection).
    pub warmup: usize,
    pub device: String,
    pub fast_path: FastPath,
    /// Read the loss back every this many steps (the only host synchronisation in the loop).
    pub log_every: usize,
    pub seed: u64,
}

/// One `bench-train` run, printed as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub impl_name: &'static str,
    pub preset: String,
    pub parameters: i64,
    pub device: String,
    pub precision: Precision,
    pub fused_adamw: bool,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Training FLOPs per token (see [`train_flops_per_token`]).
    pub flops_per_token: f64,
    /// Achieved FLOP/s over `peak_flops`, when a peak is given.
    pub mfu: Option<f64>,
    pub peak_flops: Option<f64>,
    /// GPU memory in use at the end (total - free from the driver): with libtorch's caching
    /// allocator, which keeps what it reserved, about the peak reserved memory. None on CPU.
    pub gpu_memory_used_bytes: Option<u64>,
    /// The losses read every `log_every` steps (warm-up included), to show training happens.
    pub losses: Vec<f64>,
}

/// Training FLOPs per token as PaLM's appendix B counts them for MFU: `6 N` for the matrix
/// products of forward and backward over the `N` parameters (the tied embedding counted once,
/// as the output projection; the lookup is free), plus `12 · layers · heads · head_dim · seq`
/// for the attention scores and their weighted sum (QKᵀ and AV, 2 FLOPs per multiply-add,
/// backward twice the forward). The causal mask is not halved out, as in PaLM, so MFUs compare
/// with those usually published.
pub fn train_flops_per_token(config: &ModelConfig, seq_len: usize) -> f64 {
    let n = config.num_parameters() as f64;
    let attn = 12.0
        * config.num_hidden_layers as f64
        * (config.num_attention_heads * config.head_dim) as f64
        * seq_len as f64;
    6.0 * n + attn
}

/// Trains a preset on random tokens and reports its throughput. The device is synchronised
/// only when the warm-up ends, every `log_every` steps (to read the loss) and at the end.
pub fn bench_train(opts: &BenchOptions, peak_flops: Option<f64>) -> Result<BenchReport> {
    if opts.seq_len == 0 || opts.micro_batch == 0 || opts.accumulation == 0 || opts.steps == 0 {
        return Err(Error::Config(
            "bench-train needs positive --seq, --micro-batch, --accumulation and --steps".into(),
        ));
    }
    let device = crate::device::parse(&opts.device)?;
    let mut config = ModelConfig::preset(&opts.preset)?;
    config.max_position_embeddings = config.max_position_embeddings.max(opts.seq_len as i64);
    tch::manual_seed(opts.seed as i64);
    let vs = VarStore::new(device);
    let mut model = Llama::new(&vs, config.clone())?;
    model.set_precision(opts.fast_path.precision);
    let mut optimizer = AdamW::new(&vs, AdamWConfig::default())?;
    optimizer.set_fused(opts.fast_path.fused_adamw)?;
    // A few host batches, pinned on CUDA so that their copies are asynchronous.
    let shape = [opts.micro_batch as i64, opts.seq_len as i64 + 1];
    let host: Vec<Tensor> = (0..4)
        .map(|_| {
            let t = Tensor::randint(config.vocab_size, shape, (Kind::Int64, Device::Cpu));
            if device.is_cuda() {
                t.pin_memory(device)
            } else {
                t
            }
        })
        .collect();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut losses = Vec::new();
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let mut start = Instant::now();
    let log_every = opts.log_every.max(1);
    let mut micro = 0usize;
    for step in 0..opts.warmup + opts.steps {
        if step == opts.warmup {
            sync();
            start = Instant::now();
        }
        for _ in 0..opts.accumulation {
            let batch = host[micro % host.len()].f_to_device_(device, Kind::Int64, true, false)?;
            micro += 1;
            let loss = model.loss(&batch)?;
            (&loss / opts.accumulation as f64).f_backward()?;
            loss_acc += loss.detach() / opts.accumulation as f64;
        }
        let _norm = optimizer.clip_grad_norm_on_device();
        optimizer.step(3e-4);
        optimizer.zero_grad();
        if (step + 1) % log_every == 0 {
            losses.push(loss_acc.f_double_value(&[])? / log_every as f64);
            let _ = loss_acc.zero_();
        }
    }
    sync();
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (opts.steps * opts.accumulation * opts.micro_batch * opts.seq_len) as f64;
    let tokens_per_second = tokens / seconds;
    let flops_per_token = train_flops_per_token(&config, opts.seq_len);
    Ok(BenchReport {
        impl_name: "stagecoach",
        preset: opts.preset.clone(),
        parameters: config.num_parameters(),
        device: opts.device.clone(),
        precision: opts.fast_path.precision,
        fused_adamw: opts.fast_path.fused_adamw,
        seq_len: opts.seq_len,
        micro_batch: opts.micro_batch,
        accumulation: opts.accumulation,
        steps: opts.steps,
        warmup: opts.warmup,
        seconds,
        tokens_per_second,
        flops_per_token,
        mfu: peak_flops.map(|p| tokens_per_second * flops_per_token / p),
        peak_flops,
        gpu_memory_used_bytes: if device.is_cuda() {
            gpu_memory_used()
        } else {
            None
        },
        losses,
    })
}

/// Bytes of GPU memory in use on the current CUDA context (total - free), if the driver answers.
fn gpu_memory_used() -> Option<u64> {
    use cudarc::driver::{result, sys};
    // SAFETY: only checks whether libcuda can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    result::init().ok()?;
    let (free, total) = result::mem_get_info().ok()?;
    Some((total - free) as u64)
}

/// A small job on data written for the test, shared by the tests of this module and `agent`.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::Path;

    use stagecoach_proto::v1;

    use crate::model::{Llama, ModelConfig};
    use crate::shards::{ShardWriter, TokenSize};

    /// Writes a folder of `files` shards of `tokens` byte-level tokens each.
    pub fn shards(dir: &Path, files: usize, tokens: usize, seed: u64) {
        std::fs::create_dir_all(dir).unwrap();
        for f in 0..files {
            let mut w =
                ShardWriter::create(&dir.join(format!("{f:02}.ds")), TokenSize::U16, "bytes")
                    .unwrap();
            let doc: Vec<u32> = (0..tokens as u64)
                .map(|i| ((i * 7919 + seed * 104_729 + f as u64 * 31) % 256) as u32)
                .collect();
            w.write_document(&doc).unwrap();
            w.finish().unwrap();
        }
    }

    /// A micro model over source "a" (two files, also its own held-out folder) and source "b"
    /// (no held-out folder). The model starts from a transformers folder written here, so that
    /// trainers built from the job are identical whatever else uses libtorch's global random
    /// generator meanwhile (tests run in parallel).
    pub fn job(dir: &Path) -> v1::JobSpec {
        shards(&dir.join("a"), 2, 80, 1);
        shards(&dir.join("b"), 1, 50, 2);
        let config = ModelConfig::preset("micro").unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = Llama::new(&vs, config.clone()).unwrap();
        crate::hf::save(&vs, &config, &dir.join("model")).unwrap();
        let path = |p: &str| dir.join(p).display().to_string();
        v1::JobSpec {
            name: "test".into(),
            model_from: path("model"),
            optimizer: Some(v1::OptimizerSpec {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.01,
                grad_clip: 1.0,
            }),
            seq_len: 32,
            sources: vec![
                v1::SourceSpec {
                    name: "a".into(),
                    path: path("a"),
                    eval_path: path("a"),
                },
                v1::SourceSpec {
                    name: "b".into(),
                    path: path("b"),
                    eval_path: String::new(),
                },
            ],
            threads: 1,
            init_seed: 3,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::job;
    use super::*;

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

    #[test]
    fn reports_travel_exactly_through_f32_sums() {
        for v in [
            0u64,
            1,
            0xffff,
            0x1_0000,
            u64::MAX,
            f64::NAN.to_bits(),
            2.75f64.to_bits(),
        ] {
            let mut slots = [0f32; 4];
            encode_u64(v, &mut slots);
            // What another rank's zeros add.
            let summed: Vec<f32> = slots.iter().map(|s| s + 0.0 + 0.0).collect();
            assert_eq!(decode_u64(&summed), v);
        }
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
                        &addrs,
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
