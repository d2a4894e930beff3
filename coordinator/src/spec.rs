//! The job specification file (TOML), validated, and its wire form ([`v1::JobSpec`]).
//!
//! ```toml
//! [job]
//! name = "demo"
//!
//! [model]
//! preset = "tiny"              # or: from = "path/to/transformers/folder"
//! # rope_theta = 10000.0       # overrides the preset's
//!
//! [optimizer]                  # AdamW; these are the defaults
//! betas = [0.9, 0.95]
//! eps = 1e-8
//! weight_decay = 0.01
//! grad_clip = 1.0
//!
//! [schedule]                   # WSD over [train].steps
//! peak_lr = 3e-3
//! warmup_steps = 20
//! decay_fraction = 0.2         # or decay_steps = 40
//! decay = "linear"             # or "1-sqrt"
//! min_lr = 0.0
//!
//! [data]
//! seq_len = 128
//! global_batch = 16            # samples per optimizer step, over all workers
//! micro_batch_size = 8         # samples per forward/backward on one worker
//! seed = 1234
//! sources = [ { name = "prose", path = "data/demo/prose/train", weight = 0.6 }, ... ]
//!
//! [train]
//! steps = 200
//! log_every = 10
//! device = "cpu"               # for the standalone `train`; `join --device` for workers
//! threads = 2                  # 0: libtorch's default
//! init_seed = 0
//!
//! [workers]
//! min = 2                      # a world forms when this many workers are registered
//! max = 2
//! lease_ms = 10000
//! heartbeat_ms = 1000
//! collective_timeout_ms = 30000
//! rendezvous_ms = 5000         # with min workers present, wait this long for up to max
//! ```
//! Relative paths are relative to the working directory of the workers. Unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use stagecoach_proto::v1;

/// A problem with a job file: what is wrong and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    #[serde(default)]
    pub job: JobSection,
    pub model: ModelSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub workers: WorkersSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
}

