//! The checkpoint policy: the job's `[checkpoints]` section ([`CheckpointConfig`]) and its
//! retention rule over the coordinator's index ([`to_delete`]). Pure logic, no I/O.

use std::collections::HashSet;
use std::path::PathBuf;

use stagecoach_proto::v1;

/// The `[checkpoints]` section of a job file.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointConfig {
    /// Where rank 0 writes checkpoint folders, as the workers see it.
    pub dir: PathBuf,
    /// A checkpoint after every this many committed steps (0: only on demand).
    pub every_steps: u64,
    /// The last `keep` checkpoints are kept, and pinned ones, and the latest known-good one.
    pub keep: u32,
}

impl CheckpointConfig {
    pub const DEFAULT_EVERY_STEPS: u64 = 100;
    pub const DEFAULT_KEEP: u32 = 3;

    /// The defaults for the job named `job`: `checkpoints/<job>`, every 100 steps, keep 3.
    pub fn for_job(job: &str) -> CheckpointConfig {
        CheckpointConfig {
            dir: PathBuf::from("checkpoints").join(job),
            every_steps: Self::DEFAULT_EVERY_STEPS,
            keep: Self::DEFAULT_KEEP,
        }
    }

    /// Whether a checkpoint is due after `step` committed steps (never at 0: nothing trained).
    pub fn due(&self, step: u64) -> bool {
        step > 0 && self.every_steps > 0 && step.is_multiple_of(self.every_steps)
    }
}

/// The checkpoint folders retention removes from `existing` (the index, in any order): all but
/// the last `keep` by step (ties by creation time), except pinned ones and the latest
/// known-good one. A path that a kept record also names (a folder written again) is never
/// returned.
pub fn to_delete(existing: &[v1::CheckpointRecord], keep: u32) -> Vec<String> {
    let mut order: Vec<&v1::CheckpointRecord> = existing.iter().collect();
    // Stable: of two records at the same step and time, the later in the index is newer.
    order.sort_by_key(|r| (r.step, r.unix_ms));
    let cut = order.len().saturating_sub(keep as usize);
    let mut kept: HashSet<&str> = order[cut..].iter().map(|r| r.path.as_str()).collect();
    kept.extend(order.iter().filter(|r| r.pinned).map(|r| r.path.as_str()));
    if let Some(good) = order.iter().rev().find(|r| r.known_good) {
        kept.insert(&good.path);
    }
    let mut out: Vec<String> = Vec::new();
    for r in &order[..cut] {
        if !r.path.is_empty() && !kept.contains(r.path.as_str()) && !out.contains(&r.path) {
            out.push(r.path.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_due_every_n_steps() {
        let cfg = CheckpointConfig::for_job("demo");
        assert_eq!(cfg.dir, PathBuf::from("checkpoints/demo"));
        let due: Vec<u64> = (0..=300).filter(|s| cfg.due(*s)).collect();
        assert_eq!(due, [100, 200, 300]);
        let never = CheckpointConfig {
            every_steps: 0,
            ..cfg
        };
        assert!(!(0..1000).any(|s| never.due(s)));
    }

    fn record(step: u64, known_good: bool, pinned: bool) -> v1::CheckpointRecord {
        v1::CheckpointRecord {
            step,
            path: format!("ck/step-{step:08}"),
            known_good,
            pinned,
            unix_ms: 1_000 + step,
            ..Default::default()
        }
    }
    #[test]
    fn retention_keeps_the_last_k_pinned_and_the_latest_known_good() {
        let path = |s: u64| format!("ck/step-{s:08}");
        // In any order: the index need not be sorted.
        let index = vec![
            record(300, true, false),
            record(100, true, true),
            record(200, true, false),
            record(400, true, false),
            record(500, true, false),
        ];
        assert_eq!(to_delete(&index, 3), [path(200)]);
        assert_eq!(to_delete(&index, 5), Vec::<String>::new());
        assert_eq!(to_delete(&index, 1), [path(200), path(300), path(400)]);

        // After a spike, the newest checkpoints are not known-good: the last good one stays.
        let index = vec![
            record(100, true, false),
            record(200, true, false),
            record(300, false, false),
            record(400, false, false),
            record(500, false, false),
        ];
        assert_eq!(to_delete(&index, 2), [path(100), path(300)]);
        // keep = 0 still keeps pinned and known-good ones.
        let index = vec![record(100, true, false), record(200, false, true)];
        assert_eq!(to_delete(&index, 0), Vec::<String>::new());

        // A folder written again (the same path, later) is never deleted through its older
        // record.
        let mut again = record(300, true, false);
        again.path = path(100);
        let index = vec![record(100, true, false), record(200, true, false), again];
        assert_eq!(to_delete(&index, 1), [path(200)]);
    }
}
