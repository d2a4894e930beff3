//! The job-file checks as a user meets them: every malformed spec in `tests/fixtures/invalid`
//! gets exactly one problem, which starts with its place in the file and contains what the
//! fixture's first line (`# expect: ...`) says; the specs in `tests/fixtures/invalid-data` are
//! valid but name folders that are missing or hold no shards; the shipped examples validate.

use std::path::{Path, PathBuf};

use stagecoach_coordinator::datacheck::check_data;
use stagecoach_core::spec::JobFile;
use stagecoach_core::spike::{Rung, SpikeConfig};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn workspace_dir() -> PathBuf {
    crate_dir()
        .parent()
        .expect("the coordinator crate sits in the workspace")
        .to_path_buf()
}

/// The `.toml` files of a folder, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// What the fixture's first line says its problem contains.
fn expectation(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("read the fixture");
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{}: the first line must be `# expect: ...`", file.display()))
        .to_owned()
}

/// Where a problem can be: a section or item of the job file (`stages[2] ("x").mix`,
/// `data (line 18, column 1)`), or a line of it (TOML syntax errors).
const SECTIONS: &[&str] = &[
    "job",
    "model",
    "optimizer",
    "schedule",
    "data",
    "sources",
    "stages",
    "train",
    "workers",
    "checkpoints",
    "spikes",
    "recovery",
];

fn starts_with_a_place(msg: &str) -> bool {
    let head = msg
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    let section = SECTIONS.contains(&head) && msg[head.len()..].starts_with(['.', '[', ' ', ':']);
    (section || msg.starts_with("line ")) && msg.contains(": ")
}

/// A tree like the demo corpus under `root/data`: shards in train/ and valid/ of each domain,
/// and a raw/ folder of documents that are not tokenized.
fn fake_corpus(root: &Path) {
    for domain in ["prose", "math", "code"] {
        for split in ["train", "valid"] {
            let dir = root.join("data").join(domain).join(split);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("tokens-0.ds"), b"").unwrap();
        }
        let raw = root.join("data").join(domain).join("raw");
        std::fs::create_dir_all(&raw).unwrap();
        std::fs::write(raw.join("docs.jsonl"), b"{\"text\": \"hello\"}\n").unwrap();
    }
}

#[test]
fn every_malformed_spec_gets_one_problem_that_says_where_and_what() {
    let files = toml_files(&crate_dir().join("tests/fixtures/invalid"));
    assert!(files.len() >= 16, "only {} fixtures", files.len());
    // The checkpoint and spike sections have fixtures of their own.
    for section in ["checkpoints", "spikes"] {
        assert!(
            files
                .iter()
                .filter(|f| f
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(section)))
                .count()
                >= 1,
            "no fixture for [{section}]"
        );
    }
    for file in &files {
        let want = expectation(file);
        let problems = match JobFile::load(file) {
            Ok(_) => panic!(
                "{} validated, but it should fail with {want:?}",
                file.display()
            ),
            Err(e) => e.0,
        };
        let shown = problems
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            problems.len(),
            1,
            "{}: one mistake should give one problem, got:\n{shown}",
            file.display()
        );
        let msg = &problems[0].0;
        assert!(
            msg.contains(&want),
            "{}: expected {want:?} in:\n{msg}",
            file.display()
        );
        assert!(
            starts_with_a_place(msg),
            "{}: the problem does not start with its place in the file:\n{msg}",
            file.display()
        );
    }
}

#[test]
fn the_spec_the_fixtures_change_is_valid_and_finds_its_data() {
    let base = crate_dir().join("tests/fixtures/valid/base.toml");
    let job = JobFile::load(&base).unwrap_or_else(|e| panic!("{}:\n{e}", base.display()));
    let root = tempfile::tempdir().unwrap();
    fake_corpus(root.path());
    assert_eq!(check_data(&job, root.path()), vec![]);
    // Without the corpus, every folder is missing: three sources and one eval folder.
    let empty = tempfile::tempdir().unwrap();
    let problems = check_data(&job, empty.path());
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems.iter().all(|p| p.0.contains("does not exist")));
}

#[test]
fn specs_pointing_at_missing_or_empty_folders_fail_the_data_check_only() {
    let files = toml_files(&crate_dir().join("tests/fixtures/invalid-data"));
    assert!(!files.is_empty());
    let root = tempfile::tempdir().unwrap();
    fake_corpus(root.path());
    for file in &files {
        let want = expectation(file);
        let job = JobFile::load(file).unwrap_or_else(|e| {
            panic!("{}: the spec itself should be valid:\n{e}", file.display())
        });
        let problems = check_data(&job, root.path());
        assert_eq!(problems.len(), 1, "{}: {problems:#?}", file.display());
        let msg = &problems[0].0;
        assert!(
            msg.contains(&want),
            "{}: expected {want:?} in:\n{msg}",
            file.display()
        );
        assert!(
            msg.contains("stagecoach-worker tokenize"),
            "{}: the message should say how to make the shards:\n{msg}",
            file.display()
        );
    }
}

