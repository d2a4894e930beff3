//! One child worker of a node agent: its command line and environment, starting it so that it
//! cannot outlive the agent, and copying what it prints, line by line and prefixed with its
//! local rank, to its log.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::devices::NodeDevice;
use crate::error::{Error, IoContext, Result};

/// The environment variable that tells a child its local rank (its index in `--devices`).
pub const LOCAL_RANK_ENV: &str = "STAGECOACH_LOCAL_RANK";
/// The environment variable that tells a child how many workers its agent runs.
pub const LOCAL_WORLD_SIZE_ENV: &str = "STAGECOACH_LOCAL_WORLD_SIZE";

/// How many lines of a child's last error message are kept, to say why it stopped.
const TAIL_LINES: usize = 24;

/// What one child is started with, the same at every restart but for `--metrics-out`.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub local_rank: usize,
    pub device: NodeDevice,
    /// Its `--listen`: the agent's host, port 0 or the agent's port + the local rank.
    pub listen: SocketAddr,
    /// Its `--metrics-listen`, derived alike.
    pub metrics_listen: SocketAddr,
    /// Its `--metrics-out` at the first start (restarts add `.restartN` before the extension).
    pub metrics_out: Option<PathBuf>,
    /// Its log file (appended to), or none: its lines go to the agent's stderr.
    pub log: Option<PathBuf>,
    /// Set in its environment, beside what it inherits from the agent.
    pub env: Vec<(String, String)>,
}

impl ChildSpec {
    /// What starts each of its lines in the log.
    pub fn prefix(&self) -> String {
        format!("[local_rank {}] ", self.local_rank)
    }

    /// Its `--metrics-out` at start `attempt` (0: the first), so that a restart does not
    /// overwrite the steps an earlier process of the rank recorded.
    pub fn metrics_out(&self, attempt: u32) -> Option<PathBuf> {
        let first = self.metrics_out.as_ref()?;
        if attempt == 0 {
            return Some(first.clone());
        }
        let stem = first.file_stem().unwrap_or(OsStr::new("metrics"));
        let mut name = stem.to_os_string();
        name.push(format!(".restart{attempt}"));
        if let Some(ext) = first.extension() {
            name.push(".");
            name.push(ext);
        }
        Some(first.with_file_name(name))
    }

