//! A deterministic sample order over a weighted mixture of shard folders.
//!
//! Two decisions are made for each position of the global sample sequence:
//! 1. *which source*: smooth weighted round-robin: the source whose count lags its share the
//!    most (`weight * (n + 1) - taken`) goes next, so after `n` samples each source has had its
//!    share to within one sample, with no randomness to drift;
//! 2. *which sample of that source*: the source's cursor `c` maps through a seeded bijection
//!    of `0..num_samples` (a Feistel network, re-keyed each epoch), so the order looks random,
//!    needs no memory proportional to the corpus, and a cursor is all a resume needs.
//!
//! The state is the per-source cursors; identical cursors give identical futures.

use crate::shards::ShardFolder;

/// One source of the mixture.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub folder: ShardFolder,
    pub weight: f64,
    pub num_samples: u64,
}

/// A sample of the plan: which source, which sample of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleId {
    pub source: usize,
    pub index: u64,
}

/// The sample order over the sources, with per-source cursors.
#[derive(Debug)]
pub struct Mixture {
    sources: Vec<Source>,
    seed: u64,
    /// Samples taken from each source since the start.
    cursors: Vec<u64>,
    /// Samples taken from each source under the current weights (the round-robin's state).
    taken_since_weights: Vec<u64>,
}

impl Mixture {
    /// Weights are normalised; sources with no sample of the window size are refused by the caller.
    pub fn new(sources: Vec<Source>, seed: u64) -> Mixture {
        let n = sources.len();
        Mixture {
            sources,
            seed,
            cursors: vec![0; n],
            taken_since_weights: vec![0; n],
        }
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Samples consumed per source.
    pub fn cursors(&self) -> &[u64] {
        &self.cursors
    }

    /// The next sample of the plan.
    pub fn next_sample(&mut self) -> SampleId {
        let total: u64 = self.taken_since_weights.iter().sum();
        let weight_sum: f64 = self.sources.iter().map(|s| s.weight).sum();
        let mut best = 0;
        let mut best_lag = f64::NEG_INFINITY;
        for (i, s) in self.sources.iter().enumerate() {
            if s.weight <= 0.0 {
                continue;
            }
            let lag =
                s.weight / weight_sum * (total + 1) as f64 - self.taken_since_weights[i] as f64;
            if lag > best_lag + 1e-12 {
                best = i;
                best_lag = lag;
            }
        }
        let n = self.sources[best].num_samples;
        let c = self.cursors[best];
        let key = mix(mix(self.seed ^ best as u64) ^ (c / n));
        let index = permute(c % n, n, key);
        self.cursors[best] += 1;
        self.taken_since_weights[best] += 1;
        SampleId {
            source: best,
            index,
        }
    }
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
}

#[cfg(test)]
mod mixture_tests {
    use super::*;
    use crate::shards::{ShardWriter, TokenSize};

    fn source(dir: &std::path::Path, name: &str, samples: u32, weight: f64) -> Source {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        let mut w = ShardWriter::create(&path.join("a.ds"), TokenSize::U16, "t").unwrap();
        w.write_document(&(0..samples * 4).collect::<Vec<_>>())
            .unwrap();
        w.finish().unwrap();
        let folder = ShardFolder::open(&path, TokenSize::U16).unwrap();
        let num_samples = folder.num_samples(3);
        assert_eq!(num_samples, u64::from(samples));
        Source {
            name: name.into(),
            folder,
            weight,
            num_samples,
        }
    }

    #[test]
    fn shares_are_exact_and_each_epoch_covers_a_source_once() {
        let dir = tempfile::tempdir().unwrap();
        let sources = vec![
            source(dir.path(), "a", 70, 0.7),
            source(dir.path(), "b", 50, 0.3),
        ];
        let mut m = Mixture::new(sources, 9);
        let picks: Vec<SampleId> = (0..100).map(|_| m.next_sample()).collect();
        let from_a: Vec<u64> = picks
            .iter()
            .filter(|s| s.source == 0)
            .map(|s| s.index)
            .collect();
        assert_eq!(from_a.len(), 70);
        assert_eq!(m.cursors(), [70, 30]);
        // Every prefix holds each source's share to within one sample.
        for n in 1..=100usize {
            let a = picks[..n].iter().filter(|s| s.source == 0).count() as f64;
            assert!((a - 0.7 * n as f64).abs() <= 1.0, "prefix {n}: {a}");
        }
        // The first epoch of source a is a permutation of its samples.
        let mut sorted = from_a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..70).collect::<Vec<_>>());
        // Same seed, same plan.
        let sources = vec![
            source(&dir.path().join("again"), "a", 70, 0.7),
            source(&dir.path().join("again"), "b", 50, 0.3),
        ];
        let mut m2 = Mixture::new(sources, 9);
        assert_eq!(
            (0..100).map(|_| m2.next_sample()).collect::<Vec<_>>(),
            picks
        );
    }
}
