//! Helpers for the end-to-end tests: build and locate the workspace's binaries, start them as
//! real processes, and make sure they are killed when a test ends, passed or failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use stagecoach_core::spec::builder::JobBuilder;

/// The folder holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The venv's python (the reference stack and grpcio): `STAGECOACH_PYTHON`, or the
/// workspace's `.venv`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("STAGECOACH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "no python with the reference stack and grpcio at {} (run `make setup`, or set STAGECOACH_PYTHON)",
        p.display()
    );
    p
}

/// The workspace's root folder.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// Builds every binary of the workspace, once per test process, so a test never runs binaries
/// older than the sources (`cargo test -p stagecoach-e2e` alone does not build them). Under
/// `make test` they are already built by the same `cargo` invocation's feature set, and this is
/// a no-op of well under a second.
///
/// The variables cargo sets for a test process are removed first: build scripts watch some of
/// them (ring's reruns when `CARGO_MANIFEST_DIR` changes), and the test's values would make
/// this build rebuild ring and everything above it, and the next `make test` rebuild it back.
fn build_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo_for_a_test) {
                cmd.env_remove(name);
            }
        }
        let status = cmd
            .args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(workspace_dir())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cargo} to build the binaries: {e}"));
        assert!(
            status.success(),
            "`cargo build --workspace --bins` failed ({status}); the worker needs libtorch: run \
             the tests with `make test`, which sets LIBTORCH_USE_PYTORCH and the venv"
        );
    });
}

/// Whether cargo sets the environment variable `name` for the test processes it runs (the
/// package's manifest and metadata, the crate and binary names, the target's folders).
fn set_by_cargo_for_a_test(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "OUT_DIR"
        )
}

/// A binary of the workspace, built from the current sources.
pub fn bin(name: &str) -> PathBuf {
    build_binaries();
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not a binary of the workspace",
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
    coordinator_with_args(job, state, log, &[])
}

/// Starts a coordinator on free loopback ports with `extra` arguments (TLS, auth); returns it,
/// its URL (`https://` when it serves TLS) and its /metrics URL.
pub fn coordinator_with_args(
    job: &Path,
    state: &Path,
    log: &Path,
    extra: &[&std::ffi::OsStr],
) -> (Proc, String, String) {
    start_coordinator(job, state, log, "127.0.0.1:0", extra)
}

/// Starts a coordinator listening on `listen` (a fixed address, so that its workers find a
/// restarted one where the first was); returns it and its URL.
pub fn coordinator_at(job: &Path, state: &Path, log: &Path, listen: &str) -> (Proc, String) {
    let (p, url, _) = start_coordinator(job, state, log, listen, &[]);
    (p, url)
}

/// A free loopback port (free when asked: for a coordinator started on it soon after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

fn start_coordinator(
    job: &Path,
    state: &Path,
    log: &Path,
    listen: &str,
    extra: &[&std::ffi::OsStr],
) -> (Proc, String, String) {
    let mut cmd = Command::new(bin("stagecoach-coordinator"));
    cmd.args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
        .args(extra)
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
    let scheme = if metrics.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    (p, format!("{scheme}://{addr}"), metrics)
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
    micro(name, data, workers)
        .stage("main", steps, 64, MIX)
        .set(
            "checkpoints.dir",
            dir.join(format!("{name}-checkpoints"))
                .to_string_lossy()
                .into_owned(),
        )
        .set("schedule.decay_start.step", decay_start as i64)
        .set("data.seed", 3)
        .set("train.log_every", 5)
        .set("checkpoints.every_steps", 50)
        .write(dir.join(file))
}

/// The demo corpus mixture most end-to-end tests train.
pub const MIX: &[(&str, f64)] = &[("prose", 0.5), ("math", 0.3), ("code", 0.2)];

/// The job most end-to-end tests start from: `name` training the micro preset on the demo
/// corpus at `data` (prose, math and code), 8 samples of 64 tokens per step, with exactly
/// `workers` workers (lease 5 s), checkpoints under `<data>/../<name>-checkpoints`. Tests add
/// stages (`stage("main", steps, 64, MIX)`) and change keys with `set`.
pub fn micro(name: &str, data: &Path, workers: u32) -> JobBuilder {
    let checkpoints = data
        .parent()
        .unwrap_or(data)
        .join(format!("{name}-checkpoints"));
    JobBuilder::new(name)
        .demo_sources(data, false)
        .workers(workers, 5000)
        .set(
            "checkpoints.dir",
            checkpoints.to_string_lossy().into_owned(),
        )
}

