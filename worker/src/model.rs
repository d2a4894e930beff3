//! The SmolLM2 model: a Llama decoder (RMSNorm, SwiGLU MLP, rotary position embeddings with a
//! configurable θ, grouped-query attention, tied input/output embeddings, no biases).
//!
//! Parameters live in a [`tch::nn::VarStore`] under the names transformers'
//! `LlamaForCausalLM` uses (`model.layers.0.self_attn.q_proj.weight`, ...), so weights move
//! between the two without renaming (see [`crate::hf`]).
//!
//! [`Precision::Bf16`] computes the way `torch.autocast(dtype=torch.bfloat16)` does on the same
//! module: the weights stay fp32 (the optimizer updates fp32 masters), every matrix product and
//! the attention run in bf16 on bf16 copies of their operands, and everything else (the
//! embedding lookup, the residual stream, RMSNorm, RoPE, the loss) stays in fp32. tch's own
//! `autocast` is not used: it switches only CUDA autocast, whose default type is fp16, and does
//! nothing on CPU; casting at the matrix products gives the same numbers on both devices.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The shape of a model. Field names follow transformers' `LlamaConfig` where one exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    /// Standard deviation of the normal initialisation of every weight matrix.
    pub init_std: f64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

/// The precision of the forward and backward passes (the parameters are fp32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// bf16 matrix products and attention, as bf16 autocast (see the module documentation).
    Bf16,
}

impl Precision {
    /// The kind matrix products run in.
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Config(format!(
                "unknown precision {other:?}; choose fp32 or bf16"
            ))),
        }
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 5] = [
    "smollm2-135m",
    "smollm2-360m",
    "smollm2-1.7b",
    "tiny",
    "micro",
];

