//! The node agent (`stagecoach-worker join --devices LIST`), what torchrun is to PyTorch: one
//! process per node that starts one worker per device and supervises them.
//!
//! Each child is this same binary running `join` with the options the agent was given
//! (coordinator, TLS files, token file, reconnect, fast path...) and its own: `--device` (a GPU
//! by its index among those the agent sees: every child sees all of them, which NCCL needs for
//! CUDA IPC between local ranks, and uses only its own), `--listen` on the agent's host with
//! port 0 or the agent's port + the local rank, `--metrics-listen` alike, a `--metrics-out`
//! file of its own; `STAGECOACH_LOCAL_RANK` and `STAGECOACH_LOCAL_WORLD_SIZE` in its
//! environment (and `OMP_NUM_THREADS`, the node's cores shared out, unless already set). What a
//! child prints goes, each line prefixed with `[local_rank N] `, to `--log-dir DIR`'s
//! `worker-N.log` or to the agent's stderr.
//!
//! Supervision: a child that exits 0 (its job finished) is done; one that dies otherwise is
//! started again after a backoff and registers as a new worker, taking the state from a
//! survivor (the coordinator's part). A child that needs more than `--max-restarts` restarts
//! within `--restart-window-secs`, or that says its job failed ([`JOB_FAILED_EXIT`]), stops
//! the agent: every child is stopped and the agent fails with the reason. SIGTERM or SIGINT is
//! forwarded to every child as SIGTERM; what is left after the grace period gets SIGKILL, and
//! every child is reaped before the agent exits. A child gets SIGTERM from the kernel when the
//! agent dies in any way (`PR_SET_PDEATHSIG`), so none outlives it.

mod child;
mod devices;
pub mod relay;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

pub use child::{pass_through, LOCAL_RANK_ENV, LOCAL_WORLD_SIZE_ENV};
pub use devices::{cuda_device_count, DeviceList, NodeDevice};

use crate::error::{Error, IoContext, Result};
use child::{describe, signal_name, ChildSpec, Running, Sink};

/// The exit status of a `join` whose job failed: starting it again cannot help.
pub const JOB_FAILED_EXIT: i32 = 3;

/// How often the agent looks at its children.
const POLL: Duration = Duration::from_millis(100);

/// How a node agent runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub devices: DeviceList,
    /// The coordinator's URL: where the children register, and, without `listen`, how the
    /// agent finds the address other nodes reach it at.
    pub coordinator: String,
    /// The agent's `--listen`: its host is every child's (an unspecified or absent host: the
    /// address of the interface that routes to the coordinator), its port the first child's
    /// (0: every child takes a free port).
    pub listen: Option<SocketAddr>,
    /// The agent's `--metrics-listen`: host and first port, as `listen`.
    pub metrics_listen: SocketAddr,
    /// The agent's `--metrics-out FILE`: child N writes `FILE`'s stem + `-N`.
    pub metrics_out: Option<PathBuf>,
    /// Child N logs to `DIR/worker-N.log`; without it, to the agent's stderr.
    pub log_dir: Option<PathBuf>,
    pub restarts: RestartPolicy,
    /// How long children have to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// The `join` options every child gets as given (see [`pass_through`]).
    pub pass_through: Vec<OsString>,
    /// The worker binary (this one).
    pub exe: PathBuf,
    /// `--relay`: carry the workers' sessions over one node session, reaching the coordinator
    /// with these credentials (the children then reach the agent, see [`relay`]).
    pub relay: Option<stagecoach_proto::connect::ClientAuth>,
}

/// How often a child may be started again.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts of one child allowed within `window`; one more stops the agent.
    pub max_restarts: u32,
    pub window: Duration,
    /// The wait before the first restart within the window, doubling with each one after.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl RestartPolicy {
    pub fn new(max_restarts: u32, window: Duration) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The wait before a restart when `recent` restarts happened within the window.
    fn backoff(&self, recent: usize) -> Duration {
        let doublings = recent.min(16) as u32;
        (self.first_backoff * 2u32.pow(doublings)).min(self.max_backoff)
    }

    /// A child died at `now`, after the restarts in `history` (oldest first): forgets those
    /// older than the window, then either records a restart and says how long to wait before
    /// it, or, when `max_restarts` already happened within the window, refuses with how many.
    fn admit(
        &self,
        history: &mut VecDeque<Instant>,
        now: Instant,
    ) -> std::result::Result<Duration, usize> {
        while history
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            history.pop_front();
        }
        if history.len() >= self.max_restarts as usize {
            return Err(history.len());
        }
        let wait = self.backoff(history.len());
        history.push_back(now);
        Ok(wait)
    }
}

