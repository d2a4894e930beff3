//! The single-worker training configuration (`stagecoach-worker train --config FILE`), TOML.
//!
//! ```toml
//! [model]
//! preset = "tiny"              # or: from = "path/to/transformers/folder"
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
//! decay_steps = 40             # or decay_fraction = 0.2
//! decay = "linear"             # or "1-sqrt"
//! min_lr = 0.0
//!
//! [data]
//! seq_len = 128
//! micro_batch_size = 8
//! grad_accum = 1
//! seed = 1234
//! sources = [ { name = "prose", path = "data/demo/prose/train", weight = 0.6 }, ... ]
//!
//! [train]
//! steps = 200
//! log_every = 10
//! device = "cpu"
//! threads = 2                  # 0: libtorch's default
//! ```
//! Relative paths are relative to the working directory. Unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};
use crate::model::ModelConfig;
use crate::optim::AdamWConfig;
use crate::schedule::{DecayShape, Wsd};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub optimizer: AdamWConfig,
    pub schedule: ScheduleSection,
    pub data: DataSection,
    pub train: TrainSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A preset name (see [`crate::model::PRESETS`]).
    pub preset: Option<String>,
    /// A transformers model folder to start from (its config and weights).
    pub from: Option<PathBuf>,
    /// Overrides RoPE θ of the preset or folder.
    pub rope_theta: Option<f64>,
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
    pub decay: DecayShape,
    #[serde(default)]
    pub min_lr: f64,
}

fn linear() -> DecayShape {
    DecayShape::Linear
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub seq_len: usize,
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub seed: u64,
    pub sources: Vec<SourceSection>,
}

fn one() -> usize {
    1
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
    pub threads: usize,
    /// Seed of the weight initialisation.
    #[serde(default)]
    pub init_seed: u64,
}

fn ten() -> u64 {
    10
}

fn cpu() -> String {
    "cpu".into()
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).at(path)?;
        let config: TrainConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what can be checked without touching the data.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        match (&self.model.preset, &self.model.from) {
            (Some(_), Some(_)) => {
                return bad("[model]: give either preset or from, not both".into())
            }
            (None, None) => {
                return bad(
                    "[model]: give preset = \"tiny\" (or another preset) or from = \"folder\""
                        .into(),
                )
            }
            _ => {}
        }
        self.optimizer.validate()?;
        self.schedule()?.validate()?;
        let d = &self.data;
        if d.seq_len == 0 || d.micro_batch_size == 0 || d.grad_accum == 0 {
            return bad("[data]: seq_len, micro_batch_size and grad_accum must be positive".into());
        }
        if d.sources.is_empty() {
            return bad(
                "[data]: sources is empty; list at least one { name, path, weight }".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for s in &d.sources {
            if !s.weight.is_finite() || s.weight < 0.0 {
                return bad(format!(
                    "[data] source {:?}: weight must be a non-negative number, got {}",
                    s.name, s.weight
                ));
            }
            if !names.insert(&s.name) {
                return bad(format!("[data]: source name {:?} appears twice", s.name));
            }
        }
        let sum: f64 = d.sources.iter().map(|s| s.weight).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return bad(format!(
                "[data]: source weights sum to {sum}, they must sum to 1"
            ));
        }
        if self.train.steps == 0 {
            return bad("[train]: steps must be positive".into());
        }
        Ok(())
    }

    /// The WSD schedule over the run.
    pub fn schedule(&self) -> Result<Wsd> {
        let s = &self.schedule;
        let total = self.train.steps;
        let decay_steps = match (s.decay_steps, s.decay_fraction) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "[schedule]: give decay_steps or decay_fraction, not both".into(),
                ))
            }
            (Some(n), None) => n,
            (None, Some(f)) if (0.0..=1.0).contains(&f) => (f * total as f64).round() as u64,
            (None, Some(f)) => {
                return Err(Error::Config(format!(
                    "[schedule]: decay_fraction must lie in [0, 1], got {f}"
                )))
            }
            (None, None) => 0,
        };
        Ok(Wsd {
            peak_lr: s.peak_lr,
            warmup_steps: s.warmup_steps,
            total_steps: total,
            decay_steps,
            decay: s.decay,
            min_lr: s.min_lr,
        })
    }

    /// The model shape: the preset, or the folder's `config.json`, with overrides applied.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let mut c = match (&self.model.preset, &self.model.from) {
            (Some(p), _) => ModelConfig::preset(p)?,
            (None, Some(dir)) => crate::hf::read_config(&dir.join("config.json"))?,
            (None, None) => unreachable!("validated"),
        };
        if let Some(theta) = self.model.rope_theta {
            c.rope_theta = theta;
        }
        if self.data.seq_len as i64 > c.max_position_embeddings {
            c.max_position_embeddings = self.data.seq_len as i64;
        }
        c.validate()?;
        Ok(c)
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
        micro_batch_size = 2
        sources = [{ name = "a", path = "x", weight = 0.5 }, { name = "b", path = "y", weight = 0.5 }]
        [train]
        steps = 10
    "#;

    #[test]
    fn parses_with_defaults() {
        let c: TrainConfig = toml::from_str(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.optimizer, AdamWConfig::default());
        assert_eq!(c.schedule().unwrap().decay_steps, 5);
        assert_eq!(c.data.grad_accum, 1);
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
                "exceed total_steps",
            ),
            (
                GOOD.replace("name = \"b\"", "name = \"a\""),
                "appears twice",
            ),
            (GOOD.replace("preset = \"micro\"", ""), "give preset"),
        ];
        for (text, want) in cases {
            let err = toml::from_str::<TrainConfig>(&text)
                .map_err(|e| Error::Config(e.to_string()))
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "expected {want:?} in {err}");
        }
    }
}
