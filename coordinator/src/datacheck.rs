//! [`check_data`]: the folders a job file names, as the workers will see them. (The job file
//! itself is checked by `stagecoach_core::spec`, which reads no data.)

use std::path::{Path, PathBuf};

use stagecoach_core::spec::{item_path, JobFile, Problems, SpecError};

/// Checks that every source and eval folder of `job` (relative ones resolved against `root`,
/// the workers' working directory) exists and holds `.ds` shards, and that a `model.from`
/// folder holds a config.json. Empty when all is there.
pub fn check_data(job: &JobFile, root: &Path) -> Vec<SpecError> {
    let mut p = Problems::default();
    for (i, src) in job.sources.iter().enumerate() {
        let path = item_path("sources", i, &src.name);
        if let Some(msg) = check_shard_folder(&src.path, root) {
            p.at(format!("{path}.path"), msg);
        }
        if let Some(eval) = &src.eval {
            if let Some(msg) = check_shard_folder(eval, root) {
                p.at(format!("{path}.eval"), msg);
            }
        }
    }
    if let Some(from) = job
        .model
        .from
        .as_deref()
        .filter(|f| !f.as_os_str().is_empty())
    {
        let full = resolve(from, root);
        if !full.join("config.json").is_file() {
            p.at(
                "model.from",
                format!(
                    "{} holds no config.json{}; give a transformers model folder (or write one \
                         with `stagecoach-worker init`)",
                    from.display(),
                    relative_note(from, root)
                ),
            );
        }
    }
    p.0
}

fn resolve(folder: &Path, root: &Path) -> PathBuf {
    if folder.is_absolute() {
        folder.to_path_buf()
    } else {
        root.join(folder)
    }
}

fn relative_note(folder: &Path, root: &Path) -> String {
    if folder.is_absolute() {
        String::new()
    } else {
        format!(" (relative to {})", root.display())
    }
}

/// What is wrong with a folder of shards, if anything.
fn check_shard_folder(folder: &Path, root: &Path) -> Option<String> {
    if folder.as_os_str().is_empty() {
        return None; // validate() reports it
    }
    let full = resolve(folder, root);
    let shown = folder.display();
    let note = relative_note(folder, root);
    let fix = format!(
        "run `stagecoach-worker tokenize --output {shown} INPUTS...` into it, or fix the path"
    );
    match std::fs::metadata(&full) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("the folder {shown} does not exist{note}; {fix}"))
        }
        Err(e) => Some(format!("cannot read {shown}{note}: {e}")),
        Ok(m) if !m.is_dir() => Some(format!(
            "{shown}{note} is a file, not a folder of .ds shards; fix the path"
        )),
        Ok(_) => match holds_shards(&full, 0) {
            Ok(true) => None,
            Ok(false) => Some(format!(
                "{shown}{note} holds no .ds shards (its subfolders included); {fix}"
            )),
            Err(e) => Some(format!("cannot read {shown}{note}: {e}")),
        },
    }
}

/// Whether `dir` or a folder below it holds a `.ds` file, as the worker finds them. The depth
/// limit stops a symlink loop.
fn holds_shards(dir: &Path, depth: usize) -> std::io::Result<bool> {
    if depth > 32 {
        return Ok(false);
    }
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            subdirs.push(path);
        } else if path.extension().is_some_and(|e| e == "ds") {
            return Ok(true);
        }
    }
    for sub in subdirs {
        if holds_shards(&sub, depth + 1)? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [job]
        name = "t"
        [model]
        preset = "micro"
        [schedule]
        peak_lr = 1e-3
        warmup_steps = 2
        [data]
        global_batch_tokens = 64
        micro_batch_tokens = 32
        [[sources]]
        name = "a"
        path = "x"
        eval = "xv"
        [[sources]]
        name = "b"
        path = "y"
        [[stages]]
        name = "one"
        until = { steps = 5 }
        seq_len = 16
        mix = { b = 0.25, a = 0.75 }
    "#;

    #[test]
    fn data_folders_are_checked() {
        let root = std::env::temp_dir().join(format!("stagecoach-spec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("x/part-0")).unwrap();
        std::fs::write(root.join("x/part-0/a.ds"), b"").unwrap();
        std::fs::create_dir_all(root.join("y")).unwrap();
        std::fs::write(root.join("y/readme.txt"), b"").unwrap();
        let job = JobFile::parse(GOOD).unwrap();
        let problems: Vec<String> = check_data(&job, &root).into_iter().map(|e| e.0).collect();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].starts_with("sources[0] (\"a\").eval: the folder xv does not exist"),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].starts_with("sources[1] (\"b\").path: y ")
                && problems[1].contains("holds no .ds shards"),
            "{}",
            problems[1]
        );
    }
}
