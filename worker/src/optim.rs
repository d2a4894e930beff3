//! AdamW with decoupled weight decay, and global-norm gradient clipping, computed the way
//! `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` compute them (checked against them in
//! the reference tests).
//!
//! Weight decay applies to every matrix (attention and MLP projections and the tied embedding)
//! and not to the RMSNorm gains; see [`crate::model::decays`].

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::decays;

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Maximum global L2 norm of the gradients; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.95)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    1.0
}

impl Default for AdamWConfig {
    /// The SmolLM2 values: β = (0.9, 0.95), ε = 1e-8, weight decay 0.01, clip 1.0.
    fn default() -> Self {
        AdamWConfig {
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            grad_clip: default_clip(),
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(Error::Config(format!(
                "betas must lie in [0, 1), got ({b1}, {b2})"
            )));
        }
        if self.eps.is_nan()
            || self.eps <= 0.0
            || [self.weight_decay, self.grad_clip]
                .iter()
                .any(|v| v.is_nan() || *v < 0.0)
        {
            return Err(Error::Config(
                "eps must be positive; weight_decay and grad_clip non-negative".into(),
            ));
        }
        Ok(())
    }
}

/// One parameter and its moments.
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

/// The optimizer over every trainable variable of a [`VarStore`], in name order.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    pub fn new(vs: &VarStore, config: AdamWConfig) -> Result<AdamW> {
        config.validate()?;
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, param)| {
                let decay = decays(&param.size());
                // Moments in fp32 whatever the parameter's type.
                let zeros = || param.zeros_like().to_kind(Kind::Float);
                ParamState {
                    name,
                    exp_avg: zeros(),
                    exp_avg_sq: zeros(),
                    param,
                    decay,
                }
            })
            .collect();
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the steps taken (a resumed optimizer continues the bias correction from there).
    pub fn set_step_count(&mut self, steps: u64) {
        self.step = steps;
    }

    pub fn params(&self) -> &[ParamState] {
        &self.params
    }

    /// Global L2 norm of all gradients (`clip_grad_norm_`'s norm: the norm of per-tensor norms).
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.param.grad())
            .filter(Tensor::defined)
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    }

    /// Scales the gradients so their global norm is at most `grad_clip` (coefficient
    /// `max / (norm + 1e-6)`, as PyTorch); returns the norm before clipping.
    pub fn clip_grad_norm(&self) -> f64 {
        let norm = self.grad_norm();
        self.clip_to(norm);
        norm
    }

    /// Scales the gradients as [`clip_grad_norm`](Self::clip_grad_norm) does, given their
    /// global norm `norm` (computed once and agreed between ranks).
    pub fn clip_to(&self, norm: f64) {
        let max = self.config.grad_clip;
        if max > 0.0 {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                tch::no_grad(|| {
                    for p in &self.params {
                        let mut g = p.param.grad();
                        if g.defined() {
                            let _ = g.g_mul_scalar_(coef);
                        }
                    }
                });
            }
        }
    }

    /// One AdamW update at learning rate `lr` from the current gradients.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = self.config.betas;
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        let (eps, wd) = (self.config.eps, self.config.weight_decay);
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.to_kind(Kind::Float);
                if p.decay && wd != 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = p.exp_avg.lerp_(&grad, 1.0 - b1);
                let _ = p.exp_avg_sq.g_mul_scalar_(b2);
                let _ = p.exp_avg_sq.addcmul_(&(&grad * (1.0 - b2)), &grad);
                let denom = p.exp_avg_sq.sqrt() / bias2_sqrt + eps;
                let update = (&p.exp_avg / denom) * step_size;
                let _ = p.param.f_sub_(&update.to_kind(p.param.kind()));
            }
        });
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
}
