//! The checks of the policy sections, `[checkpoints]`, `[recovery]` and `[spikes]`: what the
//! run does about time, failures and loss spikes, apart from what it trains.

use super::{list, positive_number, Problems, MAX_MS, MAX_STEPS};
use crate::spec::JobFile;
use crate::spike::Rung;

impl JobFile {
    pub(super) fn check_checkpoints(&self, p: &mut Problems) {
        let c = &self.checkpoints;
        if c.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            p.at(
                "checkpoints.dir",
                "empty; give the folder rank 0 writes checkpoints to, or remove the key for \
                 checkpoints/<job name>",
            );
        }
        if let Some(dir) = &c.dir {
            if dir
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                p.at(
                    "checkpoints.dir",
                    format!(
                        "{} climbs out of its folder with '..'; retention deletes old checkpoints \
                         in this folder, so give it without '..' (an absolute path is fine)",
                        dir.display()
                    ),
                );
            }
        }
        if c.every_steps > MAX_STEPS {
            p.at(
                "checkpoints.every_steps",
                format!(
                    "{} is more than {MAX_STEPS} steps; 0 means only on demand",
                    c.every_steps
                ),
            );
        }
        if c.keep > 100_000 {
            p.at(
                "checkpoints.keep",
                format!("{} is more than 100000 checkpoints", c.keep),
            );
        }
        if c.keep == 0 {
            let why = if c.every_steps > 0 {
                format!(
                    "each checkpoint written every {} steps would be deleted at once",
                    c.every_steps
                )
            } else {
                "each checkpoint would be deleted as soon as it is written".to_owned()
            };
            p.at(
                "checkpoints.keep",
                format!(
                    "0 keeps none: {why} (only pinned and the latest known-good one would stay); \
                     keep at least 1"
                ),
            );
        }
    }

    pub(super) fn check_recovery(&self, p: &mut Problems) {
        let r = &self.recovery;
        if r.max_failures == 0 {
            p.at(
                "recovery.max_failures",
                "must be at least 1: a lost worker would stop the job at once",
            );
        }
        if r.backoff_ms == 0 || r.backoff_ms > MAX_MS {
            p.at(
                "recovery.backoff_ms",
                format!("{} must lie in 1..={MAX_MS} (500 is usual)", r.backoff_ms),
            );
        }
        if r.max_backoff_ms < r.backoff_ms || r.max_backoff_ms > MAX_MS {
            p.at(
                "recovery.max_backoff_ms",
                format!(
                    "{} must lie in backoff_ms ({})..={MAX_MS}",
                    r.max_backoff_ms, r.backoff_ms
                ),
            );
        }
        if !(1000..=MAX_MS).contains(&r.store_outage_ms) {
            p.at(
                "recovery.store_outage_ms",
                format!(
                    "{} must lie in 1000..={MAX_MS}: how long training waits for the state store",
                    r.store_outage_ms
                ),
            );
        }
        if r.step_timeout_ms != 0 && !(1000..=MAX_MS).contains(&r.step_timeout_ms) {
            p.at(
                "recovery.step_timeout_ms",
                format!(
                    "{} must be 0 (twenty times the recent steps) or lie in 1000..={MAX_MS}",
                    r.step_timeout_ms
                ),
            );
        }
    }

    pub(super) fn check_spikes(&self, p: &mut Problems) {
        let s = &self.spikes;
        for (key, v) in [
            ("window", u64::from(s.window)),
            ("min_steps", u64::from(s.min_steps)),
            ("consecutive", u64::from(s.consecutive)),
        ] {
            if v > 1_000_000 {
                p.at(
                    format!("spikes.{key}"),
                    format!("{v} is more than 1000000 steps"),
                );
            }
        }
        for (key, v) in [
            ("skip_before", s.skip_before),
            ("skip_after", s.skip_after),
            ("lr_steps", s.lr_steps),
            ("window_steps", s.window_steps),
        ] {
            if v > MAX_STEPS {
                p.at(
                    format!("spikes.{key}"),
                    format!("{v} is more than {MAX_STEPS} steps"),
                );
            }
        }
        if s.window < 2 {
            p.at(
                "spikes.window",
                format!(
                    "{} is too short: a deviation needs at least 2 steps (50 is usual)",
                    s.window
                ),
            );
        }
        if !positive_number(s.zscore) {
            p.at(
                "spikes.zscore",
                format!(
                    "must be a positive number of standard deviations above the rolling mean \
                     (6 is usual), got {}",
                    s.zscore
                ),
            );
        }
        if !(s.ratio == 0.0 || (s.ratio.is_finite() && s.ratio > 1.0)) {
            p.at(
                "spikes.ratio",
                format!(
                    "{0} would flag ordinary steps (any loss above {0}x the rolling mean); give \
                     a factor above 1 (2 is usual), or 0 to turn the rule off",
                    s.ratio
                ),
            );
        }
        if !(s.grad_norm_zscore == 0.0 || positive_number(s.grad_norm_zscore)) {
            p.at(
                "spikes.grad_norm_zscore",
                format!(
                    "must be a positive number of standard deviations, or 0 (off), got {}",
                    s.grad_norm_zscore
                ),
            );
        }
        if s.consecutive == 0 {
            p.at(
                "spikes.consecutive",
                "must be at least 1 (flagged steps in a row that make a spike)",
            );
        }
        let names = list(Rung::ALL.iter().map(|r| r.name()));
        let mut rungs: Vec<Rung> = Vec::new();
        for (i, rung) in s.ladder.iter().enumerate() {
            let at = format!("spikes.ladder[{i}]");
            let name = rung.name();
            match rung {
                Rung::Unknown(_) => {
                    p.at(at, format!("unknown rung {name:?}; the rungs are {names}"))
                }
                r if rungs.contains(r) => p.at(at, format!("{name:?} is given twice")),
                r => rungs.push(r.clone()),
            }
        }
        let ordered: Vec<Rung> = Rung::ALL
            .into_iter()
            .filter(|r| rungs.contains(r))
            .collect();
        if rungs != ordered {
            let want: Vec<String> = ordered.iter().map(|r| format!("{:?}", r.name())).collect();
            p.at(
                "spikes.ladder",
                format!("rungs go from mild to drastic: write [{}]", want.join(", ")),
            );
        }
        if !(s.lr_factor.is_finite() && s.lr_factor > 0.0 && s.lr_factor <= 1.0) {
            p.at(
                "spikes.lr_factor",
                format!(
                    "{} must lie in (0, 1]: the learning rate after a rollback is multiplied by \
                     it (1: unchanged)",
                    s.lr_factor
                ),
            );
        } else if s.lr_factor < 1.0 && s.lr_steps == 0 {
            p.at(
                "spikes.lr_steps",
                format!(
                    "0, so lr_factor = {} would last no step; give for how many steps after a \
                     rollback the learning rate is lowered",
                    s.lr_factor
                ),
            );
        }
        if s.window_steps == 0 {
            p.at(
                "spikes.window_steps",
                "must be positive: the steps within which at most max_rollbacks rollbacks are \
                 allowed",
            );
        }
    }
}
