//! The node agent (`stagecoach-worker join --devices cpu,cpu`) with real processes: its two
//! workers and one plain worker form a world of 3 that trains the losses of 3 plain workers; a
//! worker of the agent killed with SIGKILL is started again, rejoins, and the job completes with
//! every sample of the plan once in the ledger; SIGTERM stops the agent and its workers, and a
//! SIGKILLed agent takes its workers with it; the same restart through the agent's relay
//! (`--relay`, the workers' sessions in one node session), and through the relay a coordinator
//! killed and started again on its state: the agent's workers follow it without a restart of
//! their own; a worker that keeps failing, or whose job failed, stops the agent with the reason
//! instead of being started again and again.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{
    bin, coordinator, coordinator_at, coordinator_with_metrics, demo_corpus, free_port, http_get,
    join_worker, micro, micro_job, read_store, source_tokens, status, wait_for, wait_for_step,
    Proc, MIX,
};

/// The tests that train hold this, so that no two of them share the two cores.
static TRAINING: Mutex<()> = Mutex::new(());

fn training() -> std::sync::MutexGuard<'static, ()> {
    TRAINING.lock().unwrap_or_else(|p| p.into_inner())
}

/// A ledger step: its global loss and its samples (source, index).
type LedgerStep = (f64, Vec<(u32, u64)>);