impl Default for JobSection {
    fn default() -> Self {
        JobSection {
            name: "stagecoach".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    pub from: Option<PathBuf>,
    pub rope_theta: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
}

impl Default for OptimizerSection {
    /// The SmolLM2 values: β = (0.9, 0.95), ε = 1e-8, weight decay 0.01, clip 1.0.
    fn default() -> Self {
        OptimizerSection {
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Decay {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub peak_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    pub decay_steps: Option<u64>,
    pub decay_fraction: Option<f64>,
    #[serde(default = "linear")]
    pub decay: Decay,
    #[serde(default)]
    pub min_lr: f64,
}

fn linear() -> Decay {
    Decay::Linear
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub seq_len: u32,
    pub global_batch: u32,
    pub micro_batch_size: u32,
    #[serde(default)]
    pub seed: u64,
    pub sources: Vec<SourceSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    pub path: PathBuf,
    pub weight: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    #[serde(default = "ten")]
    pub log_every: u64,
    #[serde(default = "cpu")]
    pub device: String,
    #[serde(default)]
    pub threads: u32,
    #[serde(default)]
    pub init_seed: u64,
}

fn ten() -> u64 {
    10
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    pub min: u32,
    pub max: u32,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// How long a worker waits on a silent peer in a collective before giving up.
    pub collective_timeout_ms: u64,
    /// Once `min` workers are present, how long to wait for more (up to `max`) before forming
    /// a world.
    pub rendezvous_ms: u64,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            min: 1,
            max: 1,
            lease_ms: 10_000,
            heartbeat_ms: 1_000,
            collective_timeout_ms: 30_000,
            rendezvous_ms: 5_000,
        }
    }
}

impl JobFile {
    /// Reads and validates a job file.
    pub fn load(path: &Path) -> Result<JobFile, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError(format!("{}: {e}", path.display())))?;
        let job: JobFile =
            toml::from_str(&text).map_err(|e| SpecError(format!("{}: {e}", path.display())))?;
        job.validate()
            .map_err(|e| SpecError(format!("{}: {}", path.display(), e.0)))?;
        Ok(job)
    }

    /// Checks what can be checked without the data.
    pub fn validate(&self) -> Result<(), SpecError> {
        match (&self.model.preset, &self.model.from) {
            (Some(_), Some(_)) => return bad("[model]: give either preset or from, not both"),
            (None, None) => {
                return bad(
                    "[model]: give preset = \"tiny\" (or another preset) or from = \"folder\"",
                )
            }
            _ => {}
        }
        if let Some(theta) = self.model.rope_theta {
            if theta.is_nan() || theta <= 0.0 {
                return bad(format!("[model] rope_theta must be positive, got {theta}"));
            }
        }
        let o = &self.optimizer;
        if !(0.0..1.0).contains(&o.betas.0) || !(0.0..1.0).contains(&o.betas.1) {
            return bad(format!(
                "[optimizer] betas must lie in [0, 1), got ({}, {})",
                o.betas.0, o.betas.1
            ));
        }
        if o.eps.is_nan()
            || o.eps <= 0.0
            || [o.weight_decay, o.grad_clip]
                .iter()
                .any(|v| v.is_nan() || *v < 0.0)
        {
            return bad(
                "[optimizer] eps must be positive; weight_decay and grad_clip non-negative",
            );
        }
        let s = &self.schedule;
        if s.peak_lr.is_nan() || s.peak_lr <= 0.0 {
            return bad(format!(
                "[schedule] peak_lr must be positive, got {}",
                s.peak_lr
            ));
        }
        if !(0.0..=s.peak_lr).contains(&s.min_lr) {
            return bad(format!(
                "[schedule] min_lr ({}) must lie in [0, peak_lr]",
                s.min_lr
            ));
        }
        let decay = self.decay_steps()?;
        if s.warmup_steps + decay > self.train.steps {
            return bad(format!(
                "[schedule] warmup_steps ({}) + decay steps ({decay}) exceed [train] steps ({}); shorten one of them",
                s.warmup_steps, self.train.steps
            ));
        }
        let d = &self.data;
        if d.seq_len == 0 || d.global_batch == 0 || d.micro_batch_size == 0 {
            return bad("[data] seq_len, global_batch and micro_batch_size must be positive");
        }
        if d.sources.is_empty() {
            return bad("[data] sources is empty; list at least one { name, path, weight }");
        }
        let mut names = std::collections::HashSet::new();
        for (i, src) in d.sources.iter().enumerate() {
            if !src.weight.is_finite() || src.weight < 0.0 {
                return bad(format!(
                    "[data] sources[{i}] ({:?}): weight must be a non-negative number, got {}",
                    src.name, src.weight
                ));
            }
            if !names.insert(&src.name) {
                return bad(format!(
                    "[data] sources[{i}]: the name {:?} appears twice",
                    src.name
                ));
            }
        }
        let sum: f64 = d.sources.iter().map(|s| s.weight).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return bad(format!(
                "[data] source weights sum to {sum}; they must sum to 1"
            ));
        }
        if self.train.steps == 0 {
            return bad("[train] steps must be positive");
        }
        let w = &self.workers;
        if w.min == 0 || w.max < w.min {
            return bad(format!(
                "[workers] need 1 <= min <= max, got min {} max {}",
                w.min, w.max
            ));
        }
        if w.max > d.global_batch {
            return bad(format!(
                "[workers] max ({}) exceeds [data] global_batch ({}): every worker needs at least one sample per step",
                w.max, d.global_batch
            ));
        }
        if w.heartbeat_ms == 0 || w.lease_ms <= w.heartbeat_ms {
            return bad(format!(
                "[workers] lease_ms ({}) must exceed heartbeat_ms ({}) (a few heartbeats per lease)",
                w.lease_ms, w.heartbeat_ms
            ));
        }
        Ok(())
    }

    fn decay_steps(&self) -> Result<u64, SpecError> {
        let s = &self.schedule;
        match (s.decay_steps, s.decay_fraction) {
            (Some(_), Some(_)) => bad("[schedule] give decay_steps or decay_fraction, not both"),
            (Some(n), None) => Ok(n),
            (None, Some(f)) if (0.0..=1.0).contains(&f) => {
                Ok((f * self.train.steps as f64).round() as u64)
            }
            (None, Some(f)) => bad(format!(
                "[schedule] decay_fraction must lie in [0, 1], got {f}"
            )),
            (None, None) => Ok(0),
        }
    }

