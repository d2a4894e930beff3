//! Starts the real `stagecoach-coordinator` and `stagecoach` binaries and checks what a user sees.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const COORDINATOR: &str = env!("CARGO_BIN_EXE_stagecoach-coordinator");
const STAGECOACH: &str = env!("CARGO_BIN_EXE_stagecoach");

/// Kills the child process when dropped, so a failing test leaves nothing running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job file named `name` (the coordinator reads no data, so the paths need not exist), in a
/// scratch folder that also holds the state directory.
fn job_file(name: &str) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[job]\nname = \"{name}\"\n[model]\npreset = \"micro\"\n[schedule]\npeak_lr = 1e-3\n\
             [data]\nglobal_batch_tokens = 32\nmicro_batch_tokens = 32\n\
             [[sources]]\nname = \"a\"\npath = \"a\"\n\
             [[stages]]\nname = \"only\"\nuntil = {{ steps = 5 }}\nseq_len = 16\nmix = {{ a = 1.0 }}\n"
        ),
    )?;
    Ok((dir, path))
}

/// Starts a coordinator running job `job` on an ephemeral port; returns it and its URL.
fn start_coordinator(job: &str) -> Result<(KillOnDrop, String)> {
    let (dir, path) = job_file(job)?;
    let dir = dir.keep();
    let mut child = Command::new(COORDINATOR)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--job",
        ])
        .arg(&path)
        .arg("--state")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning stagecoach-coordinator")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let child = KillOnDrop(child);

    // Read the first line on a thread so that a coordinator that never prints cannot hang the
    // test; the thread ends at that line, or at EOF once the child is killed.
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the coordinator did not print its address")?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line {line:?}"))?;
    let url = format!("http://{addr}");
    Ok((child, url))
}

fn stagecoach(args: &[&str], coordinator_env: Option<&str>) -> Result<Output> {
    let mut command = Command::new(STAGECOACH);
    command
        .args(args)
        .env_remove("STAGECOACH_COORDINATOR")
        .env_remove("RUST_BACKTRACE");
    if let Some(url) = coordinator_env {
        command.env("STAGECOACH_COORDINATOR", url);
    }
    command.output().context("running stagecoach")
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn status_from_the_cli_then_graceful_shutdown() -> Result<()> {
    let (mut coordinator, url) = start_coordinator("e2e-job")?;

    // JSON, with the address from the environment.
    let out = stagecoach(&["status", "--json"], Some(&url))?;
    ensure!(out.status.success(), "stagecoach status --json: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["job"], "e2e-job");
    assert_eq!(json["state"], "waiting");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert!(json["uptime_seconds"].as_u64().is_some(), "{json}");

    // Text, with the address from the (global) flag.
    let out = stagecoach(&["--coordinator", &url, "status"], None)?;
    ensure!(out.status.success(), "stagecoach status: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.starts_with("job:      e2e-job\nstate:    waiting\n"),
        "{text}"
    );

    // SIGTERM stops the coordinator cleanly.
    #[cfg(unix)]
    {
        let pid = coordinator.0.id().to_string();
        ensure!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()?
                .success(),
            "kill failed"
        );
        let status = wait_for_exit(&mut coordinator.0, Duration::from_secs(10))?;
        assert!(status.success(), "coordinator exited with {status}");
    }
    #[cfg(not(unix))]
    drop(coordinator);

    // Now nothing answers: one clear line on stderr, exit code 2.
    let out = stagecoach(&["--coordinator", &url, "status"], None)?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the coordinator at {url}")),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn bad_arguments_get_clap_errors() -> Result<()> {
    let out = stagecoach(&["status", "--bogus"], None)?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)?.contains("--bogus"));

    let out = Command::new(COORDINATOR)
        .args(["--listen", "not-an-address"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)?.contains("--listen"));
    Ok(())
}

