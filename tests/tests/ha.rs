//! Coordinator replicas on a real etcd (`--ha`): three coordinators campaign, one leads, two
//! workers join with every replica's URL. Killing the leader (SIGKILL) hands the job to a
//! standby within seconds; an etcd member killed in a three-member cluster does not stop
//! training; a leader stopped (SIGSTOP) past its lease while a standby takes over commits
//! nothing once it runs again and steps down (exit status 3). Through all of it every step is
//! committed once, and the losses are those of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stagecoach_coordinator::store::local_etcd::{cluster_url, LocalEtcd};
use stagecoach_e2e::{
    coordinator, coordinator_with_args, demo_corpus, finish, http_get, join_worker, micro,
    read_store, wait_for, Proc, MIX,
};

/// One scenario at a time: each runs three coordinators, two workers and etcd on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 300;

/// The job every scenario trains: 300 steps of the micro preset with two workers, a
/// checkpoint every 20 steps.
fn job(dir: &Path, data: &Path) -> PathBuf {
    micro("ha", data, 2)
        .stage("only", STEPS, 64, MIX)
        .set("schedule.warmup_steps", 5)
        .set("data.seed", 5)
        .set("train.log_every", 10)
        .set("workers.lease_ms", 4000)
        .set("workers.rendezvous_ms", 1000)
        .set(
            "checkpoints.dir",
            dir.join("ha-checkpoints").to_string_lossy().into_owned(),
        )
        .set("checkpoints.every_steps", 20)
        .write(dir.join("ha.toml"))
}

/// The per-step losses of the job run without a fault (one coordinator, embedded store),
/// computed once for every scenario.
fn reference() -> &'static Vec<f64> {
    static LOSSES: OnceLock<Vec<f64>> = OnceLock::new();
    LOSSES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = demo_corpus(d);
        let path = job(d, &data);
        let state = d.join("state");
        let (mut coord, url) = coordinator(&path, &state, &d.join("reference.log"));
        let mut workers: Vec<Proc> = (0..2)
            .map(|i| join_worker(&url, d, &format!("reference-{i}"), &[]))
            .collect();
        finish(&mut coord, &mut workers, d, "reference.log");
        let stored = read_store(state.to_str().unwrap(), "ha");
        assert_eq!(stored.steps.len() as u64, STEPS);
        stored.steps.iter().map(|s| s.loss).collect()
    })
}

/// Three replicas on `state` (an etcd URL) with a 2 s election lease.
struct Replicas {
    procs: Vec<Proc>,
    urls: Vec<String>,
    /// Each replica's HTTP address (host:port): /metrics, /readyz, the status page.
    http: Vec<String>,
    logs: Vec<PathBuf>,
}

impl Replicas {
    fn start(job: &Path, state: &str, dir: &Path) -> Replicas {
        let mut r = Replicas {
            procs: vec![],
            urls: vec![],
            http: vec![],
            logs: vec![],
        };
        for i in 0..3 {
            let log = dir.join(format!("replica-{i}.log"));
            let args: Vec<&std::ffi::OsStr> = ["--ha", "--election-ttl", "2"]
                .iter()
                .map(std::ffi::OsStr::new)
                .collect();
            let (p, url, metrics) = coordinator_with_args(job, Path::new(state), &log, &args);
            r.procs.push(p);
            r.urls.push(url);
            r.http.push(
                metrics
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_owned(),
            );
            r.logs.push(log);
        }
        r
    }

    /// Every replica's URL, as workers and the CLI take them.
    fn all(&self) -> String {
        self.urls.join(",")
    }

    /// The URLs of the replicas other than `i`.
    fn others(&self, i: usize) -> String {
        let rest: Vec<&str> = (0..self.urls.len())
            .filter(|&j| j != i)
            .map(|j| self.urls[j].as_str())
            .collect();
        rest.join(",")
    }

