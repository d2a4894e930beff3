//! The single-worker training loop: a weighted mixture of shard folders, the model, AdamW with
//! the WSD schedule, gradient accumulation and clipping; one line of progress per `log_every`
//! steps and, optionally, one JSON record per step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::config::TrainConfig;
use crate::error::{Error, IoContext, Result};
use crate::mixture::{Mixture, SampleId, Source};
use crate::model::{Llama, ModelConfig};
use crate::optim::AdamW;
use crate::shards::{ShardFolder, TokenSize};

/// Options of one run that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `[train].device`.
    pub device: Option<String>,
    /// Overrides `[train].steps` (the schedule keeps the configured length).
    pub steps: Option<u64>,
    /// Write one JSON object per step here.
    pub metrics_out: Option<PathBuf>,
    /// Save the final weights as a transformers folder here.
    pub save: Option<PathBuf>,
    /// Print nothing but errors.
    pub quiet: bool,
}

/// One step's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_second: f64,
    /// Samples taken from each source in this step, in `[data].sources` order.
    pub samples_per_source: Vec<u64>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: Vec<StepRecord>,
    pub seconds: f64,
    pub source_names: Vec<String>,
    pub samples_per_source: Vec<u64>,
}

/// Opens the sources of the mixture, checking each holds at least one sample.
pub fn open_sources(config: &TrainConfig, model: &ModelConfig) -> Result<Vec<Source>> {
    let size = TokenSize::for_vocab(model.vocab_size as usize);
    config
        .data
        .sources
        .iter()
        .map(|s| {
            let folder = ShardFolder::open(&s.path, size)?;
            let num_samples = folder.num_samples(config.data.seq_len);
            if num_samples == 0 && s.weight > 0.0 {
                return Err(Error::shard(
                    &s.path,
                    format!(
                        "source {:?} holds {} tokens, fewer than one sample of seq_len + 1 = {}",
                        s.name,
                        folder.num_tokens(),
                        config.data.seq_len + 1
                    ),
                ));
            }
            Ok(Source {
                name: s.name.clone(),
                folder,
                weight: s.weight,
                num_samples,
            })
        })
        .collect()
}

/// Reads `ids` into a `[n, seq_len + 1]` int64 tensor, checking every token is in the vocabulary.
pub fn batch_tensor(
    mixture: &Mixture,
    ids: &[SampleId],
    seq_len: usize,
    vocab: i64,
) -> Result<Tensor> {
    let window = seq_len + 1;
    let mut buf = vec![0i64; ids.len() * window];
    for (id, out) in ids.iter().zip(buf.chunks_exact_mut(window)) {
        let source = &mixture.sources()[id.source];
        source.folder.read_sample(id.index, out)?;
        if let Some(bad) = out.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(Error::shard(
                source.folder.dir(),
                format!("sample {} holds token {bad}, outside the model's vocabulary of {vocab}; tokenized with another tokenizer?", id.index),
            ));
        }
    }
    Ok(Tensor::from_slice(&buf).view([ids.len() as i64, window as i64]))
}

/// Trains as `config` says; returns every step's record.
pub fn run(config: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let device = crate::device::parse(opts.device.as_deref().unwrap_or(&config.train.device))?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    let model_config = config.model_config()?;
    let schedule = config.schedule()?;
    let sources = open_sources(config, &model_config)?;
    let source_names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let mut mixture = Mixture::new(sources, config.data.seed);

    tch::manual_seed(config.train.init_seed as i64);
    let mut vs = VarStore::new(device);
    let model = Llama::new(&vs, model_config.clone())?;
    if let Some(dir) = &config.model.from {
        crate::hf::load(&mut vs, dir)?;
    }
    let mut optimizer = AdamW::new(&vs, config.optimizer.clone())?;

    let d = &config.data;
    let steps = opts.steps.unwrap_or(config.train.steps);
    let tokens_per_step = (d.micro_batch_size * d.grad_accum * d.seq_len) as u64;
    if !opts.quiet {
        println!(
            "training {} ({:.2}M parameters) on {device:?}: {steps} steps of {tokens_per_step} tokens \
             ({} x {} x {} tokens), sources: {}",
            config.model.preset.as_deref().unwrap_or("model"),
            model_config.num_parameters() as f64 / 1e6,
            d.grad_accum,
            d.micro_batch_size,
            d.seq_len,
            mixture
                .sources()
                .iter()
                .map(|s| format!("{}={} ({} samples)", s.name, s.weight, s.num_samples))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut metrics = match &opts.metrics_out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).at(p)?)),
        None => None,
    };
    let start = Instant::now();
    let mut records = Vec::with_capacity(steps as usize);
    let mut totals = vec![0u64; source_names.len()];
    for step in 0..steps {
        let t0 = Instant::now();
        let mut loss_sum = 0.0;
        let mut per_source = vec![0u64; source_names.len()];
        for _ in 0..d.grad_accum {
            let ids: Vec<SampleId> = (0..d.micro_batch_size)
                .map(|_| mixture.next_sample())
                .collect();
            for id in &ids {
                per_source[id.source] += 1;
            }
            let batch =
                batch_tensor(&mixture, &ids, d.seq_len, model_config.vocab_size)?.to_device(device);
            let loss = model.loss(&batch)?;
            let scaled = &loss / d.grad_accum as f64;
            scaled.f_backward()?;
            loss_sum += loss.to_kind(Kind::Double).double_value(&[]);
        }
        let loss = loss_sum / d.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Config(format!(
                "loss became {loss} at step {step}; lower the learning rate"
            )));
        }
        let grad_norm = optimizer.clip_grad_norm();
        let lr = schedule.lr(step);
        optimizer.step(lr);
        optimizer.zero_grad();
        let secs = t0.elapsed().as_secs_f64();
        for (t, n) in totals.iter_mut().zip(&per_source) {
            *t += n;
        }
        let rec = StepRecord {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens: tokens_per_step * (step + 1),
            tokens_per_second: tokens_per_step as f64 / secs,
            samples_per_source: per_source,
        };
        if !opts.quiet
            && ((step + 1) % config.train.log_every.max(1) == 0 || step == 0 || step + 1 == steps)
        {
            println!(
                "step {:>5}/{steps}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  tokens/s {:.0}",
                rec.step, rec.loss, rec.lr, rec.grad_norm, rec.tokens_per_second
            );
        }
        if let Some(m) = &mut metrics {
            let line = serde_json::to_string(&rec).expect("serializable");
            writeln!(m, "{line}").at(opts.metrics_out.as_deref().unwrap_or(Path::new("-")))?;
        }
        records.push(rec);
    }
    if let Some(m) = &mut metrics {
        m.flush()
            .at(opts.metrics_out.as_deref().unwrap_or(Path::new("-")))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(dir) = &opts.save {
        crate::hf::save(&vs, &model_config, dir)?;
        if !opts.quiet {
            println!(
                "saved the model as a transformers folder: {}",
                dir.display()
            );
        }
    }
    Ok(RunSummary {
        steps: records,
        seconds,
        source_names,
        samples_per_source: totals,
    })
}
