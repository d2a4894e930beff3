//! Helpers for the end-to-end tests: locate the binaries `make test` built, start them as real
//! processes, and make sure they are killed when a test ends, passed or failed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A binary of the workspace; panics with what to run if it is not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `make test` (it builds every binary first)",
        p.display()
    );
    p
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    /// Waits for the process to exit, at most `limit`; panics (after killing it) past that.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a coordinator on a free loopback port; returns it and its URL.
pub fn coordinator(job: &Path, state: &Path, log: &Path) -> (Proc, String) {
    let (p, url, _) = coordinator_with_metrics(job, state, log);
    (p, url)
}

/// Starts a coordinator on free loopback ports; returns it, its URL and its /metrics URL.
pub fn coordinator_with_metrics(job: &Path, state: &Path, log: &Path) -> (Proc, String, String) {
    let mut cmd = Command::new(bin("stagecoach-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--job")
        .arg(job)
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"));
    let mut p = Proc::spawn("stagecoach-coordinator", &mut cmd);
    let mut stdout = BufReader::new(p.child.stdout.take().expect("stdout"));
    let mut line = |prefix: &str| {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read stdout");
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected a line {prefix:?}..., got {line:?}"))
            .to_owned()
    };
    let addr = line("listening on ");
    let metrics = line("metrics on ");
    (p, format!("http://{addr}"), metrics)
}

/// Writes a small demo corpus (300 training documents per domain) under `dir/data`.
pub fn demo_corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let out = Command::new(bin("stagecoach-worker"))
        .args([
            "demo-corpus",
            "--docs",
            "300",
            "--valid-docs",
            "5",
            "--output",
        ])
        .arg(&data)
        .output()
        .expect("run stagecoach-worker demo-corpus");
    assert!(
        out.status.success(),
        "demo-corpus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

/// Starts `stagecoach-worker join` against `url`, logging to `dir/NAME.log`, with `extra`
/// arguments.
pub fn join_worker(url: &str, dir: &Path, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("stagecoach-worker"));
    cmd.args(["join", "--coordinator", url])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("worker log"));
    Proc::spawn("stagecoach-worker", &mut cmd)
}

/// Writes `dir/FILE`: a job named `name` training the micro preset on the three-domain demo
/// corpus at `data` for `steps` steps, in one stage (global batch 8 samples, micro-batches of
/// 4, seq_len 64; the LR decays over the last 4 steps) with exactly `workers` workers, and a
/// checkpoint every 50 steps under `dir`.
pub fn micro_job(
    dir: &Path,
    file: &str,
    name: &str,
    data: &Path,
    steps: u64,
    workers: u32,
) -> PathBuf {
    // The decay must start after the 4 warmup steps and before the end.
    let decay_start = steps.saturating_sub(4).max(4);
    let text = format!(
        r#"
[job]
name = "{name}"
[model]
preset = "micro"
[schedule]
peak_lr = 3e-3
warmup_steps = 4
decay_start = {{ step = {decay_start} }}
[data]
seed = 3
global_batch_tokens = 512
micro_batch_tokens = 256
[[sources]]
name = "prose"
path = "{d}/prose/train"
[[sources]]
name = "math"
path = "{d}/math/train"
[[sources]]
name = "code"
path = "{d}/code/train"
[[stages]]
name = "main"
until = {{ steps = {steps} }}
seq_len = 64
mix = {{ prose = 0.5, math = 0.3, code = 0.2 }}
[train]
threads = 1
log_every = 5
[workers]
min = {workers}
max = {workers}
lease_ms = 5000
heartbeat_ms = 200
collective_timeout_ms = 5000
[checkpoints]
dir = "{ckpt}"
every_steps = 50
"#,
        d = data.display(),
        ckpt = dir.join(format!("{name}-checkpoints")).display(),
    );
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write the job file");
    path
}
