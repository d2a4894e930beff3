//! Prometheus metrics: the coordinator's job signals ([`Metrics`]). The tokens/s estimate and
//! the `/metrics` endpoint are `stagecoach_core::metrics`'s, which the worker uses too.
//!
//! Every metric lives in a [`Registry`] owned by its struct (never the process-global one), so
//! tests can build several. Names follow `stagecoach_<subsystem>_<name>[_total|_seconds]`; label
//! values come from closed sets (source names from the job spec, job states).

use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use stagecoach_proto::v1;

use crate::status::Snapshot;
use stagecoach_core::metrics::{register, Throughput};
use stagecoach_core::plan::SampleId;

/// The job states, each a value of the `state` label of `stagecoach_job_state`.
const STATES: [(v1::JobState, &str); 5] = [
    (v1::JobState::Waiting, "waiting"),
    (v1::JobState::Running, "running"),
    (v1::JobState::Paused, "paused"),
    (v1::JobState::Finished, "finished"),
    (v1::JobState::Failed, "failed"),
];

/// The transition causes, each a value of the `cause` label of
/// `stagecoach_job_stage_transitions_total`.
const CAUSES: [v1::TransitionCause; 5] = [
    v1::TransitionCause::Start,
    v1::TransitionCause::Budget,
    v1::TransitionCause::ManualNext,
    v1::TransitionCause::ManualSet,
    v1::TransitionCause::MixChange,
];

/// The spike actions, each a value of the `action` label of `stagecoach_job_spikes_total`.
const ACTIONS: [v1::SpikeAction; 8] = [
    v1::SpikeAction::SkipStep,
    v1::SpikeAction::Rollback,
    v1::SpikeAction::Pause,
    v1::SpikeAction::ManualRollback,
    v1::SpikeAction::FailurePause,
    v1::SpikeAction::FailureStop,
    v1::SpikeAction::CheckpointFallback,
    v1::SpikeAction::Control,
];

/// The kinds of store write, each a value of the `write` label of
/// `stagecoach_store_errors_total`.
const WRITES: [&str; 6] = [
    "commit",
    "curriculum",
    "checkpoint_index",
    "event",
    "rewind",
    "skipped",
];

/// `SpikeAction::SkipStep` → `skip_step`: the proto's name without its prefix.
pub fn action_label(action: v1::SpikeAction) -> &'static str {
    match action {
        v1::SpikeAction::Unspecified => "unspecified",
        v1::SpikeAction::SkipStep => "skip_step",
        v1::SpikeAction::Rollback => "rollback",
        v1::SpikeAction::Pause => "pause",
        v1::SpikeAction::ManualRollback => "manual_rollback",
        v1::SpikeAction::FailurePause => "failure_pause",
        v1::SpikeAction::FailureStop => "failure_stop",
        v1::SpikeAction::CheckpointFallback => "checkpoint_fallback",
        v1::SpikeAction::Control => "control",
    }
}

/// `TransitionCause::ManualNext` → `manual_next`: the proto's name without its prefix.
pub fn cause_label(cause: v1::TransitionCause) -> &'static str {
    match cause {
        v1::TransitionCause::Unspecified => "unspecified",
        v1::TransitionCause::Start => "start",
        v1::TransitionCause::Budget => "budget",
        v1::TransitionCause::ManualNext => "manual_next",
        v1::TransitionCause::ManualSet => "manual_set",
        v1::TransitionCause::MixChange => "mix_change",
    }
}

/// Control requests by action and outcome (done, failed, refused): the audit trail's count.
/// Process-wide, so the services record into it without a handle; registered into a
/// [`Metrics`] registry by [`Metrics::new`].
static CONTROL_REQUESTS: std::sync::LazyLock<IntCounterVec> = std::sync::LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stagecoach_control_requests_total",
            "Requests to change the job, by action and outcome (done, failed, refused)",
        ),
        &["action", "outcome"],
    )
    .expect("a valid metric definition")
});

/// Counts a control request (see [`CONTROL_REQUESTS`]).
pub fn control_request(action: &str, outcome: &str) {
    CONTROL_REQUESTS.with_label_values(&[action, outcome]).inc();
}