impl ModelConfig {
    /// A named preset: the three SmolLM2 sizes (numbers from the SmolLM2 paper, RoPE θ as in
    /// pre-training) and two small CPU models of our own, `tiny` (~1M parameters, for the demo)
    /// and `micro` (for fast tests). The CPU presets use the 257-id byte-level vocabulary padded to
    /// a multiple of 8.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let smollm2 = |layers, hidden, heads, kv, ffn, std| ModelConfig {
            vocab_size: 49_152,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 2048,
            init_std: std,
            bos_token_id: 0,
            eos_token_id: 0,
        };
        let small = |layers, hidden, heads, kv, ffn| ModelConfig {
            vocab_size: 264,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 1024,
            init_std: (hidden as f64).powf(-0.5),
            bos_token_id: 0,
            eos_token_id: 0,
        };
        Ok(match name {
            "smollm2-135m" => smollm2(30, 576, 9, 3, 1536, 0.0417),
            "smollm2-360m" => smollm2(32, 960, 15, 5, 2560, 0.02),
            "smollm2-1.7b" => smollm2(24, 2048, 32, 32, 8192, 0.02),
            "tiny" => small(4, 128, 4, 2, 384),
            "micro" => small(2, 64, 4, 2, 176),
            other => {
                return Err(Error::Config(format!(
                    "unknown model preset {other:?}; choose one of {}",
                    PRESETS.join(", ")
                )))
            }
        })
    }

    /// Checks the internal consistency of the shape.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(Error::Config(format!(
                    "model {name} must be positive, got {v}"
                )));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim must be even for RoPE, got {}",
                self.head_dim
            )));
        }
        if [self.rope_theta, self.rms_norm_eps, self.init_std]
            .iter()
            .any(|v| v.is_nan() || *v <= 0.0)
        {
            return Err(Error::Config(
                "rope_theta, rms_norm_eps and init_std must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Parameter count (embeddings counted once: they are tied).
    pub fn num_parameters(&self) -> i64 {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        self.vocab_size * h + self.num_hidden_layers * layer + h
    }
}

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// The Llama decoder with a language-model head tied to the input embeddings.
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    rope: std::cell::RefCell<Option<RopeCache>>,
    precision: Precision,
}

/// cos/sin tables for one (length, θ, device, kind).
struct RopeCache {
    len: i64,
    theta: f64,
    device: Device,
    kind: Kind,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Creates the parameters under `vs.root()`, initialised N(0, init_std) for matrices and
    /// embeddings and 1 for the RMSNorm gains.
    pub fn new(vs: &nn::VarStore, config: ModelConfig) -> Result<Llama> {
        config.validate()?;
        let root = vs.root();
        let model = &root / "model";
        let c = &config;
        let init = Init::Randn {
            mean: 0.0,
            stdev: c.init_std,
        };
        let linear = |p: nn::Path<'_>, out: i64, inp: i64| p.f_var("weight", &[out, inp], init);
        let gain = |p: nn::Path<'_>| p.f_var("weight", &[c.hidden_size], Init::Const(1.0));
        let embed_tokens = linear(&model / "embed_tokens", c.vocab_size, c.hidden_size)?;
        let (q_dim, kv_dim) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let l = &model / "layers" / i;
            let a = &l / "self_attn";
            let m = &l / "mlp";
            layers.push(Layer {
                input_layernorm: gain(&l / "input_layernorm")?,
                self_attn: Attention {
                    q_proj: linear(&a / "q_proj", q_dim, c.hidden_size)?,
                    k_proj: linear(&a / "k_proj", kv_dim, c.hidden_size)?,
                    v_proj: linear(&a / "v_proj", kv_dim, c.hidden_size)?,
                    o_proj: linear(&a / "o_proj", c.hidden_size, q_dim)?,
                },
                post_attention_layernorm: gain(&l / "post_attention_layernorm")?,
                mlp: Mlp {
                    gate_proj: linear(&m / "gate_proj", c.intermediate_size, c.hidden_size)?,
                    up_proj: linear(&m / "up_proj", c.intermediate_size, c.hidden_size)?,
                    down_proj: linear(&m / "down_proj", c.hidden_size, c.intermediate_size)?,
                },
            });
        }
        let norm = gain(&model / "norm")?;
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            rope: std::cell::RefCell::new(None),
            precision: Precision::Fp32,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the precision of the following forward passes (the parameters are untouched).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// `x @ wᵀ`, in bf16 on bf16 copies of both operands under [`Precision::Bf16`] (the copy
    /// of `w` is differentiable, so its gradient reaches the fp32 weight as fp32).
    fn linear(&self, x: &Tensor, w: &Tensor) -> Tensor {
        match self.precision {
            Precision::Fp32 => x.linear::<Tensor>(w, None),
            Precision::Bf16 => {
                let k = Kind::BFloat16;
                x.to_kind(k).linear::<Tensor>(&w.to_kind(k), None)
            }
        }
    }

    /// Changes RoPE θ (a curriculum stage may extend the context with a larger θ). The cos/sin
    /// tables are recomputed from the new θ on the next forward pass; the weights are untouched.
    pub fn set_rope_theta(&mut self, theta: f64) -> Result<()> {
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::Config(format!(
                "RoPE theta must be a positive number, got {theta}"
            )));
        }
        if theta != self.config.rope_theta {
            self.config.rope_theta = theta;
            // The old tables can be large (max_position_embeddings x head_dim, twice).
            *self.rope.get_mut() = None;
        }
        Ok(())
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (int64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let size = input_ids.size();
        let [_, seq] = size[..] else {
            return Err(Error::Config(format!(
                "input ids must be [batch, seq], got {size:?}"
            )));
        };
        if seq > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "sequence length {seq} exceeds the model's max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let mut x = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        let (cos, sin) = self.rope_tables(seq, x.device(), x.kind());
        for layer in &self.layers {
            let h = self.rms_norm(&x, &layer.input_layernorm);
            // Out of place: `x` is saved for the backward pass of the norm that read it.
            x = x.f_add(&self.attention(&layer.self_attn, &h, &cos, &sin)?)?;
            let h = self.rms_norm(&x, &layer.post_attention_layernorm);
            let mlp = &layer.mlp;
            let act = self.linear(&h, &mlp.gate_proj).silu() * self.linear(&h, &mlp.up_proj);
            // Under bf16 the sum promotes to the fp32 residual, as under autocast.
            x = x.f_add(&self.linear(&act, &mlp.down_proj))?;
        }
        let x = self.rms_norm(&x, &self.norm);
        Ok(self.linear(&x, &self.embed_tokens))
    }

    /// Mean next-token cross-entropy (computed in fp32) of `tokens[:, :-1] → tokens[:, 1:]`
    /// for a batch of windows `[batch, seq_len + 1]`.
    pub fn loss(&self, tokens: &Tensor) -> Result<Tensor> {
        let seq = tokens.size()[1] - 1;
        let inputs = tokens.narrow(1, 0, seq);
        let targets = tokens.narrow(1, 1, seq);
        let logits = self.forward(&inputs)?;
        Ok(logits
            .to_kind(Kind::Float)
            .view([-1, self.config.vocab_size])
            .f_cross_entropy_for_logits_checked(&targets.reshape([-1]))?)
    }

    /// Each window's mean next-token cross-entropy (fp32), `[batch]`: the training loss of a
    /// batch of one window, for every window of the batch at once.
    pub fn sample_losses(&self, tokens: &Tensor) -> Result<Tensor> {
        let (batch, seq) = (tokens.size()[0], tokens.size()[1] - 1);
        let inputs = tokens.narrow(1, 0, seq);
        let targets = tokens.narrow(1, 1, seq);
        let logits = self.forward(&inputs)?;
        Ok(logits
            .to_kind(Kind::Float)
            .view([-1, self.config.vocab_size])
            .f_cross_entropy_loss::<Tensor>(
                &targets.reshape([-1]),
                None,
                tch::Reduction::None,
                -100,
                0.0,
            )?
            .view([batch, seq])
            .mean_dim(1, false, Kind::Float))
    }

    /// RMSNorm as transformers computes it: normalise in fp32, cast back, then scale.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.config.rms_norm_eps).rsqrt();
        weight * normed.to_kind(kind)
    }

    fn attention(&self, a: &Attention, h: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (h.size()[0], h.size()[1]);
        let heads = |w: &Tensor, n: i64| {
            self.linear(h, w)
                .view([b, t, n, c.head_dim])
                .transpose(1, 2)
        };
        // Under bf16, RoPE with the fp32 tables promotes q and k to fp32 (as in transformers
        // under autocast) and the attention casts them back.
        let kind = self.precision.compute_kind();
        let q = apply_rope(&heads(&a.q_proj, c.num_attention_heads), cos, sin).to_kind(kind);
        let k = apply_rope(&heads(&a.k_proj, c.num_key_value_heads), cos, sin).to_kind(kind);
        let v = heads(&a.v_proj, c.num_key_value_heads).to_kind(kind);
        let gqa = c.num_key_value_heads != c.num_attention_heads;
        let out = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, true, None, gqa,
        )?;
        Ok(self.linear(
            &out.transpose(1, 2)
                .reshape([b, t, c.num_attention_heads * c.head_dim]),
            &a.o_proj,
        ))
    }

    /// cos and sin `[seq, head_dim]` as transformers' default rotary embedding computes them
    /// (`inv_freq = 1 / θ^(arange(0, d, 2) / d)` in fp32, `positions ⊗ inv_freq`, the two halves
    /// duplicated), cached for every position up to `max_position_embeddings`.
    fn rope_tables(&self, seq: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let theta = self.config.rope_theta;
        let mut cache = self.rope.borrow_mut();
        if let Some(r) = cache.as_ref() {
            if r.len >= seq && r.theta == theta && r.device == device && r.kind == kind {
                return (r.cos.narrow(0, 0, seq), r.sin.narrow(0, 0, seq));
            }
        }
        let len = seq.max(self.config.max_position_embeddings);
        let d = self.config.head_dim;
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / d as f64;
        let inv_freq = Tensor::from(theta as f32).pow(&exponents).reciprocal();
        let positions = Tensor::arange(len, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let freqs = positions.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (
            emb.cos().to_device(device).to_kind(kind),
            emb.sin().to_device(device).to_kind(kind),
        );
        let out = (cos.narrow(0, 0, seq), sin.narrow(0, 0, seq));
        *cache = Some(RopeCache {
            len,
            theta,
            device,
            kind,
            cos,
            sin,
        });
        out
    }
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * cos + rotated * sin
}

