//! TOML and serde errors as one [`SpecError`] that says where: the table, then line and column.

use std::collections::HashMap;

use super::SpecError;

/// A TOML or serde error as one problem: where it is (the table, then line and column) and
/// what toml says.
pub(super) fn toml_error(text: &str, e: &toml::de::Error) -> SpecError {
    let msg = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        // Only a missing top-level table has no span.
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            return SpecError(format!("{field}: missing; add a [{field}] table"));
        }
        return SpecError(msg);
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let here = text[line_start..].lines().next().unwrap_or("").trim();
    // An error at a table's header (a missing field) is about that table; one elsewhere is in
    // the body of the table above it.
    let table = if here.starts_with('[') {
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |i| line_start + i);
        enclosing_table(&text[..line_end])
    } else {
        enclosing_table(&text[..line_start])
    };
    let missing = msg
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'));
    match (table, missing) {
        (Some(table), Some(field)) => SpecError(format!(
            "{table}.{field}: missing; add it to the table at line {line}"
        )),
        (None, Some(field)) => SpecError(format!("{field}: missing; add a [{field}] table")),
        (Some(table), None) => SpecError(format!("{table} (line {line}, column {column}): {msg}")),
        (None, None) => SpecError(format!("line {line}, column {column}: {msg}")),
    }
}

/// The path of the table whose body the end of `text` is in (`stages[2]`, `schedule`, ...),
/// from the headers above it.
fn enclosing_table(text: &str) -> Option<String> {
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        let l = line.trim();
        let (name, array) = if let Some(rest) = l.strip_prefix("[[") {
            (rest.split_once("]]").map(|(n, _)| n), true)
        } else if let Some(rest) = l.strip_prefix('[') {
            (rest.split_once(']').map(|(n, _)| n), false)
        } else {
            continue;
        };
        // A header TOML could not read names no table.
        let Some(name) = name.map(str::trim).filter(|n| {
            !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c))
        }) else {
            current = None;
            continue;
        };
        let name = name.to_owned();
        if array {
            let n = arrays.entry(name.clone()).or_insert(0);
            *n += 1;
            current = Some(format!("{name}[{}]", *n - 1));
        } else {
            // `[stages.mix]` after a `[[stages]]` belongs to the latest stage.
            let (first, rest) = name.split_once('.').unwrap_or((&name, ""));
            current = Some(match arrays.get(first) {
                Some(n) if !rest.is_empty() => format!("{first}[{}].{rest}", n - 1),
                _ => name.clone(),
            });
        }
    }
    current
}
