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

// --- Prose ---------------------------------------------------------------------------------------

/// Per-document choices that keep a text coherent: one tense and one recurring character.
#[derive(Clone, Copy)]
struct Story {
    past: bool,
    hero: &'static str,
}

fn prose_doc(rng: &mut ChaCha8Rng) -> String {
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
fn noun_phrase(rng: &mut ChaCha8Rng, nouns: &[&str]) -> (String, bool) {
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

    fn sentence(self, rng: &mut ChaCha8Rng) -> String {
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

// --- Math ----------------------------------------------------------------------------------------

/// Works out `a op b`; returns the worked line `"a op b = c"` and `c`.
fn eq(a: i64, op: char, b: i64) -> (String, i64) {
    let c = match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        _ => {
            debug_assert_eq!(a % b, 0, "divisions are exact by construction");
            a / b
        }
    };
    (format!("{a} {op} {b} = {c}"), c)
}

fn math_doc(rng: &mut ChaCha8Rng) -> String {
    let count = rng.random_range(2..=5);
    assemble(rng, count, "\n\n", |rng, i| problem(rng, i + 1))
}

/// Problem `number`: the question, a hint, the worked lines and `Answer: N`, where N is the
/// result of the last worked line.
#[rustfmt::skip] // One template per arm; rustfmt would scatter the long strings.
fn problem(rng: &mut ChaCha8Rng, number: usize) -> String {
    let name = pick(rng, NAMES);
    let mut friend = pick(rng, NAMES);
    while friend == name {
        friend = pick(rng, NAMES);
    }
    let items = plural(pick(rng, ITEMS));
    let box_ = pick(rng, CONTAINERS);
    let boxes = plural(box_);
    let (question, hint, work) = match rng.random_range(0..9) {
        0 => {
            let (a, b) = (rng.random_range(5..90), rng.random_range(3..60));
            (format!("{name} has {a} {items}. {friend} gives {name} {b} more. \
                      How many {items} does {name} have now?"),
             format!("Add the new {items} to the ones {name} already had."), vec![eq(a, '+', b)])
        }
        1 => {
            let a = rng.random_range(20..100);
            let b = rng.random_range(1..a);
            (format!("{name} had {a} {items} and gave {b} of them to {friend}. \
                      How many {items} does {name} have left?"),
             format!("Take away the {items} that were given away."), vec![eq(a, '-', b)])
        }
        2 => {
            let (a, b) = (rng.random_range(2..13), rng.random_range(2..13));
            (format!("There are {a} {boxes} with {b} {items} in each {box_}. \
                      How many {items} are there altogether?"),
             format!("Multiply the number of {boxes} by the {items} in each."), vec![eq(a, '*', b)])
        }
        3 => {
            let (b, c) = (rng.random_range(2..10), rng.random_range(2..13));
            (format!("{name} shares {} {items} equally among {b} friends. \
                      How many {items} does each friend get?", b * c),
             format!("Split the {items} into {b} equal groups."), vec![eq(b * c, '/', b)])
        }
        4 => {
            let (p, k) = (rng.random_range(2..9), rng.random_range(3..13));
            let g = rng.random_range(1..p * k);
            let (line, total) = eq(p, '*', k);
            (format!("{name} buys {p} {boxes} of {items} with {k} in each {box_}, then gives {g} \
                      {items} to {friend}. How many {items} does {name} have now?"),
             format!("Find how many {items} {name} bought, then take away the ones given away."),
             vec![(line, total), eq(total, '-', g)])
        }
        5 => {
            let (price, n) = (rng.random_range(2..16), rng.random_range(2..7));
            let bill = if price * n <= 50 { 50 } else { 100 };
            let (line, cost) = eq(price, '*', n);
            (format!("A ticket costs {price} dollars. {name} buys {n} tickets and pays with {bill} \
                      dollars. How much change does {name} get?"),
             "Find the total cost, then subtract it from the money paid.".into(),
             vec![(line, cost), eq(bill, '-', cost)])
        }
        6 => {
            let base = 20 * rng.random_range(2..=25);
            let pct = pick(rng, &[5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90]);
            let (place, noun, what) = pick(rng, GROUPS);
            let (line, scaled) = eq(base, '*', pct);
            (format!("{place} has {base} {noun}. {pct}% of them {what}. How many {noun} {what}?"),
             format!("{pct}% means {pct} out of every hundred."),
             vec![(line, scaled), eq(scaled, '/', 100)])
        }
        7 => {
            let (x, a) = (rng.random_range(1..=20), rng.random_range(2..=9));
            let plus = rng.random_bool(0.5);
            let b = if plus { rng.random_range(1..=40) } else { rng.random_range(1..a * x) };
            let (c, op, undo, verb, to) = if plus { (a * x + b, '+', '-', "Subtract", "from") }
                                          else { (a * x - b, '-', '+', "Add", "to") };
            let (line, d) = eq(c, undo, b);
            let (x_line, x) = eq(d, '/', a);
            (format!("Solve {a}x {op} {b} = {c}."),
             format!("{verb} {b} {to} both sides, then divide both sides by {a}."),
             vec![(format!("{line}, so {a}x = {d}."), d), (format!("{x_line}, so x = {x}."), x)])
        }
        _ => {
            let mean = rng.random_range(50..=80);
            let a = rng.random_range(mean - 10..=mean + 5);
            let b = rng.random_range(mean - 10..=mean);
            let c = 3 * mean - a - b;
            let (l1, s1) = eq(a, '+', b);
            let (l2, s2) = eq(s1, '+', c);
            (format!("{name} scored {a}, {b} and {c} points in three games. \
                      What is the average score?"),
             "Add the scores, then divide by the number of games.".into(),
             vec![(l1, s1), (l2, s2), eq(s2, '/', 3)])
        }
    };
    let answer = work.last().map_or(0, |(_, value)| *value);
    let lines: Vec<String> = work.into_iter().map(|(line, _)| line).collect();
    let lines = lines.join("\n");
    format!("Problem {number}: {question}\nSolution:\n{hint}\n{lines}\nAnswer: {answer}")
}

// --- Code ----------------------------------------------------------------------------------------

/// A function template: whether its values are numbers, whether it takes just one list (so the
/// usage block can call it), and the text. Placeholders: `{s}`/`{pl}` a noun and its plural,
/// `{k}` a digit, `{n}` < `{big}` two thresholds.
type Template = (bool, bool, &'static str);

#[rustfmt::skip] // rustfmt would split every entry over five lines.
const FUNCTIONS: &[Template] = &[
    (true, true, r#"def total_{pl}({pl}):
    """Return the sum of all {pl}."""
    total = 0
    for {s} in {pl}:
        total += {s}
    return total
"#),
    (true, true, r#"def count_large_{pl}({pl}, limit={n}):
    count = 0
    for {s} in {pl}:
        if {s} > limit:
            count += 1
    return count
"#),
    (true, true, r#"def largest_{s}({pl}):
    """Return the largest {s}, or None if there are no {pl}."""
    if not {pl}:
        return None
    best = {pl}[0]
    for {s} in {pl}[1:]:
        if {s} > best:
            best = {s}
    return best
"#),
    (true, false, r#"def scale_{s}({s}, factor={k}):
    # Multiply first, then add the fixed offset.
    return {s} * factor + {n}
"#),
    (true, false, r#"def classify_{s}({s}):
    if {s} < {n}:
        return "low"
    elif {s} < {big}:
        return "medium"
    else:
        return "high"
"#),
    (true, true, r#"def even_{pl}_times_{k}({pl}):
    return [{s} * {k} for {s} in {pl} if {s} % 2 == 0]
"#),
    (true, false, r#"def digits_in_{s}({s}, base={k}):
    digits = 1
    while {s} >= base:
        {s} //= base
        digits += 1
    return digits
"#),
    (false, true, r#"def longest_{s}({pl}, min_length={k}):
    longest = ""
    for {s} in {pl}:
        if len({s}) >= min_length and len({s}) > len(longest):
            longest = {s}
    return longest
"#),
    (false, true, r#"def join_{pl}({pl}, sep=", "):
    """Join the first {k} {pl} into one string."""
    return sep.join(str({s}) for {s} in {pl}[:{k}])
"#),
    (false, true, r#"def most_common_{pl}({pl}, top={k}):
    counts = {}
    for {s} in {pl}:
        counts[{s}] = counts.get({s}, 0) + 1
    return sorted(counts, key=lambda {s}: -counts[{s}])[:top]
"#),
];

const CLASS_HEAD: &str = r#"class {Cls}:
    """Keep track of the {pl} of one {owner}."""

    def __init__(self, name, limit={n}):
        self.name = name
        self.limit = limit
        self.{pl} = []

    def add(self, {s}):
        if len(self.{pl}) >= self.limit:
            return False
        self.{pl}.append({s})
        return True
"#;

/// Optional methods, each with whether it needs numeric values.
#[rustfmt::skip] // As for FUNCTIONS.
const METHODS: &[(bool, &str)] = &[
    (false, "    def count(self):\n        return len(self.{pl})\n"),
    (false, r#"    def clear(self):
        # Forget everything collected so far.
        self.{pl} = []
"#),
    (false, r#"    def latest(self):
        if not self.{pl}:
            return None
        return self.{pl}[-1]
"#),
    (false, r#"    def __repr__(self):
        return "{Cls}(" + repr(self.name) + ")"
"#),
    (true, "    def total(self):\n        return sum(self.{pl})\n"),
    (true, "    def largest(self):\n        return max(self.{pl}) if self.{pl} else None\n"),
];

fn code_doc(rng: &mut ChaCha8Rng) -> String {
    let count = rng.random_range(1..=4);
    let mut last_call = None;
    let mut doc = assemble(rng, count, "\n\n", |rng, _| {
        let (text, call) = definition(rng);
        last_call = call.or(last_call.take());
        text
    });
    // Sometimes call the last one-list function, if it made it into the document.
    if let Some((name, numeric)) = last_call {
        if doc.contains(&format!("def {name}(")) && rng.random_bool(0.5) {
            let data: Vec<String> = (0..rng.random_range(3..=6))
                .map(|_| match numeric {
                    true => rng.random_range(1..100).to_string(),
                    false => format!("\"{}\"", pick(rng, WORDS)),
                })
                .collect();
            let data = data.join(", ");
            let main = format!("if __name__ == \"__main__\":\n    print({name}([{data}]))\n");
            push_within(&mut doc, "\n\n", &main);
        }
    }
    doc
}

/// One top-level definition (a function or a class), and the name of the function if it takes
/// one list, with whether that list holds numbers.
fn definition(rng: &mut ChaCha8Rng) -> (String, Option<(String, bool)>) {
    let template = rng.random_bool(0.75).then(|| pick(rng, FUNCTIONS));
    let numeric = template.map_or_else(|| rng.random_bool(0.5), |(numeric, ..)| numeric);
    let s = pick(rng, if numeric { NUMERIC_NOUNS } else { TEXT_NOUNS });
    let (k, n) = (rng.random_range(2..=9), rng.random_range(10..=50));
    let big = n + rng.random_range(10..=50);
    let class = format!("{}{}", capitalize(s), pick(rng, KINDS));
    let (pl, k, n, big) = (plural(s), k.to_string(), n.to_string(), big.to_string());
    let owner = pick(rng, OWNERS);
    let vars: [(&str, &str); 7] = [
        ("{s}", s),
        ("{pl}", &pl),
        ("{k}", &k),
        ("{n}", &n),
        ("{big}", &big),
        ("{Cls}", &class),
        ("{owner}", owner),
    ];
    let fill = |text: &str| {
        vars.iter()
            .fold(text.to_string(), |t, (key, value)| t.replace(key, value))
    };
    let mut text = match rng.random_bool(0.25) {
        true => format!("{}\n", pick(rng, COMMENTS)),
        false => String::new(),
    };
    let Some((_, takes_list, body)) = template else {
        text.push_str(&fill(CLASS_HEAD));
        for &(needs_numbers, method) in METHODS {
            if (numeric || !needs_numbers) && rng.random_bool(0.4) {
                text.push('\n');
                text.push_str(&fill(method));
            }
        }
        return (text, None);
    };
    text.push_str(&fill(body));
    // The function's name is the word between "def " and "(".
    let name = body.split([' ', '(']).nth(1).unwrap_or_default();
    (text, takes_list.then(|| (fill(name), numeric)))
}

// --- Long ----------------------------------------------------------------------------------------

const LONG_MIN_BYTES: usize = 3000;
const LONG_MAX_BYTES: usize = 8000;

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

fn long_doc(rng: &mut ChaCha8Rng) -> String {
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

/// Word lists, laid out by hand (rustfmt would put one word per line).
#[rustfmt::skip]
mod words {
    pub const NAMES: &[&str] = &[
        "Anna", "Tom", "Maria", "Ben", "Clara", "Hugo", "Lena", "Omar", "Iris", "Felix", "Nora",
        "Paul", "Rosa", "Sam", "Vera", "Jonas", "Mira", "Leo", "Ada", "Eli", "Greta", "Ivan",
        "Julia", "Karl", "Lucy", "Max", "Nina", "Oscar", "Ruth", "Theo",
    ];
    pub const AGENTS: &[&str] = &[
        "farmer", "teacher", "child", "merchant", "sailor", "doctor", "painter", "soldier",
        "baker", "traveler", "king", "queen", "student", "scholar", "fisherman", "woman", "man",
        "guard", "poet", "miner", "hunter", "nurse", "judge", "tailor", "monk", "shepherd",
        "singer", "pilot", "clerk", "neighbor", "fox", "dog", "horse", "owl", "cat", "wolf",
        "goose", "mouse", "sheep", "donkey",
    ];
    pub const THINGS: &[&str] = &[
        "book", "letter", "bridge", "garden", "lamp", "loaf", "map", "key", "song", "story",
        "boat", "box", "basket", "coat", "window", "door", "wall", "fence", "ladder", "candle",
        "clock", "bell", "cup", "bottle", "rope", "hat", "ring", "coin", "stone", "tree",
        "flower", "road", "wagon", "barrel", "chair", "table", "bench", "blanket", "mirror",
        "painting", "drum", "flute", "kettle", "knife", "spoon", "bowl", "shoe", "glove", "shirt",
        "scarf", "feather", "shell", "leaf", "branch", "apple", "pear", "cherry", "potato",
        "cake", "pie", "fire", "roof", "gate", "path", "nest", "seed", "jar", "brush", "pen",
        "note", "parcel", "ticket", "compass", "lantern", "anchor", "sail", "net", "shelf",
    ];
    pub const IRREGULAR_PLURALS: &[(&str, &str)] = &[
        ("child", "children"), ("goose", "geese"), ("mouse", "mice"), ("sheep", "sheep"),
        ("wolf", "wolves"), ("knife", "knives"), ("leaf", "leaves"), ("loaf", "loaves"),
        ("shelf", "shelves"),
    ];
    pub const ADJECTIVES: &[&str] = &[
        "old", "young", "small", "large", "quiet", "bright", "dark", "green", "red", "blue",
        "golden", "silver", "heavy", "light", "ancient", "careful", "gentle", "brave", "tired",
        "happy", "sad", "clever", "strange", "narrow", "wide", "warm", "cold", "wet", "dry",
        "empty", "broken", "hidden", "famous", "humble", "proud", "patient", "wooden", "round",
        "tall", "soft", "rough", "sweet", "bitter", "lonely", "busy", "lazy", "curious", "silent",
        "noisy", "distant", "simple", "fresh", "faded", "shiny", "dusty", "crooked", "elegant",
        "ordinary", "eager", "anxious", "sleepy", "wild", "rusty",
    ];
    /// (base, past) pairs.
    pub type Verb = (&'static str, &'static str);
    pub const TRANSITIVE: &[Verb] = &[
        ("find", "found"), ("carry", "carried"), ("watch", "watched"), ("build", "built"),
        ("paint", "painted"), ("follow", "followed"), ("visit", "visited"), ("open", "opened"),
        ("remember", "remembered"), ("repair", "repaired"), ("sell", "sold"), ("buy", "bought"),
        ("read", "read"), ("write", "wrote"), ("bring", "brought"), ("hide", "hid"),
        ("lose", "lost"), ("keep", "kept"), ("clean", "cleaned"), ("move", "moved"),
        ("lift", "lifted"), ("count", "counted"), ("draw", "drew"), ("mend", "mended"),
        ("wash", "washed"), ("fix", "fixed"), ("catch", "caught"), ("throw", "threw"),
        ("borrow", "borrowed"), ("share", "shared"), ("guard", "guarded"), ("study", "studied"),
        ("admire", "admired"), ("forget", "forgot"), ("notice", "noticed"), ("pack", "packed"),
        ("push", "pushed"), ("pull", "pulled"), ("touch", "touched"), ("examine", "examined"),
        ("have", "had"),
    ];
    pub const INTRANSITIVE: &[Verb] = &[
        ("sleep", "slept"), ("laugh", "laughed"), ("wait", "waited"), ("sing", "sang"),
        ("run", "ran"), ("rest", "rested"), ("wander", "wandered"), ("smile", "smiled"),
        ("listen", "listened"), ("work", "worked"), ("travel", "traveled"), ("hurry", "hurried"),
        ("arrive", "arrived"), ("stay", "stayed"), ("dance", "danced"), ("whisper", "whispered"),
        ("shout", "shouted"), ("pray", "prayed"), ("swim", "swam"), ("climb", "climbed"),
        ("sit", "sat"), ("go", "went"), ("return", "returned"), ("dream", "dreamed"),
        ("cry", "cried"),
    ];
    pub const ADVERBS: &[&str] = &[
        "quietly", "slowly", "quickly", "carefully", "happily", "gently", "proudly", "nervously",
        "patiently", "eagerly", "silently", "loudly", "calmly", "boldly", "sadly", "again",
        "together", "all day", "every evening",
    ];
    pub const PREPOSITIONS: &[&str] = &[
        "in", "near", "behind", "beside", "across", "under", "above", "along", "outside",
        "inside", "beyond",
    ];
    pub const PLACES: &[&str] = &[
        "village", "market", "harbor", "forest", "valley", "castle", "church", "mill", "square",
        "kitchen", "library", "school", "meadow", "hill", "station", "cottage", "inn", "orchard",
        "bakery", "workshop", "lake", "shore", "island", "city", "farm", "barn", "cave",
        "tavern", "mountain", "river",
    ];
    pub const CONNECTIVES: &[&str] = &[
        "However", "Meanwhile", "Later", "At first", "In the end", "After that", "Soon", "Then",
        "Every morning", "That evening", "For a while", "Because of this", "Once", "Still",
        "Of course",
    ];
    pub const SUBORDINATORS: &[&str] = &[
        "When", "Because", "While", "Although", "Before", "After", "As soon as", "Since",
    ];
    pub const SINGULAR_DETS: &[&str] = &["the", "the", "a", "this", "that", "every", "one"];
    pub const PLURAL_DETS: &[&str] = &["the", "some", "many", "these", "two", "three", "several"];

    pub const ITEMS: &[&str] = &[
        "apple", "pencil", "marble", "sticker", "book", "cookie", "coin", "card", "stamp",
        "shell", "egg", "orange", "balloon", "flower", "toy car", "button", "candle", "ribbon",
    ];
    pub const CONTAINERS: &[&str] = &["box", "bag", "basket", "jar", "crate", "tray", "pack"];
    /// (place, counted noun, what some percentage of them do).
    pub const GROUPS: &[(&str, &str, &str)] = &[
        ("A school", "students", "walk to school"), ("A farm", "animals", "are sheep"),
        ("A library", "books", "are novels"), ("A bakery", "rolls", "are sold before noon"),
        ("A town", "houses", "have a garden"), ("A shop", "shirts", "are blue"),
    ];

    /// Nouns whose values are numbers, and nouns whose values are strings.
    pub const NUMERIC_NOUNS: &[&str] = &[
        "score", "price", "value", "weight", "reading", "sample", "payment", "point", "amount",
        "distance", "duration", "height", "age", "salary", "temperature", "fee",
    ];
    pub const TEXT_NOUNS: &[&str] = &[
        "word", "tag", "label", "title", "city", "color", "token", "email", "path", "line",
    ];
    pub const WORDS: &[&str] = &[
        "red", "green", "blue", "apple", "river", "stone", "cloud", "tiger", "paper", "lemon",
    ];
    pub const KINDS: &[&str] = &["Tracker", "Store", "Log", "Buffer", "Ledger", "Collection"];
    pub const OWNERS: &[&str] = &["team", "user", "project", "shop", "sensor", "account"];
    /// Trades, home towns and animals of the long stories' casts.
    pub const TRADES: &[&str] = &[
        "farmer", "teacher", "merchant", "sailor", "doctor", "painter", "soldier", "baker",
        "scholar", "fisherman", "guard", "poet", "miner", "hunter", "nurse", "judge", "tailor",
        "shepherd", "singer", "pilot", "clerk", "carpenter", "weaver", "potter", "smith",
        "gardener", "cook", "builder", "astronomer", "mapmaker",
    ];
    pub const TOWNS: &[&str] = &[
        "Greyhollow", "Eastmoor", "Millbrook", "Stonebridge", "Ashford", "Redwater", "Oakridge",
        "Saltmarsh", "Windmere", "Brackenfield", "Coldharbor", "Dunmore", "Elmstead", "Fairhaven",
        "Glenrock", "Highcliff", "Ironwood", "Kettleby", "Larkspur", "Mossbank", "Northwick",
        "Pinecrest", "Ravensgate", "Silverton", "Thornbury", "Westfold",
    ];
    pub const ANIMALS: &[&str] = &[
        "dog", "cat", "horse", "owl", "goose", "donkey", "goat", "parrot", "raven", "pony",
    ];
    pub const ANIMAL_NAMES: &[&str] = &[
        "Pepper", "Mist", "Biscuit", "Clover", "Ember", "Juniper", "Pebble", "Rusty", "Sage",
        "Thistle", "Willow", "Bramble", "Copper", "Dusk", "Fennel", "Hazel", "Maple", "Nutmeg",
        "Olive", "Puddle", "Quill", "Sorrel", "Tansy", "Wren",
    ];
    pub const COMMENTS: &[&str] = &[
        "# Helper used by the report code.", "# Keep this simple; the lists are small.",
        "# Inputs are assumed to be valid.", "# See the tests for examples.",
        "# This runs once per request.",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// 60 documents from each of a few seeds.
    fn docs(domain: Domain) -> Vec<String> {
        [0, 1, 42, 0xDEAD_BEEF]
            .iter()
            .flat_map(|&seed| generate(domain, seed, 60))
            .collect()
    }

    /// Checks every `a op b = c` in `line` (words may end in `.` or `,`); returns the results.
    fn worked_results(line: &str) -> Result<Vec<i64>, String> {
        let words: Vec<&str> = line
            .split_whitespace()
            .map(|w| w.trim_end_matches(['.', ',']))
            .collect();
        let mut results = Vec::new();
        for w in words.windows(5).filter(|w| w[3] == "=") {
            let [Ok(a), Ok(b), Ok(c)] = [w[0], w[2], w[4]].map(str::parse::<i64>) else {
                continue;
            };
            let correct = match w[1] {
                "+" => a + b == c,
                "-" => a - b == c,
                "*" => a * b == c,
                "/" => b != 0 && b * c == a,
                _ => continue,
            };
            if !correct {
                return Err(format!("wrong: {}", w.join(" ")));
            }
            results.push(c);
        }
        Ok(results)
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

    #[test]
    fn math_answers_are_correct() {
        assert!(worked_results("so 2 + 2 = 5.").is_err());
        assert_eq!(worked_results("12 / 4 = 3, so x = 3."), Ok(vec![3]));
        let mut problems = 0;
        for doc in docs(Domain::Math) {
            for block in doc.split("\n\n") {
                let lines: Vec<&str> = block.lines().collect();
                assert!(
                    lines[0].starts_with("Problem ") && lines[1] == "Solution:",
                    "{block}"
                );
                let answer = lines.last().and_then(|l| l.strip_prefix("Answer: "));
                let answer: i64 = answer.and_then(|n| n.parse().ok()).expect(block);
                let mut results = Vec::new();
                for line in &lines {
                    results.extend(worked_results(line).unwrap_or_else(|e| panic!("{e}: {block}")));
                }
                assert_eq!(results.last(), Some(&answer), "{block}");
                // Substitute the answer back into "Solve 3x + 5 = 20."
                if let Some(equation) = lines[0].split("Solve ").nth(1) {
                    let w: Vec<&str> = equation.trim_end_matches('.').split_whitespace().collect();
                    let a: i64 = w[0].trim_end_matches('x').parse().expect(block);
                    let [b, c]: [i64; 2] = [w[2], w[4]].map(|n| n.parse().expect(block));
                    let b = if w[1] == "+" { b } else { -b };
                    assert_eq!(a * answer + b, c, "{block}");
                }
                problems += 1;
            }
        }
        assert!(problems > 500, "{problems} problems");
    }

    #[test]
    fn code_is_balanced_and_indented() {
        for doc in docs(Domain::Code) {
            let mut open = Vec::new();
            for ch in doc.chars() {
                match ch {
                    '(' | '[' | '{' => open.push(ch),
                    ')' => assert_eq!(open.pop(), Some('('), "{doc}"),
                    ']' => assert_eq!(open.pop(), Some('['), "{doc}"),
                    '}' => assert_eq!(open.pop(), Some('{'), "{doc}"),
                    _ => {}
                }
            }
            assert!(open.is_empty(), "{doc}");
            // Indents are multiples of 4 spaces and only grow, by one level, after a colon.
            let mut prev = (0, ":");
            for line in doc.lines().filter(|l| !l.trim().is_empty()) {
                let indent = line.len() - line.trim_start_matches(' ').len();
                assert!(indent % 4 == 0 && !line.contains('\t'), "{line:?}");
                assert!(
                    indent <= prev.0 || (indent == prev.0 + 4 && prev.1.ends_with(':')),
                    "{doc}"
                );
                prev = (indent, line);
            }
        }
    }

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
