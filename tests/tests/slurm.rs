//! Slurm: `deploy/slurm/stagecoach.sbatch` on a real one-host Slurm cluster. Each test
//! configures Debian's munged, slurmctld and slurmd in a temporary folder (its own munge key
//! and socket, free ports, state and spool folders, the node's CPUs and memory from `slurmd
//! -C`), starts them in the foreground as child processes, submits the script with `sbatch` to
//! train the micro job on two CPU workers (`cpu,cpu` on the one node) over mutual TLS, and reads
//! what Slurm and the state store say afterwards.
//!
//! `sacct` needs slurmdbd (and a MySQL server) to answer from accounting; without it the
//! cluster records each job's end with `jobcomp/filetxt`, which `sacct --completion` reads: the
//! tests ask that, and `scontrol show job` while the controller keeps the job.
//!
//! Every process a test starts carries a marker in its environment (the daemons, and through
//! sbatch's environment every process of a job); when a cluster stops, none may be left.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stagecoach_e2e::{bin, bin_dir, demo_corpus, micro, read_store, workspace_dir, Proc, MIX};

const MUNGED: &str = "/usr/sbin/munged";
const SLURMCTLD: &str = "/usr/sbin/slurmctld";
const SLURMD: &str = "/usr/sbin/slurmd";
const SBATCH: &str = "/usr/bin/sbatch";
/// The environment variable that marks the processes of one test cluster (its folder).
const MARKER: &str = "STAGECOACH_SLURM_TEST";

