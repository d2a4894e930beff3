//! AdamW with decoupled weight decay, and global-norm gradient clipping, computed the way
//! `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` compute them (checked against them in
//! the reference tests).
//!
//! Weight decay applies to every matrix (attention and MLP projections and the tied embedding)
//! and not to the RMSNorm gains; see [`crate::model::decays`].
//!
//! [`AdamW::set_fused`] switches the update to ATen's fused AdamW kernel (`_fused_adamw_`, what
//! `torch.optim.AdamW(fused=True)` runs; CPU and CUDA): one kernel over all parameters of a
//! weight-decay group instead of several element-wise kernels per parameter. tch does not
//! generate a binding for it, so it is called through its exported C++ entry point (see
//! the `fused` module); the moments and the step count are the same tensors and number either way, so
//! checkpoints and clipping do not change.

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
    /// The fused kernel's step tensor (fp32, on the parameters' device) when the update is fused.
    fused: Option<Tensor>,
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
            fused: None,
        })
    }

    /// Uses ATen's fused AdamW kernel for the update (`true`) or the element-wise one (`false`,
    /// the default). Both compute the same update (checked in the tests to 1e-6). Fails, leaving
    /// the optimizer unfused, if this libtorch does not export the kernel or the parameters are
    /// not floating-point tensors on one device.
    pub fn set_fused(&mut self, on: bool) -> Result<()> {
        if !on {
            self.fused = None;
            return Ok(());
        }
        fused::available().map_err(Error::Device)?;
        let Some(first) = self.params.first() else {
            return Err(Error::Config("fused AdamW: no trainable parameters".into()));
        };
        let device = first.param.device();
        for p in &self.params {
            if p.param.device() != device || !p.param.is_floating_point() {
                return Err(Error::Config(format!(
                    "fused AdamW needs floating-point parameters on one device; {} is {:?} on {:?}",
                    p.name,
                    p.param.kind(),
                    p.param.device()
                )));
            }
        }
        self.fused = Some(Tensor::zeros([], (Kind::Float, device)));
        Ok(())
    }

    /// Whether the update runs ATen's fused kernel.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
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

    /// [`clip_grad_norm`](Self::clip_grad_norm) without reading the norm back to the host (no
    /// device synchronisation): the coefficient `min(1, max / (norm + 1e-6))` stays a tensor, as
    /// in `clip_grad_norm_(foreach=True)`. Returns the norm (fp32, on the device), if any
    /// gradient is defined.
    pub fn clip_grad_norm_on_device(&self) -> Option<Tensor> {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.param.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return None;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        let norm = Tensor::stack(&norms, 0).norm();
        let max = self.config.grad_clip;
        if max > 0.0 {
            let coef = (max / (&norm + 1e-6)).clamp_max(1.0);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_(&coef.to_kind(g.kind()));
                }
            });
        }
        Some(norm)
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
        if self.fused.is_some() {
            self.fused_step(lr);
            return;
        }
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

    /// The update through ATen's fused kernel: one call per weight-decay group (decay on the
    /// matrices, none on the gains), as `torch.optim.AdamW(fused=True)` with two param groups.
    fn fused_step(&mut self, lr: f64) {
        let Some(step) = self.fused.as_mut() else {
            return;
        };
        let (b1, b2) = self.config.betas;
        let (eps, wd) = (self.config.eps, self.config.weight_decay);
        tch::no_grad(|| {
            // One step tensor read by every parameter's update; filling it is one kernel and
            // no host synchronisation (PyTorch keeps one per parameter and adds 1 to each).
            let _ = step.fill_(self.step as f64);
            for decay in [true, false] {
                let mut group = fused::Group::default();
                for p in self.params.iter().filter(|p| p.decay == decay) {
                    let grad = p.param.grad();
                    if grad.defined() {
                        group.push(&p.param, grad, &p.exp_avg, &p.exp_avg_sq);
                    }
                }
                let wd = if decay { wd } else { 0.0 };
                group.run(step, self.step as f64, lr, (b1, b2), wd, eps);
            }
        });
    }

    /// Back to the state of a fresh optimizer over the same parameters: zero moments, no step
    /// taken, no gradient (the same tensors, zeroed in place).
    pub fn reset(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let _ = p.exp_avg.f_zero_()?;
                let _ = p.exp_avg_sq.f_zero_()?;
            }
            Ok(())
        })?;
        self.step = 0;
        self.zero_grad();
        Ok(())
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

/// ATen's `_fused_adamw_`, called through its exported C++ entry point
/// `at::_ops::_fused_adamw_::call`.
///
/// tch's code generator skips the `_fused_adam*` operators, so there is no binding. The entry
/// point takes `c10::ArrayRef<at::Tensor>` lists (a pointer and a length, trivially copyable,
/// passed as a C struct of two words), doubles, bools and `const std::optional<at::Tensor>&`
/// (a pointer to the tensor's one word followed by the engaged flag). An `at::Tensor` is one
/// pointer (its `intrusive_ptr<TensorImpl>`), and a tch tensor is a pointer to an `at::Tensor`,
/// so a list is built from borrowed copies of those words: the callee only reads through the
/// list, so no reference count changes hands. Every tensor of a call is checked first (same
/// device, kind and shape as its parameter) so the kernel has nothing to throw about: a C++
/// exception cannot cross into Rust.
mod fused {
    use std::ffi::c_void;
    use std::sync::OnceLock;

    use tch::Tensor;