/// A coordinator that refuses its job, its state or its flags exits non-zero with a message
/// that names what to fix, and never says it listens (a script waiting for that line sees the
/// failure, not a start).
#[test]
fn a_coordinator_that_cannot_run_its_job_never_says_it_listens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, [0xff, 0xfe, b'[', b'j', 0x00])?;
    let (_keep, good) = job_file("fine")?;
    let climbs = dir.path().join("climbs.toml");
    std::fs::write(
        &climbs,
        std::fs::read_to_string(&good)?.replace("name = \"fine\"", "name = \"../../x\""),
    )?;
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let [unused] = stagecoach_coordinator::store::local_etcd::free_ports()?;
    let unreachable = format!("etcd://127.0.0.1:{unused}");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a job file that is not there",
            vec![
                "--job".into(),
                "nowhere/job.toml".into(),
                "--state".into(),
                state.into(),
            ],
            "nowhere/job.toml",
        ),
        (
            "a job file of binary garbage",
            vec![
                "--job".into(),
                garbage.display().to_string(),
                "--state".into(),
                state.into(),
            ],
            "garbage.toml",
        ),
        (
            "a job name that climbs out of its folder",
            vec![
                "--job".into(),
                climbs.display().to_string(),
                "--state".into(),
                state.into(),
            ],
            "job.name",
        ),
        (
            "a state store of an unknown kind",
            vec![
                "--job".into(),
                good.display().to_string(),
                "--state".into(),
                "s3://bucket/x".into(),
            ],
            "unknown scheme",
        ),
        (
            "an etcd nobody runs",
            vec![
                "--job".into(),
                good.display().to_string(),
                "--state".into(),
                unreachable.clone(),
            ],
            "unavailable",
        ),
    ];
    for (what, args, says) in cases {
        let started = Instant::now();
        let out = Command::new(COORDINATOR)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(&args)
            .env("RUST_LOG", "error")
            .env_remove("RUST_BACKTRACE")
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(!out.status.success(), "{what}: exited {:?}", out.status);
        assert!(
            !stdout.contains("listening on"),
            "{what}: said it listens: {stdout}"
        );
        assert!(
            stderr.contains(says),
            "{what}: expected {says:?} in {stderr}"
        );
        assert!(
            stderr.len() < 4000,
            "{what}: {} bytes of error",
            stderr.len()
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

/// The CLI refuses what it can check itself before it calls anyone, and passes on the
/// coordinator's refusals of the rest with their message and a non-zero exit.
#[test]
fn the_cli_refuses_bad_arguments_clearly() -> Result<()> {
    let (_coordinator, url) = start_coordinator("bad-cli")?;
    let huge = "r".repeat(100_000);
    let dir = tempfile::tempdir()?;
    let folder = dir.path().display().to_string();
    let cases: Vec<(&str, Vec<&str>, i32, &str)> = vec![
        (
            "a weight that is no number",
            vec!["mix", "set", "only", "a=abc"],
            2,
            "a=abc",
        ),
        (
            "a source given twice",
            vec!["mix", "set", "only", "a=0.5", "a=0.5"],
            2,
            "twice",
        ),
        (
            "a weight without a source",
            vec!["mix", "set", "only", "=1"],
            2,
            "source=weight",
        ),
        (
            "an empty stage name",
            vec!["stage", "set", ""],
            1,
            "stage is empty",
        ),
        (
            "a rollback to a 100 KB name",
            vec!["rollback", &huge],
            1,
            "refused",
        ),
        (
            "a job file that is not there",
            vec!["validate", "nowhere.toml"],
            1,
            "nowhere.toml",
        ),
        (
            "a folder as a job file",
            vec!["validate", &folder],
            1,
            "cannot read",
        ),
        (
            "an export of a folder that is no checkpoint",
            vec!["export", &folder, "out-x"],
            1,
            "manifest.json",
        ),
        (
            "a coordinator address that is no URL",
            vec!["--coordinator", "ht tp://no", "status"],
            1,
            "invalid coordinator address",
        ),
    ];
    for (what, args, code, says) in cases {
        let out = stagecoach(&args, Some(&url))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{what}: {out:?}");
        assert!(
            stderr.contains(says),
            "{what}: expected {says:?} in {stderr}"
        );
        assert!(
            stderr.len() < 2000,
            "{what}: {} bytes of error",
            stderr.len()
        );
    }
    Ok(())
}

#[test]
fn coordinator_reports_a_port_in_use() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();

    let out = Command::new(COORDINATOR)
        .args(["--listen", &addr])
        .stdin(Stdio::null())
        .output()?;

    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    Ok(())
}

/// The shipped demo job, which `make demo` runs.
const DEMO_JOB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo.toml");

#[test]
fn validate_accepts_the_demo_job_without_its_data() -> Result<()> {
    let out = stagecoach(&["validate", DEMO_JOB, "--no-data"], None)?;
    ensure!(out.status.success(), "stagecoach validate: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.starts_with(&format!(
            "{DEMO_JOB}: job \"demo\" is valid; data not checked (--no-data)\n"
        )),
        "{text}"
    );
    assert!(text.contains("\ntotal:    "), "{text}");

    let out = stagecoach(&["validate", DEMO_JOB, "--no-data", "--json"], None)?;
    ensure!(out.status.success(), "stagecoach validate --json: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["valid"], true);
    assert_eq!(json["data_root"], serde_json::Value::Null);
    assert_eq!(json["job"]["name"], "demo");
    let stages = json["job"]["stages"].as_array().context("no stages")?;
    ensure!(stages.len() >= 2, "{json}");
    Ok(())
}