/// Starts a node agent for `devices` against `url`: its workers log to `dir/NAME/worker-N.log`
/// and record their steps in `dir/NAME/steps-N.jsonl`, the agent itself logs to `dir/NAME.log`.
fn agent(url: &str, dir: &Path, name: &str, devices: &str, extra: &[&str]) -> Proc {
    let logs = dir.join(name);
    let mut cmd = Command::new(bin("stagecoach-worker"));
    cmd.args(["join", "--coordinator", url, "--devices", devices])
        .arg("--log-dir")
        .arg(&logs)
        .arg("--metrics-out")
        .arg(logs.join("steps.jsonl"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("agent log"));
    Proc::spawn("stagecoach-worker join --devices", &mut cmd)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The pids local rank `rank` of the agent `dir/NAME` was started as, in order, from the
/// agent's lines in the worker's log (`[local_rank 1] [agent] start 2 as pid 1234 on cpu`).
fn child_pids(dir: &Path, name: &str, rank: usize) -> Vec<u32> {
    read(&dir.join(name).join(format!("worker-{rank}.log")))
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("[local_rank {rank}] [agent] start "))?;
            let (_, pid) = rest.split_once(" as pid ")?;
            pid.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // pid (comm) STATE ...: the state follows the last parenthesis.
    let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}

/// Polls `cond` every 20 ms for at most `limit`; panics with `what` (and `context()`) past it.
fn wait_until(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

/// What the agent `dir/NAME` and its workers logged, for failure messages.
fn agent_logs(dir: &Path, name: &str, ranks: usize) -> String {
    let mut text = format!("--- {name}.log\n{}", read(&dir.join(format!("{name}.log"))));
    for r in 0..ranks {
        let p = dir.join(name).join(format!("worker-{r}.log"));
        text += &format!("--- {}\n{}", p.display(), read(&p));
    }
    text
}

fn ledger(state: &Path, job: &str) -> Vec<LedgerStep> {
    read_store(state.to_str().unwrap(), job)
        .steps
        .iter()
        .map(|s| {
            (
                s.loss,
                s.samples.iter().map(|r| (r.source, r.index)).collect(),
            )
        })
        .collect()
}

/// The samples of a `--metrics-out` file, in order.
fn trained(path: &Path) -> Vec<(u32, u64)> {
    read(path)
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The plan's first `steps` steps of the job at `path`, replayed from the job file alone.
fn plan(path: &Path, steps: u64) -> Vec<Vec<(u32, u64)>> {
    let spec = JobFile::load(path).unwrap().to_proto();
    let mut replay = Curriculum::new(&spec, &source_tokens(&spec)).unwrap();
    (0..steps)
        .map(|_| {
            replay
                .next_step()
                .unwrap()
                .samples
                .iter()
                .map(|s| (s.source as u32, s.index))
                .collect()
        })
        .collect()
}

const STEPS: u64 = 10;

#[test]
fn an_agent_of_two_cpu_workers_and_a_plain_worker_train_the_losses_of_three_plain_workers() {
    let _one_at_a_time = training();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = micro_job(d, "job.toml", "node", &data, STEPS, 3);

    // Three plain workers.
    let started = Instant::now();
    let state = d.join("state-plain");
    let (mut coord, url) = coordinator(&job, &state, &d.join("coordinator-plain.log"));
    let mut plain: Vec<Proc> = (0..3)
        .map(|i| join_worker(&url, d, &format!("plain-{i}"), &[]))
        .collect();
    let s = coord.wait(Duration::from_secs(300));
    assert!(s.success(), "{}", read(&d.join("coordinator-plain.log")));
    for w in &mut plain {
        assert!(
            w.wait(Duration::from_secs(60)).success(),
            "a plain worker failed"
        );
    }
    let reference = ledger(&state, "node");
    let plain_secs = started.elapsed().as_secs_f64();

    // An agent with two CPU workers, and one plain worker (another node).
    let started = Instant::now();
    let state = d.join("state-agent");
    let (mut coord, url) = coordinator(&job, &state, &d.join("coordinator-agent.log"));
    let mut node = agent(&url, d, "agent", "cpu,cpu", &[]);
    let other = d.join("other.jsonl");
    let mut other_worker = join_worker(
        &url,
        d,
        "other",
        &["--metrics-out", other.to_str().unwrap()],
    );
    let mut world = 0;
    let s = loop {
        let st = status(&url);
        world = world.max(st["world_size"].as_u64().unwrap_or(0));
        if let Some(s) = coord.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the job did not end: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let logs = || agent_logs(d, "agent", 2);
    assert!(
        s.success(),
        "{}\n{}",
        read(&d.join("coordinator-agent.log")),
        logs()
    );
    let agent_status = node.wait(Duration::from_secs(60));
    assert_eq!(agent_status.code(), Some(0), "{}", logs());
    assert!(other_worker.wait(Duration::from_secs(60)).success());
    let agent_secs = started.elapsed().as_secs_f64();
    assert_eq!(world, 3, "the world the status showed");
    let with_agent = ledger(&state, "node");
    println!(
        "3 plain workers: {plain_secs:.1} s; agent (cpu,cpu) + 1 plain worker: {agent_secs:.1} s"
    );

    assert_eq!(reference.len(), STEPS as usize);
    assert_eq!(with_agent.len(), STEPS as usize);
    for (step, ((l1, s1), (l2, s2))) in reference.iter().zip(&with_agent).enumerate() {
        let rel = (l1 - l2).abs() / l1.abs();
        println!(
            "step {step}: 3 plain workers {l1:.6}, agent + 1 worker {l2:.6}, relative difference {rel:.2e}"
        );
        assert!(rel <= 1e-5, "step {step}: {l1} vs {l2}");
        assert_eq!(s1, s2, "both runs follow the same plan");
    }
    // Each of the three ranks trained its own part, and together every sample once.
    let parts = [
        trained(&d.join("agent/steps-0.jsonl")),
        trained(&d.join("agent/steps-1.jsonl")),
        trained(&other),
    ];
    println!(
        "samples trained: local rank 0 {}, local rank 1 {}, the plain worker {}",
        parts[0].len(),
        parts[1].len(),
        parts[2].len()
    );
    assert!(
        parts.iter().all(|p| !p.is_empty()),
        "a rank trained nothing"
    );
    let mut union = parts.concat();
    let mut ledger: Vec<(u32, u64)> = with_agent.into_iter().flat_map(|(_, s)| s).collect();
    union.sort();
    ledger.sort();
    assert_eq!(
        union, ledger,
        "the ranks' samples are the ledger's, each once"
    );
    // Each worker of the agent had its own log, device and environment.
    for r in 0..2 {
        let log = read(&d.join(format!("agent/worker-{r}.log")));
        assert!(
            log.contains(&format!("[local_rank {r}] [agent] start 1 as pid")),
            "{log}"
        );
        assert!(log.contains("registered"), "{log}");
        assert!(log.contains("finished (exit status 0)"), "{log}");
    }
}

#[test]
fn a_killed_worker_of_the_agent_is_started_again_and_the_job_completes_exactly() {
    killed_worker_is_started_again(&[]);
}

/// The same through the agent's relay (`--relay`): the workers reach the coordinator over one
/// node session; the killed worker's session ends with it, its restart registers and attaches
/// inside the same node session, and the job completes exactly.
#[test]
fn through_the_agents_relay_a_killed_worker_is_started_again_and_the_job_completes_exactly() {
    killed_worker_is_started_again(&["--relay"]);
}

fn killed_worker_is_started_again(agent_options: &[&str]) {
    const STEPS: u64 = 30;
    let _one_at_a_time = training();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = micro("restart", &data, 3)
        .stage("main", STEPS, 64, MIX)
        .set("data.seed", 5)
        .set("train.log_every", 5)
        .set("workers.rendezvous_ms", 1000)
        .write(d.join("restart.toml"));
    let state = d.join("state");
    let (mut coord, url, metrics) =
        coordinator_with_metrics(&job, &state, &d.join("coordinator.log"));
    let mut node = agent(&url, d, "agent", "cpu,cpu", agent_options);
    let mut other = join_worker(&url, d, "other", &[]);
    let logs = || {
        format!(
            "{}\n{}",
            read(&d.join("coordinator.log")),
            agent_logs(d, "agent", 2)
        )
    };

    wait_for_step(&url, 3);
    let first = child_pids(d, "agent", 1);
    assert_eq!(first.len(), 1, "{}", logs());
    // The coordinator counts the node sessions and the workers inside them: the agent's two
    // through its relay, none without (the plain worker has a session of its own).
    let gauge = |name: &str| {
        let addr = metrics
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        let (code, _, body) = http_get(addr, "/metrics", None);
        assert_eq!(code, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let relayed = agent_options.contains(&"--relay");
    let (sessions, workers) = if relayed { (1.0, 2.0) } else { (0.0, 0.0) };
    assert_eq!(gauge("stagecoach_node_sessions"), sessions);
    assert_eq!(gauge("stagecoach_node_session_workers"), workers);
    if relayed {
        // The workers reach the agent's relay on loopback, not the coordinator, with the
        // agent's token.
        let agent_log = read(&d.join("agent.log"));
        let relay = agent_log
            .split("relay=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("the agent names its relay: {agent_log}"))
            .to_owned();
        assert!(relay.starts_with("http://127.0.0.1:"), "{relay}");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", first[0])).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let coordinator_arg = args
            .iter()
            .position(|a| a == "--coordinator")
            .map(|i| args[i + 1].as_str());
        assert_eq!(coordinator_arg, Some(relay.as_str()), "{args:?}");
        assert!(!args.contains(&url), "{args:?}");
        let environ = std::fs::read(format!("/proc/{}/environ", first[0])).unwrap();
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|v| v.starts_with(b"STAGECOACH_TOKEN=") && v.len() == 17 + 64),
            "the relay's token in the worker's environment"
        );
    }
    signal(first[0], "-KILL");
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "the restart of local rank 1",
        || child_pids(d, "agent", 1).len() >= 2,
        logs,
    );
    let restarted = killed.elapsed();
    let s = wait_for(&url, Duration::from_secs(120), "a new world of 3", |s| {
        (s["generation"].as_u64() >= Some(2) && s["world_size"] == 3) || s["state"] == "finished"
    });
    let formed = killed.elapsed();
    println!(
        "kill -9 of local rank 1 at step {}: started again after {restarted:.1?}, a world of 3 \
         (generation {}) after {formed:.1?}",
        s["step"], s["generation"]
    );
    let finished = coord.wait(Duration::from_secs(300));
    assert!(finished.success(), "{}", logs());
    println!("the job finished {:.1?} after the kill", killed.elapsed());
    assert_eq!(
        node.wait(Duration::from_secs(60)).code(),
        Some(0),
        "{}",
        logs()
    );
    assert!(other.wait(Duration::from_secs(60)).success());
    let pids = child_pids(d, "agent", 1);
    assert_eq!(pids.len(), 2, "started once again, not more: {}", logs());
    assert!(!alive(pids[0]));
    let rank1 = read(&d.join("agent/worker-1.log"));
    assert!(
        rank1.contains("killed by SIGKILL (signal 9)") && rank1.contains("restart 1 in"),
        "{rank1}"
    );
    assert_eq!(
        child_pids(d, "agent", 0).len(),
        1,
        "local rank 0 ran throughout"
    );
    // The restart recorded its steps in a file of its own.
    assert!(
        !trained(&d.join("agent/steps-1.restart1.jsonl")).is_empty(),
        "the restarted worker trained nothing"
    );

    // The ledger: every step of the plan once, in order, each with the plan's samples.
    let store = read_store(state.to_str().unwrap(), "restart");
    assert_eq!(
        store.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..STEPS).collect::<Vec<_>>()
    );
    assert!(store.steps.last().unwrap().generation >= 2);
    let expected = plan(&job, STEPS);
    for (s, want) in store.steps.iter().zip(&expected) {
        let got: Vec<(u32, u64)> = s.samples.iter().map(|r| (r.source, r.index)).collect();
        assert_eq!(&got, want, "step {}", s.step);
    }
    let mut all: Vec<(u32, u64)> = expected.concat();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a sample twice in the plan's prefix");
}

/// Through the agent's relay, the coordinator is killed with SIGKILL mid-job and started again
/// on the same state and address: the node session breaks, the agent's workers register again
/// through the relay (no worker process is started again), a new world forms, and the job ends
/// with every step of the plan once in the ledger.
#[test]
fn through_the_agents_relay_the_workers_follow_a_restarted_coordinator() {
    const STEPS: u64 = 30;
    let _one_at_a_time = training();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    let job = micro("relayed-restart", &data, 2)
        .stage("main", STEPS, 64, MIX)
        .set("data.seed", 7)
        .set("train.log_every", 5)
        .set("workers.rendezvous_ms", 1000)
        .write(d.join("relayed-restart.toml"));
    let state = d.join("state");
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut coord, url) = coordinator_at(&job, &state, &d.join("coordinator-1.log"), &listen);
    let mut node = agent(
        &url,
        d,
        "agent",
        "cpu,cpu",
        &["--relay", "--reconnect-secs", "60"],
    );
    let logs = || {
        format!(
            "{}\n{}\n{}\n{}",
            read(&d.join("coordinator-1.log")),
            read(&d.join("coordinator-2.log")),
            read(&d.join("agent.log")),
            agent_logs(d, "agent", 2)
        )
    };
    wait_for_step(&url, 10);
    let pids: Vec<Vec<u32>> = (0..2).map(|r| child_pids(d, "agent", r)).collect();
    coord.child.kill().unwrap();
    let _ = coord.child.wait();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let (mut coord, _) = coordinator_at(&job, &state, &d.join("coordinator-2.log"), &listen);
    let s = wait_for(&url, Duration::from_secs(120), "training again", |s| {
        s["state"] == "finished" || (s["state"] == "running" && s["world_size"] == 2)
    });
    println!(
        "coordinator restarted under the relay: a world of {} at step {} after {:.1?}",
        s["world_size"],
        s["step"],
        killed.elapsed()
    );
    let finished = coord.wait(Duration::from_secs(300));
    assert!(finished.success(), "{}", logs());
    assert_eq!(
        node.wait(Duration::from_secs(60)).code(),
        Some(0),
        "{}",
        logs()
    );
    for (rank, before) in pids.iter().enumerate() {
        assert_eq!(
            &child_pids(d, "agent", rank),
            before,
            "local rank {rank} followed the coordinator without being started again: {}",
            logs()
        );
    }
    let store = read_store(state.to_str().unwrap(), "relayed-restart");
    assert_eq!(
        store.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..STEPS).collect::<Vec<_>>(),
        "every step committed once"
    );
    let before = store.steps[..=10]
        .iter()
        .map(|s| s.generation)
        .max()
        .unwrap();
    assert!(
        store.steps.last().unwrap().generation > before,
        "the steps after the restart were trained in a world the new coordinator formed"
    );
    let expected = plan(&job, STEPS);
    for (s, want) in store.steps.iter().zip(&expected) {
        let got: Vec<(u32, u64)> = s.samples.iter().map(|r| (r.source, r.index)).collect();
        assert_eq!(&got, want, "step {}", s.step);
    }
}

#[test]
fn sigterm_stops_the_agent_and_its_workers_and_a_killed_agent_takes_them_along() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A job for 5 workers: the agents' two register and wait for more, alive and idle.
    let data = demo_corpus(d);
    let job = micro("signals", &data, 5)
        .stage("main", 10, 64, MIX)
        .write(d.join("signals.toml"));
    let (_coord, url) = coordinator(&job, &d.join("state"), &d.join("coordinator.log"));

    let both_registered = |name: &str| {
        let logs = || agent_logs(d, name, 2);
        wait_until(
            Duration::from_secs(90),
            "both workers registered",
            || {
                (0..2).all(|r| {
                    read(&d.join(name).join(format!("worker-{r}.log"))).contains("registered")
                })
            },
            logs,
        );
        let pids: Vec<u32> = (0..2).map(|r| child_pids(d, name, r)[0]).collect();
        assert!(pids.iter().all(|&p| alive(p)), "{}", logs());
        pids
    };

    // SIGTERM: forwarded, every worker exits, the agent exits 128 + 15 and says so.
    let mut term = agent(&url, d, "term", "cpu,cpu", &["--grace-secs", "20"]);
    let pids = both_registered("term");
    signal(term.child.id(), "-TERM");
    let sent = Instant::now();
    let code = term.wait(Duration::from_secs(60));
    let took = sent.elapsed();
    let log = read(&d.join("term.log"));
    println!("SIGTERM: the agent exited with {code} after {took:.1?}");
    assert_eq!(code.code(), Some(143), "{log}");
    assert!(
        log.contains(
            "stopped by SIGTERM: 2 worker(s) ended within the 20 s grace period, 0 killed"
        ),
        "{log}"
    );
    for p in pids {
        assert!(!alive(p), "worker pid {p} outlived its agent");
    }

    // SIGKILL: the agent cannot forward anything; the kernel's parent-death signal stops the
    // workers. (Not the closed pipe of their output: Rust ignores SIGPIPE, and idle workers
    // write nothing.)
    let mut kill = agent(&url, d, "kill", "cpu,cpu", &[]);
    let pids = both_registered("kill");
    kill.child.kill().unwrap();
    let sent = Instant::now();
    kill.wait(Duration::from_secs(10));
    wait_until(
        Duration::from_secs(30),
        "the workers of a SIGKILLed agent exiting",
        || pids.iter().all(|&p| !alive(p)),
        || format!("pids {pids:?}\n{}", agent_logs(d, "kill", 2)),
    );
    println!(
        "SIGKILL of the agent: both workers gone {:.1?} after",
        sent.elapsed()
    );
}