#[test]
fn every_shipped_example_validates() {
    let examples = toml_files(&workspace_dir().join("examples"));
    let names: Vec<_> = examples
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    for want in ["demo.toml", "single-worker.toml", "smollm2-1.7b.toml"] {
        assert!(names.contains(&want), "examples/{want} is missing");
    }
    for file in &examples {
        JobFile::load(file).unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
    }
}

#[test]
fn the_demo_example_is_the_four_stage_shape_then_a_context_extension() {
    let job = JobFile::load(&workspace_dir().join("examples/demo.toml")).unwrap();
    let p = job.to_proto();
    let stages: Vec<_> = p
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.until_step, s.seq_len, s.rope_theta))
        .collect();
    assert_eq!(
        stages,
        [
            ("stable-1", 120, 256, 10_000.0),
            ("stable-2", 180, 256, 10_000.0),
            ("stable-3", 240, 256, 10_000.0),
            ("decay", 285, 256, 10_000.0),
            ("long-context", 300, 512, 40_000.0),
        ]
    );
    assert_eq!(p.schedule.unwrap().decay_start_step, 240);
    let c = job.checkpoint_config();
    assert_eq!(
        (c.dir.to_str(), c.every_steps, c.keep),
        (Some("runs/demo/checkpoints"), 50, 3)
    );
    // The demo writes out the detector's defaults, so that a user sees them.
    assert_eq!(job.spike_config(), SpikeConfig::default());
    assert_eq!((p.total_steps, p.seq_len, p.eval_samples), (300, 512, 16));
    let long = p.sources.iter().position(|s| s.name == "long").unwrap();
    let weights: Vec<f64> = p.stages.iter().map(|s| s.weights[long]).collect();
    assert_eq!(weights, [0.0, 0.0, 0.0, 0.0, 0.4]);
    // The demo's data exists once `make demo` has written the corpus (the long domain since the
    // context extension came); check it then.
    let root = workspace_dir();
    if root.join("runs/demo/data/long").is_dir() {
        for name in ["demo.toml", "single-worker.toml"] {
            let job = JobFile::load(&root.join("examples").join(name)).unwrap();
            assert_eq!(check_data(&job, &root), vec![], "examples/{name}");
        }
    }
}

#[test]
fn the_smollm2_example_is_the_papers_run_and_needs_its_data() {
    let job = JobFile::load(&workspace_dir().join("examples/smollm2-1.7b.toml")).unwrap();
    let p = job.to_proto();
    let tokens_per_step = 1024 * 2048;
    assert_eq!(p.global_batch_tokens, tokens_per_step);
    let until: Vec<u64> = p.stages.iter().map(|s| s.until_step).collect();
    let steps = |tokens: u64| tokens.div_ceil(tokens_per_step);
    assert_eq!(
        until,
        [
            steps(6_000_000_000_000),
            steps(8_000_000_000_000),
            steps(10_000_000_000_000),
            steps(10_925_000_000_000),
            steps(11_000_000_000_000),
        ]
    );
    let last = p.stages.last().unwrap();
    assert_eq!((last.seq_len, last.rope_theta), (8192, 130_000.0));
    let long = p
        .sources
        .iter()
        .position(|s| s.name == "long-documents")
        .unwrap();
    assert_eq!(last.weights[long], 0.4);
    // The decay starts where stage 4 starts: at 10T tokens.
    let s = p.schedule.unwrap();
    assert_eq!(
        (s.decay_start_step, s.decay_start_stage.as_str()),
        (steps(10_000_000_000_000), "stage-4")
    );
    assert_eq!((s.peak_lr, s.warmup_steps), (5e-4, 2000));
    let spikes = job.spike_config();
    assert_eq!(spikes.ladder, [Rung::Skip, Rung::Rollback]);
    assert_eq!((spikes.skip_before, spikes.skip_after), (100, 200));
    assert_eq!(job.checkpoint_config().every_steps, 2000);
    // Its paths are placeholders: the data check names the first missing folder.
    let problems = check_data(&job, &workspace_dir());
    assert!(
        problems[0].0.starts_with(
            "sources[0] (\"fineweb-edu\").path: the folder /data/smollm2/fineweb-edu/train \
             does not exist"
        ),
        "{problems:#?}"
    );
}

/// A huge input is refused with a message that quotes it cut short, not whole.
#[test]
fn a_three_megabyte_name_gets_a_short_message() {
    let base = std::fs::read_to_string(crate_dir().join("tests/fixtures/valid/base.toml")).unwrap();
    let huge = "x".repeat(3 << 20);
    let text = base.replacen("name = \"stable\"", &format!("name = \"{huge}\""), 1);
    let problems = JobFile::parse(&text).unwrap_err().0;
    assert_eq!(problems.len(), 1, "{problems:?}");
    let msg = &problems[0].0;
    assert!(msg.contains("longer than 64 characters"), "{}", &msg[..200]);
    assert!(msg.len() < 400, "a message of {} bytes", msg.len());
    // Binary garbage is no job file, and says so.
    let garbage = String::from_utf8_lossy(&[0xff, 0xfe, 0x00, 0x9c, b'[', 0x01]).into_owned();
    let problems = JobFile::parse(&garbage).unwrap_err().0;
    assert!(
        !problems.is_empty() && problems[0].0.len() < 400,
        "{problems:?}"
    );
}
