//! What the coordinator does when a generation fails: the job's `[recovery]` section
//! ([`RecoveryConfig`]) and the failure budget it keeps ([`Failures`]). Pure logic, no clock:
//! the caller says when a failure happened and waits the backoff it is told.
//!
//! A failure ends a generation (a worker reported `Failed`, lost its lease, or a step timed
//! out). Its kind says whether trying again can help:
//! - **transient** (a peer died, a collective timed out, a lost lease, a step that timed out):
//!   another world may well succeed; up to `max_failures` of them at one step;
//! - **deterministic** (a sample that cannot be trained, a job the worker cannot run, a worker
//!   whose state is not what it was asked to continue from): the same step fails again until a
//!   person fixes the cause; `max_deterministic_failures` (default 2: the failure once more, to
//!   be sure) at one step.
//!
//! Between attempts the coordinator waits, doubling from `backoff_ms` up to `max_backoff_ms`,
//! so a failing job forms a few worlds a minute, not thousands. When the budget of a step is
//! spent the job stops trying: it **pauses** (the default: a person fixes the data or the
//! worker, then `stagecoach resume`, which resets the budget) or **fails**, as
//! `on_exhausted` says. A committed step resets the budget.

use std::time::Duration;

use serde::Deserialize;
use stagecoach_proto::v1;

/// What to do when the failures of one step use up their budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exhausted {
    /// Pause the job for a person (`stagecoach resume` tries again).
    #[default]
    Pause,
    /// Fail the job.
    Fail,
}

/// The `[recovery]` section of a job file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Transient failures (a lost worker, a collective timeout) at one step before the job
    /// stops trying.
    pub max_failures: u32,
    /// Deterministic failures (bad data, a job the worker cannot run) at one step before the
    /// job stops trying.
    pub max_deterministic_failures: u32,
    /// The wait before the first new world after a failure, doubled at each further failure
    /// without progress, up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub on_exhausted: Exhausted,
    /// How long the state store may stay unreachable (training waits, no step is dispatched)
    /// before the job fails.
    pub store_outage_ms: u64,
    /// A step in flight longer than this ends the generation (a lost message, a hung rank).
    /// 0: twenty times the median of the recent steps, and at least a minute.
    pub step_timeout_ms: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            max_failures: 8,
            max_deterministic_failures: 2,
            backoff_ms: 500,
            max_backoff_ms: 30_000,
            on_exhausted: Exhausted::Pause,
            store_outage_ms: 600_000,
            step_timeout_ms: 0,
        }
    }
}

/// The floor of the automatic step timeout.
pub const MIN_STEP_TIMEOUT: Duration = Duration::from_secs(60);

impl RecoveryConfig {
    /// The step timeout given the median duration of recent steps (none yet: the floor).
    pub fn step_timeout(&self, median_step: Option<Duration>) -> Duration {
        if self.step_timeout_ms > 0 {
            return Duration::from_millis(self.step_timeout_ms);
        }
        median_step
            .map_or(MIN_STEP_TIMEOUT, |m| m.saturating_mul(20))
            .max(MIN_STEP_TIMEOUT)
    }
}

/// Whether trying again can help, by the kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Deterministic,
}

/// How a kind of failure counts against the budget. A checkpoint that cannot be loaded is not
/// counted here: the coordinator falls back to an earlier one, which is progress of its own.
pub fn class(kind: v1::FailureKind) -> Class {
    match kind {
        v1::FailureKind::Data | v1::FailureKind::Config | v1::FailureKind::State => {
            Class::Deterministic
        }
        v1::FailureKind::Unspecified
        | v1::FailureKind::Transient
        | v1::FailureKind::Resource
        | v1::FailureKind::Checkpoint => Class::Transient,
    }
}

/// The failure kinds, each a value of the `kind` label of the failures metric.
pub const KINDS: [v1::FailureKind; 7] = [
    v1::FailureKind::Unspecified,
    v1::FailureKind::Transient,
    v1::FailureKind::Data,
    v1::FailureKind::Checkpoint,
    v1::FailureKind::Config,
    v1::FailureKind::Resource,
    v1::FailureKind::State,
];

/// `FailureKind::Data` → `data`: the proto's name without its prefix.
pub fn kind_label(kind: v1::FailureKind) -> &'static str {
    match kind {
        v1::FailureKind::Unspecified => "unspecified",
        v1::FailureKind::Transient => "transient",
        v1::FailureKind::Data => "data",
        v1::FailureKind::Checkpoint => "checkpoint",
        v1::FailureKind::Config => "config",
        v1::FailureKind::Resource => "resource",
        v1::FailureKind::State => "state",
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Form a new world after `after`; this was failure `attempt` of the `of` allowed.
    Retry {
        after: Duration,
        attempt: u32,
        of: u32,
    },
    /// The budget of the step is spent (`attempts` failures): pause or fail, as configured.
    Exhausted { attempts: u32, then: Exhausted },
}

