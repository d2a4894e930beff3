//! A seeded generator of a small synthetic multi-domain text corpus.
//!
//! Four domains with clearly different statistics, so that a tiny byte-level model learns
//! something within a few hundred steps and per-domain validation loss means something:
//!
//! * [`Domain::Prose`]: English-like paragraphs from a small grammar (subject-verb agreement, one
//!   tense per document, "a"/"an", capitalisation, punctuation, a recurring character).
//! * [`Domain::Math`]: grade-school word problems with worked solutions. Every worked line
//!   `A op B = C` is arithmetically correct, and each problem ends in `Answer: N`, the result of
//!   its last worked line.
//! * [`Domain::Code`]: small Python functions and classes, indented by 4 spaces.
//! * [`Domain::Long`]: long stories (3,000 to 8,000 bytes) whose opening paragraph introduces a
//!   cast (each character's trade, home town, the object they carry, their animal's name) and a
//!   lost treasure, and whose every later paragraph refers back to those facts. The facts are
//!   drawn afresh for each story, so predicting them far into a story takes a context that
//!   reaches back to its opening: what a context-extension stage is for.
//!
//! Everything is synthetic, built from the word lists and templates below with a ChaCha8 RNG;
//! nothing is downloaded. Documents are ASCII, 200 to 1500 bytes long (the long domain's
//! excepted), and depend only on `(domain, seed)`. Real data goes through the `tokenize` command
//! instead.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use words::*;

use code::code_doc;
use long::{long_doc, LONG_MAX_BYTES, LONG_MIN_BYTES};
use math::math_doc;
use prose::prose_doc;

mod code;
mod long;
mod math;
mod prose;
#[rustfmt::skip] // Word lists laid out by hand.
mod words;

/// A kind of document, with its own generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    Prose,
    Math,
    Code,
    Long,
}

impl Domain {
    pub const ALL: [Domain; 4] = [Domain::Prose, Domain::Math, Domain::Code, Domain::Long];

    pub fn name(self) -> &'static str {
        match self {
            Domain::Prose => "prose",
            Domain::Math => "math",
            Domain::Code => "code",
            Domain::Long => "long",
        }
    }

    /// The shortest and longest document of the domain, in bytes.
    pub fn bytes(self) -> std::ops::RangeInclusive<usize> {
        match self {
            Domain::Long => LONG_MIN_BYTES..=LONG_MAX_BYTES,
            _ => MIN_BYTES..=MAX_BYTES,
        }
    }

    /// The domain called `s` (case-insensitive), if any.
    pub fn from_name(s: &str) -> Option<Domain> {
        Domain::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
    }
}

/// `n_docs` documents of the domain, deterministic in (domain, seed): the same arguments give
/// byte-identical output, and fewer documents are a prefix of more.
pub fn generate(domain: Domain, seed: u64, n_docs: usize) -> Vec<String> {
    let salt = (domain as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    let doc = match domain {
        Domain::Prose => prose_doc,
        Domain::Math => math_doc,
        Domain::Code => code_doc,
        Domain::Long => long_doc,
    };
    (0..n_docs).map(|_| doc(&mut rng)).collect()
}

const MIN_BYTES: usize = 200;
const MAX_BYTES: usize = 1500;

/// Joins at least `count` parts with `sep`, going on until the document has `MIN_BYTES` and
/// stopping before it would pass `MAX_BYTES`. Every part is well under 1000 bytes, so a
/// document never stops short of `MIN_BYTES`.
fn assemble(
    rng: &mut ChaCha8Rng,
    count: usize,
    sep: &str,
    mut part: impl FnMut(&mut ChaCha8Rng, usize) -> String,
) -> String {
    let mut doc = String::new();
    let mut n = 0;
    while (n < count || doc.len() < MIN_BYTES) && push_within(&mut doc, sep, &part(rng, n)) {
        n += 1;
    }
    doc
}

/// Appends `sep` (unless `doc` is empty) and `part` if the result stays within `MAX_BYTES`.
fn push_within(doc: &mut String, sep: &str, part: &str) -> bool {
    let sep = if doc.is_empty() { "" } else { sep };
    let fits = doc.len() + sep.len() + part.len() <= MAX_BYTES;
    if fits {
        doc.push_str(sep);
        doc.push_str(part);
    }
    fits
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A word from `words` and a space, with probability `p`; otherwise nothing.
fn maybe(rng: &mut ChaCha8Rng, p: f64, words: &[&str]) -> String {
    if rng.random_bool(p) {
        format!("{} ", pick(rng, words))
    } else {
        String::new()
    }
}

fn capitalize(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    out
}

fn plural(noun: &str) -> String {
    if let Some((_, irregular)) = IRREGULAR_PLURALS.iter().find(|(one, _)| *one == noun) {
        return irregular.to_string();
    }
    match noun.strip_suffix("man") {
        Some(stem) => format!("{stem}men"),
        None => suffix_s(noun),
    }
}

/// The regular plural of a noun, or the third person singular of a verb.
fn suffix_s(word: &str) -> String {
    let consonant_y = word
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'i', 'o', 'u']));
    if let Some(stem) = consonant_y {
        format!("{stem}ies")
    } else if word.ends_with(['s', 'x', 'z', 'o']) || word.ends_with("ch") || word.ends_with("sh") {
        format!("{word}es")
    } else {
        format!("{word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// 60 documents from each of a few seeds.
    pub(super) fn docs(domain: Domain) -> Vec<String> {
        [0, 1, 42, 0xDEAD_BEEF]
            .iter()
            .flat_map(|&seed| generate(domain, seed, 60))
            .collect()
    }
    #[test]
    fn names_round_trip() {
        for d in Domain::ALL {
            assert_eq!(Domain::from_name(d.name()), Some(d));
        }
        assert_eq!(Domain::from_name("MATH"), Some(Domain::Math));
        assert_eq!(Domain::from_name("poetry"), None);
    }

    #[test]
    fn deterministic_in_domain_and_seed() {
        for d in Domain::ALL {
            let docs = generate(d, 7, 20);
            assert_eq!(docs, generate(d, 7, 20));
            assert_eq!(docs[..5], generate(d, 7, 5)[..]);
            assert_ne!(docs, generate(d, 8, 20));
        }
        assert_eq!(generate(Domain::Code, 7, 0), Vec::<String>::new());
    }

    #[test]
    fn documents_are_distinct_sized_ascii_and_recognisably_of_their_domain() {
        for d in Domain::ALL {
            let docs = docs(d);
            let distinct: HashSet<&String> = docs.iter().collect();
            assert!(
                distinct.len() * 100 >= docs.len() * 99,
                "{} documents repeat",
                d.name()
            );
            for doc in &docs {
                assert!(doc.is_ascii() && d.bytes().contains(&doc.len()), "{doc}");
                let story = doc.contains("\n\nThis is a story about ");
                let looks_like = match (story, doc.contains("\nAnswer: "), doc.contains("def ")) {
                    (true, ..) => Domain::Long,
                    (false, true, _) => Domain::Math,
                    (false, false, true) => Domain::Code,
                    (false, false, false) => Domain::Prose,
                };
                assert_eq!(looks_like, d, "{doc}");
            }
        }
    }
}
