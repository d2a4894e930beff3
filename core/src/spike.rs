//! Loss-spike detection: pure logic, no I/O, no clock.
//!
//! # The detector
//!
//! [`Detector`] judges every committed step by its global loss and gradient norm (the same on
//! every rank, so the coordinator decides once for all of them). A step is **flagged** when
//! - its loss or gradient norm is NaN or infinite (always, armed or not);
//! - or, once armed, its loss is above `mean + zscore * std` (the z-score rule), or above
//!   `ratio * mean` (the ratio rule, when `ratio > 0`), or its gradient norm is above
//!   `gmean + grad_norm_zscore * gstd` (when `grad_norm_zscore > 0`);
//! - or its update was skipped by the ranks' guard (which can only happen when the guard, set
//!   from the statistics at dispatch, found it out of bounds).
//!
//! `mean` and `std` are the mean and sample standard deviation (n − 1) of the last `window`
//! **unflagged** steps: a flagged step never enters the statistics, so a spike cannot raise
//! the bar it is judged against, however long it lasts. The deviation is floored at
//! [`STD_FLOOR`] × the mean, so a run of nearly equal losses does not flag a rounding
//! difference. The detector is armed once `min_steps` (at least 2) unflagged steps are in its
//! history; before that only NaN/Inf is flagged.
//!
//! `consecutive` flagged steps in a row make a **spike**. What then happens follows the
//! ladder (`skip`, `rollback`, mild to drastic):
//! - `skip`: the guard ([`Detector::guard`]) makes every rank drop the update of a flagged
//!   step, so flagged steps teach the model nothing while the run of flags is counted;
//! - `rollback`: a spike is answered with [`Verdict::Rollback`]: go back to the last known-good
//!   checkpoint before the spike's first flagged step and skip the data around it
//!   ([`SpikeConfig::skip_range`]). More than `max_rollbacks` rollbacks within `window_steps`
//!   observed steps turn the next spike into [`Verdict::Pause`]: no endless loop.
//! - without `rollback`, flagged steps stay [`Verdict::Flagged`]; but a run of flags as long
//!   as the window means the loss has moved for good: with `skip` the job would make no
//!   progress, so it pauses; with an empty ladder (detection only) the statistics start
//!   again at the new level.
//!
//! `window_steps` counts the steps the detector observed, replays included: after a rollback
//! the step numbers go back, the count of work done does not.
//!
//! A stage transition or a mixture change moves the loss level for a known reason;
//! [`Detector::level_changed`] starts the statistics of a new level there (the rules above
//! re-arm after `min_steps` steps of it), so the new level is not taken for a spike. Until
//! then the step is never unprotected: a loss above `carry_ratio` times the mean of the level
//! before is flagged, and once the new level has three steps, a loss above `ratio` times their
//! median, so a spike two steps after new data enters (SmolLM2's stage 3) is caught.
//!

use std::collections::VecDeque;
use std::fmt;
use std::ops::RangeInclusive;

use stagecoach_proto::v1;

/// The deviation never counts as less than this fraction of the mean.
pub const STD_FLOOR: f64 = 1e-4;

/// How far back (in unflagged steps beyond the window) the detector remembers losses, so that
/// after a rollback it judges the replay against the statistics it had then.
const HISTORY: usize = 10_000;

/// A rung of the spike ladder, as a job file names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(from = "String")]
pub enum Rung {
    /// Drop the update of every flagged step (the step guard).
    Skip,
    /// On a spike, return to the last known-good checkpoint before it and skip its data.
    Rollback,
    /// A name that is no rung: kept as written so validation reports it with its place; the
    /// detector ignores it.
    Unknown(String),
}

impl Rung {
    /// Every rung, mild to drastic: the order a ladder lists them in.
    pub const ALL: [Rung; 2] = [Rung::Skip, Rung::Rollback];

    /// The name in a job file.
    pub fn name(&self) -> &str {
        match self {
            Rung::Skip => "skip",
            Rung::Rollback => "rollback",
            Rung::Unknown(name) => name,
        }
    }