/// How a node agent ended (what it could not even start is an [`Error`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every child exited 0: the job finished.
    Finished,
    /// Stopped by `signal` (SIGTERM or SIGINT); every child was stopped.
    Stopped { signal: i32, detail: String },
    /// A child could not go on; every child was stopped.
    Failed { reason: String },
}

impl Outcome {
    /// The agent's exit status: 0, 128 + the signal (as a shell reports it), or 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Finished => 0,
            Outcome::Stopped { signal, .. } => (128 + signal).clamp(1, 255) as u8,
            Outcome::Failed { .. } => 1,
        }
    }
}

/// Starts one worker per device and supervises them until the job ends, a child cannot go on,
/// or a signal stops the agent.
pub fn run(mut opts: NodeOptions) -> Result<Outcome> {
    let mut specs = plan(&opts, cuda_device_count)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))?;
    // A current-thread runtime: every child is started from this, the main thread, which is
    // what their parent-death signal watches.
    runtime.block_on(async {
        // The relay lives as long as the children it serves.
        let _relay = match opts.relay.clone() {
            Some(auth) => {
                let local = relay::start(&opts.coordinator, &auth).await?;
                relay_children(&mut opts, &mut specs, &local);
                Some(local)
            }
            None => None,
        };
        supervise(&opts, specs).await
    })
}

/// The children reach the agent's relay instead of the coordinator: its URL instead of
/// `--coordinator` (and no TLS files or token file of the agent's), its token in their
/// environment.
fn relay_children(opts: &mut NodeOptions, specs: &mut [ChildSpec], local: &relay::LocalRelay) {
    let mut args = pass_through(&opts.pass_through, relay::RELAYED);
    args.push("--coordinator".into());
    args.push(local.url.clone().into());
    opts.pass_through = args;
    for spec in specs {
        spec.env.push((
            stagecoach_proto::connect::TOKEN_ENV.to_owned(),
            local.token.clone(),
        ));
    }
}

/// Every child's command line and environment, checked against the node.
fn plan(
    opts: &NodeOptions,
    cuda_count: impl FnOnce() -> std::result::Result<usize, String>,
) -> Result<Vec<ChildSpec>> {
    let devices = opts.devices.resolve(cuda_count)?;
    let n = devices.len();
    let (host, port) = listen_host(opts.listen, &opts.coordinator)?;
    if let Some(dir) = &opts.log_dir {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let threads = (n > 1 && std::env::var_os("OMP_NUM_THREADS").is_none()).then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        (cores / n).max(1)
    });
    devices
        .into_iter()
        .enumerate()
        .map(|(rank, device)| {
            let mut env = vec![
                (LOCAL_RANK_ENV.to_owned(), rank.to_string()),
                (LOCAL_WORLD_SIZE_ENV.to_owned(), n.to_string()),
            ];
            if let Some(t) = threads {
                env.push(("OMP_NUM_THREADS".to_owned(), t.to_string()));
            }
            Ok(ChildSpec {
                local_rank: rank,
                device,
                listen: SocketAddr::new(host, nth_port(port, rank, "--listen")?),
                metrics_listen: SocketAddr::new(
                    opts.metrics_listen.ip(),
                    nth_port(opts.metrics_listen.port(), rank, "--metrics-listen")?,
                ),
                metrics_out: opts.metrics_out.as_ref().map(|p| per_rank(p, rank)),
                log: opts
                    .log_dir
                    .as_ref()
                    .map(|d| d.join(format!("worker-{rank}.log"))),
                env,
            })
        })
        .collect()
}

/// Port `first` + `rank`, or 0 for every rank when `first` is 0.
fn nth_port(first: u16, rank: usize, flag: &str) -> Result<u16> {
    if first == 0 {
        return Ok(0);
    }
    u16::try_from(first as usize + rank).map_err(|_| {
        Error::Config(format!(
            "{flag} port {first} + local rank {rank} is past 65535; give a lower port, or 0"
        ))
    })
}