/// High availability, process-wide like [`CONTROL_REQUESTS`] (a standby has no job metrics
/// yet): whether this replica leads, the leader changes it saw, the writes fenced off.
static LEADER: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_leader",
        "1 while this coordinator replica leads the job (--ha), 0 while it stands by",
    ))
    .expect("a valid metric definition")
});
static LEADER_CHANGES: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    IntCounter::with_opts(Opts::new(
        "stagecoach_leader_changes_total",
        "Changes of the job's leading coordinator this replica saw (--ha), its own takeover included",
    ))
    .expect("a valid metric definition")
});
static FENCED_WRITES: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    IntCounter::with_opts(Opts::new(
        "stagecoach_fenced_writes_total",
        "Writes of this replica the state store refused because another replica leads",
    ))
    .expect("a valid metric definition")
});

/// The embedded state store, process-wide like [`CONTROL_REQUESTS`] (the store reports as it
/// writes; an etcd store leaves them at 0): what it holds in memory (memtables and the
/// segments' block indexes), its segments, and what its flushes and merges wrote.
static STORE_MEMORY: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_store_memory_bytes",
        "What the embedded state store holds in memory: writes not yet in a segment and the segments' block indexes (estimated)",
    ))
    .expect("a valid metric definition")
});
static STORE_SEGMENTS: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_store_segments",
        "Segment files of the embedded state store",
    ))
    .expect("a valid metric definition")
});
static STORE_SEGMENT_BYTES: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_store_segment_bytes",
        "The embedded state store's segments' size on disk",
    ))
    .expect("a valid metric definition")
});
static STORE_COMPACTION_WRITTEN: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    IntCounter::with_opts(Opts::new(
        "stagecoach_store_compaction_written_bytes_total",
        "Bytes the embedded state store's flushes and merges wrote to segments",
    ))
    .expect("a valid metric definition")
});

/// Node sessions, process-wide like [`CONTROL_REQUESTS`] (the `Workers` service holds them,
/// not the driver): how many are open, and how many workers are attached through them.
static NODE_SESSIONS: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_node_sessions",
        "NodeSession streams open (a node agent with --relay holds one for its node's workers)",
    ))
    .expect("a valid metric definition")
});
static NODE_SESSION_WORKERS: std::sync::LazyLock<IntGauge> = std::sync::LazyLock::new(|| {
    IntGauge::with_opts(Opts::new(
        "stagecoach_node_session_workers",
        "Workers attached through NodeSession streams (the others hold a Session of their own)",
    ))
    .expect("a valid metric definition")
});

/// A node session opened (see [`NODE_SESSIONS`]).
pub fn node_session_opened() {
    NODE_SESSIONS.inc();
}

/// A node session ended.
pub fn node_session_closed() {
    NODE_SESSIONS.dec();
}

/// Workers attached through node sessions changed by `delta`.
pub fn node_session_workers(delta: i64) {
    NODE_SESSION_WORKERS.add(delta);
}

/// The embedded store's figures now (see [`STORE_MEMORY`]).
pub fn embedded_store(memory: u64, segments: usize, segment_bytes: u64) {
    STORE_MEMORY.set(i64::try_from(memory).unwrap_or(i64::MAX));
    STORE_SEGMENTS.set(i64::try_from(segments).unwrap_or(i64::MAX));
    STORE_SEGMENT_BYTES.set(i64::try_from(segment_bytes).unwrap_or(i64::MAX));
}

/// The embedded store wrote `bytes` to a segment (see [`STORE_COMPACTION_WRITTEN`]).
pub fn store_compaction_written(bytes: u64) {
    STORE_COMPACTION_WRITTEN.inc_by(bytes);
}

/// Whether this replica leads (see [`LEADER`]).
pub fn leadership(held: bool) {
    LEADER.set(i64::from(held));
}

/// The job's leader changed (see [`LEADER_CHANGES`]).
pub fn leader_changed() {
    LEADER_CHANGES.inc();
}