#[test]
fn validate_names_every_problem_of_a_malformed_job() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    // Two mistakes: weights that sum to 0.9, and a second stage that ends before the first.
    std::fs::write(
        &path,
        "[job]\nname = \"bad\"\n[model]\npreset = \"tiny\"\n[schedule]\npeak_lr = 1e-3\n\
         [data]\nglobal_batch_tokens = 1024\nmicro_batch_tokens = 512\n\
         [[sources]]\nname = \"prose\"\npath = \"prose\"\n\
         [[sources]]\nname = \"code\"\npath = \"code\"\n\
         [[stages]]\nname = \"one\"\nuntil = { steps = 20 }\nseq_len = 128\n\
         mix = { prose = 0.8, code = 0.1 }\n\
         [[stages]]\nname = \"two\"\nuntil = { steps = 10 }\nseq_len = 128\n\
         mix = { prose = 0.5, code = 0.5 }\n",
    )?;
    let file = path.to_str().context("a UTF-8 temporary path")?;

    let out = stagecoach(&["validate", file, "--no-data"], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    for line in &lines {
        assert!(line.starts_with(&format!("{file}: stages[")), "{stderr}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(".mix") && l.contains("sum")),
        "{stderr}"
    );
    assert!(lines.iter().any(|l| l.contains(".until")), "{stderr}");

    let out = stagecoach(&["validate", file, "--no-data", "--json"], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["valid"], false);
    assert_eq!(json["problems"].as_array().map(Vec::len), Some(2), "{json}");

    // Once the file is right, the data is checked (under the scratch folder, where no source
    // folder exists): each missing folder is a problem.
    let fixed = std::fs::read_to_string(&path)?
        .replace("prose = 0.8", "prose = 0.9")
        .replace("steps = 10 }", "steps = 30 }");
    std::fs::write(&path, fixed)?;
    let out = stagecoach(&["validate", file, "--no-data"], None)?;
    ensure!(out.status.success(), "the fixed file: {out:?}");
    let root = dir.path().to_str().context("a UTF-8 temporary path")?;
    let out = stagecoach(&["validate", file, "--data-root", root], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("prose") && lines[1].contains("code"),
        "{stderr}"
    );

    // A file that does not exist is one problem, not a crash.
    let missing = dir.path().join("missing.toml");
    let out = stagecoach(
        &["validate", missing.to_str().unwrap_or("missing.toml")],
        None,
    )?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");
    Ok(())
}

#[test]
fn control_commands_report_an_unreachable_coordinator() -> Result<()> {
    // An address on which nothing listens: bound to find a free port, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let url = format!("http://{addr}");
    let commands: [&[&str]; 13] = [
        &["stage", "next"],
        &["stage", "set", "decay"],
        &["mix", "set", "decay", "prose=0.5", "code=0.5"],
        &["pause"],
        &["resume"],
        &["eval"],
        &["stages", "--json"],
        &["checkpoint", "now"],
        &["checkpoints"],
        &["checkpoints", "--json"],
        &["rollback"],
        &["rollback", "runs/demo/checkpoints/step-00000100"],
        &["events", "--json"],
    ];
    for args in commands {
        let out = stagecoach(args, Some(&url))?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr)?;
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: cannot reach the coordinator at {url}")),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn mix_set_explains_the_form_of_its_arguments() -> Result<()> {
    // Rejected before any connection is tried: no coordinator is needed.
    for (args, expected) in [
        (vec!["prose"], "\"prose\" has no weight"),
        (vec!["prose=abc"], "the weight \"abc\" is not a number"),
        (
            vec!["prose=0.5", "prose=0.5"],
            "source \"prose\" is given twice",
        ),
    ] {
        let mut argv = vec!["mix", "set", "decay"];
        argv.extend(&args);
        let out = stagecoach(&argv, None)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr)?;
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            stderr.contains("expected source=weight"),
            "{args:?}: {stderr}"
        );
    }
    let out = stagecoach(&["mix", "set", "decay"], None)?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert!(stderr.contains("SOURCE=WEIGHT"), "{stderr}");
    Ok(())
}

