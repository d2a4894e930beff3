//! From the job specification the coordinator sends ([`v1::JobSpec`]) to what the worker runs:
//! the model shape, the optimizer, and the opened data sources.

use std::path::Path;

use stagecoach_proto::v1;

use crate::error::{Error, Result};
use crate::fault::{self, Poison};
use crate::model::ModelConfig;
use crate::optim::AdamWConfig;
use crate::shards::{ShardFolder, TokenSize};

/// The model shape: the preset, or the folder's `config.json`, with RoPE θ set to the first
/// stage's (when the job names one) and the position limit raised to the longest stage's
/// sequence length.
pub fn model_config(spec: &v1::JobSpec) -> Result<ModelConfig> {
    let mut c = if !spec.model_from.is_empty() {
        crate::hf::read_config(&Path::new(&spec.model_from).join("config.json"))?
    } else {
        ModelConfig::preset(&spec.model_preset)?
    };
    if spec.rope_theta > 0.0 {
        c.rope_theta = spec.rope_theta;
    }
    c.max_position_embeddings = c.max_position_embeddings.max(i64::from(spec.seq_len));
    c.validate()?;
    Ok(c)
}

pub fn optimizer(spec: &v1::JobSpec) -> Result<AdamWConfig> {
    let o = spec
        .optimizer
        .as_ref()
        .ok_or_else(|| Error::Config("job spec has no optimizer".into()))?;
    let c = AdamWConfig {
        betas: (o.beta1, o.beta2),
        eps: o.eps,
        weight_decay: o.weight_decay,
        grad_clip: o.grad_clip,
    };
    c.validate()?;
    Ok(c)
}

/// One data source of the job: its training stream and, if the job gives one, its held-out
/// stream.
pub struct Source {
    pub name: String,
    pub train: ShardFolder,
    pub eval: Option<ShardFolder>,
}

impl Source {
    /// Tokens in the training stream.
    pub fn num_tokens(&self) -> u64 {
        self.train.num_tokens()
    }

    /// Tokens in the held-out stream (0 without one).
    pub fn eval_tokens(&self) -> u64 {
        self.eval.as_ref().map_or(0, ShardFolder::num_tokens)
    }

    /// What this worker reports in `Ready`.
    pub fn size(&self) -> v1::SourceSize {
        v1::SourceSize {
            name: self.name.clone(),
            num_tokens: self.num_tokens(),
            eval_tokens: self.eval_tokens(),
        }
    }
}

/// Which stream of a source a batch reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// The job's data sources, opened, in the job's order (a sample's source is an index into it).
pub struct Sources {
    pub sources: Vec<Source>,
    pub vocab_size: i64,
    /// Training samples replaced by noise (fault injection; empty unless asked for).
    poison: Vec<Poison>,
}

