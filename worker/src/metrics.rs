//! The worker's Prometheus metrics. The trainer thread updates them (they are atomics); the
//! async side serves them with [`stagecoach_core::metrics::serve`].

use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use stagecoach_core::metrics::{register, Throughput};

use crate::checkpoint::Saved;
use crate::train::Timing;

/// What this worker trains, in its own registry.
pub struct Metrics {
    registry: Registry,
    step: IntGauge,
    loss: Gauge,
    step_seconds: HistogramVec,
    tokens: IntCounter,
    tokens_per_second: Gauge,
    rank: IntGauge,
    generation: IntGauge,
    stage: IntGauge,
    seq_len: IntGauge,
    global_loss: Gauge,
    skipped_steps: IntCounter,
    checkpoint_blocking: Gauge,
    checkpoint_write: Gauge,
    checkpoint_bytes: IntGauge,
    checkpoints: IntCounterVec,
    throughput: Mutex<Throughput>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(format!("stagecoach_worker_{name}"), help);
        // 1 ms to about 65 s.
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 17).expect("valid buckets");
        let m = Metrics {
            step: register(&r, IntGauge::with_opts(opts("step", "Steps this worker has taken"))),
            loss: register(
                &r,
                Gauge::with_opts(opts(
                    "loss",
                    "Mean loss of this rank's samples in its last step (NaN before the first)",
                )),
            ),
            step_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "stagecoach_worker_step_seconds",
                        "Seconds of each step by phase: data, forward_backward, allreduce, optimizer",
                    )
                    .buckets(buckets),
                    &["phase"],
                ),
            ),
            tokens: register(
                &r,
                IntCounter::with_opts(opts(
                    "tokens_total",
                    "Tokens this rank trained (samples x seq_len)",
                )),
            ),
            tokens_per_second: register(
                &r,
                Gauge::with_opts(opts(
                    "tokens_per_second",
                    "Tokens this rank trained per second over its recent steps",
                )),
            ),
            rank: register(
                &r,
                IntGauge::with_opts(opts("rank", "Rank in the current world (-1: none)")),
            ),
            generation: register(
                &r,
                IntGauge::with_opts(opts("generation", "Generation of the world last joined")),
            ),
            stage: register(
                &r,
                IntGauge::with_opts(opts(
                    "stage",
                    "Curriculum stage (index) of the last step trained (-1: none yet)",
                )),
            ),
            seq_len: register(
                &r,
                IntGauge::with_opts(opts(
                    "seq_len",
                    "Sequence length of the last step trained",
                )),
            ),
            global_loss: register(
                &r,
                Gauge::with_opts(opts(
                    "global_loss",
                    "Mean loss over the whole global batch of the last step (NaN before the first)",
                )),
            ),
            skipped_steps: register(
                &r,
                IntCounter::with_opts(opts(
                    "skipped_steps_total",
                    "Steps whose update the guard dropped (loss or gradient norm too high or not finite)",
                )),
            ),
            checkpoint_blocking: register(
                &r,
                Gauge::with_opts(opts(
                    "checkpoint_blocking_seconds",
                    "Seconds training waited for the last checkpoint (copying the state off)",
                )),
            ),
            checkpoint_write: register(
                &r,
                Gauge::with_opts(opts(
                    "checkpoint_write_seconds",
                    "Seconds the last checkpoint took to write in the background",
                )),
            ),
            checkpoint_bytes: register(
                &r,
                IntGauge::with_opts(opts(
                    "checkpoint_bytes",
                    "Bytes of the last checkpoint written",
                )),
            ),
            checkpoints: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "checkpoints_total",
                        "Checkpoints this worker wrote (outcome: written or failed)",
                    ),
                    &["outcome"],
                ),
            ),
            throughput: Mutex::new(Throughput::default()),
            registry: r,
        };
        m.loss.set(f64::NAN);
        m.global_loss.set(f64::NAN);
        m.rank.set(-1);
        m.stage.set(-1);
        m
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Joined the world of `generation` as `rank`.
    pub fn joined(&self, generation: u64, rank: u32) {
        self.generation.set(generation as i64);
        self.rank.set(i64::from(rank));
        self.throughput.lock().expect("not poisoned").clear();
    }

    /// Left the current world (it ended or a step failed).
    pub fn left(&self) {
        self.rank.set(-1);
        self.tokens_per_second.set(0.0);
    }

    /// Trains in curriculum stage `index` with sequence length `seq_len` from now on.
    pub fn stage(&self, index: u32, seq_len: u32) {
        self.stage.set(i64::from(index));
        self.seq_len.set(i64::from(seq_len));
    }

    /// A checkpoint write ended (written, or failed with `saved.error`).
    pub fn checkpoint_saved(&self, saved: &Saved) {
        self.checkpoint_blocking.set(saved.blocking_seconds);
        self.checkpoint_write.set(saved.write_seconds);
        if saved.error.is_none() {
            self.checkpoint_bytes.set(saved.bytes as i64);
            self.checkpoints.with_label_values(&["written"]).inc();
        } else {
            self.checkpoints.with_label_values(&["failed"]).inc();
        }
    }

    /// Restored a checkpoint: the model has now taken `steps` steps.
    pub fn restored(&self, steps: u64) {
        self.step.set(steps as i64);
    }

    /// Took a step: now `steps` in all, with this rank's mean `loss` over `tokens`, the batch's
    /// `global_loss`, and the update dropped if `skipped`.
    pub fn step_done(
        &self,
        steps: u64,
        loss: f64,
        global_loss: f64,
        skipped: bool,
        tokens: u64,
        timing: &Timing,
    ) {
        self.step.set(steps as i64);
        self.loss.set(loss);
        self.global_loss.set(global_loss);
        if skipped {
            self.skipped_steps.inc();
        }
        self.tokens.inc_by(tokens);
        for (phase, seconds) in [
            ("data", timing.data),
            ("forward_backward", timing.forward_backward),
            ("allreduce", timing.allreduce),
            ("optimizer", timing.optimizer),
        ] {
            self.step_seconds
                .with_label_values(&[phase])
                .observe(seconds);
        }
        let mut t = self.throughput.lock().expect("not poisoned");
        if let Some(rate) = t.record(Instant::now(), tokens) {
            self.tokens_per_second.set(rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_step_split() {
        let m = Metrics::new();
        m.joined(3, 1);
        m.stage(2, 512);
        let timing = Timing {
            data: 0.001,
            forward_backward: 0.5,
            allreduce: 0.25,
            optimizer: 0.002,
        };
        m.step_done(7, 2.5, 2.25, true, 512, &timing);
        m.checkpoint_saved(&Saved {
            path: "runs/x/step-7".into(),
            blocking_seconds: 0.125,
            write_seconds: 1.5,
            bytes: 4096,
            error: None,
        });
        m.checkpoint_saved(&Saved {
            path: "runs/x/step-8".into(),
            blocking_seconds: 0.25,
            write_seconds: 0.5,
            bytes: 0,
            error: Some("disk full".into()),
        });
        let t = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry().gather())
            .unwrap();
        for line in [
            "stagecoach_worker_step 7",
            "stagecoach_worker_loss 2.5",
            "stagecoach_worker_global_loss 2.25",
            "stagecoach_worker_skipped_steps_total 1",
            "stagecoach_worker_checkpoint_blocking_seconds 0.25",
            "stagecoach_worker_checkpoint_write_seconds 0.5",
            "stagecoach_worker_checkpoint_bytes 4096",
            "stagecoach_worker_checkpoints_total{outcome=\"written\"} 1",
            "stagecoach_worker_checkpoints_total{outcome=\"failed\"} 1",
            "stagecoach_worker_tokens_total 512",
            "stagecoach_worker_rank 1",
            "stagecoach_worker_generation 3",
            "stagecoach_worker_stage 2",
            "stagecoach_worker_seq_len 512",
            "stagecoach_worker_step_seconds_sum{phase=\"forward_backward\"} 0.5",
            "stagecoach_worker_step_seconds_sum{phase=\"allreduce\"} 0.25",
            "stagecoach_worker_step_seconds_count{phase=\"data\"} 1",
            "stagecoach_worker_step_seconds_count{phase=\"optimizer\"} 1",
            "stagecoach_worker_step_seconds_bucket{phase=\"allreduce\",le=\"0.256\"} 1",
            "# TYPE stagecoach_worker_step_seconds histogram",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
        }
        m.left();
        let t = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry().gather())
            .unwrap();
        assert!(t.lines().any(|l| l == "stagecoach_worker_rank -1"), "{t}");
    }
}
