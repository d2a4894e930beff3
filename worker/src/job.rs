//! From the job specification the coordinator sends ([`v1::JobSpec`]) to what the worker runs:
//! the model shape, the optimizer and schedule, and the opened data sources.

use stagecoach_coordinator::schedule::Wsd;
use stagecoach_proto::v1;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::optim::AdamWConfig;
use crate::shards::{ShardFolder, TokenSize};

/// The model shape: the preset, or the folder's `config.json`, with RoPE θ overridden if given
/// and the position limit raised to the sequence length.
pub fn model_config(spec: &v1::JobSpec) -> Result<ModelConfig> {
    let mut c = if !spec.model_from.is_empty() {
        crate::hf::read_config(&std::path::Path::new(&spec.model_from).join("config.json"))?
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

pub fn schedule(spec: &v1::JobSpec) -> Result<Wsd> {
    Wsd::from_job(spec).map_err(|e| Error::Config(e.to_string()))
}

/// The job's data sources, opened.
pub struct Sources {
    pub names: Vec<String>,
    pub folders: Vec<ShardFolder>,
    /// Samples of `seq_len + 1` tokens per source.
    pub sizes: Vec<u64>,
    pub seq_len: usize,
    pub vocab_size: i64,
}

impl Sources {
    /// Opens every source folder; a source with a positive weight and no sample is an error.
    pub fn open(spec: &v1::JobSpec, model: &ModelConfig) -> Result<Sources> {
        let seq_len = spec.seq_len as usize;
        let size = TokenSize::for_vocab(model.vocab_size as usize);
        let mut out = Sources {
            names: vec![],
            folders: vec![],
            sizes: vec![],
            seq_len,
            vocab_size: model.vocab_size,
        };
        for s in &spec.sources {
            let folder = ShardFolder::open(std::path::Path::new(&s.path), size)?;
            let n = folder.num_samples(seq_len);
            if n == 0 && s.weight > 0.0 {
                return Err(Error::shard(
                    &s.path,
                    format!(
                        "source {:?} holds {} tokens, fewer than one sample of seq_len + 1 = {}",
                        s.name,
                        folder.num_tokens(),
                        seq_len + 1
                    ),
                ));
            }
            out.names.push(s.name.clone());
            out.folders.push(folder);
            out.sizes.push(n);
        }
        Ok(out)
    }

    /// Reads samples into a `[n, seq_len + 1]` int64 tensor, checking every token is in the
    /// vocabulary.
    pub fn batch(&self, samples: &[(usize, u64)]) -> Result<tch::Tensor> {
        let window = self.seq_len + 1;
        let mut buf = vec![0i64; samples.len() * window];
        for (&(source, index), out) in samples.iter().zip(buf.chunks_exact_mut(window)) {
            let folder = self.folders.get(source).ok_or_else(|| {
                Error::Config(format!(
                    "sample of source {source}, but the job has {} sources",
                    self.folders.len()
                ))
            })?;
            folder.read_sample(index, out)?;
            if let Some(bad) = out.iter().find(|&&t| t < 0 || t >= self.vocab_size) {
                return Err(Error::shard(
                    folder.dir(),
                    format!(
                        "sample {index} holds token {bad}, outside the model's vocabulary of {}; tokenized with another tokenizer?",
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(tch::Tensor::from_slice(&buf).view([samples.len() as i64, window as i64]))
    }
}