    /// Waits until a replica leads and has committed at least `step` steps (through the CLI,
    /// which follows the leader); returns its index and the status.
    fn leader_at(&self, urls: &str, step: u64) -> (usize, serde_json::Value) {
        self.leader_where(urls, &format!("a leader at step {step}"), |s| {
            s["step"].as_u64().unwrap_or(0) >= step
        })
    }

    /// Waits until a replica leads and `done` holds of its status; returns its index and the
    /// status.
    fn leader_where(
        &self,
        urls: &str,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> (usize, serde_json::Value) {
        let s = wait_for(urls, Duration::from_secs(120), what, |s| {
            s["leader"].is_string() && done(s)
        });
        let leader = s["leader"].as_str().unwrap();
        let i = self
            .urls
            .iter()
            .position(|u| u == leader)
            .unwrap_or_else(|| panic!("the leader {leader} is none of {:?}", self.urls));
        (i, s)
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.logs[i]).unwrap_or_default()
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Waits for every worker and replica to exit; the replicas still running when the job ends
/// win the election in turn, find the job finished and exit 0.
fn finish_all(replicas: &mut Replicas, skip: &[usize], workers: &mut [Proc]) {
    for w in workers.iter_mut() {
        assert!(
            w.wait(Duration::from_secs(240)).success(),
            "a worker failed"
        );
    }
    for i in 0..replicas.procs.len() {
        if skip.contains(&i) {
            continue;
        }
        let status = replicas.procs[i].wait(Duration::from_secs(60));
        assert!(
            status.success(),
            "replica {i} ended with {status}:\n{}",
            replicas.log(i)
        );
    }
}

/// Every step committed once, with the samples of the plan, and the losses of the run
/// without faults.
fn check_ledger(state: &str) {
    let stored = read_store(state, "ha");
    let steps: Vec<u64> = stored.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, (0..STEPS).collect::<Vec<_>>(), "each step once");
    let mut samples: Vec<(u32, u64)> = stored
        .steps
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| (x.source, x.index)))
        .collect();
    let total = samples.len();
    samples.sort();
    samples.dedup();
    assert_eq!(samples.len(), total, "a sample committed twice");
    // A step committed by a deposed leader would carry its older generation after steps of
    // the new leader's.
    let generations: Vec<u64> = stored.steps.iter().map(|s| s.generation).collect();
    assert!(
        generations.windows(2).all(|w| w[0] <= w[1]),
        "generations out of order (a deposed leader's commit?): {generations:?}"
    );
    let losses: Vec<f64> = stored.steps.iter().map(|s| s.loss).collect();
    let reference = reference();
    for (step, (a, b)) in losses.iter().zip(reference).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "step {step}: loss {a} against {b} without faults"
        );
    }
    println!(
        "ledger: {} steps, {} samples, each once; generations {}..={}; final loss {:.4} (uninterrupted: {:.4})",
        steps.len(),
        total,
        generations[0],
        generations.last().unwrap(),
        losses.last().unwrap(),
        reference.last().unwrap()
    );
}