/// Tokens of every `.ds` file directly in `dir` (2-byte tokens: the demo's byte-level
/// vocabulary).
pub fn shard_tokens(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ds"))
        .map(|p| std::fs::metadata(p).expect("a shard").len() / 2)
        .sum()
}

/// Tokens per source of `job`, as a worker sees its data (to replay the plan).
pub fn source_tokens(job: &stagecoach_proto::v1::JobSpec) -> Vec<u64> {
    job.sources
        .iter()
        .map(|s| shard_tokens(Path::new(&s.path)))
        .collect()
}

/// Runs the `stagecoach` CLI against `url`; panics with its output unless it succeeds.
pub fn cli(url: &str, args: &[&str]) -> String {
    let out = Command::new(bin("stagecoach"))
        .args(["--coordinator", url])
        .args(args)
        .output()
        .expect("run stagecoach");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stagecoach {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `stagecoach status --json`, or `Null` while the coordinator does not answer.
pub fn status(url: &str) -> serde_json::Value {
    let out = Command::new(bin("stagecoach"))
        .args(["--coordinator", url, "status", "--json"])
        .output()
        .expect("run stagecoach");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits until `what` holds of the status, at most `limit`; panics with the last status then.
pub fn wait_for(
    url: &str,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(url);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the job has committed at least `step` steps (at most four minutes).
pub fn wait_for_step(url: &str, step: u64) -> serde_json::Value {
    wait_for(
        url,
        Duration::from_secs(240),
        &format!("step {step}"),
        |s| s["step"].as_u64().unwrap_or(0) >= step,
    )
}

/// Waits for the coordinator and then every worker to exit successfully; panics with the
/// coordinator's log (`dir/log`) if one does not.
pub fn finish(coord: &mut Proc, workers: &mut [Proc], dir: &Path, log: &str) {
    let status = coord.wait(Duration::from_secs(300));
    let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
    assert!(status.success(), "coordinator failed:\n{text}");
    for w in workers {
        assert!(w.wait(Duration::from_secs(60)).success(), "a worker failed");
    }
}

/// What a job's state store holds, read after the job.
pub struct Stored {
    pub steps: Vec<stagecoach_proto::v1::LedgerStep>,
    /// Committed steps set aside by rollbacks and restores.
    pub rolled_back: Vec<stagecoach_proto::v1::LedgerStep>,
    pub events: Vec<stagecoach_proto::v1::SpikeEvent>,
    pub skipped: Vec<stagecoach_proto::v1::SkippedRange>,
    pub checkpoints: Vec<stagecoach_proto::v1::CheckpointRecord>,
}

/// Reads the ledger, events, skipped ranges and checkpoint index of `job` at `state` (a folder
/// or an etcd URL).
pub fn read_store(state: &str, job: &str) -> Stored {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let store = stagecoach_coordinator::store::open(state)
            .await
            .expect("open the state store");
        let rolled_back = store
            .range(&format!("jobs/{job}/ledger/rolled_back/"))
            .await
            .expect("read the steps set aside")
            .iter()
            .map(|(k, v)| {
                stagecoach_coordinator::ledger::decode_step(k, &v.value).expect("a ledger step")
            })
            .collect();
        let l = stagecoach_coordinator::ledger::StoreLedger::new(store, job);
        Stored {
            steps: l.steps().await.expect("the ledger"),
            rolled_back,
            events: l.events().await.expect("the events"),
            skipped: l.skipped().await.expect("the skipped ranges"),
            checkpoints: l.checkpoints().await.expect("the checkpoint index"),
        }
    })
}

/// An HTTP/1.1 GET of `path` at `addr` (`host:port`) with an optional bearer token: the
/// status code, the headers (lower-cased) and the body.
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (code, head.to_lowercase(), body.to_owned())
}