#[test]
fn a_worker_that_keeps_failing_stops_the_agent_once_its_restarts_are_spent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A coordinator address nobody listens at: every worker fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut node = agent(
        &url,
        d,
        "failing",
        "cpu,cpu",
        &["--max-restarts", "2", "--restart-window-secs", "600"],
    );
    let started = Instant::now();
    let code = node.wait(Duration::from_secs(120));
    let took = started.elapsed();
    let log = read(&d.join("failing.log"));
    println!("--max-restarts 2: the agent exited with {code} after {took:.1?}");
    assert_eq!(code.code(), Some(1), "{log}");
    assert!(
        log.contains("stopped again after 2 restart(s) within 600 s")
            && log.contains("its restart budget is spent (--max-restarts 2")
            // The worker's error, said once: `coordinator: ` is not repeated.
            && log.contains(&format!("Error: coordinator: cannot reach the coordinator at {url}"))
            && log.contains("every worker of this node was stopped"),
        "{log}"
    );
    for r in 0..2 {
        let starts = child_pids(d, "failing", r).len();
        assert!(starts <= 3, "local rank {r} started {starts} times:\n{log}");
    }
    assert!(
        (0..2).any(|r| child_pids(d, "failing", r).len() == 3),
        "no worker used its two restarts:\n{}",
        agent_logs(d, "failing", 2)
    );
}