    /// Its command line after the binary: `join`, the options passed through, then its own.
    pub fn args(&self, pass_through: &[OsString], attempt: u32) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["join".into()];
        args.extend(pass_through.iter().cloned());
        for (flag, value) in [
            ("--device", self.device.arg()),
            ("--listen", self.listen.to_string()),
            ("--metrics-listen", self.metrics_listen.to_string()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        if let Some(path) = self.metrics_out(attempt) {
            args.push("--metrics-out".into());
            args.push(path.into());
        }
        args
    }
}

/// `args` (a `join` command line after `join`) without the options in `owned` and their
/// values, written `--flag VALUE` or `--flag=VALUE`: what every child gets as it was given.
pub fn pass_through(args: &[OsString], owned: &[&str]) -> Vec<OsString> {
    let mut kept = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if owned.iter().any(|flag| text == *flag) {
            iter.next();
            continue;
        }
        if owned
            .iter()
            .any(|flag| text.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
        {
            continue;
        }
        kept.push(arg.clone());
    }
    kept
}

/// Where a child's lines go.
#[derive(Clone)]
pub enum Sink {
    /// The agent's stderr.
    Stderr,
    /// Its own log file.
    File(Arc<Mutex<std::fs::File>>),
}

impl Sink {
    /// Opens `path` for appending (a restart continues the rank's log), or the agent's stderr.
    pub fn open(path: Option<&Path>) -> Result<Sink> {
        let Some(path) = path else {
            return Ok(Sink::Stderr);
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .at(path)?;
        Ok(Sink::File(Arc::new(Mutex::new(file))))
    }

    /// Writes one line (with its `\n`) in a single write, so lines of children never mix.
    fn write_line(&self, line: &[u8]) {
        // A log that cannot be written must not stop the worker: the line is dropped.
        let _ = match self {
            Sink::Stderr => std::io::stderr().lock().write_all(line),
            Sink::File(file) => file.lock().map_or(Ok(()), |mut f| f.write_all(line)),
        };
    }

    /// A line of the agent's own about this child, in the child's log file (the agent's
    /// stderr has it already).
    pub fn note(&self, prefix: &str, text: &str) {
        if let Sink::File(_) = self {
            self.write_line(format!("{prefix}[agent] {text}\n").as_bytes());
        }
    }
}

/// What a child said last, and the error it ended with.
#[derive(Default)]
struct Tail {
    last: Option<String>,
    /// Its last error message (`Error: ...` and its causes, or a panic), without the
    /// backtrace that may follow.
    error: Vec<String>,
    in_error: bool,
}

impl Tail {
    fn push(&mut self, line: &str) {
        let line = line.trim_end();
        let start = line
            .get(..6)
            .is_some_and(|h| h.eq_ignore_ascii_case("error:"))
            || line.contains("panicked at");
        if start {
            self.error.clear();
            self.in_error = true;
        } else if line.starts_with("Stack backtrace:") || line.starts_with("note: run with") {
            self.in_error = false;
        }
        if self.in_error && !line.trim().is_empty() && self.error.len() < TAIL_LINES {
            self.error.push(line.trim().to_owned());
        }
        if !line.trim().is_empty() {
            self.last = Some(line.trim().to_owned());
        }
    }

    /// Why the child stopped, as it said it: its last error, else its last line.
    fn reason(&self) -> Option<String> {
        let text = if self.error.is_empty() {
            self.last.clone()?
        } else {
            self.error.join(" / ")
        };
        Some(match text.char_indices().nth(600) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        })
    }
}

/// A started child.
pub struct Running {
    pub child: Child,
    pub started: Instant,
    copier: Option<std::thread::JoinHandle<()>>,
    tail: Arc<Mutex<Tail>>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (briefly) for the child's last lines to be copied, then says why it stopped, in
    /// its own words when it left any.
    pub fn last_words(&mut self) -> Option<String> {
        if let Some(copier) = self.copier.take() {
            // The pipe closes when the child is gone; a process it started that still holds
            // the pipe must not stall the agent.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !copier.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if copier.is_finished() {
                let _ = copier.join();
            }
        }
        self.tail.lock().ok()?.reason()
    }
}

/// Starts `exe` (this binary) as the child `spec` describes, for the `attempt`-th time. The
/// child gets SIGTERM when the thread that started it ends, so it must be started from the
/// agent's main thread, which lives as long as the agent.
pub fn spawn(
    exe: &Path,
    spec: &ChildSpec,
    pass_through: &[OsString],
    attempt: u32,
    sink: &Sink,
) -> Result<Running> {
    let (reader, writer) = std::io::pipe().at("a pipe for a worker's output")?;
    let mut cmd = Command::new(exe);
    cmd.args(spec.args(pass_through, attempt))
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(writer.try_clone().at("a pipe for a worker's output")?)
        .stderr(writer);
    die_with_parent(&mut cmd);
    let child = cmd.spawn().at(exe)?;
    // Our copies of the pipe's write end go with `cmd`: the reader sees its end when the
    // child's are closed.
    drop(cmd);
    let tail = Arc::new(Mutex::new(Tail::default()));
    let copier = {
        let (prefix, sink, tail) = (spec.prefix(), sink.clone(), tail.clone());
        std::thread::Builder::new()
            .name(format!("log-{}", spec.local_rank))
            .spawn(move || copy_lines(reader, &prefix, &sink, &tail))
            .map_err(|e| Error::Config(format!("cannot start a log thread: {e}")))?
    };
    Ok(Running {
        child,
        started: Instant::now(),
        copier: Some(copier),
        tail,
    })
}

