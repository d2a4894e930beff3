//! The job specification file (TOML), validated, and its wire form ([`v1::JobSpec`]).
//!
//! ```toml
//! [job]
//! name = "demo"
//!
//! [model]
//! preset = "tiny"              # or: from = "path/to/transformers/folder" (exactly one of the two)
//! # rope_theta = 10000.0       # default: the preset's (see PRESETS)
//! # max_seq_len = 1024         # the longest sequence any stage may use; default: the preset's
//!                              # context. Raise it (with rope_theta) for context extension.
//!
//! [optimizer]                  # AdamW; these are the defaults
//! betas = [0.9, 0.95]
//! eps = 1e-8
//! weight_decay = 0.01
//! grad_clip = 1.0
//!
//! [schedule]                   # WSD: warmup, stable, decay
//! peak_lr = 3e-3
//! warmup_steps = 30
//! decay = "linear"             # or "1-sqrt"
//! min_lr = 0.0
//! decay_start = { stage = "decay" }   # or { step = 240 } or { tokens = 983_040 }; the decay runs
//!                                     # from there to the end of the last stage. Absent: no decay.
//!
//! [data]
//! seed = 1234
//! global_batch_tokens = 4096   # tokens per optimizer step over all workers, in every stage
//! micro_batch_tokens = 2048    # tokens per forward/backward on one worker
//! eval_samples = 16            # held-out samples per source; default 32 with an eval folder, else 0
//! # eval_seq_len = 256         # default: the first stage's seq_len
//!
//! [[sources]]                  # every source any stage uses; their order is their id
//! name = "prose"
//! path = "runs/demo/data/prose/train"   # a folder of .ds shards
//! eval = "runs/demo/data/prose/valid"   # optional: held-out .ds shards
//!
//! [[stages]]                   # in order
//! name = "stable-1"
//! until = { steps = 120 }      # or { tokens = N }: where the stage ENDS, counted from the start of
//!                              # the job; tokens are rounded up to whole steps
//! seq_len = 256
//! # rope_theta = 10000.0       # default: the previous stage's (the first stage: the model's)
//! # lr = "stable"              # "schedule" (default), "stable" or "decay"
//! mix = { prose = 0.9, code = 0.1 }     # by source name; missing sources weigh 0; sums to 1
//!
//! [train]
//! log_every = 25
//! device = "cpu"               # for the standalone `train`; `join --device` for workers
//! threads = 1                  # 0: libtorch's default
//! init_seed = 0
//!
//! [workers]
//! min = 2                      # a world forms when this many workers are registered
//! max = 2
//! lease_ms = 10000
//! heartbeat_ms = 500
//! collective_timeout_ms = 20000
//! rendezvous_ms = 5000         # with min workers present, wait this long for up to max
//!
//! [checkpoints]                # these are the defaults
//! dir = "checkpoints/demo"     # where rank 0 writes checkpoint folders, as the workers see it;
//!                              # default "checkpoints/<job name>"
//! every_steps = 100            # 0: only on demand (`stagecoach checkpoint now`)
//! keep = 3                     # the last K are kept, plus pinned ones and the latest known-good
//!
//! [spikes]                     # loss-spike detection and what to do (see spike.rs); defaults:
//! enabled = true
//! window = 50                  # unflagged steps in the rolling mean and deviation
//! min_steps = 20               # unflagged steps before the detector arms (NaN/Inf: always)
//! zscore = 6.0                 # flag a loss this many deviations above the rolling mean
//! ratio = 2.0                  # ... or this many times the rolling mean (0: off)
//! grad_norm_zscore = 0.0       # the z-score test on the gradient norm (0: off)
//! consecutive = 1              # flagged steps in a row that make a spike
//! ladder = ["skip", "rollback"]  # skip: drop flagged steps' updates; rollback: on a spike, go
//!                              # back to the last known-good checkpoint before it
//! skip_before = 2              # a rollback skips the data of the steps from (first flagged
//! skip_after = 2               # step - skip_before) through (detection step + skip_after)
//! lr_factor = 1.0              # after a rollback, multiply the LR by this for lr_steps steps
//! lr_steps = 0
//! max_rollbacks = 3            # more rollbacks than this within window_steps: pause the job
//! window_steps = 1000
//! ```
//! Relative paths are relative to the working directory of the workers. Unknown keys are errors.
//!
//! [`JobFile::validate`] reports every problem at once, each starting with its path in the file
//! (`stages[2] ("stage3").mix: ...`) and saying what to change; the coordinator's `datacheck`
//! then checks the folders, which only a machine that sees the data can do.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use stagecoach_proto::v1;

