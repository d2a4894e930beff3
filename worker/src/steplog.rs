//! The `--metrics-out` file: one JSON object per trained step, written alike by the standalone
//! `train` and by `join` (one file per worker, holding the steps it trained).
//!
//! Steps are counted from 0, as the coordinator's ledger counts them. Fields a writer does not
//! know are `null` (the standalone run's cumulative token count has no equivalent in a worker
//! that may have joined a job late; a stage's name is always known, from the job).

use std::io::Write;

use serde::Serialize;

use crate::train::Timing;

/// One trained step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step, from 0.
    pub step: u64,
    /// The curriculum stage the step trained in: its index in the job, and its name.
    pub stage: u32,
    pub stage_name: Option<String>,
    pub seq_len: u32,
    /// The RoPE θ the step trained with (the model's own when the stage gives none).
    pub rope_theta: f64,
    /// Mean token loss of this rank's samples.
    pub loss: f64,
    /// Mean loss over the whole global batch, the same on every rank (`null` when not finite).
    pub global_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was dropped (a non-finite loss or gradient norm, or the step guard).
    pub skipped: bool,
    /// The world the step was trained in (0 and rank 0 for a standalone run).
    pub generation: u64,
    pub rank: usize,
    /// Tokens trained so far, this step included (standalone runs; `null` for `join`).
    pub tokens: Option<u64>,
    /// The step's tokens over all ranks (global batch × seq_len) per second of this step.
    pub tokens_per_second: f64,
    /// This rank's samples from each source, in the job's source order.
    pub samples_per_source: Vec<u64>,
    /// This rank's samples: (source, token offset).
    pub samples: Vec<(usize, u64)>,
    /// Seconds in each part of the step.
    pub timing: Timing,
}

impl StepRecord {
    /// Writes the record as one line of JSON.
    pub fn write_line(&self, out: &mut impl Write) -> std::io::Result<()> {
        let line = serde_json::to_string(self).map_err(std::io::Error::other)?;
        writeln!(out, "{line}")
    }
}

/// Samples per source (`sources` of them) of `samples`; `None` if one names a source past the
/// end.
pub fn per_source(samples: &[(usize, u64)], sources: usize) -> Option<Vec<u64>> {
    let mut counts = vec![0u64; sources];
    for &(s, _) in samples {
        *counts.get_mut(s)? += 1;
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line_of_json_with_every_field() {
        let rec = StepRecord {
            step: 0,
            stage: 1,
            stage_name: Some("long".into()),
            seq_len: 64,
            rope_theta: 10_000.0,
            loss: 5.5,
            global_loss: f64::NAN,
            lr: 1e-3,
            grad_norm: 0.5,
            skipped: true,
            generation: 2,
            rank: 1,
            tokens: None,
            tokens_per_second: 100.0,
            samples_per_source: per_source(&[(0, 3), (1, 64)], 2).unwrap(),
            samples: vec![(0, 3), (1, 64)],
            timing: Timing::default(),
        };
        let mut out = Vec::new();
        rec.write_line(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["step"], 0);
        assert_eq!(
            (v["stage"].clone(), v["stage_name"].clone()),
            (1.into(), "long".into())
        );
        assert!(v["global_loss"].is_null() && v["tokens"].is_null());
        assert_eq!(v["samples"], serde_json::json!([[0, 3], [1, 64]]));
        assert_eq!(v["samples_per_source"], serde_json::json!([1, 1]));
        assert_eq!(v["timing"]["forward_backward"], 0.0);
        assert_eq!(per_source(&[(2, 0)], 2), None);
    }
}