trait CrossEntropyChecked {
    fn f_cross_entropy_for_logits_checked(&self, targets: &Tensor)
        -> Result<Tensor, tch::TchError>;
}

impl CrossEntropyChecked for Tensor {
    /// Mean cross-entropy; a target outside the vocabulary is an error, not an abort.
    fn f_cross_entropy_for_logits_checked(
        &self,
        targets: &Tensor,
    ) -> Result<Tensor, tch::TchError> {
        self.f_cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Mean, -100, 0.0)
    }
}

/// Which parameters get weight decay: every matrix (projections and the tied embedding), not the
/// RMSNorm gains (vectors), as in GPT-style training recipes.
pub fn decays(shape: &[i64]) -> bool {
    shape.len() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_consistent() {
        for name in PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.num_attention_heads * c.head_dim, c.hidden_size, "{name}");
        }
        // Parameter counts that give the SmolLM2 models their names.
        let n = |p| ModelConfig::preset(p).unwrap().num_parameters() as f64 / 1e6;
        assert!(
            (134.0..136.0).contains(&n("smollm2-135m")),
            "{}",
            n("smollm2-135m")
        );
        assert!(
            (361.0..363.0).contains(&n("smollm2-360m")),
            "{}",
            n("smollm2-360m")
        );
        assert!(
            (1700.0..1720.0).contains(&n("smollm2-1.7b")),
            "{}",
            n("smollm2-1.7b")
        );
        let err = ModelConfig::preset("gpt5").unwrap_err().to_string();
        assert!(err.contains("smollm2-135m"), "{err}");
    }

    /// The coordinator validates job files (contexts, θ) against its own table of the presets,
    /// since it never builds a model: the two must agree, name for name.
    #[test]
    fn presets_agree_with_the_coordinators_table() {
        use stagecoach_core::spec::PRESETS as TABLE;
        let names: Vec<&str> = TABLE.iter().map(|p| p.name).collect();
        assert_eq!(names, PRESETS);
        for p in TABLE {
            let c = ModelConfig::preset(p.name).unwrap();
            assert_eq!(
                (c.max_position_embeddings, c.rope_theta),
                (i64::from(p.context), p.rope_theta),
                "{}",
                p.name
            );
        }
    }

    #[test]
    fn var_store_matches_parameter_count_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig::preset("micro").unwrap();
        let _m = Llama::new(&vs, cfg.clone()).unwrap();
        let vars = vs.variables();
        let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, cfg.num_parameters());
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.norm.weight",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn switching_rope_theta_equals_building_with_it() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cfg = ModelConfig::preset("micro").unwrap();
        let mut switched = Llama::new(&vs, cfg.clone()).unwrap();
        let ids = Tensor::randint(cfg.vocab_size, [2, 40], (Kind::Int64, Device::Cpu));
        let logits = |m: &Llama| tch::no_grad(|| m.forward(&ids).unwrap());
        // The first forward pass fills the tables at the preset's θ.
        let at_base = logits(&switched);
        switched.set_rope_theta(40_000.0).unwrap();
        let at_new = logits(&switched);

        cfg.rope_theta = 40_000.0;
        let mut vs_built = nn::VarStore::new(Device::Cpu);
        let built = Llama::new(&vs_built, cfg).unwrap();
        vs_built.copy(&vs).unwrap();
        assert_eq!(max_abs(&at_new, &logits(&built)), 0.0);
        // θ does reach the logits, and switching back restores them exactly.
        assert!(max_abs(&at_base, &at_new) > 1e-3);
        switched.set_rope_theta(10_000.0).unwrap();
        assert_eq!(max_abs(&at_base, &logits(&switched)), 0.0);

        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = switched.set_rope_theta(bad).unwrap_err().to_string();
            assert!(err.contains("RoPE theta"), "{err}");
        }
        assert_eq!(switched.config().rope_theta, 10_000.0);
    }

    #[test]
    fn forward_shape_causality_and_bad_input() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Llama::new(&vs, ModelConfig::preset("micro").unwrap()).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let logits = m.forward(&ids).unwrap();
        assert_eq!(logits.size(), [1, 6, 264]);
        // Changing a later token leaves earlier logits untouched.
        let ids2 = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
        let logits2 = m.forward(&ids2).unwrap();
        let diff = (logits.narrow(1, 0, 3) - logits2.narrow(1, 0, 3))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0);
        // A token outside the vocabulary is an error, not a crash.
        let bad = Tensor::from_slice(&[1i64, 999]).view([1, 2]);
        assert!(m.forward(&bad).is_err());
    }
}
