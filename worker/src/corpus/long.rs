//! The long domain: stories whose later paragraphs recall the facts of their opening (what a
//! context-extension stage learns).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::prose::{noun_phrase, Story};
use super::*;

pub(super) const LONG_MIN_BYTES: usize = 3000;
pub(super) const LONG_MAX_BYTES: usize = 8000;

/// A member of a long story's cast: the facts its opening states and later paragraphs recall.
#[derive(Clone, Copy)]
struct Character {
    name: &'static str,
    trade: &'static str,
    town: &'static str,
    /// The object they always carry: (adjective, noun).
    item: (&'static str, &'static str),
    animal: &'static str,
    animal_name: &'static str,
}

/// `n` different items of `items`, in random order.
fn pick_distinct<T: Copy + PartialEq>(rng: &mut ChaCha8Rng, items: &[T], n: usize) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    while out.len() < n.min(items.len()) {
        let x = pick(rng, items);
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// "a" or "an", as the next word wants.
fn a(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

pub(super) fn long_doc(rng: &mut ChaCha8Rng) -> String {
    let count = rng.random_range(2..=4);
    let names = pick_distinct(rng, NAMES, count);
    let towns = pick_distinct(rng, TOWNS, count + 1);
    let animal_names = pick_distinct(rng, ANIMAL_NAMES, count);
    let cast: Vec<Character> = (0..count)
        .map(|i| Character {
            name: names[i],
            trade: pick(rng, TRADES),
            town: towns[i],
            item: (pick(rng, ADJECTIVES), pick(rng, THINGS)),
            animal: pick(rng, ANIMALS),
            animal_name: animal_names[i],
        })
        .collect();
    let treasure = format!("{} {}", pick(rng, ADJECTIVES), pick(rng, THINGS));
    let home = towns[count];
    let tale = Tale {
        cast: &cast,
        treasure: &treasure,
        home,
    };

    let mut doc = format!(
        "The {} of {home}\n\nThis is a story about {}.",
        capitalize_words(&treasure),
        list(&names)
    );
    for c in &cast {
        let (adjective, thing) = c.item;
        doc += &format!(
            " {} was {} {} from {} who always carried {} {adjective} {thing}. {}'s {} was called {}.",
            c.name, a(c.trade), c.trade, c.town, a(adjective), c.name, c.animal, c.animal_name
        );
    }
    doc += &format!(
        " Long ago the {treasure} of {home} had been lost, and the {} friends set out to find it.",
        ["two", "three", "four"][count - 2]
    );
    let ending = tale.ending(rng);
    let target = rng.random_range(LONG_MIN_BYTES..=LONG_MAX_BYTES - 1000);
    while doc.len() < target {
        let paragraph = tale.paragraph(rng);
        if doc.len() + paragraph.len() + ending.len() + 4 > LONG_MAX_BYTES {
            break;
        }
        doc += "\n\n";
        doc += &paragraph;
    }
    doc += "\n\n";
    doc += &ending;
    doc
}

/// "Anna", "Anna and Tom", "Anna, Tom and Ben".
fn list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn capitalize_words(s: &str) -> String {
    s.split(' ').map(capitalize).collect::<Vec<_>>().join(" ")
}

/// What the paragraphs of a long story draw on.
struct Tale<'a> {
    cast: &'a [Character],
    treasure: &'a str,
    home: &'static str,
}

impl Tale<'_> {
    /// Four to seven sentences, most of them recalling facts of the opening.
    fn paragraph(&self, rng: &mut ChaCha8Rng) -> String {
        let n = rng.random_range(4..=7);
        let sentences: Vec<String> = (0..n)
            .map(|_| {
                let c = pick(rng, self.cast);
                if rng.random_bool(0.7) {
                    self.recall(rng, c)
                } else {
                    Story {
                        past: true,
                        hero: c.name,
                    }
                    .sentence(rng)
                }
            })
            .collect();
        sentences.join(" ")
    }

    /// A sentence that states again a fact of the opening about `c`.
    fn recall(&self, rng: &mut ChaCha8Rng, c: Character) -> String {
        let (adjective, thing) = c.item;
        let (treasure, home) = (self.treasure, self.home);
        let place = pick(rng, PLACES);
        match rng.random_range(0..10) {
            0 => {
                let (_, verb) = pick(rng, TRANSITIVE);
                let (object, _) = noun_phrase(rng, THINGS);
                format!(
                    "{}, the {} from {}, {verb} {object} {} the {place}.",
                    c.name,
                    c.trade,
                    c.town,
                    pick(rng, PREPOSITIONS)
                )
            }
            1 => format!(
                "{} took out the {adjective} {thing} and looked at it for a long time.",
                c.name
            ),
            2 => {
                let (_, verb) = pick(rng, INTRANSITIVE);
                format!(
                    "{}, {}'s {}, {verb} {}.",
                    c.animal_name,
                    c.name,
                    c.animal,
                    pick(rng, ADVERBS)
                )
            }
            3 => format!(
                "\"I am only {} {} from {},\" said {}.",
                a(c.trade),
                c.trade,
                c.town,
                c.name
            ),
            4 => format!(
                "Nobody had ever seen {} {thing} like the {adjective} {thing} that {} carried.",
                a(thing),
                c.name
            ),
            5 => format!(
                "{} thought of {} and of the {treasure} of {home}.",
                c.name, c.town
            ),
            6 => {
                let other = pick(rng, self.cast);
                if other.name == c.name {
                    format!(
                        "{} and {} the {} walked on toward {home}.",
                        c.name, c.animal_name, c.animal
                    )
                } else {
                    format!(
                        "{} met {} near the {place}, and was glad to see the {} from {} again.",
                        c.name, other.name, other.trade, other.town
                    )
                }
            }
            7 => format!(
                "\"Where is {}?\" asked {}. The {} was waiting {} the {place}.",
                c.animal_name,
                c.name,
                c.animal,
                pick(rng, PREPOSITIONS)
            ),
            8 => format!(
                "Everyone in {} knew that {} the {} never lost the {adjective} {thing}.",
                c.town, c.name, c.trade
            ),
            _ => format!(
                "{} asked about the {treasure} of {home} {} the {place}.",
                c.name,
                pick(rng, PREPOSITIONS)
            ),
        }
    }

    /// Where the treasure was, and everyone going home with what they carried.
    fn ending(&self, rng: &mut ChaCha8Rng) -> String {
        let mut text = format!(
            "In the end, the {} of {} was found {} the {}.",
            self.treasure,
            self.home,
            pick(rng, PREPOSITIONS),
            pick(rng, PLACES)
        );
        for c in self.cast {
            let (adjective, thing) = c.item;
            text += &format!(
                " {} the {} went back to {} with {} and the {adjective} {thing}.",
                c.name, c.trade, c.town, c.animal_name
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::tests::docs;

    #[test]
    fn long_stories_recall_their_opening_far_into_the_text() {
        let docs = docs(Domain::Long);
        let mean = docs.iter().map(String::len).sum::<usize>() / docs.len();
        assert!((4000..=7000).contains(&mean), "mean length {mean}");
        for doc in &docs {
            // The opening is the title and the paragraph that introduces the cast.
            let opening_end = doc
                .match_indices("\n\n")
                .nth(1)
                .map_or(doc.len(), |(i, _)| i);
            let (opening, rest) = doc.split_at(opening_end);
            let facts: Vec<&str> = opening
                .split(". ")
                .filter_map(|sentence| sentence.split(" was called ").nth(1))
                .map(|name| name.trim_end_matches('.'))
                .collect();
            assert!((2..=4).contains(&facts.len()), "{opening}");
            // Each animal's name, stated once at the start, comes back in the story's last
            // 1,000 bytes, over 512 (byte) tokens after it was stated.
            assert!(doc.len() - 1000 >= opening_end + 512, "{doc}");
            let tail = &doc[doc.len() - 1000..];
            for name in &facts {
                assert!(
                    tail.contains(name),
                    "{name} not recalled at the end of\n{doc}"
                );
            }
            // Every character's trade and town are recalled in the body too.
            let intro = opening.split("This is a story about ").nth(1).unwrap();
            for sentence in intro
                .split(". ")
                .filter(|s| s.contains(" who always carried "))
            {
                let words: Vec<&str> = sentence.split_whitespace().collect();
                let (name, trade, town) = (words[0], words[3], words[5]);
                assert!(
                    rest.contains(&format!("{name} the {trade} went back to {town}")),
                    "{sentence}\n{doc}"
                );
            }
        }
    }
}