    /// The mangled name of `at::_ops::_fused_adamw_::call` (std::optional: PyTorch >= 2.4).
    const SYMBOL: &[u8] = b"_ZN2at4_ops13_fused_adamw_4callEN3c108ArrayRefINS_6TensorEEES5_S5_S5_S5_S5_dddddbbRKSt8optionalIS4_ES9_\0";

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct TensorList {
        data: *const *mut c_void,
        len: usize,
    }

    #[repr(C)]
    struct OptionalTensor {
        value: *mut c_void,
        engaged: bool,
    }

    type Kernel = unsafe extern "C" fn(
        TensorList,            // params
        TensorList,            // grads
        TensorList,            // exp_avgs
        TensorList,            // exp_avg_sqs
        TensorList,            // max_exp_avg_sqs (amsgrad only: empty)
        TensorList,            // state_steps
        f64,                   // lr
        f64,                   // beta1
        f64,                   // beta2
        f64,                   // weight_decay
        f64,                   // eps
        bool,                  // amsgrad
        bool,                  // maximize
        *const OptionalTensor, // grad_scale
        *const OptionalTensor, // found_inf
    );

    struct Symbol(Kernel);

    /// Whether this libtorch exports the kernel (why not, if it does not).
    pub(super) fn available() -> Result<(), String> {
        kernel().map(|_| ())
    }

    /// The kernel, looked up once among the symbols already loaded (libtorch_cpu is linked).
    fn kernel() -> Result<Kernel, String> {
        static KERNEL: OnceLock<Result<Symbol, String>> = OnceLock::new();
        let found = KERNEL.get_or_init(|| {
            let this = libloading::os::unix::Library::this();
            // SAFETY: the symbol is a function of exactly the type `Kernel` describes (see the
            // module's documentation); the library handle is the process itself, never closed.
            let kernel = unsafe { this.get::<Kernel>(SYMBOL) }
                .map(|s| Symbol(*s))
                .map_err(|e| {
                    format!(
                        "fused AdamW: this libtorch does not export at::_ops::_fused_adamw_::call ({e}); \
                         use a PyTorch >= 2.4 build or leave --fused-adamw off"
                    )
                });
            std::mem::forget(this);
            kernel
        });
        found.as_ref().map(|s| s.0).map_err(Clone::clone)
    }

    /// The `at::Tensor` word of a tch tensor.
    fn word(t: &Tensor) -> *mut c_void {
        // SAFETY: a tch tensor points to a live `at::Tensor`, whose only field is one pointer.
        unsafe { *(t.as_ptr() as *const *mut c_void) }
    }

    /// One call's tensors. The gradients are owned here (tch hands out a new handle per
    /// `grad()`), the rest borrowed from the optimizer, alive for the call.
    #[derive(Default)]
    pub(super) struct Group {
        grads: Vec<Tensor>,
        words: [Vec<*mut c_void>; 4],
        /// Tensors the kernel cannot take as they are (another kind or device than their
        /// parameter's): updated element-wise instead.
        fallback: Vec<(Tensor, Tensor, Tensor, Tensor)>,
    }

    impl Group {
        pub(super) fn push(&mut self, param: &Tensor, grad: Tensor, m: &Tensor, v: &Tensor) {
            let fits = |t: &Tensor| {
                t.kind() == param.kind() && t.device() == param.device() && t.size() == param.size()
            };
            if fits(&grad) && fits(m) && fits(v) {
                for (list, t) in self.words.iter_mut().zip([param, &grad, m, v]) {
                    list.push(word(t));
                }
                self.grads.push(grad);
            } else {
                self.fallback.push((
                    param.shallow_clone(),
                    grad,
                    m.shallow_clone(),
                    v.shallow_clone(),
                ));
            }
        }

        /// Applies the update; `step` holds the step number `t` (already counted).
        pub(super) fn run(
            mut self,
            step: &Tensor,
            t: f64,
            lr: f64,
            (b1, b2): (f64, f64),
            wd: f64,
            eps: f64,
        ) {
            let n = self.grads.len();
            // The kernel was found by `set_fused`, which is the only way here.
            if let (true, Ok(kernel)) = (n > 0, kernel()) {
                let steps = vec![word(step); n];
                let list = |v: &Vec<*mut c_void>| TensorList {
                    data: v.as_ptr(),
                    len: v.len(),
                };
                let none = OptionalTensor {
                    value: std::ptr::null_mut(),
                    engaged: false,
                };
                // SAFETY: every list holds `n` live tensors (kept alive by `self`, `step` and
                // the optimizer) of matching device, kind and shape; the empty list's pointer
                // is never read.
                unsafe {
                    kernel(
                        list(&self.words[0]),
                        list(&self.words[1]),
                        list(&self.words[2]),
                        list(&self.words[3]),
                        TensorList {
                            data: std::ptr::NonNull::dangling().as_ptr(),
                            len: 0,
                        },
                        list(&steps),
                        lr,
                        b1,
                        b2,
                        wd,
                        eps,
                        false,
                        false,
                        &none,
                        &none,
                    )
                };
            }
            for (mut p, g, mut m, mut v) in self.fallback.drain(..) {
                let g = g.to_device(p.device()).to_kind(m.kind());
                let _ = p.g_mul_scalar_(1.0 - lr * wd);
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2);
                let _ = v.addcmul_(&(&g * (1.0 - b2)), &g);
                let denom = v.sqrt() / (1.0 - b2.powf(t)).sqrt() + eps;
                let update = (&m / denom) * (lr / (1.0 - b1.powf(t)));
                let _ = p.f_sub_(&update.to_kind(p.kind()));
            }
        }
    }
}
