//! Metrics as a user sees them: a coordinator and two workers training on the demo corpus,
//! scraped every second by a real Prometheus (Debian's `/usr/bin/prometheus`), and queried
//! through Prometheus's HTTP API until the job's loss and both ranks' step-time split are there.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stagecoach_e2e::{coordinator_with_metrics, demo_corpus, join_worker, micro_job, Proc};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PHASES: [&str; 4] = ["data", "forward_backward", "allreduce", "optimizer"];

/// `host:port` of a `http://host:port/metrics` URL.
fn target(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("an http URL");
    rest.split('/').next().unwrap().to_owned()
}

/// Waits for a worker's log to name its metrics URL.
fn worker_metrics_url(log: &Path, deadline: Instant) -> String {
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

/// One sample of an instant query: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// Runs an instant PromQL query against the Prometheus at `addr` (HTTP/1.0 over loopback).
fn query(addr: &str, promql: &str) -> Result<Vec<Sample>, String> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP body in {response:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{promql}: {head}\n{body}"));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let results = v["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("no result in {body}"))?;
    Ok(results
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            let value = r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (labels, value)
        })
        .collect())
}

/// What Prometheus has seen so far, or why it is not yet enough.
fn check(prom: &str) -> Result<String, String> {
    let up = query(prom, "up")?;
    if up.len() != 3 || up.iter().any(|(_, v)| *v != 1.0) {
        return Err(format!("targets not all up: {up:?}"));
    }
    let loss = query(prom, r#"stagecoach_job_loss{job="coordinator"}"#)?;
    let [(_, loss)] = loss[..] else {
        return Err(format!("no single loss series: {loss:?}"));
    };
    if !loss.is_finite() {
        return Err(format!("loss is {loss}"));
    }
    let alive = query(prom, "stagecoach_job_workers_alive")?;
    if alive.first().map(|s| s.1) != Some(2.0) {
        return Err(format!("workers alive: {alive:?}"));
    }
    let tokens = query(prom, "stagecoach_job_tokens_total > 0")?;
    let sources: BTreeSet<&str> = tokens.iter().map(|(l, _)| l["source"].as_str()).collect();
    if sources != BTreeSet::from(["prose", "math", "code"]) {
        return Err(format!("tokens by source: {tokens:?}"));
    }
    let ranks: BTreeMap<String, f64> = query(prom, r#"stagecoach_worker_rank{job="worker"}"#)?
        .into_iter()
        .map(|(l, v)| (l["instance"].clone(), v))
        .collect();
    let mut sorted: Vec<f64> = ranks.values().copied().collect();
    sorted.sort_by(f64::total_cmp);
    if sorted != [0.0, 1.0] {
        return Err(format!("worker ranks: {ranks:?}"));
    }
    let counts = query(
        prom,
        r#"stagecoach_worker_step_seconds_count{job="worker"} > 0"#,
    )?;
    for (instance, rank) in &ranks {
        let phases: BTreeSet<&str> = counts
            .iter()
            .filter(|(l, _)| &l["instance"] == instance)
            .map(|(l, _)| l["phase"].as_str())
            .collect();
        if phases != BTreeSet::from(PHASES) {
            return Err(format!(
                "rank {rank} ({instance}) has step times for {phases:?}"
            ));
        }
    }
    // The coordinator's embedded store reports what it holds.
    let store = query(
        prom,
        r#"stagecoach_store_memory_bytes{job="coordinator"} > 0"#,
    )?;
    if store.len() != 1 {
        return Err(format!("store memory: {store:?}"));
    }
    let running = query(prom, r#"stagecoach_job_state{state="running"}"#)?;
    Ok(format!(
        "loss {loss:.4}, ranks {ranks:?}, tokens {tokens:?}, running {running:?}, \
         step-time series {}",
        counts.len()
    ))
}

#[test]
fn prometheus_scrapes_the_job_and_both_workers() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: this test needs a real Prometheus (Debian's prometheus); \
         run `make setup`"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);

    // A job that outlasts the test (which kills it once Prometheus has seen what it needs).
    let job = micro_job(d, "job.toml", "prom", &data, 100_000, 2);
    let (_coord, url, coord_metrics) =
        coordinator_with_metrics(&job, &d.join("state"), &d.join("coordinator.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut workers = Vec::new();
    let mut worker_metrics = Vec::new();
    for i in 0..2 {
        let log = d.join(format!("worker-{i}.log"));
        workers.push(join_worker(
            &url,
            d,
            &format!("worker-{i}"),
            &["--metrics-listen", "127.0.0.1:0"],
        ));
        worker_metrics.push(worker_metrics_url(&log, deadline));
    }

    let config = d.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: coordinator\n    static_configs:\n      - targets: ['{}']\n\
             \x20 - job_name: worker\n    static_configs:\n      - targets: ['{}', '{}']\n",
            target(&coord_metrics),
            target(&worker_metrics[0]),
            target(&worker_metrics[1]),
        ),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{port}");
    let prom_log = d.join("prometheus.log");
    let mut cmd = Command::new(PROMETHEUS);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&prom_log).unwrap());
    let mut prometheus = Proc::spawn("prometheus", &mut cmd);

    let seen = loop {
        if let Some(status) = prometheus.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&prom_log).unwrap_or_default();
            panic!("prometheus exited ({status}):\n{log}");
        }
        let why = match check(&prom) {
            Ok(seen) => break seen,
            Err(why) => why,
        };
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(d.join("coordinator.log")).unwrap_or_default();
            panic!("Prometheus did not see the job within 60 s: {why}\ncoordinator log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("Prometheus at {prom} sees: {seen}");
}
