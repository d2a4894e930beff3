//! The deterministic global sample plan over a weighted mixture of sources.
//!
//! A source is one token stream (its `.ds` files in name order). It is cut into *blocks* of
//! `block` tokens (the job's largest sequence length) and a sample of sequence length `L` is the
//! `L + 1` tokens from a token offset; consecutive samples of a source advance by `L` (the
//! windows overlap by one token, the target of one is the first input of the next). Because every
//! stage's `L` divides `block`, a block tiles exactly into windows of any stage.
//!
//! Two decisions are made for each position of the global sample sequence:
//! 1. *which source*: smooth weighted round-robin: the source whose count lags its share the
//!    most (`weight * (n + 1) - taken`) goes next, so after `n` samples of a mixture each source
//!    has had its share to within one sample, with no randomness to drift;
//! 2. *where in that source*: the source's cursor `c` (tokens consumed) names block `c / block`
//!    of the source's shuffled block order (a Feistel bijection of the block indices, re-keyed
//!    each epoch), and the offset `c % block` inside it. The order looks random, needs no memory
//!    proportional to the corpus, and the cursor is all a resume needs.
//!
//! Cursors are tokens, not samples, so they mean the same thing at every sequence length: a
//! source used again in a later stage, at any `L`, continues where it stopped and never repeats
//! a token within an epoch. When `L` grows and a cursor sits inside a block at an offset that is
//! not a multiple of the new `L`, the rest of that block is skipped (at most `block - L` tokens
//! per source per change of sequence length; never trained, never repeated).
//!
//! The state is the per-source cursors and the round-robin's counts under the current mixture;
//! identical state gives an identical future, whatever the world size that consumes it.

use stagecoach_proto::v1;

/// A sample of the plan: which source (index into the job's sources) and the token offset it
/// starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId {
    pub source: usize,
    pub index: u64,
}

/// The sample order over the sources, with per-source cursors.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    seed: u64,
    /// Tokens per block (the largest sequence length of the job).
    block: u64,
    /// Whole blocks per source (the last window of a block reads one token past it).
    blocks: Vec<u64>,
    /// Tokens consumed from each source's shuffled stream since the start of the job.
    cursors: Vec<u64>,
    /// The current mixture and sequence length.
    weights: Vec<f64>,
    seq_len: u64,
    /// Samples taken from each source under the current mixture (the round-robin's state).
    taken: Vec<u64>,
}

/// Why a plan cannot be built or a mixture set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the mixture has no source with a positive weight")]
    NoWeight,
    #[error("source {0} has a positive weight but fewer than one block of tokens")]
    EmptySource(usize),
    #[error("{got} values for {sources} sources")]
    Mismatch { got: usize, sources: usize },
    #[error("sequence length {seq_len} does not divide the block of {block} tokens")]
    SeqLen { seq_len: u64, block: u64 },
    #[error("a draw of {0} samples, more than {MAX_DRAW}")]
    TooMany(u32),
}

impl Plan {
    /// A plan over sources of `source_tokens` tokens, cut in blocks of `block` tokens, starting
    /// at `cursors` (all zero for a new job). Set a mixture before drawing samples.
    pub fn new(
        seed: u64,
        block: u64,
        source_tokens: &[u64],
        cursors: Vec<u64>,
    ) -> Result<Plan, PlanError> {
        if cursors.len() != source_tokens.len() {
            return Err(PlanError::Mismatch {
                got: cursors.len(),
                sources: source_tokens.len(),
            });
        }
        let block = block.max(1);
        Ok(Plan {
            seed,
            block,
            blocks: source_tokens
                .iter()
                .map(|&t| t.saturating_sub(1) / block)
                .collect(),
            weights: vec![0.0; cursors.len()],
            seq_len: block,
            taken: vec![0; cursors.len()],
            cursors,
        })
    }

    /// Draws from now on with `weights` (normalised here) at `seq_len`, the round-robin's counts
    /// starting at `taken` (zeros for a new mixture; a resume passes the recorded counts).
    pub fn set_mix(
        &mut self,
        weights: Vec<f64>,
        seq_len: u64,
        taken: Vec<u64>,
    ) -> Result<(), PlanError> {
        let n = self.cursors.len();
        for got in [weights.len(), taken.len()] {
            if got != n {
                return Err(PlanError::Mismatch { got, sources: n });
            }
        }
        if !weights.iter().any(|&w| w > 0.0) {
            return Err(PlanError::NoWeight);
        }
        if let Some(i) = (0..n).find(|&i| weights[i] > 0.0 && self.blocks[i] == 0) {
            return Err(PlanError::EmptySource(i));
        }
        if seq_len == 0 || !self.block.is_multiple_of(seq_len) {
            return Err(PlanError::SeqLen {
                seq_len,
                block: self.block,
            });
        }
        self.weights = weights;
        self.seq_len = seq_len;
        self.taken = taken;
        Ok(())
    }