    /// The rung named `name` in a job file.
    pub fn parse(name: &str) -> Option<Rung> {
        Rung::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl From<String> for Rung {
    fn from(name: String) -> Rung {
        Rung::parse(&name).unwrap_or(Rung::Unknown(name))
    }
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `[spikes]` section of a job file (see the module documentation); every key has the
/// default below. The job file's validation checks it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeConfig {
    pub enabled: bool,
    /// Unflagged steps in the rolling mean and variance.
    pub window: u32,
    /// Unflagged steps observed before anything but NaN/Inf is flagged.
    pub min_steps: u32,
    /// Flag a loss this many standard deviations above the rolling mean.
    pub zscore: f64,
    /// Flag a loss this many times the rolling mean (0: off).
    pub ratio: f64,
    /// The z-score rule on the gradient norm (0: off).
    pub grad_norm_zscore: f64,
    /// Flagged steps in a row that make a spike.
    pub consecutive: u32,
    pub ladder: Vec<Rung>,
    /// A rollback skips the data of the steps from (first flagged step − skip_before) ...
    pub skip_before: u64,
    /// ... through (detection step + skip_after).
    pub skip_after: u64,
    /// After a rollback, the learning rate is multiplied by this for `lr_steps` steps.
    pub lr_factor: f64,
    pub lr_steps: u64,
    /// More rollbacks than this within `window_steps` observed steps pause the job.
    pub max_rollbacks: u32,
    pub window_steps: u64,
    /// Until a new level (a stage change, a mixture change) has `min_steps` steps of its own,
    /// flag a loss above this many times the mean of the level before (0: off).
    pub carry_ratio: f64,
}

impl Default for SpikeConfig {
    /// Skip flagged updates; roll back at once on a flag 6σ or 2× above the last 50 steps'
    /// mean, skipping two steps' data either side; pause after a fourth rollback within 1000
    /// steps.
    fn default() -> Self {
        SpikeConfig {
            enabled: true,
            window: 50,
            min_steps: 20,
            zscore: 6.0,
            ratio: 2.0,
            grad_norm_zscore: 0.0,
            consecutive: 1,
            ladder: vec![Rung::Skip, Rung::Rollback],
            skip_before: 2,
            skip_after: 2,
            lr_factor: 1.0,
            lr_steps: 0,
            max_rollbacks: 3,
            window_steps: 1000,
            carry_ratio: 3.0,
        }
    }
}

impl SpikeConfig {
    /// Whether the ladder has `rung`.
    pub fn has(&self, rung: Rung) -> bool {
        self.ladder.contains(&rung)
    }

    /// The steps whose data a rollback for a spike that began at `first_step` and was detected
    /// at `detected_at` skips: `first_step − skip_before ..= detected_at + skip_after`. (The
    /// rollback target must be at or before the start, so that none of it was trained.)
    pub fn skip_range(&self, first_step: u64, detected_at: u64) -> RangeInclusive<u64> {
        first_step.saturating_sub(self.skip_before)
            ..=detected_at.max(first_step).saturating_add(self.skip_after)
    }
}

/// What the detector makes of a committed step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Normal,
    /// A flagged step (counted towards `consecutive`); not (yet) a spike. `mean` and `std` are
    /// the loss statistics it was judged against (NaN before the detector is armed).
    Flagged {
        rule: String,
        mean: f64,
        std: f64,
    },
    /// A confirmed spike with "rollback" in the ladder: roll back. `first_step` is the first
    /// flagged step of the run.
    Rollback {
        first_step: u64,
        rule: String,
        mean: f64,
        std: f64,
    },
    /// A confirmed spike, but rollbacks are used up for the window (or a run of skipped steps
    /// lasted a whole window): pause the job. The reason says what to do.
    Pause {
        reason: String,
    },
}

/// An unflagged step in the detector's history.
#[derive(Debug, Clone, Copy)]
struct Sample {
    step: u64,
    loss: f64,
    grad_norm: f64,
}

/// Mean and (floored) sample deviation of the loss and gradient norm over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub grad_mean: f64,
    pub grad_std: f64,
    /// Steps in the window.
    pub n: usize,
}

/// The loss-spike detector of one job (see the module documentation).
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: SpikeConfig,
    /// Unflagged steps, oldest first: the last `window` make the statistics, older ones let a
    /// rewind restore them.
    history: VecDeque<Sample>,
    /// The open run of flagged steps: its first step and length.
    run: Option<(u64, u32)>,
    /// Steps observed so far (replays included): the clock of `window_steps`.
    observed: u64,
    /// The rollbacks within `window_steps`: when (by `observed`) and the step detected at.
    rollbacks: Vec<(u64, u64)>,
    /// The first steps of the loss levels after the first (stage and mixture changes), in
    /// order: the statistics are of the last level; the one before judges it until it arms.
    levels: Vec<u64>,
}

/// Steps of a new level before its median judges the next ones (with `ratio`).
const LEVEL_MEDIAN_STEPS: usize = 3;

impl Detector {
    pub fn new(cfg: SpikeConfig) -> Detector {
        Detector {
            cfg,
            history: VecDeque::new(),
            run: None,
            observed: 0,
            rollbacks: Vec::new(),
            levels: Vec::new(),
        }
    }

    /// The first step of the current level.
    fn level_start(&self) -> u64 {
        self.levels.last().copied().unwrap_or(0)
    }

    /// The unflagged steps of the current level, newest first.
    fn level(&self) -> impl Iterator<Item = &Sample> + Clone {
        let start = self.level_start();
        self.history
            .iter()
            .rev()
            .take_while(move |s| s.step >= start)
    }

