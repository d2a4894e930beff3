//! The math domain: grade-school word problems with worked solutions whose every line is
//! correct.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::*;

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

pub(super) fn math_doc(rng: &mut ChaCha8Rng) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::tests::docs;

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
}