    /// Tokens consumed per source.
    pub fn cursors(&self) -> &[u64] {
        &self.cursors
    }

    /// Samples drawn per source under the current mixture.
    pub fn taken(&self) -> &[u64] {
        &self.taken
    }

    pub fn seq_len(&self) -> u64 {
        self.seq_len
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
        let (block, len) = (self.block, self.seq_len);
        let mut c = self.cursors[best];
        if !c.is_multiple_of(len) {
            // The sequence length grew mid-block: skip to the next block.
            c = c.div_ceil(block) * block;
        }
        let n = self.blocks[best];
        let b = c / block;
        let key = mix(mix(self.seed ^ best as u64) ^ (b / n));
        let index = permute(b % n, n, key) * block + c % block;
        self.cursors[best] = c + len;
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

    /// The state the next draw of `count` samples starts from: [`Plan::replay`] gives the same
    /// samples from it.
    pub fn draw_state(&self, count: u32) -> v1::PlanDraw {
        v1::PlanDraw {
            seed: self.seed,
            block: self.block,
            blocks: self.blocks.clone(),
            cursors: self.cursors.clone(),
            taken: self.taken.clone(),
            weights: self.weights.clone(),
            seq_len: self.seq_len,
            count,
        }
    }

    /// The samples of a draw, drawn again from its state (a ledger record). A state no plan
    /// could have had (lengths that differ, no weight, a sequence length that does not divide
    /// the block, more samples than [`MAX_DRAW`]) is refused.
    pub fn replay(draw: &v1::PlanDraw) -> Result<Vec<SampleId>, PlanError> {
        let n = draw.blocks.len();
        if draw.cursors.len() != n {
            return Err(PlanError::Mismatch {
                got: draw.cursors.len(),
                sources: n,
            });
        }
        if draw.count > MAX_DRAW {
            return Err(PlanError::TooMany(draw.count));
        }
        let mut plan = Plan {
            seed: draw.seed,
            block: draw.block.max(1),
            blocks: draw.blocks.clone(),
            cursors: draw.cursors.clone(),
            weights: vec![0.0; n],
            seq_len: draw.block.max(1),
            taken: vec![0; n],
        };
        plan.set_mix(draw.weights.clone(), draw.seq_len, draw.taken.clone())?;
        Ok(plan.take(draw.count as usize))
    }
}

/// The most samples one recorded draw may hold (a global batch of 2^26 samples).
pub const MAX_DRAW: u32 = 1 << 26;

/// A digest of a list of samples (each `(source, token offset)`, in order): FNV-1a over their
/// little-endian bytes. Worker and coordinator compute it alike, so a worker can say which
/// samples it trained without listing them.
pub fn samples_digest(samples: impl IntoIterator<Item = (u32, u64)>) -> u64 {
    let mut h = fnv::OFFSET;
    for (source, index) in samples {
        h = fnv::bytes(h, &source.to_le_bytes());
        h = fnv::bytes(h, &index.to_le_bytes());
    }
    h
}

/// FNV-1a, 64 bits.
pub mod fnv {
    pub const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// `h` extended by `bytes`.
    pub fn bytes(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
        h
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

    /// A plan over sources of `tokens`, blocks of 8 tokens, drawing windows of `seq_len`.
    fn plan(weights: &[f64], tokens: &[u64], seq_len: u64) -> Plan {
        let mut p = Plan::new(9, 8, tokens, vec![0; tokens.len()]).unwrap();
        p.set_mix(weights.to_vec(), seq_len, vec![0; tokens.len()])
            .unwrap();
        p
    }

    #[test]
    fn shares_are_exact_and_each_epoch_covers_a_source_once() {
        // Source 0: 71 tokens = 8 whole blocks (the last window needs one token past its block).
        let mut p = plan(&[0.7, 0.3], &[71, 1000], 4);
        let picks = p.take(100);
        for n in 1..=100usize {
            let a = picks[..n].iter().filter(|s| s.source == 0).count() as f64;
            assert!((a - 0.7 * n as f64).abs() <= 1.0, "prefix {n}: {a}");
        }
        // The first 16 windows of source 0 (one epoch: 8 blocks x 2 windows) tile 0..64.
        let mut first: Vec<u64> = picks
            .iter()
            .filter(|s| s.source == 0)
            .take(16)
            .map(|s| s.index)
            .collect();
        first.sort();
        assert_eq!(first, (0..16).map(|i| i * 4).collect::<Vec<_>>());
        assert_eq!(p.cursors(), [70 * 4, 30 * 4]);
        let again = plan(&[0.7, 0.3], &[71, 1000], 4).take(100);
        assert_eq!(again, picks);
    }

    #[test]
    fn a_plan_rebuilt_from_its_cursors_continues_exactly() {
        let tokens = [400, 300, 200];
        let mut whole = plan(&[0.5, 0.3, 0.2], &tokens, 4);
        let mut first = plan(&[0.5, 0.3, 0.2], &tokens, 4);
        let _ = whole.take(37);
        let _ = first.take(37);
        let mut resumed = Plan::new(9, 8, &tokens, first.cursors().to_vec()).unwrap();
        resumed
            .set_mix(vec![0.5, 0.3, 0.2], 4, first.taken().to_vec())
            .unwrap();
        assert_eq!(resumed.take(200), whole.take(200));
    }

    #[test]
    fn a_source_continues_across_sequence_lengths_without_repeating_a_token() {
        // 16 blocks of 8 tokens; windows of 2, then 8 (the block), then 4.
        let mut p = plan(&[1.0], &[129], 2);
        let mut covered = vec![0u32; 129];
        let mut mark = |p: &mut Plan, n: usize| {
            let len = p.seq_len();
            for s in p.take(n) {
                // The L target tokens of the window (its first token is the last one's target).
                for t in s.index + 1..=s.index + len {
                    covered[t as usize] += 1;
                }
            }
        };
        mark(&mut p, 5); // 10 tokens: a whole block and a quarter of the next
        p.set_mix(vec![1.0], 8, vec![0]).unwrap();
        assert_eq!(p.cursors(), [10]);
        mark(&mut p, 3); // skips to the next block boundary (16), then 3 whole blocks
        assert_eq!(p.cursors(), [16 + 24]);
        p.set_mix(vec![1.0], 4, vec![0]).unwrap();
        mark(&mut p, 20); // 80 tokens, aligned
        assert_eq!(p.cursors(), [120]);
        assert!(covered.iter().all(|&c| c <= 1), "a token was trained twice");
        let trained: u32 = covered.iter().sum();
        assert_eq!(trained, 10 + 24 + 80);
    }

    #[test]
    fn a_draw_replays_from_its_state() {
        let mut p = plan(&[0.5, 0.3, 0.2], &[10_000, 7_000, 5_000], 4);
        for _ in 0..3 {
            let state = p.draw_state(37);
            let drawn = p.take(37);
            assert_eq!(Plan::replay(&state).unwrap(), drawn);
        }
        // Across a longer sequence length mid-block and a new mixture.
        p.set_mix(vec![0.0, 1.0, 1.0], 8, vec![0, 0, 0]).unwrap();
        let state = p.draw_state(11);
        assert_eq!(Plan::replay(&state).unwrap(), p.take(11));
        let mut bad = state.clone();
        bad.cursors.pop();
        assert!(matches!(
            Plan::replay(&bad),
            Err(PlanError::Mismatch { .. })
        ));
        let mut bad = state.clone();
        bad.seq_len = 5;
        assert!(matches!(Plan::replay(&bad), Err(PlanError::SeqLen { .. })));
        let mut bad = state;
        bad.count = MAX_DRAW + 1;
        assert!(matches!(Plan::replay(&bad), Err(PlanError::TooMany(_))));
    }

    #[test]
    fn a_new_mixture_keeps_the_cursors() {
        let mut p = plan(&[0.5, 0.5], &[1000, 1000], 4);
        let _ = p.take(10);
        let before = p.cursors().to_vec();
        p.set_mix(vec![0.0, 1.0], 4, vec![0, 0]).unwrap();
        let next = p.take(3);
        assert!(next.iter().all(|s| s.source == 1));
        assert_eq!(p.cursors(), [before[0], before[1] + 12]);
        assert_eq!(p.taken(), [0, 3]);
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
    fn bad_mixtures_are_refused() {
        let mut p = Plan::new(0, 8, &[100, 5], vec![0, 0]).unwrap();
        assert_eq!(
            p.set_mix(vec![0.0, 0.0], 4, vec![0, 0]),
            Err(PlanError::NoWeight)
        );
        assert_eq!(
            p.set_mix(vec![0.5, 0.5], 4, vec![0, 0]),
            Err(PlanError::EmptySource(1))
        );
        assert_eq!(
            p.set_mix(vec![1.0, 0.0], 3, vec![0, 0]),
            Err(PlanError::SeqLen {
                seq_len: 3,
                block: 8
            })
        );
        assert_eq!(
            p.set_mix(vec![1.0], 4, vec![0, 0]),
            Err(PlanError::Mismatch { got: 1, sources: 2 })
        );
    }
}
