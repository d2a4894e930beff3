//! The code domain: small Python functions and classes.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::*;

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

pub(super) fn code_doc(rng: &mut ChaCha8Rng) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::tests::docs;

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
}