/// One cluster at a time: the machine has few cores, and each job takes the whole node.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// A one-host Slurm cluster whose daemons are this test's children.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    node: String,
    /// munged, slurmctld, slurmd, in the order they started.
    daemons: Vec<Proc>,
    stopped: bool,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let start = Instant::now();
        let marker = dir.to_string_lossy().into_owned();
        let logs = dir.join("log");
        std::fs::create_dir_all(&logs).unwrap();

        // munge: a key of our own (readable by us alone, in a folder only we enter) and a socket
        // in a folder everyone may enter, as munged insists.
        let keys = dir.join("munge-key");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").unwrap(),
            &mut bytes,
        )
        .unwrap();
        std::fs::write(&key, &bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let run = dir.join("munge");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = run.join("munge.socket");
        let mut cmd = Command::new(MUNGED);
        cmd.args(["--foreground", "--force"])
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", run.join("munged.pid").display()))
            .arg(format!("--log-file={}", logs.join("munged.log").display()))
            .arg(format!("--seed-file={}", run.join("munged.seed").display()))
            .env(MARKER, &marker)
            .stdout(log_file(&logs, "munged.out"))
            .stderr(log_file(&logs, "munged.out"));
        let mut daemons = vec![Proc::spawn("munged", &mut cmd)];
        poll(Duration::from_secs(20), "munged's socket", || {
            socket.exists().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}:\n{}", read(&logs.join("munged.out"))));

        // The node as slurmd sees this machine: `NodeName=host CPUs=... RealMemory=...`.
        let hw = output(Command::new(SLURMD).arg("-C"));
        let node_line = hw
            .lines()
            .find(|l| l.starts_with("NodeName="))
            .unwrap_or_else(|| panic!("`slurmd -C` printed no NodeName line:\n{hw}"))
            .trim()
            .to_owned();
        let node = node_line["NodeName=".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        let user = output(Command::new("id").arg("-un")).trim().to_owned();
        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let slurm = dir.join("slurm");
        for d in ["state", "spool"] {
            std::fs::create_dir_all(slurm.join(d)).unwrap();
        }
        let conf = slurm.join("slurm.conf");
        let p = |name: &str| slurm.join(name).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "# A one-host test cluster (tests/tests/slurm.rs).
ClusterName=stagecoach-test
SlurmctldHost={node}
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={slurmd_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={slurmd_log}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
{node_line} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
",
                socket = socket.display(),
                state = p("state"),
                spool = p("spool"),
                ctld_pid = p("slurmctld.pid"),
                slurmd_pid = p("slurmd.pid"),
                ctld_log = logs.join("slurmctld.log").display(),
                slurmd_log = logs.join("slurmd.log").display(),
                jobcomp = logs.join("jobcomp.txt").display(),
            ),
        )
        .unwrap();
        for (name, exe) in [("slurmctld", SLURMCTLD), ("slurmd", SLURMD)] {
            let mut cmd = Command::new(exe);
            cmd.arg("-D")
                .arg("-f")
                .arg(&conf)
                .env("SLURM_CONF", &conf)
                .env(MARKER, &marker)
                .stdout(log_file(&logs, &format!("{name}.out")))
                .stderr(log_file(&logs, &format!("{name}.out")));
            daemons.push(Proc::spawn(name, &mut cmd));
        }
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            conf,
            node,
            daemons,
            stopped: false,
        };
        let idle = poll(Duration::from_secs(60), "the node idle in sinfo", || {
            let out = cluster
                .cmd("sinfo")
                .args(["-h", "-n", &cluster.node, "-o", "%t"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "idle").then_some(())
        });
        if let Err(e) = idle {
            let logs = cluster.logs();
            cluster.stop();
            panic!("{e}\n{logs}");
        }
        println!(
            "slurm cluster (munged, slurmctld, slurmd; node {} from `slurmd -C`) up and idle in {:.1?}",
            cluster.node,
            start.elapsed()
        );
        cluster
    }

    /// A Slurm client command against this cluster, marked as this test's.
    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf)
            .env(MARKER, self.dir.to_string_lossy().as_ref());
        cmd
    }

    /// Runs a client command; panics with its output unless it succeeds.
    fn run(&self, program: &str, args: &[&str]) -> String {
        output(self.cmd(program).args(args))
    }

    /// Submits `deploy/slurm/stagecoach.sbatch` with `env` (the rest of this process's
    /// environment goes along, as sbatch exports it); returns the job id.
    fn sbatch(&self, name: &str, env: &[(&str, PathBuf)], remove: &[&str]) -> u32 {
        let script = workspace_dir().join("deploy/slurm/stagecoach.sbatch");
        let mut cmd = self.cmd(SBATCH);
        cmd.arg("--parsable")
            .arg(format!("--job-name={name}"))
            .arg(format!("--chdir={}", self.dir.display()))
            .arg(format!(
                "--output={}",
                self.dir.join(format!("{name}-%j.out")).display()
            ))
            .arg(&script);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let out = output(&mut cmd);
        out.trim()
            .split(';')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("sbatch printed no job id: {out:?}"))
    }

    /// `scontrol show job -o ID` as key=value pairs (empty once the controller forgot the job).
    fn job(&self, id: u32) -> BTreeMap<String, String> {
        let out = self
            .cmd("scontrol")
            .args(["show", "job", "-o", &id.to_string()])
            .output()
            .expect("run scontrol");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Waits until job `id`'s state (`JobState`, with `Reason`) satisfies `done`.
    fn wait_job(
        &self,
        id: u32,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id);
            if done(&job) {
                return job;
            }
            if Instant::now() > deadline {
                panic!(
                    "job {id}: {what} did not happen within {limit:?}; it is {:?} ({:?})\n{}",
                    job.get("JobState"),
                    job.get("Reason"),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sacct --completion` (the jobcomp/filetxt records): one (state, exit code) per end of
    /// job `id`, a requeue included.
    fn completions(&self, id: u32) -> Vec<(String, String)> {
        self.run(
            "sacct",
            &[
                "--completion",
                "-n",
                "-P",
                "-j",
                &id.to_string(),
                "-o",
                "JobID,State,ExitCode",
            ],
        )
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 3 && f[0] == id.to_string()).then(|| (f[1].to_owned(), f[2].to_owned()))
        })
        .collect()
    }

    /// The daemons' logs, for a failure message.
    fn logs(&self) -> String {
        ["slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let text = read(&self.dir.join("log").join(f));
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {f} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Cancels every job, stops the daemons (slurmd, slurmctld, munged), and waits for every
    /// process of this cluster to be gone; kills the ones still there after that and returns
    /// them (`pid command`).
    fn stop(&mut self) -> Vec<String> {
        if self.stopped {
            return vec![];
        }
        self.stopped = true;
        let queued = self
            .cmd("squeue")
            .args(["-h", "-o", "%i"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in queued.split_whitespace() {
            let _ = self.cmd("scancel").arg(id).status();
        }
        let _ = poll(Duration::from_secs(60), "an empty queue", || {
            let out = self.cmd("squeue").arg("-h").output().ok()?;
            (out.status.success() && out.stdout.is_empty()).then_some(())
        });
        for mut d in self.daemons.drain(..).rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &d.child.id().to_string()])
                .status();
            let _ = poll(Duration::from_secs(15), "a daemon to stop", || {
                d.child.try_wait().ok().flatten()
            });
            // Dropping it kills what is left of it.
        }
        let marker = self.dir.to_string_lossy().into_owned();
        if poll(Duration::from_secs(20), "every process gone", || {
            marked(&marker).is_empty().then_some(())
        })
        .is_ok()
        {
            return vec![];
        }
        let left = marked(&marker);
        for (pid, _) in &left {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        left.into_iter()
            .map(|(pid, cmd)| format!("{pid} {cmd}"))
            .collect()
    }
}

/// Why Slurm cannot run here, if it cannot: `make setup` installs Debian's munge, slurmctld,
/// slurmd and slurm-client (the Makefile's SERVICES); where they are absent the tests say so
/// and do nothing.
fn slurm_missing() -> Option<String> {
    let missing: Vec<&str> = [MUNGED, SLURMCTLD, SLURMD, SBATCH]
        .into_iter()
        .filter(|b| !Path::new(b).exists())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "skipped: {} missing (Debian's munge, slurmctld, slurmd, slurm-client; `make setup` installs them)",
            missing.join(", ")
        )
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let left = self.stop();
        if !left.is_empty() {
            eprintln!("killed processes the cluster left behind: {left:?}");
        }
    }
}

/// Processes whose environment carries `MARKER=marker` (this process excluded), with their
/// command lines.
fn marked(marker: &str) -> Vec<(u32, String)> {
    let want = format!("{MARKER}={marker}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes()))
        })
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (pid, cmd.trim().to_owned())
        })
        .collect()
}

/// Calls `f` every 100 ms until it returns something, at most `limit`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("a log file")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs `cmd`; panics with its output unless it succeeds; returns its stdout.
fn output(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A job's files: the micro job training on the demo corpus, certificates for the node, the
/// run folder the script writes into.
struct Setup {
    job: PathBuf,
    certs: PathBuf,
    run: PathBuf,
}

impl Setup {
    fn new(dir: &Path, cluster: &Cluster, name: &str, steps: u64, every: i64) -> Setup {
        let data = demo_corpus(dir);
        // The micro job (as `micro_job` writes it), checkpoints every `every` steps, all kept:
        // the requeue test reads the ones a restore used.
        let job = micro(name, &data, 2)
            .stage("main", steps, 64, MIX)
            .set(
                "schedule.decay_start.step",
                steps.saturating_sub(4).max(4) as i64,
            )
            .set("data.seed", 3)
            .set("train.log_every", 5)
            .set("checkpoints.every_steps", every)
            .set("checkpoints.keep", 1000)
            .write(dir.join("job.toml"));
        let certs = dir.join("certs");
        output(
            Command::new(bin("stagecoach"))
                .args(["certs", "init"])
                .arg(&certs)
                .args(["--host", &cluster.node]),
        );
        Setup {
            job,
            certs,
            run: dir.join("run"),
        }
    }

    /// What the script is given: the job, two CPU workers, mutual TLS, free ports.
    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("STAGECOACH_JOB", self.job.clone()),
            ("STAGECOACH_DEVICES", "cpu,cpu".into()),
            ("STAGECOACH_BIN", bin_dir()),
            ("STAGECOACH_CERTS", self.certs.clone()),
            ("STAGECOACH_RUN_DIR", self.run.clone()),
            ("STAGECOACH_PORT", "0".into()),
            ("STAGECOACH_METRICS_PORT", "0".into()),
        ]
    }

    /// `stagecoach status --json` against the coordinator the run folder names, as an operator
    /// (Null while there is none to answer).
    fn status(&self) -> serde_json::Value {
        let Ok(url) = std::fs::read_to_string(self.run.join("coordinator.url")) else {
            return serde_json::Value::Null;
        };
        let c = &self.certs;
        let out = Command::new(bin("stagecoach"))
            .args(["--coordinator", url.trim()])
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("operator.pem"))
            .arg("--key")
            .arg(c.join("operator.key"))
            .args(["status", "--json"])
            .output()
            .expect("run stagecoach");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until attempt `attempt`'s coordinator reports a step of at least `step`.
    fn wait_step(&self, attempt: u32, step: u64, limit: Duration) -> serde_json::Value {
        let out = self.attempt(attempt).join("coordinator.out");
        poll(limit, &format!("step {step} in attempt {attempt}"), || {
            // The URL file may still name the previous attempt's coordinator.
            read(&out).contains("metrics on ").then_some(())?;
            let s = self.status();
            (s["step"].as_u64()? >= step).then_some(s)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}; last status {}\n{}",
                self.status(),
                read(&self.attempt(attempt).join("coordinator.log"))
            )
        })
    }

    fn attempt(&self, n: u32) -> PathBuf {
        self.run.join(format!("attempt-{n}"))
    }
}

/// Every step of `0..steps` once in the ledger with a full batch, and no sample twice.
fn assert_ledger_complete(steps: &[stagecoach_proto::v1::LedgerStep], total: u64) {
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>(),
        "the ledger should hold every step once"
    );
    assert!(steps.iter().all(|s| s.samples.len() == 8));
    let mut all: Vec<(u32, u64)> = steps
        .iter()
        .flat_map(|s| s.samples.iter().map(|r| (r.source, r.index)))
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a sample was trained in two committed steps");
}

#[test]
fn the_sbatch_script_trains_a_job_to_completion_on_slurm() {
    if let Some(why) = slurm_missing() {
        println!("{why}");
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bin("stagecoach-worker");
    let mut cluster = Cluster::start(dir);
    let setup = Setup::new(dir, &cluster, "slurm", 60, 50);
    let env = setup.env();

    // Without certificates or a deliberate STAGECOACH_INSECURE=1 the script refuses to start
    // a coordinator other machines can reach, and says what to set.
    let mut without: Vec<(&str, PathBuf)> = env
        .iter()
        .filter(|(k, _)| !matches!(*k, "STAGECOACH_CERTS" | "STAGECOACH_RUN_DIR"))
        .cloned()
        .collect();
    without.push(("STAGECOACH_RUN_DIR", dir.join("refused-run")));
    let refused = cluster.sbatch(
        "refused",
        &without,
        &["STAGECOACH_CERTS", "STAGECOACH_INSECURE"],
    );
    let job = cluster.wait_job(refused, Duration::from_secs(60), "the end", |j| {
        j.get("JobState").is_some_and(|s| s == "FAILED")
    });
    let out = read(&dir.join(format!("refused-{refused}.out")));
    assert!(
        out.contains("neither STAGECOACH_CERTS nor STAGECOACH_INSECURE=1 is set"),
        "{job:?}\n{out}"
    );
    assert!(
        !dir.join("refused-run/attempt-0/coordinator.out").exists(),
        "{out}"
    );

    let submitted = Instant::now();
    let id = cluster.sbatch("slurm", &env, &["STAGECOACH_INSECURE"]);
    cluster.wait_job(id, Duration::from_secs(60), "RUNNING", |j| {
        j.get("JobState").is_some_and(|s| s != "PENDING")
    });
    let queued = submitted.elapsed();
    // Watched as the README says: the URL from the run folder, the operator's certificate.
    let first = setup.wait_step(0, 1, Duration::from_secs(120));
    let to_first_step = submitted.elapsed();
    assert_eq!(first["workers_alive"], 2, "{first}");
    let job = cluster.wait_job(id, Duration::from_secs(240), "the end", |j| {
        j.get("JobState")
            .is_some_and(|s| !matches!(s.as_str(), "PENDING" | "RUNNING" | "COMPLETING"))
    });
    let wall = submitted.elapsed();
    let out = read(&dir.join(format!("slurm-{id}.out")));
    let attempt = setup.attempt(0);
    assert_eq!(
        job.get("JobState").map(String::as_str),
        Some("COMPLETED"),
        "{job:?}\n{out}\n{}",
        read(&attempt.join("coordinator.log"))
    );
    assert_eq!(job.get("ExitCode").map(String::as_str), Some("0:0"));
    assert_eq!(
        cluster.completions(id),
        vec![("COMPLETED".to_owned(), "0:0".to_owned())],
        "sacct --completion"
    );
    assert!(out.contains("job ended at step 60 of 60"), "{out}");

    // The node agent's log and its two workers' logs, under the run folder.
    let node = &cluster.node;
    assert!(attempt.join(format!("node-{node}.log")).exists(), "{out}");
    for w in 0..2 {
        let log = read(&attempt.join(node).join(format!("worker-{w}.log")));
        assert!(log.contains("registered"), "worker {w}:\n{log}");
    }
    let coordinator = read(&attempt.join("coordinator.log"));
    assert!(coordinator.contains("tls=true"), "{coordinator}");
    assert!(coordinator.contains("world_size=2"), "{coordinator}");

    let store = read_store(setup.run.join("state").to_str().unwrap(), "slurm");
    assert_ledger_complete(&store.steps, 60);
    assert!(store.rolled_back.is_empty());
    assert!(store.checkpoints.iter().any(|c| c.step == 60));

    let left = cluster.stop();
    assert!(
        left.is_empty(),
        "processes left after the cluster stopped: {left:?}"
    );
    println!(
        "sbatch → running {queued:.1?}, → first step {to_first_step:.1?}, job wall time (60 steps, 2 CPU workers, mutual TLS) {wall:.1?}; sacct --completion: COMPLETED"
    );
}

/// From attempt `n`'s coordinator log: the restore of a requeued job that found no worker with
/// its state, as (steps in the ledger, checkpoint step restored). Waits for it: the attempt's
/// world forms once its workers registered.
fn restore_in(setup: &Setup, n: u32) -> (u64, u64) {
    let path = setup.attempt(n).join("coordinator.log");
    let line = poll(Duration::from_secs(120), "the restore", || {
        read(&path)
            .lines()
            .find(|l| l.contains("restoring a checkpoint on every rank"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("attempt {n} restored no checkpoint ({e}):\n{}", read(&path)));
    let number_after = |pat: &str| -> u64 {
        let i = line
            .rfind(pat)
            .unwrap_or_else(|| panic!("no {pat:?} in {line}"))
            + pat.len();
        line[i..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("no number after {pat:?} in {line}"))
    };
    (
        number_after("holds the state of step "),
        number_after(" step="),
    )
}

/// The steps of the checkpoints attempt `n`'s coordinator saved.
fn saved_in(setup: &Setup, n: u32) -> Vec<u64> {
    read(&setup.attempt(n).join("coordinator.log"))
        .lines()
        .filter_map(|l| {
            let i = l.find("checkpoint saved step=")? + "checkpoint saved step=".len();
            l[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until the job is back in the queue (a requeue), releases Slurm's hold on it (a requeued
/// job may start only 120 s later), and waits until it runs as attempt `attempt`; returns when
/// it left the node and when it ran again.
fn requeued(cluster: &Cluster, id: u32, attempt: u32, since: Instant) -> (Duration, Duration) {
    cluster.wait_job(id, Duration::from_secs(90), "the requeue", |j| {
        j.get("JobState").is_some_and(|s| s == "PENDING")
            && j.get("Restarts") == Some(&attempt.to_string())
    });
    // Pending with COMPLETING while its processes stop, then only PENDING.
    poll(
        Duration::from_secs(90),
        "the requeued job off the node",
        || {
            let out = cluster
                .cmd("squeue")
                .args(["-h", "-j", &id.to_string(), "-o", "%T"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "PENDING").then_some(())
        },
    )
    .unwrap();
    let off = since.elapsed();
    // slurmd refuses a launch whose credential was created in the same second as, or before,
    // the job's revocation (`cred->ctime <= j->revoked`, whole seconds): released at once, the
    // new start can land in that second and FAIL with "Job credential revoked". The job is off
    // the node, so the revocation is behind us; two seconds put the new credential past it.
    std::thread::sleep(Duration::from_secs(2));
    cluster.run(
        "scontrol",
        &["update", &format!("JobId={id}"), "StartTime=now"],
    );
    cluster.wait_job(id, Duration::from_secs(60), "the restart", |j| {
        j.get("JobState").is_some_and(|s| s == "RUNNING")
    });
    (off, since.elapsed())
}

#[test]
fn a_requeued_job_resumes_from_its_ledger_and_checkpoints() {
    if let Some(why) = slurm_missing() {
        println!("{why}");
        return;
    }
    // Long enough for both interruptions (after step 120, then 60 steps later) and a finish.
    const STEPS: u64 = 260;
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bin("stagecoach-worker");
    let mut cluster = Cluster::start(dir);
    let setup = Setup::new(dir, &cluster, "requeue", STEPS, 50);
    let env = setup.env();
    let prepared = began.elapsed();
    let submitted = Instant::now();
    let id = cluster.sbatch("requeue", &env, &["STAGECOACH_INSECURE"]);
    let out = dir.join(format!("requeue-{id}.out"));

    // 1. `scontrol requeue` mid-run: Slurm stops every process of the job at once, and the job
    // starts again from its ledger and its last checkpoint.
    setup.wait_step(0, 120, Duration::from_secs(180));
    let to_120 = submitted.elapsed();
    let t = Instant::now();
    cluster.run("scontrol", &["requeue", &id.to_string()]);
    let (off, running) = requeued(&cluster, id, 1, t);
    let first_step = poll(Duration::from_secs(120), "a step after the requeue", || {
        read(&setup.attempt(1).join("coordinator.log"))
            .contains("step committed")
            .then(|| t.elapsed())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", read(&out)));
    let (ledger1, restored1) = restore_in(&setup, 1);
    let saved0 = saved_in(&setup, 0);
    println!(
        "scontrol requeue at step ~{ledger1}: off the node after {off:.1?}, running again {running:.1?} (hold released), first step committed {first_step:.1?} after the requeue; restored step {restored1}, retraining {} steps",
        ledger1 - restored1
    );
    // Nothing rolled back that did not need to be: the restore is from the newest checkpoint
    // written before the requeue.
    assert_eq!(
        saved0.iter().filter(|&&s| s <= ledger1).max(),
        Some(&restored1),
        "attempt 0 saved checkpoints at {saved0:?}"
    );

    // The other path of the script, SIGTERM to the batch script alone (as --signal=B:TERM@60
    // sends it before the time limit: a checkpoint, then `scontrol requeue` from the trap), is
    // not run here: on this one-host Slurm its relaunch was refused now and then ("Job
    // credential revoked", the job FAILED), a race inside Slurm between the kill of the job
    // and its new start on the same node (deploy/README.md).

    let job = cluster.wait_job(id, Duration::from_secs(300), "the end", |j| {
        j.get("JobState")
            .is_some_and(|s| !matches!(s.as_str(), "PENDING" | "RUNNING" | "COMPLETING"))
    });
    let job_wall = submitted.elapsed();
    let text = read(&out);
    assert_eq!(
        job.get("JobState").map(String::as_str),
        Some("COMPLETED"),
        "{job:?}\n{text}"
    );
    assert_eq!(job.get("Restarts").map(String::as_str), Some("1"));
    // Each requeue's end is a record too (Slurm writes it as PENDING), then the completion.
    let ends = cluster.completions(id);
    assert_eq!(
        ends.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["PENDING", "COMPLETED"],
        "sacct --completion"
    );
    assert!(
        text.contains(&format!("job ended at step {STEPS} of {STEPS}")),
        "{text}"
    );

    // Every step once, no sample twice; the steps trained again are exactly those after each
    // restored checkpoint, and the restored checkpoints are the index's.
    let store = read_store(setup.run.join("state").to_str().unwrap(), "requeue");
    assert_ledger_complete(&store.steps, STEPS);
    let again: Vec<u64> = store.rolled_back.iter().map(|s| s.step).collect();
    let want: Vec<u64> = (restored1..ledger1).collect();
    assert_eq!(
        again.iter().copied().collect::<BTreeSet<_>>(),
        want.iter().copied().collect::<BTreeSet<_>>(),
        "steps set aside"
    );
    assert_eq!(again.len(), want.len(), "a step set aside twice: {again:?}");
    assert!(store.checkpoints.iter().any(|c| c.step == restored1));

    let left = cluster.stop();
    assert!(
        left.is_empty(),
        "processes left after the cluster stopped: {left:?}"
    );
    println!(
        "requeued once, COMPLETED with {STEPS} steps in the ledger, {} set aside; corpus, certificates and cluster {prepared:.1?}, sbatch → step 120 {to_120:.1?}, job wall time {job_wall:.1?}, test wall time {:.1?}",
        again.len(),
        began.elapsed()
    );
}