    /// Until the current level arms: the bar a loss must stay under, from the level before
    /// (`carry_ratio` × its mean) and, after a few steps, from this one (`ratio` × its
    /// median), with the rule that set it.
    fn carried(&self) -> Option<(f64, String)> {
        if !self.cfg.enabled || self.armed() || self.levels.is_empty() {
            return None;
        }
        let start = self.level_start();
        let window = (self.cfg.window as usize).max(2);
        let before: Vec<f64> = self
            .history
            .iter()
            .rev()
            .filter(|s| s.step < start)
            .take(window)
            .map(|s| s.loss)
            .collect();
        let mut bars: Vec<(f64, String)> = vec![];
        if self.cfg.carry_ratio > 0.0 && before.len() >= 2 {
            let mean = before.iter().sum::<f64>() / before.len() as f64;
            if mean > 0.0 {
                bars.push((
                    self.cfg.carry_ratio * mean,
                    format!(
                        "{}x the previous level's mean {mean:.4} (the new level has {} of spikes.min_steps = {} steps)",
                        self.cfg.carry_ratio,
                        self.level().count(),
                        self.cfg.min_steps
                    ),
                ));
            }
        }
        let mut recent: Vec<f64> = self.level().map(|s| s.loss).collect();
        if self.cfg.ratio > 0.0 && recent.len() >= LEVEL_MEDIAN_STEPS {
            recent.sort_by(f64::total_cmp);
            let median = recent[recent.len() / 2];
            if median > 0.0 {
                bars.push((
                    self.cfg.ratio * median,
                    format!(
                        "{}x the median {median:.4} of the new level's {} steps",
                        self.cfg.ratio,
                        recent.len()
                    ),
                ));
            }
        }
        bars.into_iter()
            .filter(|(bar, _)| bar.is_finite())
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    pub fn config(&self) -> &SpikeConfig {
        &self.cfg
    }

    /// Whether a run of flagged steps is open: the last step observed was flagged, and no
    /// rollback, rewind or pause closed the run since.
    pub fn in_spike(&self) -> bool {
        self.run.is_some()
    }

    /// Whether the detector judges losses (before that only NaN/Inf is flagged).
    pub fn armed(&self) -> bool {
        let need = (self.cfg.min_steps as usize).clamp(2, self.capacity());
        self.cfg.enabled && self.level().take(need).count() >= need
    }

    /// The statistics the next step is judged against; `None` while not armed.
    pub fn stats(&self) -> Option<Stats> {
        if !self.armed() {
            return None;
        }
        let window = (self.cfg.window as usize).max(2);
        let recent = || self.level().take(window);
        let (mean, std) = mean_std(recent().map(|s| s.loss));
        let (grad_mean, grad_std) = mean_std(recent().map(|s| s.grad_norm));
        Some(Stats {
            mean,
            std,
            grad_mean,
            grad_std,
            n: recent().count(),
        })
    }

    /// The guard every rank applies to the next step: with "skip" in the ladder and the
    /// detector armed, `max_loss` is the lowest loss the rules flag, `min(mean + zscore·std,
    /// ratio·mean)` (each rule only when on), and `max_grad_norm` is `gmean +
    /// grad_norm_zscore·gstd` (0 when that rule is off). Otherwise zeros: no limit (the ranks
    /// still drop a step whose loss or gradient norm is not finite).
    pub fn guard(&self) -> v1::StepGuard {
        if !self.cfg.has(Rung::Skip) {
            return v1::StepGuard::default();
        }
        let Some(s) = self.stats() else {
            let max_loss = self.carried().map_or(0.0, |(bar, _)| bar);
            return v1::StepGuard {
                max_loss,
                max_grad_norm: 0.0,
            };
        };
        v1::StepGuard {
            max_loss: self.loss_limit(&s).unwrap_or(0.0),
            max_grad_norm: self.grad_limit(&s).unwrap_or(0.0),
        }
    }

    /// The lowest loss the rules flag.
    fn loss_limit(&self, s: &Stats) -> Option<f64> {
        let z = (self.cfg.zscore > 0.0).then_some(s.mean + self.cfg.zscore * s.std);
        let r = (self.cfg.ratio > 0.0 && s.mean > 0.0).then_some(self.cfg.ratio * s.mean);
        let limit = match (z, r) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        (limit.is_finite() && limit > 0.0).then_some(limit)
    }

    fn grad_limit(&self, s: &Stats) -> Option<f64> {
        let limit = (self.cfg.grad_norm_zscore > 0.0)
            .then_some(s.grad_mean + self.cfg.grad_norm_zscore * s.grad_std)?;
        (limit.is_finite() && limit > 0.0).then_some(limit)
    }

    /// Why the step is flagged, one phrase per rule it breaks; empty: it is not.
    fn rules_broken(&self, stats: Option<&Stats>, loss: f64, grad_norm: f64) -> Vec<String> {
        let mut rules = Vec::new();
        if !loss.is_finite() {
            rules.push(format!("loss is {loss}"));
        }
        if !grad_norm.is_finite() {
            rules.push(format!("grad norm is {grad_norm}"));
        }
        let Some(s) = stats else {
            if let Some((bar, rule)) = self.carried() {
                if loss.is_finite() && loss > bar {
                    rules.push(format!("loss {loss:.4} above {rule}"));
                }
            }
            return rules;
        };
        // The limit is the lowest of the rules' bars: above it, at least one rule holds.
        if loss.is_finite() && self.loss_limit(s).is_some_and(|limit| loss > limit) {
            if self.cfg.zscore > 0.0 && loss > s.mean + self.cfg.zscore * s.std {
                let z = (loss - s.mean) / s.std;
                rules.push(format!("loss z-score {z:.1} > {}", self.cfg.zscore));
            }
            if self.cfg.ratio > 0.0 && s.mean > 0.0 && loss > self.cfg.ratio * s.mean {
                rules.push(format!(
                    "loss {:.2}x the mean > {}x",
                    loss / s.mean,
                    self.cfg.ratio
                ));
            }
        }
        if grad_norm.is_finite() {
            if let Some(limit) = self.grad_limit(s) {
                if grad_norm > limit {
                    let z = (grad_norm - s.grad_mean) / s.grad_std;
                    rules.push(format!(
                        "grad norm z-score {z:.1} > {}",
                        self.cfg.grad_norm_zscore
                    ));
                }
            }
        }
        rules
    }

    /// One committed step: its global loss, gradient norm, and whether its update was skipped.
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: f64, skipped: bool) -> Verdict {
        if !self.cfg.enabled {
            return Verdict::Normal;
        }
        self.observed += 1;
        let stats = self.stats();
        let mut rules = self.rules_broken(stats.as_ref(), loss, grad_norm);
        if rules.is_empty() && skipped {
            // The guard was set from the statistics at dispatch, which a step committed since
            // may have moved; the ranks did not learn from it either way.
            rules.push("update skipped by the guard".to_owned());
        }
        if rules.is_empty() {
            self.run = None;
            self.accept(Sample {
                step,
                loss,
                grad_norm,
            });
            return Verdict::Normal;
        }
        let rule = rules.join("; ");
        let (mean, std) = stats.map_or((f64::NAN, f64::NAN), |s| (s.mean, s.std));
        let (first, len) = match self.run {
            Some((first, len)) => (first, len.saturating_add(1)),
            None => (step, 1),
        };
        self.run = Some((first, len));
        if len < self.cfg.consecutive.max(1) {
            return Verdict::Flagged { rule, mean, std };
        }
        if self.cfg.has(Rung::Rollback) {
            let recent = self.rollbacks_in_window();
            if recent.len() >= self.cfg.max_rollbacks as usize {
                self.run = None;
                let at: Vec<String> = recent.iter().map(u64::to_string).collect();
                let earlier = match at.is_empty() {
                    true => "no rollback allowed (spikes.max_rollbacks = 0)".to_owned(),
                    false => format!(
                        "{} rollback(s) within {} steps already (detected at step {}; \
                         spikes.max_rollbacks = {})",
                        at.len(),
                        self.cfg.window_steps,
                        at.join(", "),
                        self.cfg.max_rollbacks
                    ),
                };
                return Verdict::Pause {
                    reason: format!(
                        "loss spike at step {step} (from step {first}: {rule}) and {earlier}; \
                         look at the data around step {first}, then `stagecoach rollback` or \
                         `stagecoach resume`"
                    ),
                };
            }
            return Verdict::Rollback {
                first_step: first,
                rule,
                mean,
                std,
            };
        }
        if len >= self.cfg.consecutive.max(self.cfg.window) {
            if self.cfg.has(Rung::Skip) {
                self.run = None;
                return Verdict::Pause {
                    reason: format!(
                        "{len} steps in a row flagged and their updates skipped (steps \
                         {first}..={step}, last: {rule}); the loss stays above the detector's \
                         limits and no rollback is in spikes.ladder: look at the data, then \
                         `stagecoach rollback` or raise the limits and `stagecoach resume`"
                    ),
                };
            }
            // Detection only: the loss has moved to a new level for a whole window; judge
            // what follows against that level alone.
            self.history.clear();
            self.levels.clear();
            self.run = None;
        }
        Verdict::Flagged { rule, mean, std }
    }

