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
             [data]\nseq_len = 16\nglobal_batch = 2\nmicro_batch_size = 2\n\
             sources = [{{ name = \"a\", path = \"a\", weight = 1.0 }}]\n[train]\nsteps = 5\n"
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
    command.args(args).env_remove("STAGECOACH_COORDINATOR");
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
