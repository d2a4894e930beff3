//! The warmup-stable-decay (WSD) learning-rate schedule SmolLM2 was trained with: a linear
//! warmup to the peak, a long constant phase, then a decay (linear or `1 - sqrt`) to a floor
//! over the last steps.

use stagecoach_proto::v1;

use crate::spec::SpecError;

/// The shape of the decay phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayShape {
    /// `lr = floor + (peak - floor) * (1 - p)`, p the fraction of the decay done.
    Linear,
    /// `lr = floor + (peak - floor) * (1 - sqrt(p))` (Hägele et al., 2024).
    OneMinusSqrt,
}

/// A WSD schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Wsd {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    /// Steps of the decay phase, which ends at the last step.
    pub decay_steps: u64,
    pub decay: DecayShape,
    /// The learning rate the decay ends at.
    pub min_lr: f64,
}

impl Wsd {
    /// The schedule of a job, from its wire form.
    pub fn from_job(job: &v1::JobSpec) -> Result<Wsd, SpecError> {
        let s = job
            .schedule
            .as_ref()
            .ok_or_else(|| SpecError("the job has no schedule".into()))?;
        let decay = match s.decay() {
            v1::DecayShape::OneMinusSqrt => DecayShape::OneMinusSqrt,
            _ => DecayShape::Linear,
        };
        let w = Wsd {
            peak_lr: s.peak_lr,
            warmup_steps: s.warmup_steps,
            total_steps: job.total_steps,
            decay_steps: job.total_steps.saturating_sub(s.decay_start_step),
            decay,
            min_lr: s.min_lr,
        };
        w.validate()?;
        Ok(w)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.peak_lr.is_nan() || self.peak_lr <= 0.0 {
            return Err(SpecError(format!(
                "peak_lr must be positive, got {}",
                self.peak_lr
            )));
        }
        if !(0.0..=self.peak_lr).contains(&self.min_lr) {
            return Err(SpecError(format!(
                "min_lr ({}) must lie in [0, peak_lr]",
                self.min_lr
            )));
        }
        if self.warmup_steps + self.decay_steps > self.total_steps {
            return Err(SpecError(format!(
                "warmup_steps ({}) + decay_steps ({}) exceed total_steps ({}); shorten one of them",
                self.warmup_steps, self.decay_steps, self.total_steps
            )));
        }
        Ok(())
    }

    /// First step of the decay phase.
    pub fn decay_start(&self) -> u64 {
        self.total_steps - self.decay_steps
    }

    /// The learning rate of step `step` in a decay that runs over steps `start..end` from
    /// `from` down to the floor, in this schedule's shape.
    pub fn decay_over(&self, from: f64, start: u64, end: u64, step: u64) -> f64 {
        let len = end.saturating_sub(start).max(1);
        let p = ((step.saturating_sub(start) + 1) as f64 / len as f64).min(1.0);
        let factor = match self.decay {
            DecayShape::Linear => 1.0 - p,
            DecayShape::OneMinusSqrt => 1.0 - p.sqrt(),
        };
        self.min_lr + (from - self.min_lr) * factor
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let start = self.decay_start();
        if step < start || self.decay_steps == 0 {
            return self.peak_lr;
        }
        self.decay_over(self.peak_lr, start, self.total_steps, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wsd(decay: DecayShape) -> Wsd {
        Wsd {
            peak_lr: 1.0,
            warmup_steps: 4,
            total_steps: 20,
            decay_steps: 4,
            decay,
            min_lr: 0.1,
        }
    }

    #[test]
    fn phases() {
        let s = wsd(DecayShape::Linear);
        s.validate().unwrap();
        let lrs: Vec<f64> = (0..20).map(|i| s.lr(i)).collect();
        assert_eq!(&lrs[..4], [0.25, 0.5, 0.75, 1.0]);
        assert!(lrs[4..16].iter().all(|&l| l == 1.0));
        let expect = [0.775, 0.55, 0.325, 0.1];
        for (got, want) in lrs[16..].iter().zip(expect) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Past the end the floor holds.
        assert!((s.lr(25) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn one_minus_sqrt_decays_faster_early() {
        let lin = wsd(DecayShape::Linear);
        let sq = wsd(DecayShape::OneMinusSqrt);
        assert!(sq.lr(16) < lin.lr(16));
        assert!((sq.lr(16) - (0.1 + 0.9 * (1.0 - 0.25f64.sqrt()))).abs() < 1e-12);
        assert!((sq.lr(19) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn bad_schedules_are_explained() {
        let mut s = wsd(DecayShape::Linear);
        s.decay_steps = 17;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("exceed total_steps"));
        let mut s = wsd(DecayShape::Linear);
        s.min_lr = 2.0;
        assert!(s.validate().unwrap_err().to_string().contains("min_lr"));
    }
}