impl Sources {
    /// Opens every source's training folder, and its held-out folder when the job names one.
    /// Whether a source holds enough tokens for the stages that draw from it is the planner's
    /// question (the coordinator's, from the sizes in `Ready`).
    pub fn open(spec: &v1::JobSpec, model: &ModelConfig) -> Result<Sources> {
        let size = TokenSize::for_vocab(model.vocab_size as usize);
        let sources = spec
            .sources
            .iter()
            .map(|s| {
                Ok(Source {
                    name: s.name.clone(),
                    train: ShardFolder::open(Path::new(&s.path), size)?,
                    eval: match s.eval_path.as_str() {
                        "" => None,
                        p => Some(ShardFolder::open(Path::new(p), size)?),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sources {
            sources,
            vocab_size: model.vocab_size,
            poison: Vec::new(),
        })
    }

    /// Replaces the training samples in `ranges` with noise from now on (fault injection for
    /// tests: a real loss spike). Held-out samples are never poisoned.
    pub fn set_poison(&mut self, ranges: Vec<Poison>) -> Result<()> {
        if let Some(p) = ranges.iter().find(|p| p.source >= self.sources.len()) {
            return Err(Error::Config(format!(
                "--poison {p}: no source {} (the job has {} sources, indexed from 0 in the job file's order)",
                p.source,
                self.sources.len()
            )));
        }
        self.poison = ranges;
        Ok(())
    }

    /// Whether the training sample at `offset` of `source` is poisoned.
    pub fn is_poisoned(&self, source: usize, offset: u64) -> bool {
        self.poison.iter().any(|p| p.covers(source, offset))
    }

    pub fn names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    /// Tokens in each source's training stream, in the job's order.
    pub fn num_tokens(&self) -> Vec<u64> {
        self.sources.iter().map(Source::num_tokens).collect()
    }

    /// What this worker reports in `Ready`, in the job's order.
    pub fn sizes(&self) -> Vec<v1::SourceSize> {
        self.sources.iter().map(Source::size).collect()
    }

    /// Reads training samples into a `[n, seq_len + 1]` int64 tensor: for each `(source,
    /// offset)`, the `seq_len + 1` tokens of the source's stream from that token offset. Every
    /// token is checked to be in the vocabulary ([`Error::Data`] names the file and the token
    /// otherwise).
    pub fn batch(&self, samples: &[(usize, u64)], seq_len: usize) -> Result<tch::Tensor> {
        self.read(samples, seq_len, Split::Train)
    }

    /// As [`batch`](Self::batch), from the sources' held-out streams.
    pub fn eval_batch(&self, samples: &[(usize, u64)], seq_len: usize) -> Result<tch::Tensor> {
        self.read(samples, seq_len, Split::Eval)
    }

    fn read(&self, samples: &[(usize, u64)], seq_len: usize, split: Split) -> Result<tch::Tensor> {
        if seq_len == 0 {
            return Err(Error::Config("a sequence length of 0 was asked for".into()));
        }
        let window = seq_len + 1;
        let mut buf = vec![0i64; samples.len() * window];
        for (&(source, offset), out) in samples.iter().zip(buf.chunks_exact_mut(window)) {
            let s = self.sources.get(source).ok_or_else(|| {
                Error::Config(format!(
                    "a sample of source {source} was asked for, but the job has {} sources",
                    self.sources.len()
                ))
            })?;
            let folder = match split {
                Split::Train => &s.train,
                Split::Eval => s.eval.as_ref().ok_or_else(|| {
                    Error::Config(format!(
                        "a held-out sample of source {:?} was asked for, but the job gives it no eval folder",
                        s.name
                    ))
                })?,
            };
            folder.read_window(offset, out)?;
            if split == Split::Train && self.is_poisoned(source, offset) {
                tracing::warn!(
                    source = %s.name,
                    offset,
                    "fault injection: poisoned sample (its tokens replaced by noise)"
                );
                fault::noise(source, offset, self.vocab_size, out);
            }
            // Before the model sees them: on a GPU an id past the embedding is a device-side
            // assertion that takes the whole process down, not an error.
            folder.check_vocab(offset, out, self.vocab_size)?;
        }
        Ok(tch::Tensor::from_slice(&buf).view([samples.len() as i64, window as i64]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// Exactly the training samples whose offset lies in the range (its end excluded) of the
    /// named source read as noise within the vocabulary; every other sample, and the held-out
    /// stream, read as before.
    #[test]
    fn poisoning_replaces_exactly_the_samples_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::train::fixtures::job(dir.path());
        let config = model_config(&spec).unwrap();
        let clean = Sources::open(&spec, &config).unwrap();
        let mut poisoned = Sources::open(&spec, &config).unwrap();
        poisoned
            .set_poison(vec!["0:16..24".parse().unwrap()])
            .unwrap();
        let samples = [
            (0, 15),
            (0, 16),
            (0, 20),
            (0, 23),
            (0, 24),
            (1, 16),
            (1, 20),
        ];
        let a = Vec::<i64>::try_from(clean.batch(&samples, 16).unwrap().view([-1])).unwrap();
        let b = Vec::<i64>::try_from(poisoned.batch(&samples, 16).unwrap().view([-1])).unwrap();
        for (i, &(source, offset)) in samples.iter().enumerate() {
            let (ra, rb) = (&a[i * 17..][..17], &b[i * 17..][..17]);
            let in_range = source == 0 && (16..24).contains(&offset);
            assert_eq!(poisoned.is_poisoned(source, offset), in_range);
            if in_range {
                assert_ne!(ra, rb, "{source}:{offset} should be noise");
                assert!(rb.iter().all(|t| (0..config.vocab_size).contains(t)));
            } else {
                assert_eq!(ra, rb, "{source}:{offset} should be untouched");
            }
        }
        // The same sample reads the same noise every time.
        let again =
            Vec::<i64>::try_from(poisoned.batch(&[(0, 20)], 16).unwrap().view([-1])).unwrap();
        assert_eq!(&again[..], &b[2 * 17..][..17]);
        // Held-out windows are never poisoned.
        assert!(poisoned
            .eval_batch(&[(0, 16)], 16)
            .unwrap()
            .equal(&clean.eval_batch(&[(0, 16)], 16).unwrap()));
        // A source the job does not have is refused, naming the option.
        let err = poisoned
            .set_poison(vec!["2:0..8".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--poison 2:0..8: no source 2 (the job has 2 sources"),
            "{err}"
        );
    }

    #[test]
    fn the_model_takes_the_first_stage_theta_and_the_longest_stage() {
        let mut spec = v1::JobSpec {
            model_preset: "micro".into(),
            seq_len: 256,
            ..Default::default()
        };
        // Within the preset's context (1024), θ the model's own.
        let c = model_config(&spec).unwrap();
        assert_eq!((c.max_position_embeddings, c.rope_theta), (1024, 10_000.0));
        // A longer stage raises the context; the first stage's θ replaces the preset's.
        spec.seq_len = 2048;
        spec.rope_theta = 80_000.0;
        let c = model_config(&spec).unwrap();
        assert_eq!((c.max_position_embeddings, c.rope_theta), (2048, 80_000.0));
        // The position tables then cover it: a 1,500-token sequence runs, one past 2,048 does not.
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = crate::model::Llama::new(&vs, c).unwrap();
        let ids = |n: i64| Tensor::zeros([1, n], (Kind::Int64, Device::Cpu));
        let logits = tch::no_grad(|| model.forward(&ids(1500))).unwrap();
        assert_eq!(logits.size(), [1, 1500, 264]);
        let err = tch::no_grad(|| model.forward(&ids(2049)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_position_embeddings 2048"), "{err}");
    }
}