#[test]
fn a_worker_whose_job_failed_is_not_started_again() {
    let _one_at_a_time = training();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);
    // One transient failure at a step is retried, the second fails the job.
    let job = micro("fails", &data, 3)
        .stage("main", 20, 64, MIX)
        .set("workers.rendezvous_ms", 500)
        .set("recovery.max_failures", 1)
        .set("recovery.backoff_ms", 200)
        .set("recovery.on_exhausted", "fail")
        .write(d.join("fails.toml"));
    let (mut coord, url) = coordinator(&job, &d.join("state"), &d.join("coordinator.log"));
    let mut node = agent(&url, d, "agent", "cpu,cpu", &["--reconnect-secs", "10"]);
    let logs = || {
        format!(
            "{}\n{}",
            read(&d.join("coordinator.log")),
            agent_logs(d, "agent", 2)
        )
    };
    // A plain worker that crashes before step 2, then another that does the same.
    let mut first = join_worker(&url, d, "crash-1", &["--kill-at-step", "2"]);
    assert!(
        !first.wait(Duration::from_secs(120)).success(),
        "{}",
        logs()
    );
    let _second = join_worker(&url, d, "crash-2", &["--kill-at-step", "2"]);
    let code = node.wait(Duration::from_secs(120));
    let log = read(&d.join("agent.log"));
    println!("the job failed: the agent exited with {code}");
    assert_eq!(code.code(), Some(1), "{}", logs());
    assert!(
        log.contains("the job failed") && log.contains("every worker of this node was stopped"),
        "{}",
        logs()
    );
    for r in 0..2 {
        let wlog = read(&d.join(format!("agent/worker-{r}.log")));
        assert_eq!(
            child_pids(d, "agent", r).len(),
            1,
            "local rank {r} was started again:\n{wlog}"
        );
        assert!(!wlog.contains("[agent] restart"), "{wlog}");
    }
    assert!(
        (0..2).any(|r| read(&d.join(format!("agent/worker-{r}.log"))).contains("exit status 3")),
        "{}",
        logs()
    );
    assert!(
        !coord.wait(Duration::from_secs(60)).success(),
        "the job should have failed"
    );
}