/// The coordinator's metrics. The driver updates them: [`Metrics::observe`] after every event,
/// the others as what they count happens.
pub struct Metrics {
    registry: Registry,
    step: IntGauge,
    total_steps: IntGauge,
    loss: Gauge,
    tokens: IntCounterVec,
    stage_info: IntGaugeVec,
    stage_index: IntGauge,
    transitions: IntCounterVec,
    validation_loss: GaugeVec,
    tokens_per_second: Gauge,
    workers_alive: IntGauge,
    world_size: IntGauge,
    generation: IntGauge,
    generations_ended: IntCounter,
    leases_expired: IntCounter,
    state: IntGaugeVec,
    spikes: IntCounterVec,
    skipped_samples: IntCounter,
    checkpoints: IntCounter,
    checkpoint_failures: IntCounter,
    checkpoint_blocking: Gauge,
    checkpoint_write: Gauge,
    checkpoint_bytes: IntGauge,
    last_checkpoint_step: IntGauge,
    last_checkpoint_time: Gauge,
    checkpoint_every: IntGauge,
    generations: IntCounter,
    failures: IntCounterVec,
    step_timeouts: IntCounter,
    state_syncs: IntCounter,
    restores: IntCounter,
    recovered_steps: IntCounter,
    nonfinite_steps: IntCounter,
    workers_min: IntGauge,
    stage_until_step: IntGauge,
    epoch: GaugeVec,
    store_errors: IntCounterVec,
    store_pending: IntGauge,
    store_available: IntGauge,
    /// The job's source names, in its order (the labels of the per-source series).
    sources: Mutex<Vec<String>>,
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
        let opts = |name: &str, help: &str| Opts::new(format!("stagecoach_job_{name}"), help);
        let m = Metrics {
            step: register(
                &r,
                IntGauge::with_opts(opts("step", "Steps committed to the ledger")),
            ),
            total_steps: register(
                &r,
                IntGauge::with_opts(opts("total_steps", "Steps the job trains in all")),
            ),
            loss: register(
                &r,
                Gauge::with_opts(opts(
                    "loss",
                    "Global mean loss of the last committed step (NaN before the first)",
                )),
            ),
            tokens: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "tokens_total",
                        "Tokens trained in committed steps (samples x the stage's seq_len), by \
                         source",
                    ),
                    &["source"],
                ),
            ),
            stage_info: register(
                &r,
                IntGaugeVec::new(
                    opts(
                        "stage_info",
                        "1, labelled with the current curriculum stage",
                    ),
                    &["stage"],
                ),
            ),
            stage_index: register(
                &r,
                IntGauge::with_opts(opts(
                    "stage_index",
                    "Index of the current stage in the curriculum (0: the first)",
                )),
            ),
            transitions: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "stage_transitions_total",
                        "Stage transitions (and mixture changes of the current stage), by cause",
                    ),
                    &["cause"],
                ),
            ),
            validation_loss: register(
                &r,
                GaugeVec::new(
                    opts(
                        "validation_loss",
                        "Mean token loss on the held-out samples of a source, at the latest \
                         evaluation",
                    ),
                    &["source"],
                ),
            ),
            tokens_per_second: register(
                &r,
                Gauge::with_opts(opts(
                    "tokens_per_second",
                    "Tokens trained per second over the recent committed steps of this generation",
                )),
            ),
            workers_alive: register(
                &r,
                IntGauge::with_opts(opts("workers_alive", "Registered workers holding a lease")),
            ),
            world_size: register(
                &r,
                IntGauge::with_opts(opts("world_size", "Ranks in the current world (0: none)")),
            ),
            generation: register(
                &r,
                IntGauge::with_opts(opts("generation", "The latest world's generation")),
            ),
            generations_ended: register(
                &r,
                IntCounter::with_opts(opts(
                    "generations_ended_total",
                    "Generations ended by a lost or failed worker",
                )),
            ),
            leases_expired: register(
                &r,
                IntCounter::with_opts(opts(
                    "leases_expired_total",
                    "Workers dropped because no message came from them for a lease",
                )),
            ),
            state: register(
                &r,
                IntGaugeVec::new(opts("state", "1 for the job's current state"), &["state"]),
            ),
            spikes: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "spikes_total",
                        "Loss-spike actions: steps whose update the guard dropped (skip_step), \
                         rollbacks, pauses, and rollbacks a person asked for",
                    ),
                    &["action"],
                ),
            ),
            skipped_samples: register(
                &r,
                IntCounter::with_opts(opts(
                    "skipped_samples_total",
                    "Samples a rollback skipped around a spike: planned, never trained",
                )),
            ),
            checkpoints: register(
                &r,
                IntCounter::with_opts(opts("checkpoints_total", "Checkpoints written")),
            ),
            checkpoint_failures: register(
                &r,
                IntCounter::with_opts(opts(
                    "checkpoint_failures_total",
                    "Checkpoint writes that failed (the earlier checkpoints are intact)",
                )),
            ),
            checkpoint_blocking: register(
                &r,
                Gauge::with_opts(opts(
                    "checkpoint_blocking_seconds",
                    "How long the last checkpoint held training (copying the state off)",
                )),
            ),
            checkpoint_write: register(
                &r,
                Gauge::with_opts(opts(
                    "checkpoint_write_seconds",
                    "How long the last checkpoint's write took, in the background",
                )),
            ),
            checkpoint_bytes: register(
                &r,
                IntGauge::with_opts(opts("checkpoint_bytes", "Size of the last checkpoint")),
            ),
            last_checkpoint_step: register(
                &r,
                IntGauge::with_opts(opts(
                    "last_checkpoint_step",
                    "Committed steps in the last checkpoint written",
                )),
            ),
            last_checkpoint_time: register(
                &r,
                Gauge::with_opts(opts(
                    "last_checkpoint_timestamp_seconds",
                    "When the last checkpoint was written (Unix time; 0: none yet)",
                )),
            ),
            checkpoint_every: register(
                &r,
                IntGauge::with_opts(opts(
                    "checkpoint_every_steps",
                    "The job's checkpoint interval in steps (0: only on demand)",
                )),
            ),
            generations: register(
                &r,
                IntCounter::with_opts(opts(
                    "generations_total",
                    "Worlds formed (each generation of workers)",
                )),
            ),
            failures: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "failures_total",
                        "Failures that ended a generation or kept a worker from starting, by \
                         kind (transient, data, checkpoint, config, resource, state)",
                    ),
                    &["kind"],
                ),
            ),
            step_timeouts: register(
                &r,
                IntCounter::with_opts(opts(
                    "step_timeouts_total",
                    "Steps (or evaluations) that got no report in time ([recovery] step_timeout_ms)",
                )),
            ),
            state_syncs: register(
                &r,
                IntCounter::with_opts(opts(
                    "state_syncs_total",
                    "Worlds whose ranks took the committed state from a rank holding it",
                )),
            ),
            restores: register(
                &r,
                IntCounter::with_opts(opts(
                    "restores_total",
                    "Worlds that restored a checkpoint because no rank held the committed state",
                )),
            ),
            recovered_steps: register(
                &r,
                IntCounter::with_opts(opts(
                    "recovered_steps_total",
                    "Steps the ledger lacked (a coordinator restart) committed from the ranks' reports",
                )),
            ),
            nonfinite_steps: register(
                &r,
                IntCounter::with_opts(opts(
                    "nonfinite_steps_total",
                    "Committed steps whose loss or gradient norm was NaN or infinite (their update was dropped)",
                )),
            ),
            workers_min: register(
                &r,
                IntGauge::with_opts(opts(
                    "workers_min",
                    "The workers a world needs ([workers] min)",
                )),
            ),
            stage_until_step: register(
                &r,
                IntGauge::with_opts(opts(
                    "stage_until_step",
                    "The step the current stage's budget ends before",
                )),
            ),
            epoch: register(
                &r,
                GaugeVec::new(
                    opts(
                        "source_epoch",
                        "Passes over a source's tokens so far (above 1: the source repeats data)",
                    ),
                    &["source"],
                ),
            ),
            store_errors: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "stagecoach_store_errors_total",
                        "State store writes that failed (and were retried), by kind of write",
                    ),
                    &["write"],
                ),
            ),
            store_pending: register(
                &r,
                IntGauge::with_opts(Opts::new(
                    "stagecoach_store_pending_writes",
                    "Writes waiting for the state store (no step is dispatched while above 0)",
                )),
            ),
            store_available: register(
                &r,
                IntGauge::with_opts(Opts::new(
                    "stagecoach_store_available",
                    "1 while the state store takes writes, 0 during an outage",
                )),
            ),
            sources: Mutex::new(vec![]),
            throughput: Mutex::new(Throughput::default()),
            registry: r,
        };
        m.store_available.set(1);
        // Each registry holds the process's counter of control requests (tests build several).
        let _ = m.registry.register(Box::new(CONTROL_REQUESTS.clone()));
        let _ = m.registry.register(Box::new(LEADER.clone()));
        let _ = m.registry.register(Box::new(LEADER_CHANGES.clone()));
        let _ = m.registry.register(Box::new(FENCED_WRITES.clone()));
        let _ = m.registry.register(Box::new(NODE_SESSIONS.clone()));
        let _ = m.registry.register(Box::new(NODE_SESSION_WORKERS.clone()));
        let _ = m.registry.register(Box::new(STORE_MEMORY.clone()));
        let _ = m.registry.register(Box::new(STORE_SEGMENTS.clone()));
        let _ = m.registry.register(Box::new(STORE_SEGMENT_BYTES.clone()));
        let _ = m
            .registry
            .register(Box::new(STORE_COMPACTION_WRITTEN.clone()));
        for kind in stagecoach_core::recovery::KINDS {
            m.failures
                .with_label_values(&[stagecoach_core::recovery::kind_label(kind)]);
        }
        for w in WRITES {
            m.store_errors.with_label_values(&[w]);
        }
        m.loss.set(f64::NAN);
        for (_, name) in STATES {
            m.state.with_label_values(&[name]).set(0);
        }
        // Every cause shows from the start, so that `increase()` sees the first transition.
        for cause in CAUSES {
            m.transitions.with_label_values(&[cause_label(cause)]);
        }
        for action in ACTIONS {
            m.spikes.with_label_values(&[action_label(action)]);
        }
        m
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates the per-source series of `job` at zero, so every source shows before it trains.
    pub fn job(&self, job: &v1::JobSpec) {
        *self.sources.lock().expect("not poisoned") =
            job.sources.iter().map(|s| s.name.clone()).collect();
        for s in &job.sources {
            self.tokens.with_label_values(&[&s.name]);
            self.epoch.with_label_values(&[&s.name]).set(0.0);
        }
    }

    /// The job's settings alerts compare against: the workers a world needs and the
    /// checkpoint interval.
    pub fn settings(&self, workers_min: u32, checkpoint_every_steps: u64) {
        self.workers_min.set(i64::from(workers_min));
        self.checkpoint_every
            .set(i64::try_from(checkpoint_every_steps).unwrap_or(i64::MAX));
    }

    /// Sets the gauges from what a status query sees.
    pub fn observe(&self, s: &Snapshot) {
        self.step.set(s.step as i64);
        self.total_steps.set(s.total_steps as i64);
        self.loss.set(s.loss.unwrap_or(f64::NAN));
        self.workers_alive.set(i64::from(s.workers_alive));
        self.world_size.set(i64::from(s.world_size));
        self.generation.set(s.generation as i64);
        if let Some((_, at)) = &s.next_transition {
            self.stage_until_step
                .set(i64::try_from(*at).unwrap_or(i64::MAX));
        } else {
            self.stage_until_step
                .set(i64::try_from(s.total_steps).unwrap_or(i64::MAX));
        }
        for (state, name) in STATES {
            let current = s.state == state as i32;
            self.state
                .with_label_values(&[name])
                .set(i64::from(current));
        }
    }

    /// A step of `job` with these samples, each `seq_len` tokens long, was committed.
    ///
    /// A sample is read as `seq_len + 1` tokens (inputs and shifted targets), but consecutive
    /// samples of a source share their boundary token, so each trains `seq_len` new tokens.
    pub fn step_committed(&self, job: &v1::JobSpec, samples: &[SampleId], seq_len: u32) {
        let mut per_source = vec![0u64; job.sources.len()];
        for s in samples {
            if let Some(n) = per_source.get_mut(s.source) {
                *n += u64::from(seq_len);
            }
        }
        for (source, n) in job.sources.iter().zip(&per_source) {
            self.tokens.with_label_values(&[&source.name]).inc_by(*n);
        }
        let mut t = self.throughput.lock().expect("not poisoned");
        if let Some(rate) = t.record(Instant::now(), per_source.iter().sum()) {
            self.tokens_per_second.set(rate);
        }
    }

    /// The job is now in stage `name`, at `index` in the curriculum.
    pub fn stage_changed(&self, name: &str, index: u32) {
        // Only the current stage has a series: a query for the stage needs no `== 1` filter,
        // and a stage left behind does not linger at 0 next to it.
        self.stage_info.reset();
        self.stage_info.with_label_values(&[name]).set(1);
        self.stage_index.set(i64::from(index));
    }

    /// A stage transition (or a mixture change of the current stage) took effect.
    pub fn transition(&self, cause: v1::TransitionCause) {
        self.transitions
            .with_label_values(&[cause_label(cause)])
            .inc();
    }

    /// An evaluation measured `loss` on the held-out samples of `source`.
    pub fn validation_loss(&self, source: &str, loss: f64) {
        self.validation_loss.with_label_values(&[source]).set(loss);
    }

    /// The spike detector (or a person) acted: a skipped update, a rollback or a pause.
    pub fn spike(&self, action: v1::SpikeAction) {
        self.spikes.with_label_values(&[action_label(action)]).inc();
    }

    /// A rollback skipped `n` samples around a spike.
    pub fn skipped_samples(&self, n: u64) {
        self.skipped_samples.inc_by(n);
    }

    /// A checkpoint of the state after `step` committed steps is in place.
    pub fn checkpoint_saved(
        &self,
        step: u64,
        blocking_seconds: f64,
        write_seconds: f64,
        bytes: u64,
    ) {
        self.checkpoints.inc();
        self.checkpoint_blocking.set(blocking_seconds);
        self.checkpoint_write.set(write_seconds);
        self.checkpoint_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.last_checkpoint_step
            .set(i64::try_from(step).unwrap_or(i64::MAX));
        self.last_checkpoint_time
            .set(stagecoach_core::clock::now_ms() as f64 / 1000.0);
    }

    /// A checkpoint write failed.
    pub fn checkpoint_failed(&self) {
        self.checkpoint_failures.inc();
    }

    /// `n` workers lost their leases.
    pub fn leases_expired(&self, n: u64) {
        self.leases_expired.inc_by(n);
    }

    /// A world formed (a new generation).
    pub fn generation_formed(&self) {
        self.generations.inc();
    }

    /// A failure of `kind` ended a generation (or kept a worker from starting).
    pub fn failure(&self, kind: v1::FailureKind) {
        self.failures
            .with_label_values(&[stagecoach_core::recovery::kind_label(kind)])
            .inc();
    }

    /// A step or evaluation got no report in time.
    pub fn step_timeout(&self) {
        self.step_timeouts.inc();
    }

    /// The ranks of a world took the committed state from one of them.
    pub fn state_sync(&self) {
        self.state_syncs.inc();
    }

    /// Every rank of a world restored a checkpoint.
    pub fn restore(&self) {
        self.restores.inc();
    }

    /// A step the ledger lacked was committed from the ranks' reports.
    pub fn step_recovered(&self) {
        self.recovered_steps.inc();
    }

    /// A committed step had a loss or gradient norm that is not finite.
    pub fn nonfinite_step(&self) {
        self.nonfinite_steps.inc();
    }

    /// The passes over each source so far: its cursor over its tokens.
    pub fn epochs(&self, cursors: &[u64], source_tokens: &[u64]) {
        let names = self.sources.lock().expect("not poisoned");
        for ((c, t), name) in cursors.iter().zip(source_tokens).zip(names.iter()) {
            if *t > 0 {
                self.epoch
                    .with_label_values(&[name])
                    .set(*c as f64 / *t as f64);
            }
        }
    }

    /// A write to the state store failed (of kind `write`: commit, curriculum, ...).
    pub fn store_error(&self, write: &str) {
        self.store_errors.with_label_values(&[write]).inc();
    }

    /// A write was fenced off: another replica leads.
    pub fn fenced_write(&self) {
        FENCED_WRITES.inc();
    }

    /// Writes waiting for the state store.
    pub fn store_pending(&self, n: usize) {
        self.store_pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether the state store takes writes.
    pub fn store_available(&self, up: bool) {
        self.store_available.set(i64::from(up));
    }

    /// The current generation ended: nothing trains until the next world runs.
    pub fn generation_ended(&self) {
        self.generations_ended.inc();
        self.throughput.lock().expect("not poisoned").clear();
        self.tokens_per_second.set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::TextEncoder;

    fn job() -> v1::JobSpec {
        let source = |name: &str| v1::SourceSpec {
            name: name.into(),
            ..Default::default()
        };
        v1::JobSpec {
            seq_len: 64,
            sources: vec![source("prose"), source("code")],
            ..Default::default()
        }
    }

    fn text(m: &Metrics) -> String {
        TextEncoder::new()
            .encode_to_string(&m.registry().gather())
            .unwrap()
    }

    fn assert_lines(t: &str, lines: &[&str]) {
        for line in lines {
            assert!(t.lines().any(|l| l == *line), "no {line:?} in\n{t}");
        }
    }

    #[test]
    fn encodes_the_job_signals() {
        let m = Metrics::new();
        let job = job();
        m.job(&job);
        let before = text(&m);
        assert_lines(
            &before,
            &[
                "stagecoach_job_loss NaN",
                "stagecoach_job_tokens_total{source=\"code\"} 0",
            ],
        );

        let sample = |source, index| SampleId { source, index };
        // A stage at seq_len 32 (the job's largest is 64): each sample trains 32 tokens.
        m.step_committed(&job, &[sample(0, 0), sample(0, 32), sample(1, 0)], 32);
        m.step_committed(&job, &[sample(1, 64)], 64);
        m.observe(&Snapshot {
            state: v1::JobState::Running as i32,
            generation: 2,
            step: 1,
            total_steps: 100,
            loss: Some(3.5),
            workers_alive: 2,
            world_size: 2,
            ..Default::default()
        });
        m.generation_ended();
        let t = text(&m);
        assert_lines(
            &t,
            &[
                "stagecoach_job_step 1",
                "stagecoach_job_total_steps 100",
                "stagecoach_job_loss 3.5",
                "stagecoach_job_tokens_total{source=\"prose\"} 64",
                "stagecoach_job_tokens_total{source=\"code\"} 96",
                "stagecoach_job_workers_alive 2",
                "stagecoach_job_world_size 2",
                "stagecoach_job_generation 2",
                "stagecoach_job_generations_ended_total 1",
                "stagecoach_job_state{state=\"running\"} 1",
                "stagecoach_job_state{state=\"waiting\"} 0",
                "stagecoach_job_tokens_per_second 0",
                "# TYPE stagecoach_job_tokens_total counter",
            ],
        );
        // Each Metrics has its own registry.
        assert!(text(&Metrics::new()).contains("stagecoach_job_step 0"));
    }

    #[test]
    fn encodes_the_curriculum_signals() {
        let m = Metrics::new();
        let before = text(&m);
        // Every cause is there at zero before any transition; no stage or loss series yet.
        for cause in ["start", "budget", "manual_next", "manual_set", "mix_change"] {
            let line = format!("stagecoach_job_stage_transitions_total{{cause=\"{cause}\"}} 0");
            assert_lines(&before, &[&line]);
        }
        assert!(!before.contains("stagecoach_job_stage_info{"), "{before}");
        assert!(
            !before.contains("stagecoach_job_validation_loss{"),
            "{before}"
        );

        m.stage_changed("stable-1", 0);
        m.transition(v1::TransitionCause::Start);
        m.validation_loss("prose", 2.5);
        m.validation_loss("code", 3.25);
        m.stage_changed("decay", 2);
        m.transition(v1::TransitionCause::ManualSet);
        m.transition(v1::TransitionCause::MixChange);
        m.transition(v1::TransitionCause::MixChange);
        m.validation_loss("prose", 2.0);
        let t = text(&m);
        assert_lines(
            &t,
            &[
                "# TYPE stagecoach_job_stage_info gauge",
                "stagecoach_job_stage_info{stage=\"decay\"} 1",
                "stagecoach_job_stage_index 2",
                "# TYPE stagecoach_job_stage_transitions_total counter",
                "stagecoach_job_stage_transitions_total{cause=\"start\"} 1",
                "stagecoach_job_stage_transitions_total{cause=\"budget\"} 0",
                "stagecoach_job_stage_transitions_total{cause=\"manual_set\"} 1",
                "stagecoach_job_stage_transitions_total{cause=\"mix_change\"} 2",
                "# TYPE stagecoach_job_validation_loss gauge",
                "stagecoach_job_validation_loss{source=\"prose\"} 2",
                "stagecoach_job_validation_loss{source=\"code\"} 3.25",
            ],
        );
        // Only the current stage has a series.
        let stages: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("stagecoach_job_stage_info{"))
            .collect();
        assert_eq!(stages, ["stagecoach_job_stage_info{stage=\"decay\"} 1"]);
    }

    #[test]
    fn encodes_the_spike_and_checkpoint_signals() {
        let m = Metrics::new();
        let before = text(&m);
        // Every action is there at zero, so that `increase()` sees the first one.
        for action in ["skip_step", "rollback", "pause", "manual_rollback"] {
            let line = format!("stagecoach_job_spikes_total{{action=\"{action}\"}} 0");
            assert_lines(&before, &[&line]);
        }
        assert_lines(
            &before,
            &[
                "stagecoach_job_skipped_samples_total 0",
                "stagecoach_job_checkpoints_total 0",
                "stagecoach_job_checkpoint_failures_total 0",
                "stagecoach_job_last_checkpoint_step 0",
            ],
        );

        m.spike(v1::SpikeAction::SkipStep);
        m.spike(v1::SpikeAction::SkipStep);
        m.spike(v1::SpikeAction::Rollback);
        m.spike(v1::SpikeAction::ManualRollback);
        m.skipped_samples(80);
        m.skipped_samples(16);
        m.checkpoint_saved(100, 0.25, 1.5, 4_000_000);
        m.checkpoint_failed();
        m.checkpoint_saved(200, 0.125, 1.75, 4_000_100);
        let t = text(&m);
        assert_lines(
            &t,
            &[
                "# TYPE stagecoach_job_spikes_total counter",
                "stagecoach_job_spikes_total{action=\"skip_step\"} 2",
                "stagecoach_job_spikes_total{action=\"rollback\"} 1",
                "stagecoach_job_spikes_total{action=\"pause\"} 0",
                "stagecoach_job_spikes_total{action=\"manual_rollback\"} 1",
                "# TYPE stagecoach_job_skipped_samples_total counter",
                "stagecoach_job_skipped_samples_total 96",
                "# TYPE stagecoach_job_checkpoints_total counter",
                "stagecoach_job_checkpoints_total 2",
                "stagecoach_job_checkpoint_failures_total 1",
                "# TYPE stagecoach_job_checkpoint_blocking_seconds gauge",
                "stagecoach_job_checkpoint_blocking_seconds 0.125",
                "stagecoach_job_checkpoint_write_seconds 1.75",
                "stagecoach_job_checkpoint_bytes 4000100",
                "stagecoach_job_last_checkpoint_step 200",
            ],
        );
        assert_eq!(action_label(v1::SpikeAction::Unspecified), "unspecified");
    }
}