fn copy_lines(reader: std::io::PipeReader, prefix: &str, sink: &Sink, tail: &Mutex<Tail>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let mut out = Vec::with_capacity(prefix.len() + line.len());
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&line);
        sink.write_line(&out);
        if let Ok(mut t) = tail.lock() {
            t.push(&String::from_utf8_lossy(&line));
        }
    }
}

/// Asks the kernel to send the child SIGTERM when its parent goes, whatever way it goes
/// (SIGKILL included), so no worker outlives its agent.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have gone before the request: then nobody would send the signal.
            // (No allocation here: another thread may have held the allocator's lock.)
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// How an exit reads in a message: `exit status 1`, `killed by SIGKILL (signal 9)`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by {} (signal {sig})", signal_name(sig)),
        _ => status.to_string(),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_agents_own_options_are_not_passed_through() {
        let given = os(&[
            "--coordinator",
            "https://c:7070",
            "--devices",
            "cpu,cpu",
            "--listen=10.0.0.1:0",
            "--ca",
            "ca.pem",
            "--log-dir",
            "logs",
            "--reconnect-secs",
            "30",
            "--fused-adamw",
            "--metrics-out",
            "m.jsonl",
        ]);
        let owned = ["--devices", "--listen", "--log-dir", "--metrics-out"];
        assert_eq!(
            pass_through(&given, &owned),
            os(&[
                "--coordinator",
                "https://c:7070",
                "--ca",
                "ca.pem",
                "--reconnect-secs",
                "30",
                "--fused-adamw",
            ])
        );
        // A flag that merely starts like an owned one is kept.
        assert_eq!(
            pass_through(&os(&["--listener", "x"]), &owned),
            os(&["--listener", "x"])
        );
    }

    #[test]
    fn a_child_gets_its_device_addresses_and_a_metrics_file_per_start() {
        let spec = ChildSpec {
            local_rank: 1,
            device: NodeDevice::Cuda(1),
            listen: "10.0.0.1:29501".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            metrics_out: Some("runs/m-1.jsonl".into()),
            log: None,
            env: vec![],
        };
        let args = spec.args(&os(&["--coordinator", "http://c:1"]), 2);
        assert_eq!(
            args,
            os(&[
                "join",
                "--coordinator",
                "http://c:1",
                "--device",
                "cuda:1",
                "--listen",
                "10.0.0.1:29501",
                "--metrics-listen",
                "127.0.0.1:0",
                "--metrics-out",
                "runs/m-1.restart2.jsonl",
            ])
        );
        assert_eq!(spec.metrics_out(0), Some("runs/m-1.jsonl".into()));
        assert_eq!(spec.prefix(), "[local_rank 1] ");
    }

    #[test]
    fn the_reason_is_the_childs_error_message() {
        let mut tail = Tail::default();
        for l in [
            "INFO registered\n",
            "Error: coordinator: cannot reach the coordinator\n",
            "\n",
            "Caused by:\n",
            "    refused\n",
            "\n",
            "Stack backtrace:\n",
            "   0: main\n",
        ] {
            tail.push(l);
        }
        assert_eq!(
            tail.reason().unwrap(),
            "Error: coordinator: cannot reach the coordinator / Caused by: / refused"
        );
        let mut tail = Tail::default();
        for l in [
            "INFO a",
            "thread 'main' panicked at src/x.rs:1:1:",
            "boom",
            "note: run with",
        ] {
            tail.push(l);
        }
        assert_eq!(
            tail.reason().unwrap(),
            "thread 'main' panicked at src/x.rs:1:1: / boom"
        );
        let mut tail = Tail::default();
        tail.push("INFO the last line\n");
        assert_eq!(tail.reason().unwrap(), "INFO the last line");
        assert_eq!(Tail::default().reason(), None);
    }
}