    fn accept(&mut self, sample: Sample) {
        if self.history.len() == self.capacity() {
            self.history.pop_front();
        }
        self.history.push_back(sample);
    }

    fn capacity(&self) -> usize {
        (self.cfg.window.max(self.cfg.min_steps) as usize).max(2) + HISTORY
    }

    /// The steps at which the rollbacks within `window_steps` were detected.
    fn rollbacks_in_window(&self) -> Vec<u64> {
        let w = self.cfg.window_steps;
        self.rollbacks
            .iter()
            .filter(|(at, _)| at.saturating_add(w) > self.observed)
            .map(|(_, step)| *step)
            .collect()
    }

    /// A rollback happened (detected at `step`): it counts towards `max_rollbacks` within
    /// `window_steps`; the run of flags is closed; the statistics of the good steps stay (see
    /// [`Detector::rewind`] for those the replay will observe again).
    pub fn rolled_back(&mut self, step: u64) {
        let (w, now) = (self.cfg.window_steps, self.observed);
        self.rollbacks.retain(|(at, _)| at.saturating_add(w) > now);
        self.rollbacks.push((now, step));
        self.run = None;
    }

    /// Training goes on from a checkpoint taken after `step` committed steps: the steps from
    /// `step` on are forgotten (the replay observes them again, so the statistics are those
    /// the detector had when it first reached `step`), and the run of flags is closed. A
    /// manual rollback calls this alone: it does not count towards `max_rollbacks`.
    pub fn rewind(&mut self, step: u64) {
        while self.history.back().is_some_and(|s| s.step >= step) {
            self.history.pop_back();
        }
        // Steps only go back at a rewind, which drops everything at or after its step, so the
        // history stays sorted by step. Levels that begin there begin again in the replay.
        while self.levels.last().is_some_and(|l| *l >= step) {
            self.levels.pop();
        }
        self.run = None;
    }

