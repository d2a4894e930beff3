//! `stagecoach-bench` against the real coordinator binary (`target/debug`, built by `make test`
//! before the tests; `STAGECOACH_COORDINATOR` names another): its step count agrees with the
//! coordinator's, and a world that cannot form is a row saying so, within the timeout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stagecoach_bench::probe;

/// The coordinator binary the tests start.
fn coordinator_bin() -> PathBuf {
    let path = std::env::var_os("STAGECOACH_COORDINATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/stagecoach-coordinator")
        });
    assert!(
        path.is_file(),
        "{} does not exist: build it first (`cargo build --workspace --bins`, which `make test` runs), or name one with STAGECOACH_COORDINATOR",
        path.display()
    );
    path
}

/// A coordinator process, killed when dropped, and where it listens.
struct Coordinator {
    child: Child,
    grpc: String,
    metrics: String,
    state: PathBuf,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(dir: &Path, ranks: u32) -> PathBuf {
    let text = format!(
        r#"[job]
name = "bench-test"
[model]
preset = "micro"
[schedule]
peak_lr = 3e-3
warmup_steps = 4
[data]
global_batch_tokens = {tokens}
micro_batch_tokens = 64
[workers]
min = {ranks}
max = {ranks}
lease_ms = 10000
heartbeat_ms = 1000
[checkpoints]
dir = "{dir}/checkpoints"
every_steps = 0
[spikes]
enabled = false
[[sources]]
name = "web"
path = "{dir}/data"
[[stages]]
name = "main"
until = {{ steps = 1000000 }}
seq_len = 64
mix = {{ web = 1.0 }}
"#,
        tokens = ranks * 64,
        dir = dir.display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(dir: &Path, ranks: u32) -> Coordinator {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut child = Command::new(coordinator_bin())
        .arg("--job")
        .arg(job(dir, ranks))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line = |prefix: &str| {
        let l = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("the coordinator printed no {prefix:?} line"));
        l.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{l:?} is not a {prefix:?} line"))
            .to_owned()
    };
    let grpc = format!("http://{}", line("listening on "));
    let metrics = line("metrics on ");
    Coordinator {
        child,
        grpc,
        metrics,
        state,
    }
}

fn bench(c: &Coordinator, args: &[&str], json: &Path) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_stagecoach-bench"))
        .args(["--coordinator", &c.grpc, "--metrics-url", &c.metrics])
        .arg("--coordinator-pid")
        .arg(c.child.id().to_string())
        .arg("--state-dir")
        .arg(&c.state)
        .arg("--json-out")
        .arg(json)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stagecoach-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = std::fs::read_to_string(json).unwrap();
    (stdout, serde_json::from_str(line.trim()).unwrap())
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stagecoach-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The coordinator's committed steps once the generation the bench left has ended.
fn settled_step(metrics: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = probe::scrape(metrics, Duration::from_secs(10)).unwrap();
        let running = probe::metric_sum(&m, "stagecoach_job_state{state=\"running\"}");
        if running == Some(0.0) {
            return probe::metric_sum(&m, "stagecoach_job_step").unwrap() as u64;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator still runs a world a minute after the bench left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn its_steps_are_the_coordinators() {
    let dir = tmp("steps");
    let c = start(&dir, 8);
    let json = dir.join("figures.jsonl");
    let (row, f) = bench(
        &c,
        &[
            "--ranks",
            "8",
            "--ranks-per-channel",
            "3",
            "--run-secs",
            "2",
            "--form-timeout-secs",
            "60",
        ],
        &json,
    );
    println!("{row}");
    assert!(row.starts_with("| 8 | "), "{row}");
    assert_eq!(f["formed"], true, "{f}");
    let steps = f["steps"].as_u64().unwrap();
    let last = f["last_work_step"].as_u64().unwrap();
    assert!(steps > 0, "{f}");
    assert_eq!(f["leases_lost"], 0, "{f}");
    assert_eq!(f["generations"], 1, "{f}");
    assert!(
        f["latency_samples"].as_u64().unwrap() >= 8 * (steps - 1),
        "{f}"
    );
    // Work for step k came after step k - 1 was committed; the step the ranks were last given
    // was committed too if any rank reported it before the bench left.
    let committed = settled_step(&c.metrics);
    println!("bench: {steps} steps in the window, work up to step {last}; coordinator: {committed} committed");
    assert!(
        committed == last || committed == last + 1,
        "the coordinator committed {committed} steps, the ranks were last given step {last}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_world_that_cannot_form_is_a_row_within_the_timeout() {
    // The job wants 8 workers, the bench brings 4.
    let dir = tmp("noform");
    let c = start(&dir, 8);
    let json = dir.join("figures.jsonl");
    let began = Instant::now();
    let (row, f) = bench(
        &c,
        &[
            "--ranks",
            "4",
            "--run-secs",
            "2",
            "--form-timeout-secs",
            "3",
        ],
        &json,
    );
    println!("{row} ({:.1} s)", began.elapsed().as_secs_f64());
    assert!(row.starts_with("| 4 | not within 3 | – |"), "{row}");
    assert!(
        row.contains("no world: 4/4 registered, 4 in a session, 0 answered a World"),
        "{row}"
    );
    assert_eq!(f["formed"], false, "{f}");
    assert!(f["coordinator_peak_rss_bytes"].as_u64().unwrap() > 0, "{f}");
    let _ = std::fs::remove_dir_all(&dir);
}