/// The failures since the last committed step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures {
    /// The step they happened at.
    step: u64,
    transient: u32,
    deterministic: u32,
}

impl Failures {
    /// Counts a failure of `class` at committed step `step` and says what to do.
    pub fn record(&mut self, cfg: &RecoveryConfig, step: u64, class: Class) -> Decision {
        if step != self.step {
            *self = Failures {
                step,
                ..Failures::default()
            };
        }
        let (count, limit) = match class {
            Class::Transient => {
                self.transient = self.transient.saturating_add(1);
                (self.transient, cfg.max_failures)
            }
            Class::Deterministic => {
                self.deterministic = self.deterministic.saturating_add(1);
                (self.deterministic, cfg.max_deterministic_failures)
            }
        };
        if count > limit {
            return Decision::Exhausted {
                attempts: self.attempts(),
                then: cfg.on_exhausted,
            };
        }
        Decision::Retry {
            after: self.backoff(cfg),
            attempt: count,
            of: limit,
        }
    }

    /// Failures at the current step, of either class.
    pub fn attempts(&self) -> u32 {
        self.transient.saturating_add(self.deterministic)
    }

    /// The wait before the next world: `backoff_ms` doubled per failure after the first.
    fn backoff(&self, cfg: &RecoveryConfig) -> Duration {
        let doublings = self.attempts().saturating_sub(1).min(30);
        let ms = cfg
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(cfg.max_backoff_ms.max(cfg.backoff_ms));
        Duration::from_millis(ms)
    }

    /// A step was committed, or a person resumed the job: the budget starts again.
    pub fn reset(&mut self) {
        *self = Failures::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_back_off_and_run_out() {
        let cfg = RecoveryConfig {
            max_failures: 3,
            ..RecoveryConfig::default()
        };
        let mut f = Failures::default();
        let waits: Vec<Decision> = (0..4)
            .map(|_| f.record(&cfg, 7, Class::Transient))
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            waits[..3],
            [
                Decision::Retry {
                    after: ms(500),
                    attempt: 1,
                    of: 3
                },
                Decision::Retry {
                    after: ms(1000),
                    attempt: 2,
                    of: 3
                },
                Decision::Retry {
                    after: ms(2000),
                    attempt: 3,
                    of: 3
                },
            ]
        );
        assert_eq!(
            waits[3],
            Decision::Exhausted {
                attempts: 4,
                then: Exhausted::Pause
            }
        );
        // Progress starts the budget again.
        f.reset();
        assert!(matches!(
            f.record(&cfg, 8, Class::Transient),
            Decision::Retry { attempt: 1, .. }
        ));
    }

    #[test]
    fn deterministic_failures_have_their_own_small_budget() {
        let cfg = RecoveryConfig {
            on_exhausted: Exhausted::Fail,
            ..RecoveryConfig::default()
        };
        let mut f = Failures::default();
        assert!(matches!(
            f.record(&cfg, 0, Class::Deterministic),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            f.record(&cfg, 0, Class::Transient),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            f.record(&cfg, 0, Class::Deterministic),
            Decision::Retry { .. }
        ));
        assert_eq!(
            f.record(&cfg, 0, Class::Deterministic),
            Decision::Exhausted {
                attempts: 4,
                then: Exhausted::Fail
            }
        );
        // A failure at another step is a new budget.
        assert!(matches!(
            f.record(&cfg, 1, Class::Deterministic),
            Decision::Retry { attempt: 1, .. }
        ));
    }

    #[test]
    fn the_backoff_is_capped_and_the_timeout_follows_the_steps() {
        let cfg = RecoveryConfig {
            max_failures: 100,
            max_backoff_ms: 4000,
            ..RecoveryConfig::default()
        };
        let mut f = Failures::default();
        let last = (0..80)
            .map(|_| f.record(&cfg, 3, Class::Transient))
            .last()
            .unwrap();
        assert!(matches!(last, Decision::Retry { after, .. } if after == Duration::from_secs(4)));
        assert_eq!(cfg.step_timeout(None), MIN_STEP_TIMEOUT);
        assert_eq!(
            cfg.step_timeout(Some(Duration::from_secs(10))),
            Duration::from_secs(200)
        );
        let fixed = RecoveryConfig {
            step_timeout_ms: 1500,
            ..cfg
        };
        assert_eq!(fixed.step_timeout(None), Duration::from_millis(1500));
        assert_eq!(class(v1::FailureKind::Data), Class::Deterministic);
        assert_eq!(class(v1::FailureKind::Unspecified), Class::Transient);
    }
}
