//! Fault injection for tests, switched on only by explicit `join` options (grouped under
//! "Fault injection (for tests)" in `stagecoach-worker join --help`): poisoned samples that make
//! the loss jump for real, a crash at a given step, heartbeats that stop.
//!
//! None of it is active unless asked for; a worker started without these options behaves as if
//! this module did not exist.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The faults a worker was asked to inject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Training samples whose tokens are replaced by noise.
    pub poison: Vec<Poison>,
    /// Abort the process (as a crash would) when about to train this step.
    pub kill_at_step: Option<u64>,
    /// Stop sending heartbeats when about to train this step; the process stays alive.
    pub stop_heartbeats_at_step: Option<u64>,
}

/// Every training sample of source `source` whose token offset lies in `offsets` has its tokens
/// replaced by uniformly random tokens (written `SOURCE:FROM..TO`, `TO` excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub source: usize,
    pub offsets: Range<u64>,
}

/// The seed of the noise: fixed, so that a poisoned sample reads the same wherever and whenever
/// it is read (a rerun, another rank, after a rollback).
const NOISE_SEED: u64 = 0x005e_ed0f_da7a;

impl Poison {
    /// Whether the training sample at `offset` of `source` is poisoned.
    pub fn covers(&self, source: usize, offset: u64) -> bool {
        self.source == source && self.offsets.contains(&offset)
    }
}

/// Replaces `window` (the tokens of the sample at `offset` of `source`) with uniformly random
/// tokens below `vocab_size`, the same ones every time for the same sample. Text the model has
/// learnt to predict becomes noise it cannot, so the loss jumps and the gradient grows.
pub fn noise(source: usize, offset: u64, vocab_size: i64, window: &mut [i64]) {
    let seed = NOISE_SEED ^ (source as u64).rotate_left(48) ^ offset;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for t in window {
        *t = rng.random_range(0..vocab_size.max(1));
    }
}

impl FromStr for Poison {
    type Err = String;

    fn from_str(s: &str) -> Result<Poison, String> {
        let usage = || {
            format!("{s:?}: expected SOURCE:FROM..TO (a source index and a half-open range of token offsets, e.g. 0:4096..8192)")
        };
        let (source, range) = s.split_once(':').ok_or_else(usage)?;
        let (from, to) = range.split_once("..").ok_or_else(usage)?;
        let number = |what: &str, v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("{}: {what} {v:?}: {e}", usage()))
        };
        let source = number("source index", source)?;
        let (from, to) = (number("FROM", from)?, number("TO", to)?);
        if from >= to {
            return Err(format!("{}: FROM must be below TO", usage()));
        }
        Ok(Poison {
            source: usize::try_from(source).map_err(|e| format!("{}: {e}", usage()))?,
            offsets: from..to,
        })
    }
}

impl fmt::Display for Poison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}..{}",
            self.source, self.offsets.start, self.offsets.end
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_ranges_parse_and_are_half_open() {
        let p: Poison = "1:100..200".parse().unwrap();
        assert_eq!(
            p,
            Poison {
                source: 1,
                offsets: 100..200
            }
        );
        assert_eq!(p.to_string(), "1:100..200");
        assert!(p.covers(1, 100) && p.covers(1, 199));
        assert!(!p.covers(1, 99) && !p.covers(1, 200) && !p.covers(0, 150));
        for bad in [
            "1:200..100",
            "1:5..5",
            "x:1..2",
            "1:1-2",
            "12",
            "1:..4",
            "-1:0..4",
        ] {
            let err = bad.parse::<Poison>().unwrap_err();
            assert!(err.contains("SOURCE:FROM..TO"), "{bad}: {err}");
        }
    }

    #[test]
    fn noise_is_fixed_per_sample_and_within_the_vocabulary() {
        let (mut a, mut b, mut c) = ([0i64; 64], [0i64; 64], [0i64; 64]);
        noise(0, 32, 264, &mut a);
        noise(0, 32, 264, &mut b);
        noise(0, 33, 264, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().chain(&c).all(|&t| (0..264).contains(&t)));
        // Spread over the vocabulary, not a constant.
        let distinct: std::collections::BTreeSet<i64> = a.iter().copied().collect();
        assert!(distinct.len() > 30, "{distinct:?}");
    }
}