pub mod builder;
mod check;
mod parse_error;

pub use check::{
    align_mix, item_path, shown, Problems, MAX_BATCH_TOKENS, MAX_EVAL_SAMPLES, MAX_MS, MAX_NAME,
    MAX_SAMPLES_PER_STEP, MAX_STEPS, MAX_THREADS, MAX_TOKENS, MAX_WORKERS,
};
use parse_error::toml_error;

use crate::recovery::RecoveryConfig;
use crate::retention::CheckpointConfig;
use crate::spike::{Rung, SpikeConfig};

/// A model preset: its context length and RoPE θ. The worker holds the full shapes and tests
/// that its presets agree with this table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// The sequence length the preset is trained at (its `max_position_embeddings`).
    pub context: u32,
    pub rope_theta: f64,
}

/// Every preset the worker can build, in the order they are listed to users.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "smollm2-135m",
        context: 2048,
        rope_theta: 10_000.0,
    },
    Preset {
        name: "smollm2-360m",
        context: 2048,
        rope_theta: 10_000.0,
    },
    Preset {
        name: "smollm2-1.7b",
        context: 2048,
        rope_theta: 10_000.0,
    },
    Preset {
        name: "tiny",
        context: 1024,
        rope_theta: 10_000.0,
    },
    Preset {
        name: "micro",
        context: 1024,
        rope_theta: 10_000.0,
    },
];

/// The preset of that name.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// One problem with a job file. The message starts with where it is (`stages[1] ("x").mix`,
/// `schedule.decay_start.stage`, or a line and column for TOML errors) and says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// Every problem found in a job file, in file order; displayed one per line.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
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
    // Absent lists parse as empty so that validation can say what to add, with its path.
    #[serde(default)]
    pub sources: Vec<SourceSection>,
    #[serde(default)]
    pub stages: Vec<StageSection>,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub workers: WorkersSection,
    #[serde(default)]
    pub checkpoints: CheckpointsSection,
    #[serde(default)]
    pub spikes: SpikeConfig,
    #[serde(default)]
    pub recovery: RecoveryConfig,
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
    /// The model's RoPE θ (the first stage's unless it sets its own); default: the preset's.
    pub rope_theta: Option<f64>,
    /// The longest sequence any stage may train on; default: the preset's context.
    pub max_seq_len: Option<u32>,
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
    #[serde(default = "linear")]
    pub decay: Decay,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub decay_start: Option<DecayStartTable>,
}

fn linear() -> Decay {
    Decay::Linear
}

/// `decay_start = { stage = "X" }`, `{ step = N }` or `{ tokens = N }`: exactly one key, which
/// [`DecayStartTable::get`] checks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecayStartTable {
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default, alias = "steps", deserialize_with = "opt_count")]
    pub step: Option<u64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub tokens: Option<u64>,
}

/// Where the decay starts, as the job file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecayStart {
    /// Where that stage starts (as planned, or wherever it actually starts).
    Stage(String),
    Step(u64),
    Tokens(u64),
}