#[test]
fn the_leader_killed_and_an_etcd_member_lost_the_job_goes_on_with_nothing_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reference();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut etcd = rt.block_on(LocalEtcd::cluster(3)).expect("a 3-member etcd");
    let state = cluster_url(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.keep();
    eprintln!("DIR {}", dir.display());
    let d = dir.as_path();
    let data = demo_corpus(d);
    let path = job(d, &data);
    let mut replicas = Replicas::start(&path, &state, d);
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| join_worker(&replicas.all(), d, &format!("worker-{i}"), &[]))
        .collect();

    // The leader names both standbys once it has read the election (every second).
    let (leader, s) = replicas.leader_where(&replicas.all(), "a leader with two standbys", |s| {
        s["step"].as_u64().unwrap_or(0) >= 15 && s["standbys"].as_array().map_or(0, Vec::len) == 2
    });
    let at_kill = s["step"].as_u64().unwrap();
    let generation = s["generation"].as_u64().unwrap();
    assert!(
        at_kill < STEPS / 2,
        "the job ran too far before the kill: {s}"
    );
    // The CLI names the leader and the standbys.
    let text = stagecoach_e2e::cli(&replicas.all(), &["status"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("leader:") && l.ends_with(&replicas.urls[leader])),
        "{text}"
    );

    // Only the leader is ready and serves the status page; standbys say where to look.
    for i in 0..3 {
        let (ready, _, _) = http_get(&replicas.http[i], "/readyz", None);
        let (page, _, body) = http_get(&replicas.http[i], "/", None);
        if i == leader {
            assert_eq!((ready, page), (200, 200), "the leader's /readyz and page");
            assert!(body.contains("<html") && body.contains("ha"), "{body}");
        } else {
            assert_eq!(
                (ready, page),
                (503, 503),
                "a standby's /readyz and page: {body}"
            );
        }
    }

    let killed = Instant::now();
    signal(&replicas.procs[leader], "-KILL");
    let _ = replicas.procs[leader].wait(Duration::from_secs(10));
    let others = replicas.others(leader);
    // The new leader's world, then a step it committed.
    let (next, s) = replicas.leader_where(&others, "a new leader's world", |s| {
        s["generation"].as_u64().unwrap_or(0) > generation
    });
    let (_, s) = replicas.leader_at(&others, s["step"].as_u64().unwrap() + 1);
    let takeover = killed.elapsed();
    assert_ne!(next, leader);
    println!(
        "takeover: leader {leader} killed at step {at_kill}; replica {next} led, formed generation {} and committed step {} {:.2} s later (election lease 2 s)",
        s["generation"], s["step"], takeover.as_secs_f64()
    );

    // An etcd member dies: the other two keep a quorum, training goes on.
    let at_member = s["step"].as_u64().unwrap();
    etcd[0].kill();
    let lost_member = Instant::now();
    let (_, s) = replicas.leader_at(&others, at_member + 10);
    println!(
        "etcd member 0 of 3 killed at step {at_member}: step {} committed {:.2} s later",
        s["step"],
        lost_member.elapsed().as_secs_f64()
    );
    finish_all(&mut replicas, &[leader], &mut workers);
    // Read through the members still up.
    check_ledger(&cluster_url(&etcd[1..]));
}

#[test]
fn a_leader_stopped_past_its_lease_commits_nothing_and_steps_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reference();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(LocalEtcd::start()).expect("a local etcd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let path = job(d, &data);
    let mut replicas = Replicas::start(&path, &etcd.url, d);
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| join_worker(&replicas.all(), d, &format!("worker-{i}"), &[]))
        .collect();

    let (leader, s) = replicas.leader_at(&replicas.all(), 15);
    let at_stop = s["step"].as_u64().unwrap();
    let generation = s["generation"].as_u64().unwrap();
    signal(&replicas.procs[leader], "-STOP");
    let stopped = Instant::now();
    let others = replicas.others(leader);
    let (next, s) = replicas.leader_where(&others, "a new leader's world", |s| {
        s["generation"].as_u64().unwrap_or(0) > generation
    });
    assert_ne!(next, leader);
    println!(
        "leader {leader} stopped at step {at_stop}; replica {next} leads generation {} at step {} {:.2} s later",
        s["generation"],
        s["step"],
        stopped.elapsed().as_secs_f64()
    );
    signal(&replicas.procs[leader], "-CONT");
    let status = replicas.procs[leader].wait(Duration::from_secs(30));
    let log = replicas.log(leader);
    assert_eq!(
        status.code(),
        Some(3),
        "the old leader must step down with status 3:\n{log}"
    );
    assert!(log.contains("stepping down"), "{log}");
    let reason = log
        .lines()
        .find(|l| l.contains("stepping down:"))
        .unwrap_or_default();
    println!("the old leader, continued: {reason}");
    finish_all(&mut replicas, &[leader], &mut workers);
    check_ledger(&etcd.url);
}
