//! What the alert and dashboard tests share: a real Prometheus (Debian's `/usr/bin/prometheus`)
//! started on a free loopback port, its HTTP API queried over plain HTTP/1.0, and the job they
//! watch (a coordinator and two workers on the demo corpus, one sample poisoned so that a real
//! loss spike happens).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{source_tokens, workspace_dir, JobBuilder, Proc};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// `deploy/prometheus/` of the workspace.
pub fn rules_dir() -> PathBuf {
    workspace_dir().join("deploy/prometheus")
}

/// Panics with what to do unless `path` (a Debian prometheus binary) is there.
pub fn require(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: this test needs a real Prometheus (Debian's prometheus); run \
         `make setup`"
    );
}

/// A free loopback port (bound, then released for the process that takes it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `host:port` of a `http://host:port/metrics` URL.
pub fn target(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("an http URL");
    rest.split('/').next().unwrap().to_owned()
}

/// A running Prometheus and where its API is.
pub struct Prometheus {
    pub proc: Proc,
    pub addr: String,
    pub log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (which names its rule files relative to itself), its
    /// data under `dir/tsdb`, its log in `dir/prometheus.log`.
    pub fn start(dir: &Path, config: &Path) -> Prometheus {
        require(PROMETHEUS);
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let mut cmd = Command::new(PROMETHEUS);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let proc = Proc::spawn("prometheus", &mut cmd);
        Prometheus { proc, addr, log }
    }

    /// Panics with its log if Prometheus has exited.
    pub fn check_alive(&mut self) {
        if let Some(status) = self.proc.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("prometheus exited ({status}):\n{log}");
        }
    }

    /// An instant query.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let v = get(
            &self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )?;
        Ok(samples(&v["data"]["result"], false))
    }

    /// A range query from `start` to `end` (Unix seconds) every `step` seconds, as Grafana
    /// runs a panel's query: every series with at least one point.
    pub fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: u32,
    ) -> Result<Vec<Sample>, String> {
        let v = get(
            &self.addr,
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
                encode(promql)
            ),
        )?;
        Ok(samples(&v["data"]["result"], true))
    }

    /// Waits until `done` holds of Prometheus (polled every half second), at most `limit`;
    /// panics with `what` and the last answer past that.
    pub fn wait_for<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&Prometheus) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive();
            let why = match done(self) {
                Ok(t) => return t,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "{what} did not happen within {limit:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// One series of an answer: its labels and its last value.
pub type Sample = (BTreeMap<String, String>, f64);

fn samples(result: &serde_json::Value, range: bool) -> Vec<Sample> {
    result
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let point = if range {
                        r["values"].as_array().and_then(|v| v.last()).cloned()
                    } else {
                        Some(r["value"].clone())
                    };
                    let value = point
                        .and_then(|p| p[1].as_str().and_then(|s| s.parse::<f64>().ok()))
                        .unwrap_or(f64::NAN);
                    (labels, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GETs `path` of Prometheus's API; the JSON answer, or Prometheus's error (a query that does
/// not parse is a 400 with `errorType` "bad_data").
fn get(addr: &str, path: &str) -> Result<serde_json::Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP body in {response:?}"))?;
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("{e}: {head}\n{body}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "{}: {} ({})",
            head.lines().next().unwrap_or(""),
            v["error"].as_str().unwrap_or(body),
            v["errorType"].as_str().unwrap_or("")
        ));
    }
    Ok(v)
}

/// Waits for a worker's log to name its metrics URL.
pub fn worker_metrics_url(log: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(i) = text.find("metrics on http://") {
            let url = text[i + "metrics on ".len()..]
                .split_whitespace()
                .next()
                .unwrap();
            return url.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The spike settings of the watched jobs: armed after 10 steps, a step flagged at 5 standard
/// deviations or 1.5x the mean of the last 20, its update dropped (the ladder's "skip").
pub fn spikes(job: JobBuilder) -> JobBuilder {
    job.set("spikes.window", 20)
        .set("spikes.min_steps", 10)
        .set("spikes.zscore", 5.0)
        .set("spikes.ratio", 1.5)
        .set("spikes.consecutive", 1)
        .set("spikes.ladder", vec!["skip"])
}

/// The `--poison` arguments that replace the samples of step `step` of the job at `path` with
/// random tokens, from a replay of its plan.
pub fn poison_step(path: &Path, step: u64) -> Vec<String> {
    let spec = JobFile::load(path).unwrap().to_proto();
    let tokens = source_tokens(&spec);
    let mut replay = Curriculum::new(&spec, &tokens).unwrap();
    let plan = (0..=step)
        .map(|_| replay.next_step().unwrap())
        .last()
        .unwrap();
    plan.samples
        .iter()
        .flat_map(|s| {
            [
                "--poison".to_owned(),
                format!("{}:{}..{}", s.source, s.index, s.index + 1),
            ]
        })
        .collect()
}

/// Unix time now, in seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