/// `FILE` for local rank `rank`: `dir/metrics.jsonl` → `dir/metrics-1.jsonl`.
fn per_rank(path: &std::path::Path, rank: usize) -> PathBuf {
    let mut name = path
        .file_stem()
        .unwrap_or(std::ffi::OsStr::new("metrics"))
        .to_os_string();
    name.push(format!("-{rank}"));
    if let Some(ext) = path.extension() {
        name.push(".");
        name.push(ext);
    }
    path.with_file_name(name)
}

/// The host every child listens on (and registers, so other nodes must reach it there), and
/// the first port: `--listen`'s, or, when it names no host, the address of this node's
/// interface towards the coordinator.
fn listen_host(listen: Option<SocketAddr>, coordinator: &str) -> Result<(IpAddr, u16)> {
    let port = listen.map_or(0, |a| a.port());
    match listen {
        Some(a) if !a.ip().is_unspecified() => Ok((a.ip(), port)),
        // Replicas separated by commas: they share a network, the first one routes as well.
        _ => Ok((
            route_to(coordinator.split(',').next().unwrap_or("").trim())?,
            port,
        )),
    }
}

/// The local address this node uses to reach the coordinator at `url` (no packet is sent:
/// connecting a UDP socket only picks the route).
fn route_to(url: &str) -> Result<IpAddr> {
    let fail = |why: String| {
        Error::Config(format!(
            "cannot tell which address of this node the other workers reach ({why}); pass \
             --listen ADDRESS:PORT with an address of this node they can connect to"
        ))
    };
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| fail(format!("the coordinator URL {url:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| fail(format!("the coordinator URL {url:?} names no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let target = (host, port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| fail(format!("{host} resolves to no address")))?;
    if target.ip().is_loopback() {
        return Ok(target.ip());
    }
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).map_err(|e| fail(format!("a UDP socket: {e}")))?;
    socket
        .connect(target)
        .map_err(|e| fail(format!("no route to {target}: {e}")))?;
    let ip = socket
        .local_addr()
        .map_err(|e| fail(format!("the route to {target}: {e}")))?
        .ip();
    if ip.is_unspecified() {
        return Err(fail(format!("no local address routes to {target}")));
    }
    Ok(ip)
}

/// Where one child stands.
enum State {
    Running(Running),
    /// Dead, to be started again at `until`.
    Waiting {
        until: Instant,
    },
    /// Exited 0, or stopped by the agent.
    Exited,
}

/// One child and its history.
struct Slot {
    spec: ChildSpec,
    sink: Sink,
    state: State,
    /// Starts so far.
    starts: u32,
    /// When it was restarted, within the window.
    restarts: VecDeque<Instant>,
}

impl Slot {
    fn start(&mut self, opts: &NodeOptions) -> Result<()> {
        let attempt = self.starts;
        let running = child::spawn(
            &opts.exe,
            &self.spec,
            &opts.pass_through,
            attempt,
            &self.sink,
        )?;
        self.starts += 1;
        let r = self.spec.local_rank;
        let device = self.spec.device.arg();
        let pid = running.pid();
        let log = match &self.spec.log {
            Some(p) => p.display().to_string(),
            None => "stderr".into(),
        };
        info!(
            "local rank {r} ({device}) started as pid {pid} (start {}, log {log})",
            attempt + 1
        );
        self.sink.note(
            &self.spec.prefix(),
            &format!("start {} as pid {pid} on {device}", attempt + 1),
        );
        self.state = State::Running(running);
        Ok(())
    }

    fn name(&self) -> String {
        format!(
            "local rank {} ({})",
            self.spec.local_rank,
            self.spec.device.arg()
        )
    }
}

/// What a look at one child found.
enum Event {
    Nothing,
    /// It cannot go on: the agent stops.
    Fatal(String),
}

async fn supervise(opts: &NodeOptions, specs: Vec<ChildSpec>) -> Result<Outcome> {
    let signal_stream =
        |kind: SignalKind| signal(kind).map_err(|e| Error::Config(format!("signals: {e}")));
    let mut term = signal_stream(SignalKind::terminate())?;
    let mut int = signal_stream(SignalKind::interrupt())?;
    let devices: Vec<String> = specs.iter().map(|s| s.device.arg()).collect();
    info!(
        "node agent: {} worker(s) on {} for {}, collective on {}, at most {} restart(s) per worker within {} s",
        specs.len(),
        devices.join(","),
        opts.coordinator,
        specs.first().map_or(String::new(), |s| s.listen.to_string()),
        opts.restarts.max_restarts,
        opts.restarts.window.as_secs()
    );
    let mut slots = Vec::with_capacity(specs.len());
    for spec in specs {
        let sink = Sink::open(spec.log.as_deref())?;
        slots.push(Slot {
            spec,
            sink,
            state: State::Exited,
            starts: 0,
            restarts: VecDeque::new(),
        });
    }
    let mut started = Ok(());
    for slot in &mut slots {
        started = slot.start(opts);
        if started.is_err() {
            break;
        }
    }
    if let Err(e) = started {
        stop_all(&mut slots, opts.grace, &mut term, &mut int).await;
        return Err(e);
    }
    let mut tick = tokio::time::interval(POLL);
    loop {
        let stop = tokio::select! {
            biased;
            _ = term.recv() => Some(libc::SIGTERM),
            _ = int.recv() => Some(libc::SIGINT),
            _ = tick.tick() => None,
        };
        if let Some(sig) = stop {
            warn!(
                "{}: stopping every worker (SIGTERM, then SIGKILL after {} s)",
                signal_name(sig),
                opts.grace.as_secs_f64()
            );
            let (ended, killed) = stop_all(&mut slots, opts.grace, &mut term, &mut int).await;
            return Ok(Outcome::Stopped {
                signal: sig,
                detail: format!(
                    "stopped by {}: {ended} worker(s) ended within the {} s grace period, \
                     {killed} killed; the job did not finish on this node",
                    signal_name(sig),
                    opts.grace.as_secs_f64()
                ),
            });
        }
        let mut event = Ok(Event::Nothing);
        for slot in &mut slots {
            event = look_at(slot, opts);
            if !matches!(event, Ok(Event::Nothing)) {
                break;
            }
        }
        match event {
            Ok(Event::Nothing) => {}
            Ok(Event::Fatal(reason)) => {
                warn!("{reason}; stopping every worker of this node");
                stop_all(&mut slots, opts.grace, &mut term, &mut int).await;
                return Ok(Outcome::Failed { reason });
            }
            Err(e) => {
                stop_all(&mut slots, opts.grace, &mut term, &mut int).await;
                return Err(e);
            }
        }
        if slots.iter().all(|s| matches!(s.state, State::Exited)) {
            info!("every worker of this node finished");
            return Ok(Outcome::Finished);
        }
    }
}

/// Looks at one child: reaps it if it exited (to restart it later, or not), starts it again
/// when its backoff is over.
fn look_at(slot: &mut Slot, opts: &NodeOptions) -> Result<Event> {
    let now = Instant::now();
    match &mut slot.state {
        State::Exited => Ok(Event::Nothing),
        State::Waiting { until } => {
            if now >= *until {
                slot.start(opts)?;
            }
            Ok(Event::Nothing)
        }
        State::Running(running) => {
            let Some(status) = running
                .child
                .try_wait()
                .map_err(|e| Error::Config(format!("waiting for a worker: {e}")))?
            else {
                return Ok(Event::Nothing);
            };
            let (pid, ran) = (running.pid(), running.started.elapsed());
            let said = running
                .last_words()
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            slot.state = State::Exited;
            let how = describe(status);
            let name = slot.name();
            let prefix = slot.spec.prefix();
            if status.success() {
                info!("{name} finished (exit status 0)");
                slot.sink.note(&prefix, "finished (exit status 0)");
                return Ok(Event::Nothing);
            }
            slot.sink.note(&prefix, &format!("{how} after {ran:.1?}"));
            if status.code() == Some(JOB_FAILED_EXIT) {
                return Ok(Event::Fatal(format!(
                    "{name}: the job failed ({how}{said})"
                )));
            }
            let policy = &opts.restarts;
            let wait = match policy.admit(&mut slot.restarts, now) {
                Ok(wait) => wait,
                Err(recent) => {
                    return Ok(Event::Fatal(format!(
                        "{name} stopped again after {recent} restart(s) within {} s ({how} \
                         after {ran:.1?}{said}); its restart budget is spent (--max-restarts \
                         {} per --restart-window-secs {})",
                        policy.window.as_secs(),
                        policy.max_restarts,
                        policy.window.as_secs()
                    )));
                }
            };
            warn!(
                "{name} pid {pid} ended: {how} after {ran:.1?}{said}; restart {} of {} in {wait:?}",
                slot.restarts.len(),
                policy.max_restarts
            );
            slot.sink.note(
                &prefix,
                &format!("restart {} in {wait:?}", slot.restarts.len()),
            );
            slot.state = State::Waiting { until: now + wait };
            Ok(Event::Nothing)
        }
    }
}

/// Stops every child: SIGTERM, then SIGKILL for those still there after `grace` (at once on a
/// second signal to the agent), and reaps them all. Returns (ended within the grace period,
/// killed).
async fn stop_all(
    slots: &mut [Slot],
    grace: Duration,
    term: &mut Signal,
    int: &mut Signal,
) -> (usize, usize) {
    let mut running: Vec<(String, Running)> = Vec::new();
    for slot in slots.iter_mut() {
        if let State::Running(r) = std::mem::replace(&mut slot.state, State::Exited) {
            // SAFETY: kill(2) on our own unreaped child, whose pid cannot have been reused.
            unsafe { libc::kill(r.pid() as libc::pid_t, libc::SIGTERM) };
            running.push((slot.name(), r));
        }
    }
    let deadline = Instant::now() + grace;
    let mut ended = 0;
    while !running.is_empty() && Instant::now() < deadline {
        let hurry = tokio::select! {
            biased;
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = tokio::time::sleep(Duration::from_millis(20)) => false,
        };
        running.retain_mut(|(name, r)| match r.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                info!("{name} ended: {}", describe(status));
                ended += 1;
                false
            }
            Err(_) => true,
        });
        if hurry {
            warn!("a second signal: killing what is left at once");
            break;
        }
    }
    let killed = running.len();
    for (name, mut r) in running {
        let _ = r.child.kill();
        let status = r.child.wait();
        warn!(
            "{name} killed after the grace period: {}",
            status.map_or_else(|e| e.to_string(), describe)
        );
    }
    (ended, killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(devices: &str) -> NodeOptions {
        NodeOptions {
            devices: devices.parse().unwrap(),
            coordinator: "http://127.0.0.1:7070".into(),
            listen: None,
            metrics_listen: "127.0.0.1:9500".parse().unwrap(),
            metrics_out: Some("runs/steps.jsonl".into()),
            log_dir: None,
            restarts: RestartPolicy::new(3, Duration::from_secs(60)),
            grace: Duration::from_secs(1),
            pass_through: vec![],
            exe: "stagecoach-worker".into(),
            relay: None,
        }
    }

    /// Relayed, a child reaches the agent: its URL as --coordinator, none of the agent's TLS
    /// files or token file, the agent's token in its environment; its other options as given.
    #[test]
    fn relayed_children_reach_the_agent_with_its_token() {
        let mut opts = options("cpu,cpu");
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        opts.pass_through = os(&[
            "--coordinator",
            "https://c:7070",
            "--ca",
            "ca.pem",
            "--cert=node.pem",
            "--key",
            "node.key",
            "--token-file",
            "t",
            "--reconnect-secs",
            "30",
        ]);
        let mut specs = plan(&opts, || panic!("no CUDA for CPU workers")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let local = relay::start("http://c:7070", &Default::default())
                .await
                .unwrap();
            relay_children(&mut opts, &mut specs, &local);
            assert_eq!(
                opts.pass_through,
                os(&["--reconnect-secs", "30", "--coordinator", &local.url])
            );
            assert!(local.url.starts_with("http://127.0.0.1:"), "{}", local.url);
            assert_eq!(local.token.len(), 64);
            for spec in &specs {
                let tokens: Vec<_> = spec
                    .env
                    .iter()
                    .filter(|(k, _)| k == stagecoach_proto::connect::TOKEN_ENV)
                    .collect();
                assert_eq!(tokens, [&(TOKEN_ENV_NAME.to_owned(), local.token.clone())]);
            }
            let several = relay::start("http://a:1,http://b:1", &Default::default()).await;
            let Err(Error::Config(why)) = several else {
                panic!(
                    "several coordinators relayed: {:?}",
                    several.map(|l| l.url.clone())
                )
            };
            assert!(why.contains("one URL"), "{why}");
        });
    }

    const TOKEN_ENV_NAME: &str = stagecoach_proto::connect::TOKEN_ENV;

    #[test]
    fn each_child_gets_its_rank_ports_files_and_environment() {
        let mut opts = options("cpu,cpu,cpu");
        opts.listen = Some("127.0.0.1:29500".parse().unwrap());
        let specs = plan(&opts, || panic!("no CUDA for CPU workers")).unwrap();
        assert_eq!(specs.len(), 3);
        for (r, s) in specs.iter().enumerate() {
            assert_eq!(s.local_rank, r);
            assert_eq!(s.listen.to_string(), format!("127.0.0.1:{}", 29500 + r));
            assert_eq!(
                s.metrics_listen.to_string(),
                format!("127.0.0.1:{}", 9500 + r)
            );
            assert_eq!(
                s.metrics_out,
                Some(PathBuf::from(format!("runs/steps-{r}.jsonl")))
            );
            assert!(s.env.contains(&(LOCAL_RANK_ENV.to_owned(), r.to_string())));
            assert!(s
                .env
                .contains(&(LOCAL_WORLD_SIZE_ENV.to_owned(), "3".to_owned())));
        }
        // Port 0: every child takes a free port; the host comes from the route to the
        // coordinator (loopback here).
        opts.listen = Some("0.0.0.0:0".parse().unwrap());
        let specs = plan(&opts, || Ok(0)).unwrap();
        assert_eq!(specs[2].listen.to_string(), "127.0.0.1:0");
        opts.listen = Some("127.0.0.1:65535".parse().unwrap());
        let err = plan(&opts, || Ok(0)).unwrap_err().to_string();
        assert!(err.contains("past 65535"), "{err}");
        let err = plan(&options("all"), || Ok(0)).unwrap_err().to_string();
        assert!(
            err.contains("no CUDA device visible") && err.contains("use --devices cpu,cpu"),
            "{err}"
        );
    }

    #[test]
    fn the_collective_host_is_the_route_to_the_coordinator() {
        assert_eq!(
            route_to("http://127.0.0.1:7070").unwrap().to_string(),
            "127.0.0.1"
        );
        assert!(route_to("http://localhost:7070").unwrap().is_loopback());
        // Replicas (`--coordinator A,B`): the route to the first.
        let (host, port) =
            listen_host(None, "http://127.0.0.1:7070, http://127.0.0.2:7070").unwrap();
        assert_eq!((host.to_string(), port), ("127.0.0.1".to_owned(), 0));
        let given = Some("10.1.2.3:29500".parse().unwrap());
        let (host, port) = listen_host(given, "http://127.0.0.1:7070").unwrap();
        assert_eq!((host.to_string(), port), ("10.1.2.3".to_owned(), 29500));
        let err = route_to("not a url").unwrap_err().to_string();
        assert!(err.contains("pass --listen ADDRESS:PORT"), "{err}");
        // A remote coordinator (TEST-NET-1): the interface towards it, if this machine has a
        // route there at all.
        match route_to("https://192.0.2.1:7070") {
            Ok(ip) => assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}"),
            Err(e) => assert!(e.to_string().contains("no route to 192.0.2.1:7070"), "{e}"),
        }
    }

    #[test]
    fn restarts_are_counted_within_the_window() {
        let p = RestartPolicy::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut history = VecDeque::new();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(p.admit(&mut history, at(0)), Ok(Duration::from_secs(1)));
        assert_eq!(p.admit(&mut history, at(10)), Ok(Duration::from_secs(2)));
        // A third death within the minute: the budget of two is spent.
        assert_eq!(p.admit(&mut history, at(20)), Err(2));
        assert_eq!(history.len(), 2, "a refusal records no restart");
        // Past the window the first restart is forgotten: one more is allowed, and its wait
        // counts only the restart still within the window.
        assert_eq!(p.admit(&mut history, at(61)), Ok(Duration::from_secs(2)));
        assert_eq!(p.admit(&mut history, at(62)), Err(2));
        // Long after, the budget is whole again.
        assert_eq!(p.admit(&mut history, at(500)), Ok(Duration::from_secs(1)));
        assert_eq!(history.len(), 1);
        // --max-restarts 0: the first death stops the agent.
        let none = RestartPolicy::new(0, Duration::from_secs(60));
        assert_eq!(none.admit(&mut VecDeque::new(), at(0)), Err(0));
    }

    #[test]
    fn restarts_back_off_and_outcomes_have_exit_codes() {
        let p = RestartPolicy::new(5, Duration::from_secs(60));
        let waits: Vec<u64> = (0..7).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(Outcome::Finished.exit_code(), 0);
        let stopped = Outcome::Stopped {
            signal: libc::SIGTERM,
            detail: String::new(),
        };
        assert_eq!(stopped.exit_code(), 143);
        let failed = Outcome::Failed {
            reason: String::new(),
        };
        assert_eq!(failed.exit_code(), 1);
    }
}
