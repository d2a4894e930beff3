//! The prose domain: English-like paragraphs from a small grammar (one tense per document,
//! agreement, a recurring character).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::*;

/// Per-document choices that keep a text coherent: one tense and one recurring character.
#[derive(Clone, Copy)]
pub(super) struct Story {
    pub(super) past: bool,
    pub(super) hero: &'static str,
}

pub(super) fn prose_doc(rng: &mut ChaCha8Rng) -> String {
    let (past, hero) = (rng.random_bool(0.5), pick(rng, NAMES));
    let paragraphs = rng.random_range(1..=3);
    assemble(rng, paragraphs, "\n\n", |rng, _| {
        let sentences = rng.random_range(3..=6);
        let text: Vec<String> = (0..sentences)
            .map(|_| Story { past, hero }.sentence(rng))
            .collect();
        text.join(" ")
    })
}

/// Determiner, optional adjective and noun; returns the phrase and whether it is plural.
pub(super) fn noun_phrase(rng: &mut ChaCha8Rng, nouns: &[&str]) -> (String, bool) {
    let is_plural = rng.random_bool(0.3);
    let (dets, noun) = match is_plural {
        true => (PLURAL_DETS, plural(pick(rng, nouns))),
        false => (SINGULAR_DETS, pick(rng, nouns).to_string()),
    };
    let head = format!("{}{noun}", maybe(rng, 0.4, ADJECTIVES));
    let det = match pick(rng, dets) {
        "a" if head.starts_with(['a', 'e', 'i', 'o']) => "an",
        det => det,
    };
    (format!("{det} {head}"), is_plural)
}

impl Story {
    fn verb(self, (base, past): Verb, is_plural: bool) -> String {
        match (self.past, is_plural, base) {
            (true, ..) => past.to_string(),
            (false, true, _) => base.to_string(),
            (false, false, "have") => "has".to_string(),
            _ => suffix_s(base),
        }
    }

    fn clause(self, rng: &mut ChaCha8Rng) -> String {
        let (subject, is_plural) = match rng.random_bool(0.35) {
            true => (self.hero.to_string(), false),
            false => noun_phrase(rng, AGENTS),
        };
        let mut clause = match rng.random_range(0..5) {
            0 | 1 => {
                let verb = self.verb(pick(rng, TRANSITIVE), is_plural);
                format!("{subject} {verb} {}", noun_phrase(rng, THINGS).0)
            }
            2 | 3 => {
                let verb = self.verb(pick(rng, INTRANSITIVE), is_plural);
                format!("{subject} {verb}")
            }
            _ => {
                let be = match (self.past, is_plural) {
                    (false, false) => "is",
                    (false, true) => "are",
                    (true, false) => "was",
                    (true, true) => "were",
                };
                let adjectives = [pick(rng, ADJECTIVES), pick(rng, ADJECTIVES)];
                let both = adjectives[0] != adjectives[1] && rng.random_bool(0.3);
                let adjectives = adjectives[..1 + usize::from(both)].join(" and ");
                return format!("{subject} {be} {adjectives}");
            }
        };
        if rng.random_bool(0.3) {
            clause += &format!(" {}", pick(rng, ADVERBS));
        }
        if rng.random_bool(0.4) {
            let (prep, adjective) = (pick(rng, PREPOSITIONS), maybe(rng, 0.3, ADJECTIVES));
            clause += &format!(" {prep} the {adjective}{}", pick(rng, PLACES));
        }
        clause
    }

    pub(super) fn sentence(self, rng: &mut ChaCha8Rng) -> String {
        match rng.random_range(0..10) {
            0..=3 => capitalize(&format!("{}.", self.clause(rng))),
            4 | 5 => format!("{}, {}.", pick(rng, CONNECTIVES), self.clause(rng)),
            6 | 7 => {
                let (first, second) = (self.clause(rng), self.clause(rng));
                let conj = pick(rng, &["and", "but", "so"]);
                capitalize(&format!("{first}, {conj} {second}."))
            }
            8 => {
                let (first, second) = (self.clause(rng), self.clause(rng));
                format!("{} {first}, {second}.", pick(rng, SUBORDINATORS))
            }
            _ => {
                // Direct speech is in the present tense, whatever the tense of the narration.
                let speech = Story {
                    past: false,
                    ..self
                }
                .clause(rng);
                let said = if self.past { "said" } else { "says" };
                let other = pick(rng, NAMES);
                let speaker = pick(rng, &[self.hero, other]);
                format!("\"{},\" {said} {speaker}.", capitalize(&speech))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::tests::docs;

    #[test]
    fn prose_is_punctuated_and_agrees() {
        for doc in docs(Domain::Prose) {
            for paragraph in doc.split("\n\n") {
                let first = paragraph.trim_start_matches('"').chars().next();
                assert!(first.is_some_and(|c| c.is_ascii_uppercase()), "{paragraph}");
                assert!(paragraph.ends_with('.'), "{paragraph}");
            }
            let words: Vec<&str> = doc.split_whitespace().collect();
            for w in words.windows(2) {
                let article = w[0].to_ascii_lowercase();
                if article == "a" || article == "an" {
                    let vowel = w[1].starts_with(['a', 'e', 'i', 'o']);
                    assert_eq!(article == "an", vowel, "{doc}");
                }
            }
            // "to be" agrees with its subject: a name, or a noun phrase led by its determiner.
            for clause in doc.split([',', '.', '"']) {
                let words: Vec<&str> = clause.split_whitespace().collect();
                for (i, word) in words.iter().enumerate() {
                    let (wrong, reach): (&[&str], usize) = match word.to_ascii_lowercase().as_str()
                    {
                        "a" | "an" | "this" | "that" | "every" | "one" => (&["are", "were"], 3),
                        "two" | "three" | "several" | "many" | "these" | "some" => {
                            (&["is", "was", "has"], 3)
                        }
                        _ if NAMES.contains(word) => (&["are", "were", "have"], 1),
                        _ => continue,
                    };
                    let next = &words[i + 1..words.len().min(i + 1 + reach)];
                    assert!(!next.iter().any(|v| wrong.contains(v)), "{clause}");
                }
            }
        }
    }
}