impl DecayStartTable {
    /// The one key given, or `None` when there are none or several.
    pub fn get(&self) -> Option<DecayStart> {
        match (&self.stage, self.step, self.tokens) {
            (Some(s), None, None) => Some(DecayStart::Stage(s.clone())),
            (None, Some(n), None) => Some(DecayStart::Step(n)),
            (None, None, Some(t)) => Some(DecayStart::Tokens(t)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    #[serde(default)]
    pub seed: u64,
    /// Tokens per optimizer step over all workers, the same in every stage.
    #[serde(deserialize_with = "count")]
    pub global_batch_tokens: u64,
    /// Tokens per forward/backward on one worker.
    #[serde(deserialize_with = "count")]
    pub micro_batch_tokens: u64,
    /// Held-out samples per source; see [`JobFile::eval_samples`] for the default.
    #[serde(default)]
    pub eval_samples: Option<u32>,
    /// Default: the first stage's seq_len.
    #[serde(default)]
    pub eval_seq_len: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    #[serde(default)]
    pub name: String,
    /// A folder of .ds shards (searched recursively).
    #[serde(default)]
    pub path: PathBuf,
    /// A folder of held-out .ds shards for validation loss.
    #[serde(default)]
    pub eval: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub until: Option<UntilTable>,
    #[serde(default)]
    pub seq_len: Option<u32>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub lr: LrPhase,
    /// Weights by source name, in the order of the file.
    #[serde(default, deserialize_with = "mix")]
    pub mix: Vec<(String, f64)>,
}

/// `until = { steps = N }` or `{ tokens = N }`: exactly one key, which [`UntilTable::get`]
/// checks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UntilTable {
    #[serde(default, alias = "step", deserialize_with = "opt_count")]
    pub steps: Option<u64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub tokens: Option<u64>,
}

/// Where a stage ends, counted from the start of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Steps(u64),
    Tokens(u64),
}

impl UntilTable {
    /// The one key given, or `None` when there are none or both.
    pub fn get(&self) -> Option<Until> {
        match (self.steps, self.tokens) {
            (Some(n), None) => Some(Until::Steps(n)),
            (None, Some(t)) => Some(Until::Tokens(t)),
            _ => None,
        }
    }
}

impl fmt::Display for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Until::Steps(n) => write!(f, "{{ steps = {n} }}"),
            Until::Tokens(t) => write!(f, "{{ tokens = {t} }}"),
        }
    }
}

/// How a stage's learning rate follows the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrPhase {
    /// As `[schedule]` says.
    #[default]
    Schedule,
    /// The peak (after warmup) for the whole stage.
    Stable,
    /// From the LR at the stage's start down to `min_lr` at its end.
    Decay,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub log_every: u64,
    pub device: String,
    pub threads: u32,
    pub init_seed: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            log_every: 10,
            device: "cpu".into(),
            threads: 0,
            init_seed: 0,
        }
    }
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

/// `[checkpoints]`: see [`CheckpointConfig`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointsSection {
    /// Default: `checkpoints/<job name>`.
    pub dir: Option<PathBuf>,
    pub every_steps: u64,
    pub keep: u32,
}

impl Default for CheckpointsSection {
    fn default() -> Self {
        CheckpointsSection {
            dir: None,
            every_steps: CheckpointConfig::DEFAULT_EVERY_STEPS,
            keep: CheckpointConfig::DEFAULT_KEEP,
        }
    }
}

/// A whole number of steps or tokens: an integer, or a float with no fraction so that
/// `tokens = 6e12` reads as it is meant.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct CountVisitor;
    impl Visitor<'_> for CountVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole non-negative number (e.g. 6_000_000_000_000 or 6e12)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            // 2^64 is exact in f64; below it, a whole float converts exactly.
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 18_446_744_073_709_551_616.0 {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(CountVisitor)
}

fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    count(d).map(Some)
}

