//! TOML and serde errors as one [`SpecError`] that says where: the table, then line and column.

use std::collections::HashMap;

use super::SpecError;

/// A TOML or serde error as one problem: where it is (the table, then line and column) and
/// what toml says.
pub(super) fn toml_error(text: &str, e: &toml::de::Error) -> SpecError {
    let msg = e.message().trim().replace('\n', "; ");
    let missing = msg
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'));
    // A field missing from the top level comes with no span or an empty one at the start of
    // the file (a field missing from a table spans that table): whatever the first line holds,
    // it is no table's.
    let span = e.span().filter(|s| missing.is_none() || !s.is_empty());
    let Some(span) = span else {
        if let Some(field) = missing {
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

#[cfg(test)]
mod tests {
    use crate::spec::JobFile;

    fn problem(text: &str) -> String {
        match JobFile::parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const MODEL: &str = "[model]\npreset = \"tiny\"\n";
    const SCHEDULE: &str = "[schedule]\npeak_lr = 1e-3\n";
    const DATA: &str = "[data]\nglobal_batch_tokens = 64\nmicro_batch_tokens = 32\n";

    #[test]
    fn a_missing_top_level_table_is_named_whatever_the_first_line_holds() {
        // The file opening on a table header, on a comment, on a blank line, or on nothing.
        for head in [
            "[job]\nname = \"x\"\n",
            "# a job\n[job]\nname = \"x\"\n",
            "\n",
            "",
        ] {
            let text = format!("{head}{MODEL}{DATA}");
            assert_eq!(
                problem(&text),
                "schedule: missing; add a [schedule] table",
                "{text:?}"
            );
        }
        assert_eq!(
            problem(&format!("{SCHEDULE}{DATA}")),
            "model: missing; add a [model] table"
        );
    }

    #[test]
    fn a_field_missing_from_a_table_names_the_table_and_its_line() {
        let text = format!("{MODEL}{SCHEDULE}[data]\nmicro_batch_tokens = 32\n");
        assert_eq!(
            problem(&text),
            "data.global_batch_tokens: missing; add it to the table at line 5"
        );
        // The first table of the file: its span starts where the file does.
        let text = format!("[data]\nmicro_batch_tokens = 32\n{MODEL}{SCHEDULE}");
        assert_eq!(
            problem(&text),
            "data.global_batch_tokens: missing; add it to the table at line 1"
        );
    }
}