    /// The wire form that workers receive.
    pub fn to_proto(&self) -> v1::JobSpec {
        let o = &self.optimizer;
        let s = &self.schedule;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        v1::JobSpec {
            name: self.job.name.clone(),
            model_preset: self.model.preset.clone().unwrap_or_default(),
            model_from: self.model.from.as_deref().map(path).unwrap_or_default(),
            rope_theta: self.model.rope_theta.unwrap_or(0.0),
            optimizer: Some(v1::OptimizerSpec {
                beta1: o.betas.0,
                beta2: o.betas.1,
                eps: o.eps,
                weight_decay: o.weight_decay,
                grad_clip: o.grad_clip,
            }),
            schedule: Some(v1::ScheduleSpec {
                peak_lr: s.peak_lr,
                warmup_steps: s.warmup_steps,
                decay_steps: self.decay_steps().unwrap_or(0),
                decay: match s.decay {
                    Decay::Linear => v1::DecayShape::Linear,
                    Decay::OneMinusSqrt => v1::DecayShape::OneMinusSqrt,
                }
                .into(),
                min_lr: s.min_lr,
            }),
            seq_len: self.data.seq_len,
            global_batch: self.data.global_batch,
            micro_batch_size: self.data.micro_batch_size,
            sources: self
                .data
                .sources
                .iter()
                .map(|src| v1::SourceSpec {
                    name: src.name.clone(),
                    path: path(&src.path),
                    weight: src.weight,
                })
                .collect(),
            total_steps: self.train.steps,
            init_seed: self.train.init_seed,
            data_seed: self.data.seed,
            threads: self.train.threads,
            device: self.train.device.clone(),
            log_every: self.train.log_every,
            collective_timeout_ms: self.workers.collective_timeout_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [model]
        preset = "micro"
        [schedule]
        peak_lr = 1e-3
        warmup_steps = 2
        decay_fraction = 0.5
        [data]
        seq_len = 16
        global_batch = 4
        micro_batch_size = 2
        sources = [{ name = "a", path = "x", weight = 0.5 }, { name = "b", path = "y", weight = 0.5 }]
        [train]
        steps = 10
    "#;

    fn check(text: &str) -> Result<JobFile, SpecError> {
        let job: JobFile = toml::from_str(text).map_err(|e| SpecError(e.to_string()))?;
        job.validate().map(|_| job)
    }

    #[test]
    fn parses_with_defaults() {
        let job = check(GOOD).unwrap();
        assert_eq!(job.optimizer, OptimizerSection::default());
        let p = job.to_proto();
        assert_eq!(p.schedule.unwrap().decay_steps, 5);
        assert_eq!(p.sources.len(), 2);
        assert_eq!(job.workers.min, 1);
    }

    #[test]
    fn mistakes_are_explained() {
        let cases = [
            (
                GOOD.replace("weight = 0.5 }]", "weight = 0.4 }]"),
                "sum to 0.9",
            ),
            (
                GOOD.replace("steps = 10", "steps = 10\nstpes = 3"),
                "unknown field `stpes`",
            ),
            (
                GOOD.replace(
                    "decay_fraction = 0.5",
                    "decay_fraction = 0.5\ndecay_steps = 2",
                ),
                "not both",
            ),
            (
                GOOD.replace("warmup_steps = 2", "warmup_steps = 9"),
                "exceed [train] steps",
            ),
            (
                GOOD.replace("name = \"b\"", "name = \"a\""),
                "appears twice",
            ),
            (GOOD.replace("preset = \"micro\"", ""), "give preset"),
            (format!("{GOOD}\n[workers]\nmin = 3\nmax = 2"), "min <= max"),
            (
                format!("{GOOD}\n[workers]\nmin = 1\nmax = 8"),
                "exceeds [data] global_batch",
            ),
        ];
        for (text, want) in cases {
            let err = check(&text).unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?} in {err}");
        }
    }
}
