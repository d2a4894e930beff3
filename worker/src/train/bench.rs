//! `stagecoach-worker bench-train`: training throughput of a preset on random tokens, with
//! the FLOPs per token an MFU is computed from.

use std::time::Instant;

use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::FastPath;
use crate::error::{Error, Result};
use crate::model::{Llama, ModelConfig, Precision};
use crate::optim::{AdamW, AdamWConfig};

/// What `stagecoach-worker bench-train` measures: training throughput on random tokens.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    pub seq_len: usize,
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Timed steps.
    pub steps: usize,
    /// Steps run before the timing starts (allocator warm-up, kernel selection).
    pub warmup: usize,
    pub device: String,
    pub fast_path: FastPath,
    /// Read the loss back every this many steps (the only host synchronisation in the loop).
    pub log_every: usize,
    pub seed: u64,
}

/// One `bench-train` run, printed as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub impl_name: &'static str,
    pub preset: String,
    pub parameters: i64,
    pub device: String,
    pub precision: Precision,
    pub fused_adamw: bool,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Training FLOPs per token (see [`train_flops_per_token`]).
    pub flops_per_token: f64,
    /// Achieved FLOP/s over `peak_flops`, when a peak is given.
    pub mfu: Option<f64>,
    pub peak_flops: Option<f64>,
    /// GPU memory in use at the end (total - free from the driver): with libtorch's caching
    /// allocator, which keeps what it reserved, about the peak reserved memory. None on CPU.
    pub gpu_memory_used_bytes: Option<u64>,
    /// The losses read every `log_every` steps (warm-up included), to show training happens.
    pub losses: Vec<f64>,
}

/// Training FLOPs per token as PaLM's appendix B counts them for MFU: `6 N` for the matrix
/// products of forward and backward over the `N` parameters (the tied embedding counted once,
/// as the output projection; the lookup is free), plus `12 · layers · heads · head_dim · seq`
/// for the attention scores and their weighted sum (QKᵀ and AV, 2 FLOPs per multiply-add,
/// backward twice the forward). The causal mask is not halved out, as in PaLM, so MFUs compare
/// with those usually published.
pub fn train_flops_per_token(config: &ModelConfig, seq_len: usize) -> f64 {
    let n = config.num_parameters() as f64;
    let attn = 12.0
        * config.num_hidden_layers as f64
        * (config.num_attention_heads * config.head_dim) as f64
        * seq_len as f64;
    6.0 * n + attn
}

/// Trains a preset on random tokens and reports its throughput. The device is synchronised
/// only when the warm-up ends, every `log_every` steps (to read the loss) and at the end.
pub fn bench_train(opts: &BenchOptions, peak_flops: Option<f64>) -> Result<BenchReport> {
    if opts.seq_len == 0 || opts.micro_batch == 0 || opts.accumulation == 0 || opts.steps == 0 {
        return Err(Error::Config(
            "bench-train needs positive --seq, --micro-batch, --accumulation and --steps".into(),
        ));
    }
    let device = crate::device::parse(&opts.device)?;
    let mut config = ModelConfig::preset(&opts.preset)?;
    config.max_position_embeddings = config.max_position_embeddings.max(opts.seq_len as i64);
    tch::manual_seed(opts.seed as i64);
    let vs = VarStore::new(device);
    let mut model = Llama::new(&vs, config.clone())?;
    model.set_precision(opts.fast_path.precision);
    let mut optimizer = AdamW::new(&vs, AdamWConfig::default())?;
    optimizer.set_fused(opts.fast_path.fused_adamw)?;
    // A few host batches, pinned on CUDA so that their copies are asynchronous.
    let shape = [opts.micro_batch as i64, opts.seq_len as i64 + 1];
    let host: Vec<Tensor> = (0..4)
        .map(|_| {
            let t = Tensor::randint(config.vocab_size, shape, (Kind::Int64, Device::Cpu));
            if device.is_cuda() {
                t.pin_memory(device)
            } else {
                t
            }
        })
        .collect();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut losses = Vec::new();
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let mut start = Instant::now();
    let log_every = opts.log_every.max(1);
    let mut micro = 0usize;
    for step in 0..opts.warmup + opts.steps {
        if step == opts.warmup {
            sync();
            start = Instant::now();
        }
        for _ in 0..opts.accumulation {
            let batch = host[micro % host.len()].f_to_device_(device, Kind::Int64, true, false)?;
            micro += 1;
            let loss = model.loss(&batch)?;
            (&loss / opts.accumulation as f64).f_backward()?;
            loss_acc += loss.detach() / opts.accumulation as f64;
        }
        let _norm = optimizer.clip_grad_norm_on_device();
        optimizer.step(3e-4);
        optimizer.zero_grad();
        if (step + 1) % log_every == 0 {
            losses.push(loss_acc.f_double_value(&[])? / log_every as f64);
            let _ = loss_acc.zero_();
        }
    }
    sync();
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (opts.steps * opts.accumulation * opts.micro_batch * opts.seq_len) as f64;
    let tokens_per_second = tokens / seconds;
    let flops_per_token = train_flops_per_token(&config, opts.seq_len);
    Ok(BenchReport {
        impl_name: "stagecoach",
        preset: opts.preset.clone(),
        parameters: config.num_parameters(),
        device: opts.device.clone(),
        precision: opts.fast_path.precision,
        fused_adamw: opts.fast_path.fused_adamw,
        seq_len: opts.seq_len,
        micro_batch: opts.micro_batch,
        accumulation: opts.accumulation,
        steps: opts.steps,
        warmup: opts.warmup,
        seconds,
        tokens_per_second,
        flops_per_token,
        mfu: peak_flops.map(|p| tokens_per_second * flops_per_token / p),
        peak_flops,
        gpu_memory_used_bytes: if device.is_cuda() {
            gpu_memory_used()
        } else {
            None
        },
        losses,
    })
}

/// Bytes of GPU memory in use on the current CUDA context (total - free), if the driver answers.
fn gpu_memory_used() -> Option<u64> {
    use cudarc::driver::{result, sys};
    // SAFETY: only checks whether libcuda can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    result::init().ok()?;
    let (free, total) = result::mem_get_info().ok()?;
    Some((total - free) as u64)
}
