//! The training step, shared by the standalone `train` command and the coordinator-driven
//! worker: forward/backward over micro-batches, gradient all-reduce in buckets, global-norm
//! clipping, AdamW at the schedule's learning rate.
//!
//! A step's gradient is the mean over the *global* batch: each micro-batch's mean loss is
//! weighted by `its samples / global batch` before backward, and ranks sum their gradients, so
//! the update does not depend on how the batch was split between ranks or micro-batches.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use stagecoach_coordinator::plan::Plan;
use stagecoach_proto::v1;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, Solo};
use crate::error::{Error, IoContext, Result};
use crate::job::{self, Sources};
use crate::model::{Llama, ModelConfig};
use crate::optim::AdamW;

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
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub timing: Timing,
}

/// The model, its optimizer and the data, owned by one thread.
pub struct Trainer {
    vs: VarStore,
    model: Llama,
    optimizer: AdamW,
    sources: Sources,
    micro_batch: usize,
    device: Device,
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
        tch::manual_seed(spec.init_seed as i64);
        let mut vs = VarStore::new(device);
        let model = Llama::new(&vs, config)?;
        if !spec.model_from.is_empty() {
            crate::hf::load(&mut vs, std::path::Path::new(&spec.model_from))?;
        }
        let optimizer = AdamW::new(&vs, job::optimizer(spec)?)?;
        let micro_batch = spec.micro_batch_size.max(1) as usize;
        Ok(Trainer {
            vs,
            model,
            optimizer,
            sources,
            micro_batch,
            device,
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
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

    /// One optimizer step over `samples` (this rank's share of a global batch of `global_batch`).
    /// On error no update is applied and the gradients are cleared.
    pub fn step(
        &mut self,
        samples: &[(usize, u64)],
        global_batch: usize,
        lr: f64,
        comm: &mut dyn Collective,
    ) -> Result<StepResult> {
        let result = self.try_step(samples, global_batch, lr, comm);
        if result.is_err() {
            self.optimizer.zero_grad();
        }
        result
    }

    fn try_step(
        &mut self,
        samples: &[(usize, u64)],
        global_batch: usize,
        lr: f64,
        comm: &mut dyn Collective,
    ) -> Result<StepResult> {
        let mut timing = Timing::default();
        let mut loss_sum = 0.0;
        for chunk in samples.chunks(self.micro_batch) {
            let t0 = Instant::now();
            let batch = self.sources.batch(chunk)?.to_device(self.device);
            timing.data += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let loss = self.model.loss(&batch)?;
            (&loss * (chunk.len() as f64 / global_batch as f64)).f_backward()?;
            loss_sum += loss.to_kind(Kind::Double).double_value(&[]) * chunk.len() as f64;
            timing.forward_backward += t1.elapsed().as_secs_f64();
        }
        if !loss_sum.is_finite() {
            return Err(Error::Config(format!(
                "the loss became {loss_sum}; lower the learning rate"
            )));
        }
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
        timing.allreduce = t2.elapsed().as_secs_f64();
        let t3 = Instant::now();
        let grad_norm = self.optimizer.clip_grad_norm();
        self.optimizer.step(lr);
        self.optimizer.zero_grad();
        timing.optimizer = t3.elapsed().as_secs_f64();
        Ok(StepResult {
            loss_sum,
            samples: samples.len(),
            grad_norm,
            timing,
        })
    }
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
    /// Stop after this many steps (the schedule keeps the configured length).
    pub steps: Option<u64>,
    /// Write one JSON object per step here.
    pub metrics_out: Option<PathBuf>,
    /// Save the final weights as a transformers folder here.
    pub save: Option<PathBuf>,
}

/// One step's numbers, as written to the metrics file.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_second: f64,
    /// Samples taken from each source in this step, in the job's source order.
    pub samples_per_source: Vec<u64>,
    /// The samples of this step: (source, index).
    pub samples: Vec<(usize, u64)>,
    pub timing: Timing,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: Vec<StepRecord>,
    pub seconds: f64,
    pub source_names: Vec<String>,
    pub samples_per_source: Vec<u64>,
}

/// Trains alone (world size 1) as the job says, drawing batches from the sample plan.
pub fn run_standalone(spec: &v1::JobSpec, opts: &RunOptions) -> Result<RunSummary> {
    let device = crate::device::parse(opts.device.as_deref().unwrap_or(&spec.device))?;
    let schedule = job::schedule(spec)?;
    let mut trainer = Trainer::new(spec, device)?;
    let weights = spec.sources.iter().map(|s| s.weight).collect();
    let mut plan = Plan::new(
        weights,
        trainer.sources().sizes.clone(),
        spec.data_seed,
        vec![0; spec.sources.len()],
    )
    .map_err(|e| Error::Config(format!("data mixture: {e}")))?;
    let names = trainer.sources().names.clone();
    let steps = opts.steps.unwrap_or(spec.total_steps);
    let global_batch = spec.global_batch as usize;
    let tokens_per_step = (global_batch * spec.seq_len as usize) as u64;
    let c = trainer.model_config();
    println!(
        "training {} ({:.2}M parameters) on {device:?}: {steps} steps of {global_batch} x {} tokens \
         (micro-batches of {}), sources: {}",
        if spec.model_preset.is_empty() { &spec.model_from } else { &spec.model_preset },
        c.num_parameters() as f64 / 1e6,
        spec.seq_len,
        spec.micro_batch_size,
        names
            .iter()
            .zip(&spec.sources)
            .zip(&trainer.sources().sizes)
            .map(|((n, s), size)| format!("{n}={} ({size} samples)", s.weight))
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
    let mut totals = vec![0u64; names.len()];
    let mut solo = Solo;
    for step in 0..steps {
        let t0 = Instant::now();
        let samples: Vec<(usize, u64)> = plan
            .take(global_batch)
            .into_iter()
            .map(|s| (s.source, s.index))
            .collect();
        let lr = schedule.lr(step);
        let r = trainer.step(&samples, global_batch, lr, &mut solo)?;
        let mut per_source = vec![0u64; names.len()];
        for &(s, _) in &samples {
            per_source[s] += 1;
            totals[s] += 1;
        }
        let rec = StepRecord {
            step: step + 1,
            loss: r.loss_sum / r.samples as f64,
            lr,
            grad_norm: r.grad_norm,
            tokens: tokens_per_step * (step + 1),
            tokens_per_second: tokens_per_step as f64 / t0.elapsed().as_secs_f64(),
            samples_per_source: per_source,
            samples,
            timing: r.timing,
        };
        if (step + 1) % spec.log_every.max(1) == 0 || step == 0 || step + 1 == steps {
            println!(
                "step {:>5}/{steps}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  tokens/s {:.0}",
                rec.step, rec.loss, rec.lr, rec.grad_norm, rec.tokens_per_second
            );
        }
        if let Some((m, path)) = &mut metrics {
            writeln!(m, "{}", serde_json::to_string(&rec).expect("serializable"))
                .at(path.as_path())?;
        }
        records.push(rec);
    }
    if let Some((m, path)) = &mut metrics {
        m.flush().at(path.as_path())?;
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
        samples_per_source: totals,
    })
}