/// A mixture table, keeping the order of the file so messages list sources as the user wrote
/// them.
fn mix<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
    struct MixVisitor;
    impl<'de> Visitor<'de> for MixVisitor {
        type Value = Vec<(String, f64)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of weights by source name, e.g. { prose = 0.7, code = 0.3 }")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, f64>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_map(MixVisitor)
}
impl JobFile {
    /// Reads, parses and validates a job file; looks at no data.
    pub fn load(path: &Path) -> Result<JobFile, SpecErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError(format!("{}: cannot read the job file: {e}", path.display())))?;
        JobFile::parse(&text)
    }

    /// Parses and validates the text of a job file.
    pub fn parse(text: &str) -> Result<JobFile, SpecErrors> {
        let job: JobFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        job.validate()?;
        Ok(job)
    }

    /// Where each stage ends, in steps from the start of the job (tokens rounded up to whole
    /// steps). Meaningful on a validated spec; a stage without a usable `until` gives 0.
    pub fn stage_until_steps(&self) -> Vec<u64> {
        let g = self.data.global_batch_tokens;
        self.stages
            .iter()
            .map(|st| match st.until.as_ref().and_then(UntilTable::get) {
                Some(Until::Steps(n)) => n,
                Some(Until::Tokens(t)) if g > 0 => t.div_ceil(g),
                _ => 0,
            })
            .collect()
    }

    /// The end of the last stage.
    pub fn total_steps(&self) -> u64 {
        self.stage_until_steps().last().copied().unwrap_or(0)
    }

    /// The planned step where the decay starts: for `{ stage = X }` the end of the stage before
    /// X (0 for the first), and the end of the job when there is no decay.
    pub fn decay_start_step(&self) -> u64 {
        let total = self.total_steps();
        let Some(start) = self
            .schedule
            .decay_start
            .as_ref()
            .and_then(DecayStartTable::get)
        else {
            return total;
        };
        match start {
            DecayStart::Stage(name) => match self.stages.iter().position(|st| st.name == name) {
                Some(0) => 0,
                Some(i) => self.stage_until_steps()[i - 1],
                None => total,
            },
            DecayStart::Step(n) => n,
            DecayStart::Tokens(t) => t.div_ceil(self.data.global_batch_tokens.max(1)),
        }
    }

    /// The largest seq_len of any stage: the block a source's tokens are shuffled in.
    pub fn largest_seq_len(&self) -> u32 {
        self.stages
            .iter()
            .filter_map(|st| st.seq_len)
            .max()
            .unwrap_or(0)
    }

    /// The longest sequence the model may train on: `max_seq_len`, else the preset's context;
    /// `None` for a `from` model without `max_seq_len` (the worker checks it against the
    /// folder's config.json).
    pub fn context(&self) -> Option<u32> {
        self.model.max_seq_len.or_else(|| {
            self.model
                .preset
                .as_deref()
                .and_then(preset)
                .map(|p| p.context)
        })
    }

    fn context_origin(&self) -> String {
        match (&self.model.max_seq_len, &self.model.preset) {
            (Some(_), _) => "model.max_seq_len".to_owned(),
            (None, Some(name)) => format!("the default of preset {name:?}"),
            (None, None) => "the model's".to_owned(),
        }
    }

    /// Each stage's RoPE θ: its own, else the previous stage's, else the model's (`rope_theta`,
    /// else the preset's); 0 means the model folder's own.
    pub fn stage_rope_thetas(&self) -> Vec<f64> {
        let mut theta = self.model.rope_theta.unwrap_or_else(|| {
            self.model
                .preset
                .as_deref()
                .and_then(preset)
                .map_or(0.0, |p| p.rope_theta)
        });
        self.stages
            .iter()
            .map(|st| {
                theta = st.rope_theta.unwrap_or(theta);
                theta
            })
            .collect()
    }

    /// A stage's weights aligned with `sources` (unknown names are ignored, missing ones weigh 0).
    pub fn stage_weights(&self, stage: usize) -> Vec<f64> {
        let Some(st) = self.stages.get(stage) else {
            return vec![0.0; self.sources.len()];
        };
        self.sources
            .iter()
            .map(|src| {
                st.mix
                    .iter()
                    .find(|(n, _)| *n == src.name)
                    .map_or(0.0, |(_, w)| *w)
            })
            .collect()
    }

    /// Held-out samples per source: as given, else 32 when a source has an eval folder, else 0.
    pub fn eval_samples(&self) -> u32 {
        self.data.eval_samples.unwrap_or_else(|| {
            if self.sources.iter().any(|s| s.eval.is_some()) {
                32
            } else {
                0
            }
        })
    }

    /// The sequence length of held-out samples: as given, else the first stage's.
    pub fn eval_seq_len(&self) -> u32 {
        self.data
            .eval_seq_len
            .or_else(|| self.stages.first().and_then(|st| st.seq_len))
            .unwrap_or(0)
    }

    /// The checkpoint policy: `[checkpoints]` with its defaults (the folder:
    /// `checkpoints/<job name>`).
    pub fn checkpoint_config(&self) -> CheckpointConfig {
        let c = &self.checkpoints;
        CheckpointConfig {
            dir: c
                .dir
                .clone()
                .unwrap_or_else(|| CheckpointConfig::for_job(&self.job.name).dir),
            every_steps: c.every_steps,
            keep: c.keep,
        }
    }

    /// The spike detector's configuration: `[spikes]` with its defaults. Meaningful on a
    /// validated spec (a rung it does not know is left out).
    pub fn spike_config(&self) -> SpikeConfig {
        let mut c = self.spikes.clone();
        c.ladder.retain(|r| !matches!(r, Rung::Unknown(_)));
        c
    }

    /// The wire form that workers receive.
    pub fn to_proto(&self) -> v1::JobSpec {
        let o = &self.optimizer;
        let s = &self.schedule;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let until = self.stage_until_steps();
        let thetas = self.stage_rope_thetas();
        let stages = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, st)| v1::StageSpec {
                name: st.name.clone(),
                weights: self.stage_weights(i),
                until_step: until[i],
                seq_len: st.seq_len.unwrap_or(0),
                rope_theta: thetas[i],
                lr_phase: match st.lr {
                    LrPhase::Schedule => v1::LrPhase::Unspecified,
                    LrPhase::Stable => v1::LrPhase::Stable,
                    LrPhase::Decay => v1::LrPhase::Decay,
                }
                .into(),
            })
            .collect();
        let decay_start_stage = match s.decay_start.as_ref().and_then(DecayStartTable::get) {
            Some(DecayStart::Stage(name)) => name,
            _ => String::new(),
        };
        v1::JobSpec {
            name: self.job.name.clone(),
            model_preset: self.model.preset.clone().unwrap_or_default(),
            model_from: self.model.from.as_deref().map(path).unwrap_or_default(),
            rope_theta: thetas.first().copied().unwrap_or(0.0),
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
                decay: match s.decay {
                    Decay::Linear => v1::DecayShape::Linear,
                    Decay::OneMinusSqrt => v1::DecayShape::OneMinusSqrt,
                }
                .into(),
                min_lr: s.min_lr,
                decay_start_step: self.decay_start_step(),
                decay_start_stage,
            }),
            seq_len: self.largest_seq_len(),
            sources: self
                .sources
                .iter()
                .map(|src| v1::SourceSpec {
                    name: src.name.clone(),
                    path: path(&src.path),
                    eval_path: src.eval.as_deref().map(path).unwrap_or_default(),
                })
                .collect(),
            total_steps: self.total_steps(),
            init_seed: self.train.init_seed,
            data_seed: self.data.seed,
            threads: self.train.threads,
            device: self.train.device.clone(),
            log_every: self.train.log_every,
            collective_timeout_ms: self.workers.collective_timeout_ms,
            global_batch_tokens: self.data.global_batch_tokens,
            micro_batch_tokens: self.data.micro_batch_tokens,
            stages,
            eval_samples: self.eval_samples(),
            eval_seq_len: self.eval_seq_len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [job]
        name = "t"
        [model]
        preset = "micro"
        [schedule]
        peak_lr = 1e-3
        warmup_steps = 2
        decay_start = { stage = "decay" }
        [data]
        global_batch_tokens = 64
        micro_batch_tokens = 32
        [[sources]]
        name = "a"
        path = "x"
        eval = "xv"
        [[sources]]
        name = "b"
        path = "y"
        [[stages]]
        name = "one"
        until = { steps = 5 }
        seq_len = 16
        lr = "stable"
        mix = { b = 0.25, a = 0.75 }
        [[stages]]
        name = "decay"
        until = { tokens = 330 }
        seq_len = 16
        mix = { a = 1 }
        [[stages]]
        name = "long"
        until = { steps = 8 }
        seq_len = 32
        rope_theta = 40000.0
        mix = { a = 0.5, b = 0.5 }
    "#;

    fn errors(text: &str) -> Vec<String> {
        match JobFile::parse(text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| e.0).collect(),
        }
    }

    #[test]
    fn a_good_spec_parses_with_defaults() {
        let job = JobFile::parse(GOOD).unwrap();
        assert_eq!(job.optimizer, OptimizerSection::default());
        assert_eq!(job.workers.min, 1);
        assert_eq!(job.train.log_every, 10);
        assert_eq!(job.data.global_batch_tokens, 64);
        // 330 tokens at 64 per step: 5.16 steps, rounded up.
        assert_eq!(job.stage_until_steps(), vec![5, 6, 8]);
        assert_eq!(job.total_steps(), 8);
        assert_eq!(job.eval_samples(), 32);
        assert_eq!(job.eval_seq_len(), 16);
        assert_eq!(job.context(), Some(1024));
    }

    #[test]
    fn to_proto_resolves_the_curriculum() {
        let p = JobFile::parse(GOOD).unwrap().to_proto();
        let names: Vec<_> = p.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(p.sources[0].eval_path, "xv");
        assert_eq!(p.sources[1].eval_path, "");
        // Weights follow the order of [[sources]], not of the mix table.
        assert_eq!(p.stages[0].weights, vec![0.75, 0.25]);
        assert_eq!(p.stages[1].weights, vec![1.0, 0.0]);
        let until: Vec<_> = p.stages.iter().map(|s| s.until_step).collect();
        assert_eq!(until, [5, 6, 8]);
        assert_eq!(p.stages[0].lr_phase, i32::from(v1::LrPhase::Stable));
        assert_eq!(p.stages[1].lr_phase, i32::from(v1::LrPhase::Unspecified));
        // θ: the preset's, inherited, then the stage's own.
        let thetas: Vec<_> = p.stages.iter().map(|s| s.rope_theta).collect();
        assert_eq!(thetas, [10_000.0, 10_000.0, 40_000.0]);
        assert_eq!(p.rope_theta, 10_000.0);
        assert_eq!(p.seq_len, 32);
        assert_eq!(p.total_steps, 8);
        assert_eq!((p.global_batch_tokens, p.micro_batch_tokens), (64, 32));
        assert_eq!((p.eval_samples, p.eval_seq_len), (32, 16));
        let s = p.schedule.unwrap();
        // { stage = "decay" }: where the stage before it ends.
        assert_eq!(s.decay_start_step, 5);
        assert_eq!(s.decay_start_stage, "decay");
    }

    #[test]
    fn theta_inherits_from_the_model_and_from_stage_to_stage() {
        let text = GOOD
            .replace(
                "preset = \"micro\"",
                "preset = \"micro\"\nrope_theta = 5000.0",
            )
            .replace("rope_theta = 40000.0", "")
            .replace("name = \"decay\"", "name = \"decay\"\nrope_theta = 20000.0");
        let p = JobFile::parse(&text).unwrap().to_proto();
        let thetas: Vec<_> = p.stages.iter().map(|s| s.rope_theta).collect();
        assert_eq!(thetas, [5_000.0, 20_000.0, 20_000.0]);
        assert_eq!(p.rope_theta, 5_000.0);
    }

    #[test]
    fn decay_start_in_steps_tokens_or_absent() {
        let by_step = GOOD.replace("{ stage = \"decay\" }", "{ step = 4 }");
        let s = JobFile::parse(&by_step)
            .unwrap()
            .to_proto()
            .schedule
            .unwrap();
        assert_eq!((s.decay_start_step, s.decay_start_stage.as_str()), (4, ""));
        // 200 tokens at 64 per step: step 4 (3.1 rounded up).
        let by_tokens = GOOD.replace("{ stage = \"decay\" }", "{ tokens = 200 }");
        let job = JobFile::parse(&by_tokens).unwrap();
        assert_eq!(job.decay_start_step(), 4);
        let none = GOOD.replace("decay_start = { stage = \"decay\" }", "");
        assert_eq!(JobFile::parse(&none).unwrap().decay_start_step(), 8);
    }

    #[test]
    fn tokens_may_be_written_as_whole_floats() {
        let text = GOOD.replace("{ tokens = 330 }", "{ tokens = 3.3e2 }");
        assert_eq!(JobFile::parse(&text).unwrap().stage_until_steps()[1], 6);
        let err = errors(&GOOD.replace("{ tokens = 330 }", "{ tokens = 330.5 }"));
        assert!(err[0].contains("whole non-negative number"), "{err:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = GOOD
            .replace(
                "mix = { b = 0.25, a = 0.75 }",
                "mix = { b = 0.25, a = 0.65 }",
            )
            .replace("until = { steps = 8 }", "until = { steps = 4 }")
            .replace("{ stage = \"decay\" }", "{ stage = \"decy\" }");
        let err = errors(&text);
        assert_eq!(err.len(), 3, "{err:#?}");
        assert!(
            err[0].starts_with("schedule.decay_start.stage: no stage named \"decy\"; the stages are one, decay, long"),
            "{}",
            err[0]
        );
        assert_eq!(
            err[1],
            "stages[0] (\"one\").mix: weights sum to 0.9; they must sum to 1 (change one of b, a)"
        );
        assert!(
            err[2].starts_with(
                "stages[2] (\"long\").until: { steps = 4 } does not come after \
                 stages[1] (\"decay\").until = { tokens = 330 } (step 6): a budget that goes backwards"
            ),
            "{}",
            err[2]
        );
    }

    #[test]
    fn mistakes_name_their_path() {
        let cases = [
            (GOOD.replace("preset = \"micro\"", "preset = \"mikro\""), "model.preset: unknown preset \"mikro\"; the presets are smollm2-135m"),
            (GOOD.replace("seq_len = 32", "seq_len = 2048"), "stages[2] (\"long\").seq_len: 2048 exceeds the model's context of 1024"),
            (GOOD.replace("seq_len = 32", "seq_len = 24"), "data.global_batch_tokens: 64 is not a multiple of seq_len 24 (stages[2] (\"long\"))"),
            (GOOD.replace("seq_len = 32", "seq_len = 40"), "stages[0] (\"one\").seq_len: 16 does not divide the largest seq_len, 40, of stages[2] (\"long\")"),
            (GOOD.replace("{ a = 1 }", "{ a = 1, c = 0 }"), "stages[1] (\"decay\").mix: no source named \"c\"; the sources are a, b"),
            (GOOD.replace("{ a = 1 }", "{ a = 1.5, b = -0.5 }"), "stages[1] (\"decay\").mix: the weight of b is -0.5"),
            (GOOD.replace("{ steps = 5 }", "{ steps = 5, tokens = 3 }"), "stages[0] (\"one\").until: give steps or tokens, not both"),
            (GOOD.replace("until = { steps = 5 }", ""), "stages[0] (\"one\").until: missing"),
            (GOOD.replace("name = \"long\"", "name = \"one\""), "stages[2] (\"one\").name: \"one\" is also the name of stages[0]"),
            (GOOD.replace("name = \"b\"", "name = \"a\""), "sources[1] (\"a\").name: \"a\" is also the name of sources[0]"),
            (GOOD.replace("warmup_steps = 2", "warmup_steps = 8"), "schedule.warmup_steps: 8 is not below the job's 8 steps"),
            (GOOD.replace("warmup_steps = 2", "warmup_steps = 6"), "schedule.decay_start.stage: stage \"decay\" starts at step 5, before the warmup ends"),
            (GOOD.replace("{ stage = \"decay\" }", "{ step = 8 }"), "schedule.decay_start.step: step 8, at or after the end of the job"),
            (GOOD.replace("{ stage = \"decay\" }", "{ step = 3, stage = \"one\" }"), "schedule.decay_start: give exactly one of stage, step or tokens, not stage and step"),
            (GOOD.replace("micro_batch_tokens = 32", "micro_batch_tokens = 32\neval_seq_len = 2000"), "data.eval_seq_len: 2000 exceeds the model's context of 1024"),
            (GOOD.replace("eval = \"xv\"", "").replace("micro_batch_tokens = 32", "micro_batch_tokens = 32\neval_samples = 4"), "data.eval_samples: 4 held-out samples per source asked for, but no [[sources]] has an eval folder"),
            (format!("{GOOD}\n[workers]\nmin = 3\nmax = 2"), "workers.max: 2 is below workers.min (3)"),
            (format!("{GOOD}\n[workers]\nmin = 1\nmax = 4"), "stages[2] (\"long\").seq_len: 2 samples per step (data.global_batch_tokens 64 / seq_len 32) is fewer than workers.max (4)"),
            (GOOD.replace("preset = \"micro\"", ""), "model: give preset = \"NAME\""),
            (GOOD.replace("warmup_steps = 2", "warmup_steps = 2\nwarmpu = 1"), "schedule (line 9, column 1): unknown field `warmpu`"),
        ];
        for (text, want) in cases {
            let err = errors(&text);
            assert!(
                err.iter().any(|e| e.starts_with(want)),
                "expected a problem starting with {want:?}, got {err:#?}"
            );
        }
    }

    #[test]
    fn checkpoints_and_spikes_have_defaults() {
        let job = JobFile::parse(GOOD).unwrap();
        assert_eq!(
            job.checkpoint_config(),
            CheckpointConfig {
                dir: PathBuf::from("checkpoints/t"),
                every_steps: 100,
                keep: 3,
            }
        );
        assert_eq!(job.spike_config(), SpikeConfig::default());
        let text = format!(
            "{GOOD}\n[checkpoints]\ndir = \"runs/ck\"\nevery_steps = 0\nkeep = 1\n\
             [spikes]\nenabled = false\nzscore = 7\nratio = 0\nladder = [\"rollback\"]\n\
             lr_factor = 0.5\nlr_steps = 20\nconsecutive = 2\ngrad_norm_zscore = 5.5\n"
        );
        let job = JobFile::parse(&text).unwrap();
        let c = job.checkpoint_config();
        assert_eq!(
            (c.dir, c.every_steps, c.keep),
            (PathBuf::from("runs/ck"), 0, 1)
        );
        assert_eq!(
            job.spike_config(),
            SpikeConfig {
                enabled: false,
                zscore: 7.0,
                ratio: 0.0,
                ladder: vec![Rung::Rollback],
                lr_factor: 0.5,
                lr_steps: 20,
                consecutive: 2,
                grad_norm_zscore: 5.5,
                ..SpikeConfig::default()
            }
        );
        // Detection only.
        let job = JobFile::parse(&format!("{GOOD}\n[spikes]\nladder = []\n")).unwrap();
        assert_eq!(job.spike_config().ladder, []);
    }

    #[test]
    fn checkpoint_and_spike_mistakes_name_their_path() {
        let with = |section: &str| format!("{GOOD}\n{section}\n");
        let cases = [
            (with("[checkpoints]\nkeep = 0"), "checkpoints.keep: 0 keeps none: each checkpoint written every 100 steps would be deleted at once"),
            (with("[checkpoints]\nkeep = 0\nevery_steps = 0"), "checkpoints.keep: 0 keeps none: each checkpoint would be deleted as soon as it is written"),
            (with("[checkpoints]\ndir = \"\""), "checkpoints.dir: empty"),
            (with("[checkpoints]\nevery = 5"), "checkpoints (line 39, column 1): unknown field `every`, expected one of `dir`, `every_steps`, `keep`"),
            (with("[spikes]\nwindow = 1"), "spikes.window: 1 is too short"),
            (with("[spikes]\nzscore = 0"), "spikes.zscore: must be a positive number"),
            (with("[spikes]\nzscore = -3.0"), "spikes.zscore: must be a positive number"),
            (with("[spikes]\nratio = 0.5"), "spikes.ratio: 0.5 would flag ordinary steps"),
            (with("[spikes]\ngrad_norm_zscore = -1"), "spikes.grad_norm_zscore: must be a positive number"),
            (with("[spikes]\nconsecutive = 0"), "spikes.consecutive: must be at least 1"),
            (with("[spikes]\nladder = [\"skip\", \"rolback\"]"), "spikes.ladder[1]: unknown rung \"rolback\"; the rungs are skip, rollback"),
            (with("[spikes]\nladder = [\"skip\", \"skip\"]"), "spikes.ladder[1]: \"skip\" is given twice"),
            (with("[spikes]\nladder = [\"rollback\", \"skip\"]"), "spikes.ladder: rungs go from mild to drastic: write [\"skip\", \"rollback\"]"),
            (with("[spikes]\nlr_factor = 2.0"), "spikes.lr_factor: 2 must lie in (0, 1]"),
            (with("[spikes]\nlr_factor = 0.5"), "spikes.lr_steps: 0, so lr_factor = 0.5 would last no step"),
            (with("[spikes]\nwindow_steps = 0"), "spikes.window_steps: must be positive"),
            (with("[spikes]\nladder = \"skip\""), "spikes (line 39, column 10): invalid type: string \"skip\", expected a sequence"),
        ];
        for (text, want) in cases {
            let err = errors(&text);
            assert!(
                err.len() == 1 && err[0].starts_with(want),
                "expected one problem starting with {want:?}, got {err:#?}"
            );
        }
        // Problems come in file order: the new sections after [workers].
        let text = format!(
            "[spikes]\nwindow = 0\n{}",
            GOOD.replace("preset = \"micro\"", "")
        );
        let err = errors(&text);
        assert_eq!(err.len(), 2, "{err:#?}");
        assert!(
            err[0].starts_with("model: ") && err[1].starts_with("spikes.window: "),
            "{err:#?}"
        );
    }

    #[test]
    fn align_mix_checks_and_aligns() {
        let sources = ["prose", "math", "code"];
        let mix = vec![("code".to_owned(), 0.4), ("prose".to_owned(), 0.6)];
        assert_eq!(align_mix(&sources, &mix).unwrap(), vec![0.6, 0.0, 0.4]);
        let bad = vec![("code".to_owned(), 0.4)];
        assert_eq!(
            align_mix(&sources, &bad).unwrap_err(),
            vec!["weights sum to 0.4; they must sum to 1 (change one of code)".to_owned()]
        );
    }

    #[test]
    fn presets_are_listed_once() {
        let names: std::collections::HashSet<_> = PRESETS.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), PRESETS.len());
        assert_eq!(preset("smollm2-1.7b").map(|p| p.context), Some(2048));
    }
}
