//! The standalone `train` command: one worker alone (world size 1) through the job's whole
//! curriculum, planned by the same curriculum the coordinator runs.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use stagecoach_core::curriculum::Curriculum;
use stagecoach_proto::v1;

use super::{FastPath, Guard, Shape, Trainer};
use crate::collective::Solo;
use crate::error::{Error, IoContext, Result};
use crate::steplog::{self, StepRecord};

/// What a failed write of a progress line names.
const PROGRESS: &str = "the progress output";

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
/// Progress lines go to `out`; failing to write them (a closed pipe) ends the run with an
/// [`Error::Io`].
pub fn run_standalone(
    spec: &v1::JobSpec,
    opts: &RunOptions,
    out: &mut dyn Write,
) -> Result<RunSummary> {
    let device = crate::device::parse(opts.device.as_deref().unwrap_or(&spec.device))?;
    let mut trainer = Trainer::new(spec, device)?;
    trainer.set_fast_path(opts.fast_path)?;
    let names = trainer.sources().names();
    let source_tokens = trainer.sources().num_tokens();
    let mut curriculum = Curriculum::new(spec, &source_tokens)
        .map_err(|e| Error::Config(format!("the curriculum cannot be planned: {e}")))?;
    let steps = opts.steps.unwrap_or(spec.total_steps).min(spec.total_steps);
    let c = trainer.model_config();
    writeln!(
        out,
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
    )
    .at(PROGRESS)?;
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
            writeln!(
                out,
                "stage {} {:?} after {} steps: seq_len {}, rope θ {}, {} samples per step in micro-batches of {}",
                plan.stage.index,
                plan.stage_name,
                plan.step,
                shape.seq_len,
                trainer.rope_theta(),
                plan.global_batch,
                shape.micro_batch
            )
            .at(PROGRESS)?;
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
            writeln!(
                out,
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
            )
            .at(PROGRESS)?;
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
        writeln!(
            out,
            "saved the model as a transformers folder: {}",
            dir.display()
        )
        .at(PROGRESS)?;
    }
    Ok(RunSummary {
        steps: records,
        seconds,
        source_names: names,
        samples_per_source: samples_total,
        tokens_per_source: tokens_total,
    })
}