    /// The loss level moves for a known reason from `step` on (a stage that changes the data
    /// mixture or the sequence length, a mixture change): the statistics of the rules start
    /// again there (they re-arm after `min_steps` steps), and until then the level before
    /// judges the new one with a wider bar (`carry_ratio`). Rollbacks stay counted.
    pub fn level_changed(&mut self, step: u64) {
        if self.levels.last() != Some(&step) && step > 0 {
            if self.levels.len() == 1024 {
                self.levels.remove(0);
            }
            self.levels.push(step);
        }
        self.run = None;
    }
}

/// Mean and sample standard deviation (n − 1), the deviation floored at [`STD_FLOOR`] × |mean|.
fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    let var = if n > 1 {
        values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    (mean, var.sqrt().max(STD_FLOOR * mean.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normal deviates from a fixed seed (xorshift64* and Box–Muller): the tests replay the
    /// same curve every time.
    struct Noise(u64);

    impl Noise {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// A pre-training loss curve: from ~10.8 decaying towards 2.0, with step-to-step noise of
    /// σ = 0.03, and a gradient norm that settles around 0.3.
    fn curve(steps: u64) -> Vec<(f64, f64)> {
        let mut noise = Noise(0x5eed_cafe);
        (0..steps)
            .map(|t| {
                let trend = 2.0 + 8.8 * (-(t as f64) / 60.0).exp();
                let loss = trend + 0.03 * noise.normal();
                let grad = 0.3 + 2.0 * (-(t as f64) / 30.0).exp() + 0.02 * noise.normal();
                (loss, grad)
            })
            .collect()
    }

    fn config(ladder: &[Rung]) -> SpikeConfig {
        SpikeConfig {
            ladder: ladder.to_vec(),
            ..SpikeConfig::default()
        }
    }

    /// Feeds `curve` from step `from`; returns the steps that were not Normal, with verdicts.
    fn replay(d: &mut Detector, curve: &[(f64, f64)], from: u64) -> Vec<(u64, Verdict)> {
        let mut out = Vec::new();
        for (i, (loss, grad)) in curve.iter().enumerate() {
            let step = from + i as u64;
            match d.observe(step, *loss, *grad, false) {
                Verdict::Normal => {}
                v => out.push((step, v)),
            }
        }
        out
    }

    #[test]
    fn a_realistic_curve_is_flagged_exactly_at_the_injected_spike() {
        let mut losses = curve(1000);
        let clean = replay(
            &mut Detector::new(config(&[Rung::Skip, Rung::Rollback])),
            &losses,
            0,
        );
        assert_eq!(clean, [], "false alarms on a clean curve");

        // At step 400 the loss is ~2.01; a jump of 0.6 is 1.3x the mean (below the ratio
        // rule) but ~20σ of the noise.
        losses[400].0 += 0.6;
        let mut d = Detector::new(config(&[Rung::Skip, Rung::Rollback]));
        let flagged = replay(&mut d, &losses, 0);
        assert_eq!(flagged.len(), 1, "{flagged:#?}");
        let (step, verdict) = &flagged[0];
        assert_eq!(*step, 400);
        let Verdict::Rollback {
            first_step,
            rule,
            mean,
            std,
        } = verdict
        else {
            panic!("{verdict:?}");
        };
        assert_eq!(*first_step, 400);
        assert!(rule.starts_with("loss z-score "), "{rule}");
        assert!(!rule.contains("x the mean"), "{rule}");
        assert!((mean - 2.015).abs() < 0.02, "{mean}");
        assert!(*std > 0.02 && *std < 0.06, "{std}");

        // A doubling trips the ratio rule as well.
        let mut d = Detector::new(config(&[]));
        let mut doubled = curve(500);
        doubled[450].0 *= 2.5;
        let flagged = replay(&mut d, &doubled, 0);
        assert_eq!(flagged.len(), 1, "{flagged:#?}");
        let Verdict::Flagged { rule, .. } = &flagged[0].1 else {
            panic!("{flagged:?}");
        };
        assert!(
            rule.contains("loss z-score") && rule.contains("x the mean > 2x"),
            "{rule}"
        );
    }

    #[test]
    fn outliers_never_enter_the_statistics() {
        let losses = curve(300);
        let mut spiky = losses.clone();
        // A spike that lasts 20 steps at 1.5x the level: every one of them is judged against
        // the statistics from before it.
        for l in &mut spiky[250..270] {
            l.0 *= 1.5;
        }
        let mut d = Detector::new(config(&[]));
        replay(&mut d, &spiky[..250], 0);
        let before = d.stats().unwrap();
        let flagged = replay(&mut d, &spiky[250..270], 250);
        let steps: Vec<u64> = flagged.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, (250..270).collect::<Vec<_>>());
        assert_eq!(d.stats().unwrap(), before);
        assert!(d.in_spike());
        assert_eq!(replay(&mut d, &spiky[270..], 270), []);
        assert!(!d.in_spike());

        // The same curve without the spike's steps gives the same statistics.
        let mut without = Detector::new(config(&[]));
        replay(&mut without, &losses[..250], 0);
        replay(&mut without, &losses[270..], 270);
        assert_eq!(without.stats(), d.stats());
    }

    #[test]
    fn nan_and_inf_are_always_flagged_and_never_counted() {
        let losses = curve(100);
        let mut d = Detector::new(config(&[Rung::Skip]));
        // Before the detector is armed, a huge loss passes but NaN does not.
        assert_eq!(d.observe(0, 1e6, 1.0, false), Verdict::Normal);
        assert!(!d.armed());
        let v = d.observe(1, f64::NAN, 1.0, true);
        assert!(
            matches!(&v, Verdict::Flagged { rule, mean, .. } if rule == "loss is NaN" && mean.is_nan()),
            "{v:?}"
        );
        let v = d.observe(2, 3.0, f64::INFINITY, true);
        assert!(
            matches!(&v, Verdict::Flagged { rule, .. } if rule == "grad norm is inf"),
            "{v:?}"
        );
        replay(&mut d, &losses[3..], 3);
        assert!(d.armed());
        let s = d.stats().unwrap();
        assert!(s.mean.is_finite() && s.std.is_finite(), "{s:?}");
        let v = d.observe(100, f64::NEG_INFINITY, 0.3, true);
        assert!(
            matches!(&v, Verdict::Flagged { rule, .. } if rule == "loss is -inf"),
            "{v:?}"
        );
        assert_eq!(d.stats().unwrap(), s);
        // With rollback in the ladder, a NaN is a spike like any other.
        let mut d = Detector::new(config(&[Rung::Skip, Rung::Rollback]));
        assert!(matches!(
            d.observe(0, f64::NAN, 0.0, true),
            Verdict::Rollback { first_step: 0, .. }
        ));
    }

    #[test]
    fn nothing_but_nan_is_flagged_before_min_steps() {
        let cfg = SpikeConfig {
            min_steps: 30,
            ..config(&[Rung::Skip])
        };
        let mut d = Detector::new(cfg);
        let losses = curve(40);
        replay(&mut d, &losses[..29], 0);
        assert!(!d.armed());
        assert_eq!(d.guard(), v1::StepGuard::default());
        assert_eq!(d.observe(29, 50.0, 0.3, false), Verdict::Normal);
        // 30 unflagged steps (the 50.0 among them): armed.
        assert!(d.armed());
        assert!(matches!(
            d.observe(30, 500.0, 0.3, false),
            Verdict::Flagged { .. }
        ));
    }

    #[test]
    fn consecutive_flags_make_a_spike() {
        let cfg = SpikeConfig {
            consecutive: 3,
            ..config(&[Rung::Skip, Rung::Rollback])
        };
        let mut d = Detector::new(cfg);
        let losses = curve(300);
        replay(&mut d, &losses[..200], 0);
        let high = 10.0;
        assert!(matches!(
            d.observe(200, high, 0.3, true),
            Verdict::Flagged { .. }
        ));
        assert!(matches!(
            d.observe(201, high, 0.3, true),
            Verdict::Flagged { .. }
        ));
        // A normal step ends the run.
        assert_eq!(d.observe(202, losses[202].0, 0.3, false), Verdict::Normal);
        assert!(!d.in_spike());
        for step in 203..205 {
            assert!(matches!(
                d.observe(step, high, 0.3, true),
                Verdict::Flagged { .. }
            ));
            assert!(d.in_spike());
        }
        let v = d.observe(205, high, 0.3, true);
        assert!(
            matches!(
                v,
                Verdict::Rollback {
                    first_step: 203,
                    ..
                }
            ),
            "{v:?}"
        );
        d.rolled_back(205);
        assert!(!d.in_spike());
    }

    #[test]
    fn the_rollback_limit_turns_into_a_pause() {
        let cfg = SpikeConfig {
            max_rollbacks: 2,
            window_steps: 100,
            ..config(&[Rung::Skip, Rung::Rollback])
        };
        let mut d = Detector::new(cfg);
        let losses = curve(400);
        replay(&mut d, &losses[..200], 0);
        // Two spikes, each rolled back to step 190 and replayed.
        for _ in 0..2 {
            let v = d.observe(200, 9.0, 0.3, true);
            assert!(
                matches!(
                    v,
                    Verdict::Rollback {
                        first_step: 200,
                        ..
                    }
                ),
                "{v:?}"
            );
            d.rolled_back(200);
            d.rewind(190);
            assert_eq!(replay(&mut d, &losses[190..200], 190), []);
        }
        // The third within 100 observed steps pauses, and says why.
        let v = d.observe(200, 9.0, 0.3, true);
        let Verdict::Pause { reason } = &v else {
            panic!("{v:?}");
        };
        assert!(
            reason.starts_with("loss spike at step 200 (from step 200: loss z-score"),
            "{reason}"
        );
        assert!(
            reason.contains("and 2 rollback(s) within 100 steps already (detected at step 200, 200; spikes.max_rollbacks = 2)"),
            "{reason}"
        );
        assert!(!d.in_spike());
        // A hundred steps later the window has moved on: rollbacks are allowed again.
        assert_eq!(replay(&mut d, &losses[200..300], 200), []);
        let v = d.observe(300, 9.0, 0.3, true);
        assert!(
            matches!(
                v,
                Verdict::Rollback {
                    first_step: 300,
                    ..
                }
            ),
            "{v:?}"
        );

        // max_rollbacks = 0: every spike pauses.
        let mut d = Detector::new(SpikeConfig {
            max_rollbacks: 0,
            ..config(&[Rung::Rollback])
        });
        replay(&mut d, &losses[..100], 0);
        let v = d.observe(100, 30.0, 0.3, false);
        assert!(
            matches!(&v, Verdict::Pause { reason } if reason.contains("no rollback allowed (spikes.max_rollbacks = 0)")),
            "{v:?}"
        );
    }

    #[test]
    fn a_rewind_restores_the_statistics_the_replay_is_judged_against() {
        let losses = curve(300);
        let mut d = Detector::new(config(&[Rung::Skip, Rung::Rollback]));
        replay(&mut d, &losses[..150], 0);
        let at_150 = d.stats().unwrap();
        let guard_150 = d.guard();
        replay(&mut d, &losses[150..220], 150);
        assert_ne!(d.stats().unwrap(), at_150);
        d.rewind(150);
        assert_eq!(d.stats().unwrap(), at_150);
        assert_eq!(d.guard(), guard_150);
        // The replay of the same steps gives the same statistics as the first time.
        replay(&mut d, &losses[150..220], 150);
        let mut straight = Detector::new(config(&[Rung::Skip, Rung::Rollback]));
        replay(&mut straight, &losses[..220], 0);
        assert_eq!(d.stats(), straight.stats());
    }

    #[test]
    fn the_guard_is_the_lowest_bar_of_the_rules() {
        let losses = curve(300);
        let mut d = Detector::new(SpikeConfig {
            grad_norm_zscore: 5.0,
            ..config(&[Rung::Skip, Rung::Rollback])
        });
        assert_eq!(d.guard(), v1::StepGuard::default(), "not armed yet");
        replay(&mut d, &losses, 0);
        let s = d.stats().unwrap();
        assert_eq!(s.n, 50);
        let g = d.guard();
        let z = s.mean + 6.0 * s.std;
        assert_eq!(g.max_loss, z.min(2.0 * s.mean));
        assert_eq!(g.max_grad_norm, s.grad_mean + 5.0 * s.grad_std);
        // The detector flags exactly what the guard skips.
        let mut above = d.clone();
        let v = above.observe(300, g.max_loss * (1.0 + 1e-9), 0.3, true);
        assert!(matches!(v, Verdict::Rollback { .. }), "{v:?}");
        let mut below = d.clone();
        assert_eq!(
            below.observe(300, g.max_loss * (1.0 - 1e-9), 0.3, false),
            Verdict::Normal
        );
        let mut grad = d.clone();
        let v = grad.observe(300, s.mean, g.max_grad_norm * 1.01, true);
        assert!(
            matches!(&v, Verdict::Rollback { rule, .. } if rule.starts_with("grad norm z-score")),
            "{v:?}"
        );

        // When the mean is low and noisy, the ratio is the lower bar.
        let mut noisy = Detector::new(SpikeConfig {
            zscore: 50.0,
            ..config(&[Rung::Skip])
        });
        let mut n = Noise(7);
        for step in 0..100 {
            noisy.observe(step, 1.0 + 0.1 * n.normal(), 0.3, false);
        }
        let s = noisy.stats().unwrap();
        assert_eq!(noisy.guard().max_loss, 2.0 * s.mean);

        // Without "skip" in the ladder the ranks never skip: no limits.
        let mut no_skip = Detector::new(config(&[Rung::Rollback]));
        replay(&mut no_skip, &losses, 0);
        assert!(no_skip.armed());
        assert_eq!(no_skip.guard(), v1::StepGuard::default());
    }

    #[test]
    fn a_step_the_guard_skipped_is_flagged_even_within_the_rules() {
        let losses = curve(200);
        let mut d = Detector::new(config(&[Rung::Skip]));
        replay(&mut d, &losses[..100], 0);
        let before = d.stats();
        let v = d.observe(100, losses[100].0, losses[100].1, true);
        assert!(
            matches!(&v, Verdict::Flagged { rule, .. } if rule == "update skipped by the guard"),
            "{v:?}"
        );
        assert_eq!(d.stats(), before);
    }

    #[test]
    fn a_run_of_skips_as_long_as_the_window_pauses_without_rollback() {
        let cfg = SpikeConfig {
            window: 20,
            min_steps: 10,
            ..config(&[Rung::Skip])
        };
        let mut d = Detector::new(cfg.clone());
        let losses = curve(300);
        replay(&mut d, &losses[..200], 0);
        // The level doubles for good (say, a new data source): 19 skipped steps, then a pause.
        for step in 200..219 {
            let v = d.observe(step, 2.0 * losses[step as usize].0, 0.3, true);
            assert!(matches!(v, Verdict::Flagged { .. }), "{step}: {v:?}");
        }
        let v = d.observe(219, 2.0 * losses[219].0, 0.3, true);
        let Verdict::Pause { reason } = &v else {
            panic!("{v:?}");
        };
        assert!(
            reason.starts_with(
                "20 steps in a row flagged and their updates skipped (steps 200..=219"
            ),
            "{reason}"
        );

        // Detection only: after a window of flags the statistics follow the new level.
        let mut d = Detector::new(SpikeConfig {
            ladder: vec![],
            ..cfg
        });
        replay(&mut d, &losses[..200], 0);
        let doubled: Vec<(f64, f64)> = losses[200..].iter().map(|(l, g)| (2.0 * l, *g)).collect();
        let flagged = replay(&mut d, &doubled, 200);
        let steps: Vec<u64> = flagged.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, (200..220).collect::<Vec<_>>());
        assert!(d.stats().unwrap().mean > 3.9);
        assert!(flagged
            .iter()
            .all(|(_, v)| matches!(v, Verdict::Flagged { .. })));
    }

    #[test]
    fn a_disabled_detector_does_nothing() {
        let mut d = Detector::new(SpikeConfig {
            enabled: false,
            ..SpikeConfig::default()
        });
        replay(&mut d, &curve(100), 0);
        assert_eq!(d.observe(100, f64::NAN, f64::NAN, true), Verdict::Normal);
        assert_eq!(d.guard(), v1::StepGuard::default());
        assert_eq!(d.stats(), None);
    }

    #[test]
    fn a_stage_change_can_restart_the_statistics() {
        let losses = curve(200);
        let mut d = Detector::new(config(&[Rung::Skip]));
        replay(&mut d, &losses[..150], 0);
        d.level_changed(150);
        assert!(!d.armed());
        // A new level right after the change is not a spike.
        assert_eq!(replay(&mut d, &[(4.0, 0.3); 30], 150), []);
        assert!((d.stats().unwrap().mean - 4.0).abs() < 1e-12);
    }

    /// SmolLM2's stage-3 case: a spike two steps after new data enters is caught although the
    /// new level has none of its own statistics yet; an honest move of the level is not.
    #[test]
    fn no_step_after_a_level_change_is_unprotected() {
        let losses = curve(200);
        let mut d = Detector::new(config(&[Rung::Skip, Rung::Rollback]));
        assert_eq!(replay(&mut d, &losses[..150], 0), []);
        let before = d.stats().unwrap().mean;
        d.level_changed(150);
        assert!(!d.armed());
        // The new mixture moves the loss up by a third: not a spike.
        let moved: Vec<(f64, f64)> = losses[150..152]
            .iter()
            .map(|(l, g)| (l * 1.33, *g))
            .collect();
        assert_eq!(replay(&mut d, &moved, 150), []);
        // Step 152, the third of the stage, is a spike of 4x: flagged and rolled back.
        let v = d.observe(152, 4.0 * before, 0.3, false);
        match v {
            Verdict::Rollback {
                first_step, rule, ..
            } => {
                assert_eq!(first_step, 152);
                assert!(rule.contains("previous level"), "{rule}");
            }
            v => panic!("expected a rollback, got {v:?}"),
        }
        // The guard of the next step carries the bar too.
        assert!(d.guard().max_loss > 0.0 && d.guard().max_loss < 4.0 * before);
        // Once the new level has steps of its own, a spike against them is caught as well.
        let mut d = Detector::new(SpikeConfig {
            carry_ratio: 0.0,
            ..config(&[Rung::Skip, Rung::Rollback])
        });
        replay(&mut d, &losses[..150], 0);
        d.level_changed(150);
        assert_eq!(replay(&mut d, &[(6.0, 0.3); 3], 150), []);
        assert!(matches!(
            d.observe(153, 13.0, 0.3, false),
            Verdict::Rollback { ref rule, .. } if rule.contains("median")
        ));
        // A rewind to before the change forgets it (the replay makes it again).
        d.rewind(140);
        assert!(d.armed());
    }

    #[test]
    fn a_flat_curve_does_not_flag_rounding() {
        let mut d = Detector::new(config(&[Rung::Skip]));
        assert_eq!(replay(&mut d, &[(3.0, 0.5); 100], 0), []);
        let s = d.stats().unwrap();
        assert_eq!(s.std, 3.0 * STD_FLOOR);
        assert_eq!(d.observe(100, 3.0 + 1e-9, 0.5, false), Verdict::Normal);
        assert!(matches!(
            d.observe(101, 3.01, 0.5, false),
            Verdict::Flagged { .. }
        ));
    }

    #[test]
    fn skip_range_spans_the_spike_and_its_margins() {
        let cfg = SpikeConfig::default();
        assert_eq!(cfg.skip_range(400, 402), 398..=404);
        assert_eq!(cfg.skip_range(1, 1), 0..=3);
        assert!(cfg.has(Rung::Skip) && cfg.has(Rung::Rollback));
        assert_eq!(Rung::parse("rollback"), Some(Rung::Rollback));
        assert_eq!(Rung::parse("Skip"), None);
        assert_eq!(Rung::Skip.to_string(), "skip");
    }
}