/// A checkpoint folder as rank 0 writes it: the model files (a one-layer Llama), the optimizer
/// state and a manifest with each file's size and SHA-256.
fn fake_checkpoint(dir: &std::path::Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    use stagecoach_core::checkpoint::{
        Dtype, FileEntry, Header, LlamaLayout, Manifest, FORMAT, MANIFEST,
    };
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8,
        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "tie_word_embeddings": true,
    });
    let layout = LlamaLayout::of_config(&config)?;
    let mut model = Header::encode(
        &Default::default(),
        layout
            .tensors
            .iter()
            .map(|(n, s)| (n.as_str(), Dtype::F32, s.as_slice())),
    );
    let elements: u64 = layout
        .tensors
        .iter()
        .map(|(_, s)| s.iter().product::<u64>())
        .sum();
    model.resize(model.len() + 4 * elements as usize, 0);
    let config = config.to_string();
    let files: [(&str, &[u8]); 3] = [
        ("model.safetensors", &model),
        ("config.json", config.as_bytes()),
        ("optimizer.safetensors", b"moments"),
    ];
    let mut digests = std::collections::BTreeMap::new();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes)?;
        let sha256: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let bytes = bytes.len() as u64;
        digests.insert(name.to_owned(), FileEntry { bytes, sha256 });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        job: "demo".into(),
        step: 100,
        optimizer_steps: 100,
        stage: 0,
        cursors: vec![1_600, 0],
        stage_taken: vec![1_600, 0],
        parent: String::new(),
        generation: 1,
        rope_theta: 10_000.0,
        created_unix_ms: 1_700_000_000_000,
        files: digests,
    };
    std::fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&manifest)?)?;
    Ok(())
}

#[test]
fn export_copies_a_checked_model_folder_without_a_coordinator() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("step-00000100");
    fake_checkpoint(&ck)?;
    let out_dir = tmp.path().join("hf/demo-100");
    let (ck_arg, out_arg) = (
        ck.to_str().context("a UTF-8 temporary path")?,
        out_dir.to_str().context("a UTF-8 temporary path")?,
    );
    // No coordinator runs at this address: export never asks one.
    let nowhere = "http://127.0.0.1:1";
    let out = stagecoach(&["export", ck_arg, out_arg], Some(nowhere))?;
    ensure!(out.status.success(), "stagecoach export: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.starts_with(&format!(
            "exported step 100 of job \"demo\" from {ck_arg} to {out_arg}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("  model.safetensors ") && text.contains("  config.json "),
        "{text}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    for name in &names {
        assert_eq!(
            std::fs::read(out_dir.join(name))?,
            std::fs::read(ck.join(name))?
        );
    }

    // Again into the same folder: it is not empty any more.
    let out = stagecoach(&["export", ck_arg, out_arg], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(
        stderr,
        format!("error: {out_arg}: the folder is not empty; export into a new or empty folder\n")
    );
    Ok(())
}

#[test]
fn export_refuses_a_checkpoint_whose_files_do_not_match_the_manifest() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ck = tmp.path().join("step-00000100");
    fake_checkpoint(&ck)?;
    // One byte changed, the size kept: only the digest can tell.
    let model = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&model)?;
    bytes[9] ^= 0x01;
    std::fs::write(&model, bytes)?;
    let out_dir = tmp.path().join("out");
    let (ck_arg, out_arg) = (
        ck.to_str().context("a UTF-8 temporary path")?,
        out_dir.to_str().context("a UTF-8 temporary path")?,
    );
    let out = stagecoach(&["export", ck_arg, out_arg], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: checkpoint {ck_arg}: the sha256 of model.safetensors is "
        )),
        "{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("the file changed after the checkpoint was written; nothing exported"),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "a refused export left {out_dir:?}");

    // A folder that is no checkpoint at all.
    let out = stagecoach(&["export", out_arg, ck_arg], None)?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert!(stderr.contains("not a folder"), "{stderr}");
    Ok(())
}
