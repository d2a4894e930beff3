//! The worker's Prometheus metrics. The trainer thread updates them (they are atomics); the
//! async side serves them with [`stagecoach_coordinator::metrics::serve`].

use std::sync::Mutex;
use std::time::Instant;

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounter, IntGauge, Opts, Registry};
use stagecoach_coordinator::metrics::{register, Throughput};

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
            throughput: Mutex::new(Throughput::default()),
            registry: r,
        };
        m.loss.set(f64::NAN);
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

    /// Took a step: now `steps` in all, with this rank's mean `loss` over `tokens`.
    pub fn step_done(&self, steps: u64, loss: f64, tokens: u64, timing: &Timing) {
        self.step.set(steps as i64);
        self.loss.set(loss);
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
        m.step_done(7, 2.5, 512, &timing);
        let t = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry().gather())
            .unwrap();
        for line in [
            "stagecoach_worker_step 7",
            "stagecoach_worker_loss 2.5",
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
