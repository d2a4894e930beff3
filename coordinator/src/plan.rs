//! The deterministic global sample plan over a weighted mixture of sources.
//!
//! Two decisions are made for each position of the global sample sequence:
//! 1. *which source*: smooth weighted round-robin: the source whose count lags its share the
//!    most (`weight * (n + 1) - taken`) goes next, so after `n` samples each source has had its
//!    share to within one sample, with no randomness to drift;
//! 2. *which sample of that source*: the source's cursor `c` maps through a seeded bijection of
//!    `0..num_samples` (a Feistel network, re-keyed each epoch), so the order looks random, needs
//!    no memory proportional to the corpus, and a cursor is all a resume needs.
//!
//! The state is the per-source cursors (and the counts under the current weights); identical
//! state gives an identical future, whatever the world size that consumes it.

/// A sample of the plan: which source (index into the job's sources), which sample of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId {
    pub source: usize,
    pub index: u64,
}

/// The sample order over the sources, with per-source cursors.
#[derive(Debug, Clone)]
pub struct Plan {
    weights: Vec<f64>,
    sizes: Vec<u64>,
    seed: u64,
    /// Samples taken from each source since the start of the job.
    cursors: Vec<u64>,
    /// Samples taken from each source under the current weights (the round-robin's state).
    taken: Vec<u64>,
}

/// Why a plan cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the mixture has no source with a positive weight")]
    NoWeight,
    #[error("source {0} has a positive weight but no sample")]
    EmptySource(usize),
    #[error("{weights} weights for {sizes} sources")]
    Mismatch { weights: usize, sizes: usize },
}

impl Plan {
    /// A plan over sources of `sizes` samples with `weights` (normalised here), starting at
    /// `cursors` (all zero for a new job).
    pub fn new(
        weights: Vec<f64>,
        sizes: Vec<u64>,
        seed: u64,
        cursors: Vec<u64>,
    ) -> Result<Plan, PlanError> {
        if weights.len() != sizes.len() || cursors.len() != sizes.len() {
            return Err(PlanError::Mismatch {
                weights: weights.len(),
                sizes: sizes.len(),
            });
        }
        if !weights.iter().any(|&w| w > 0.0) {
            return Err(PlanError::NoWeight);
        }
        if let Some(i) = (0..sizes.len()).find(|&i| weights[i] > 0.0 && sizes[i] == 0) {
            return Err(PlanError::EmptySource(i));
        }
        // The weights have held since the start of the job, so the round-robin's counts are the
        // cursors: a plan rebuilt from its cursors continues exactly where the old one was.
        let taken = cursors.clone();
        Ok(Plan {
            weights,
            sizes,
            seed,
            cursors,
            taken,
        })
    }

    /// Samples consumed per source.
    pub fn cursors(&self) -> &[u64] {
        &self.cursors
    }

    /// The next sample of the plan.
    pub fn next_sample(&mut self) -> SampleId {
        let total: u64 = self.taken.iter().sum();
        let weight_sum: f64 = self.weights.iter().filter(|w| **w > 0.0).sum();
        let mut best = 0;
        let mut best_lag = f64::NEG_INFINITY;
        for (i, &w) in self.weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            let lag = w / weight_sum * (total + 1) as f64 - self.taken[i] as f64;
            if lag > best_lag + 1e-12 {
                best = i;
                best_lag = lag;
            }
        }
        let n = self.sizes[best];
        let c = self.cursors[best];
        let key = mix(mix(self.seed ^ best as u64) ^ (c / n));
        let index = permute(c % n, n, key);
        self.cursors[best] += 1;
        self.taken[best] += 1;
        SampleId {
            source: best,
            index,
        }
    }

    /// The next `n` samples.
    pub fn take(&mut self, n: usize) -> Vec<SampleId> {
        (0..n).map(|_| self.next_sample()).collect()
    }
}

/// Rank `rank`'s share of a global batch of `batch` samples over `world` ranks: contiguous
/// slices, the first `batch % world` ranks one sample larger.
pub fn rank_slice(batch: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let (base, extra) = (batch / world, batch % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// SplitMix64 finaliser: a fast, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijection of `0..n` keyed by `key`: a balanced Feistel network on the smallest even
/// power-of-two domain holding `n`, cycle-walking values that fall outside.
pub fn permute(x: u64, n: u64, key: u64) -> u64 {
    assert!(x < n, "permute: {x} outside 0..{n}");
    if n <= 1 {
        return x;
    }
    let bits = 64 - (n - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut v = x;
    loop {
        let (mut l, mut r) = (v >> half, v & mask);
        for round in 0..4u64 {
            let f = mix(r ^ mix(key ^ round)) & mask;
            (l, r) = (r, l ^ f);
        }
        v = (l << half) | r;
        if v < n {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000] {
            let mut seen: Vec<u64> = (0..n).map(|x| permute(x, n, 42)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<u64> = (0..100).map(|x| permute(x, 100, 1)).collect();
        let b: Vec<u64> = (0..100).map(|x| permute(x, 100, 2)).collect();
        assert_ne!(a, b, "keys give different orders");
        assert_ne!(a, (0..100).collect::<Vec<_>>(), "not the identity");
    }

    #[test]
    fn shares_are_exact_and_each_epoch_covers_a_source_once() {
        let mut plan = Plan::new(vec![0.7, 0.3], vec![70, 50], 9, vec![0, 0]).unwrap();
        let picks = plan.take(100);
        let from_a: Vec<u64> = picks
            .iter()
            .filter(|s| s.source == 0)
            .map(|s| s.index)
            .collect();
        assert_eq!(from_a.len(), 70);
        assert_eq!(plan.cursors(), [70, 30]);
        for n in 1..=100usize {
            let a = picks[..n].iter().filter(|s| s.source == 0).count() as f64;
            assert!((a - 0.7 * n as f64).abs() <= 1.0, "prefix {n}: {a}");
        }
        let mut sorted = from_a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..70).collect::<Vec<_>>());
        let mut again = Plan::new(vec![0.7, 0.3], vec![70, 50], 9, vec![0, 0]).unwrap();
        assert_eq!(again.take(100), picks);
    }

    #[test]
    fn a_plan_rebuilt_from_its_cursors_continues_exactly() {
        let mut whole = Plan::new(vec![0.5, 0.3, 0.2], vec![40, 30, 20], 5, vec![0; 3]).unwrap();
        let mut first = Plan::new(vec![0.5, 0.3, 0.2], vec![40, 30, 20], 5, vec![0; 3]).unwrap();
        let _ = whole.take(37);
        let _ = first.take(37);
        let mut resumed = Plan::new(
            vec![0.5, 0.3, 0.2],
            vec![40, 30, 20],
            5,
            first.cursors().to_vec(),
        )
        .unwrap();
        assert_eq!(resumed.take(200), whole.take(200));
    }

    #[test]
    fn rank_slices_partition_the_batch() {
        for (batch, world) in [(16, 2), (17, 3), (5, 4), (3, 4)] {
            let slices: Vec<_> = (0..world).map(|r| rank_slice(batch, world, r)).collect();
            assert_eq!(slices[0].start, 0);
            assert_eq!(slices[world - 1].end, batch);
            for w in slices.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
            }
        }
    }

    #[test]
    fn bad_plans_are_refused() {
        assert_eq!(
            Plan::new(vec![0.0], vec![5], 0, vec![0]).unwrap_err(),
            PlanError::NoWeight
        );
        assert_eq!(
            Plan::new(vec![1.0, 0.0], vec![0, 5], 0, vec![0, 0]).unwrap_err(),
            PlanError::EmptySource(0)
        );
    }
}
