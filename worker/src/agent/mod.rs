//! The coordinator-driven worker (`stagecoach-worker join`).
//!
//! Two halves: an async side (a small tokio runtime) that registers, holds the session stream,
//! sends heartbeats and relays messages; and one named OS thread, `trainer`, that owns the model,
//! the optimizer, the data and the collective. They talk over bounded channels: commands down
//! (`World`, `Work`, `Evaluate`, `SaveCheckpoint`, leave, exit), worker messages up. No libtorch
//! or collective call runs on a tokio thread: the trainer thread is [`trainer`], and what the
//! async side needs of libtorch or NCCL before it exists (choosing the device, an NCCL unique
//! id for the registration) runs on tokio's blocking pool.
//!
//! Each `Work` carries its curriculum stage (sequence length, RoPE θ, micro-batch), applied
//! before the step, and its guard (every rank drops the update alike when the global loss or
//! gradient norm is too high or not finite). An `Evaluate` computes held-out losses between two
//! steps without touching the model or the optimizer. A `SaveCheckpoint` copies the state off
//! between two steps and writes it in the background ([`crate::checkpoint`]); a `World` that
//! names a checkpoint to restore loads it, checked against the coordinator's ledger, before the
//! worker answers `Ready`.
//!
//! When the session breaks (the coordinator died or restarted), the trainer keeps the model and
//! the async side registers again with backoff for up to `--reconnect-secs`; the coordinator then
//! decides whether the worker continues from its step or restores a checkpoint. Replies are
//! tagged with the session of the command they answer, so a new session never carries a reply
//! meant for the coordinator that went away.

pub mod node;
mod trainer;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::collective::nccl;
use crate::error::{Error, IoContext, Result};
use crate::fault::Faults;
use crate::metrics::Metrics;
use trainer::{trainer_thread, Setup};

/// How to join a job.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator's URL (http://host:port), or the URLs of its replicas separated by
    /// commas: the worker registers with the one that leads.
    pub coordinator: String,
    /// Where to accept the ring neighbour (port 0: any free port).
    pub listen: SocketAddr,
    /// The device to train on, overriding the job's; without it the worker registers as a CPU
    /// worker, which a job whose `[train] device` is a GPU refuses (see [`check_device`]).
    pub device: Option<String>,
    /// Write one JSON record per trained step (with its samples) here.
    pub metrics_out: Option<PathBuf>,
    /// Where to serve Prometheus metrics (GET /metrics; port 0: any free port, logged).
    pub metrics_listen: SocketAddr,
    /// How long to keep trying to reach the coordinator again after the session breaks.
    pub reconnect: Duration,
    /// Fault injection (tests only; none by default).
    pub faults: Faults,
    /// bf16 and the fused optimizer (fp32 and element-wise by default).
    pub fast_path: crate::train::FastPath,
    /// What to present to the coordinator: a CA to check it against, a client certificate, a
    /// token (none by default: plain gRPC).
    pub auth: stagecoach_proto::connect::ClientAuth,
}

enum Command {
    World(v1::World),
    Work(v1::Work),
    Evaluate(v1::Evaluate),
    Save(v1::SaveCheckpoint),
    Sync(v1::SyncState),
    /// Leave the current collective (the generation ended, or the session broke).
    Leave,
    Exit,
}

/// A command, with the session (epoch) it arrived on.
type Envelope = (u64, Command);

type Reply = v1::worker_message::Kind;

/// A message for the coordinator, with the session of the command it answers: only messages of
/// the current session are sent.
struct Up {
    epoch: u64,
    kind: Reply,
}

/// Registers with the coordinator and trains what it sends until the job ends.
pub fn join(opts: JoinOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(session(opts))
}

fn rpc(what: &str, e: tonic::Status) -> Error {
    let message = format!(
        "{what}: the coordinator answered {:?}: {}",
        e.code(),
        e.message()
    );
    match e
        .metadata()
        .get(stagecoach_proto::JOB_OVER_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        Some(state) => Error::JobOver {
            finished: state == "finished",
            message,
        },
        None => Error::Coordinator(message),
    }
}

/// A registration: the client, this worker's id in it, and the job.
struct Link {
    client: WorkersClient<stagecoach_proto::connect::AuthedChannel>,
    worker_id: String,
    job: v1::JobSpec,
    heartbeat: Duration,
}

/// Where and how this worker registers.
struct Registrar {
    /// The coordinators to try (`--coordinator`'s URLs, and leaders they named), and which
    /// to try first: the one that took the last registration.
    targets: std::sync::Mutex<Targets>,
    /// What to present to the coordinators (for the endpoints of leaders they name).
    auth: stagecoach_proto::connect::ClientAuth,
    /// The token interceptor of every call.
    bearer: stagecoach_proto::connect::Bearer,
    address: SocketAddr,
    device: tch::Device,
    /// Whether a standby answered since the last registration (an election may be under way).
    saw_standby: AtomicBool,
}

/// The coordinators a worker knows of.
struct Targets {
    list: Vec<(String, tonic::transport::Endpoint)>,
    first: usize,
}

/// Coordinators a worker adds to its list when a standby names them; more are ignored (a
/// replica naming a new leader each time cannot grow the list without end).
const MAX_TARGETS: usize = 16;

/// How long one registration attempt with one coordinator may take when there are others to
/// try: a stopped coordinator accepts the TCP connection but never answers.
const ATTEMPT_WITH_OTHERS: Duration = Duration::from_secs(3);

/// How long one registration attempt may take when there is no other coordinator to try.
const ATTEMPT_ALONE: Duration = Duration::from_secs(10);

/// Reconnection backoff's longest wait with several coordinators (a standby takes over
/// within seconds) and with one.
const BACKOFF_WITH_OTHERS: Duration = Duration::from_secs(1);
const BACKOFF_ALONE: Duration = Duration::from_secs(5);

/// The URLs of a `--coordinator` list: comma separated, blanks ignored.
pub fn coordinator_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An endpoint for `url`: `auth`'s TLS material, and HTTP/2 pings every second that end the
/// connection when one goes unanswered for 3 s, so a stopped coordinator (SIGSTOP, a partition)
/// breaks the session like a dead one does.
fn coordinator_endpoint(
    auth: &stagecoach_proto::connect::ClientAuth,
    url: &str,
    connect_timeout: Duration,
) -> Result<tonic::transport::Endpoint> {
    Ok(auth
        .endpoint(url, connect_timeout)
        .map_err(|e| Error::Config(e.to_string()))?
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

/// Why one coordinator did not take the registration, as a part of the error naming them all
/// (an [`Error::Coordinator`] without its own `coordinator: `).
fn reason(e: Error) -> String {
    match e {
        Error::Coordinator(message) => message,
        e => e.to_string(),
    }
}

/// What one registration attempt with one coordinator came to.
enum Attempt {
    Registered(Box<Link>),
    /// A standby: it named the leader (or none is elected yet).
    Standby(Option<String>, Error),
    Failed(Error),
}

impl Registrar {
    fn new(
        urls: &[String],
        auth: stagecoach_proto::connect::ClientAuth,
        address: SocketAddr,
        device: tch::Device,
    ) -> Result<Registrar> {
        if urls.is_empty() {
            return Err(Error::Config(
                "--coordinator names no URL: give one, or several separated by commas".into(),
            ));
        }
        let timeout = Self::attempt_limit(urls.len());
        let list = urls
            .iter()
            .map(|u| Ok((auth.url(u), coordinator_endpoint(&auth, u, timeout)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Registrar {
            targets: std::sync::Mutex::new(Targets { list, first: 0 }),
            bearer: auth.bearer(),
            auth,
            address,
            device,
            saw_standby: AtomicBool::new(false),
        })
    }

    fn attempt_limit(targets: usize) -> Duration {
        if targets > 1 {
            ATTEMPT_WITH_OTHERS
        } else {
            ATTEMPT_ALONE
        }
    }

    fn targets(&self) -> std::sync::MutexGuard<'_, Targets> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URLs to name in messages.
    fn urls(&self) -> String {
        let t = self.targets();
        let urls: Vec<&str> = t.list.iter().map(|(u, _)| u.as_str()).collect();
        urls.join(", ")
    }

    /// The index of `leader` in the list, added when it is new (and the list not full).
    fn target_for(&self, leader: &str) -> Option<usize> {
        let url = self.auth.url(leader);
        let mut t = self.targets();
        if let Some(i) = t.list.iter().position(|(u, _)| *u == url) {
            return Some(i);
        }
        if t.list.len() >= MAX_TARGETS {
            return None;
        }
        let endpoint = coordinator_endpoint(&self.auth, &url, ATTEMPT_WITH_OTHERS).ok()?;
        info!(leader = %url, "a standby named the leader; adding it to the coordinators to try");
        t.list.push((url, endpoint));
        Some(t.list.len() - 1)
    }

    /// Registers with the leader: the coordinator that took the last registration first, then
    /// the others in order, following a standby's word on who leads.
    async fn register(&self) -> Result<Link> {
        let (count, first) = {
            let t = self.targets();
            (t.list.len(), t.first)
        };
        let mut order: std::collections::VecDeque<usize> =
            (0..count).map(|i| (first + i) % count).collect();
        let mut tried = Vec::new();
        let mut errors = Vec::new();
        while let Some(i) = order.pop_front() {
            if tried.contains(&i) {
                continue;
            }
            tried.push(i);
            let (url, endpoint) = self.targets().list[i].clone();
            let limit = Self::attempt_limit(self.targets().list.len());
            let attempt = tokio::time::timeout(limit, self.register_at(&url, endpoint))
                .await
                .unwrap_or_else(|_| {
                    Attempt::Failed(Error::Coordinator(format!(
                        "{url} did not answer within {} s",
                        limit.as_secs()
                    )))
                });
            match attempt {
                Attempt::Registered(link) => {
                    self.targets().first = i;
                    if count > 1 || i > 0 {
                        info!(coordinator = %url, "registered with the leading coordinator");
                    }
                    return Ok(*link);
                }
                Attempt::Standby(leader, e) => {
                    self.saw_standby.store(true, Ordering::Relaxed);
                    if let Some(j) = leader.as_deref().and_then(|l| self.target_for(l)) {
                        order.push_front(j);
                    }
                    errors.push(reason(e));
                }
                // Trying another replica cannot change that.
                Attempt::Failed(e @ Error::JobOver { .. }) => return Err(e),
                Attempt::Failed(e) => errors.push(reason(e)),
            }
        }
        Err(Error::Coordinator(errors.join("; ")))
    }

    async fn register_at(&self, url: &str, endpoint: tonic::transport::Endpoint) -> Attempt {
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                return Attempt::Failed(Error::Coordinator(format!(
                    "cannot reach the coordinator at {url}: {}",
                    stagecoach_proto::connect::chain(&e)
                )))
            }
        };
        let mut client = WorkersClient::with_interceptor(channel, self.bearer.clone());
        // The device decides the collective: NCCL between GPUs (its unique id travels through
        // the coordinator), the TCP ring between CPU workers.
        let (backend, nccl_unique_id) = match self.device {
            tch::Device::Cuda(_) => {
                match off_async("creating an NCCL unique id", fresh_nccl_id).await {
                    Ok(id) => (v1::CollectiveBackend::Nccl, id),
                    Err(e) => return Attempt::Failed(e),
                }
            }
            _ => (v1::CollectiveBackend::Tcp, Vec::new()),
        };
        let reg = client
            .register(v1::RegisterRequest {
                name: format!("{}:{}", hostname(), std::process::id()),
                backend: backend.into(),
                collective_address: self.address.to_string(),
                nccl_unique_id,
            })
            .await;
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && status
                        .metadata()
                        .contains_key(stagecoach_proto::LEADER_METADATA) =>
            {
                let leader = status
                    .metadata()
                    .get(stagecoach_proto::LEADER_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned);
                let e = rpc(&format!("register at {url}"), status);
                return Attempt::Standby(leader, e);
            }
            Err(status) => return Attempt::Failed(rpc(&format!("register at {url}"), status)),
        };
        let Some(job) = reg.job else {
            return Attempt::Failed(Error::Coordinator(format!(
                "the coordinator at {url} sent no job"
            )));
        };
        Attempt::Registered(Box::new(Link {
            client,
            worker_id: reg.worker_id,
            job,
            heartbeat: Duration::from_millis(reg.heartbeat_ms.max(10)),
        }))
    }

    /// Registers again after the session broke (`why`), with backoff, for up to `window`.
    /// With several coordinators, the one whose session broke is tried last: a stopped one
    /// would hold each attempt for its whole time limit.
    async fn reconnect(&self, window: Duration, why: &str) -> Result<Link> {
        {
            let mut t = self.targets();
            t.first = (t.first + 1) % t.list.len();
        }
        let start = Instant::now();
        let mut backoff = Duration::from_millis(250);
        let cap = match self.targets().list.len() {
            1 => BACKOFF_ALONE,
            _ => BACKOFF_WITH_OTHERS,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.register().await {
                Ok(link) => {
                    info!(attempt, worker = %link.worker_id, "registered again with the coordinator; the model is kept");
                    return Ok(link);
                }
                // Trying again cannot change that.
                Err(e @ Error::JobOver { .. }) => return Err(e),
                Err(e) if start.elapsed() + backoff > window => {
                    return Err(Error::Coordinator(format!(
                        "the session with the coordinator at {} broke ({why}) and no coordinator could be reached again within {} s ({attempt} attempts; last: {e}); giving up (--reconnect-secs sets how long to wait)",
                        self.urls(),
                        window.as_secs()
                    )));
                }
                Err(e) => {
                    warn!(attempt, error = %e, "the coordinator cannot be reached yet; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cap);
                }
            }
        }
    }
}

/// Refuses to go on with a coordinator that now runs another job than the one this worker's
/// model and data belong to.
fn same_job(ours: &v1::JobSpec, theirs: &v1::JobSpec) -> Result<()> {
    let fields: [(&str, bool); 6] = [
        ("name", ours.name == theirs.name),
        ("model preset", ours.model_preset == theirs.model_preset),
        ("model folder", ours.model_from == theirs.model_from),
        ("sources", ours.sources == theirs.sources),
        ("optimizer", ours.optimizer == theirs.optimizer),
        ("longest seq_len", ours.seq_len == theirs.seq_len),
    ];
    match fields.iter().find(|(_, same)| !same) {
        None => Ok(()),
        Some((field, _)) => Err(Error::Coordinator(format!(
            "after reconnecting, the coordinator runs job {:?} whose {field} differs from job {:?} this worker's model belongs to; start a new worker for it",
            theirs.name, ours.name
        ))),
    }
}

/// Aborts a task when dropped, so a session's helpers end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a session ended.
enum End {
    /// The job ended (finished, failed, or the trainer thread ended).
    Done(Result<()>),
    /// The stream broke or the coordinator closed it: reconnect.
    Broken(String),
}

async fn session(opts: JoinOptions) -> Result<()> {
    let listener = TcpListener::bind(opts.listen).at(format!("{}", opts.listen))?;
    let address = listener.local_addr().at("collective listener")?;
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_listen)
        .await
        .at(format!("metrics endpoint {}", opts.metrics_listen))?;
    let metrics_address = metrics_listener.local_addr().at("metrics endpoint")?;
    let _metrics_server = AbortOnDrop(tokio::spawn(stagecoach_core::metrics::serve(
        metrics_listener,
        metrics.registry().clone(),
    )));
    info!("metrics on http://{metrics_address}/metrics");
    // The device decides the backend this worker registers with, and the registration is what
    // tells it the job: so the device is `--device`, else the CPU, and the job's own device
    // must then be the CPU too (see `check_device`). Parsing may load libtorch_cuda: off the
    // async threads.
    let requested = opts.device.clone();
    let device = off_async("choosing the device", move || {
        crate::device::parse(requested.as_deref().unwrap_or("cpu"))
    })
    .await?;
    let registrar = Registrar::new(
        &coordinator_urls(&opts.coordinator),
        opts.auth.clone(),
        address,
        device,
    )?;
    let first = match registrar.register().await {
        // Replicas that stand by while none leads yet: an election is under way.
        Err(e) if registrar.saw_standby.load(Ordering::Relaxed) => {
            info!(error = %e, "no coordinator leads yet; trying again");
            registrar
                .reconnect(opts.reconnect, "no replica led the job yet")
                .await
        }
        other => other,
    };
    let link = match first {
        Err(Error::JobOver {
            finished: true,
            message,
        }) => {
            info!("nothing to do: {message}");
            return Ok(());
        }
        other => other?,
    };
    info!(worker = %link.worker_id, job = %link.job.name, %address, "registered");
    check_device(opts.device.as_deref(), &link.job)?;

    let (up_tx, up_rx) = mpsc::channel::<Up>(64);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Envelope>(16);
    let heartbeats = Arc::new(AtomicBool::new(true));
    let trainer = {
        let setup = Setup {
            job: link.job.clone(),
            device: registrar.device,
            listener,
            worker_id: link.worker_id.clone(),
            commands: cmd_rx,
            up: up_tx,
            metrics_out: opts.metrics_out.clone(),
            prom: metrics,
            faults: opts.faults.clone(),
            fast_path: opts.fast_path,
            heartbeats: heartbeats.clone(),
        };
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || trainer_thread(setup))
            .map_err(|e| Error::Config(format!("cannot start the trainer thread: {e}")))?
    };
    let outcome = drive(
        &registrar,
        link,
        up_rx,
        &cmd_tx,
        &heartbeats,
        opts.reconnect,
    )
    .await;
    drop(cmd_tx);
    let trained = tokio::task::spawn_blocking(move || trainer.join())
        .await
        .map_err(|e| Error::Config(format!("joining the trainer: {e}")))?
        .map_err(|_| Error::Config("the trainer thread panicked".into()))?;
    // The trainer's own error says more than "the trainer thread ended".
    trained.and(outcome)
}

/// Runs sessions until the job ends, registering again whenever one breaks. Takes the
/// trainer's messages and drops them when it returns, so that a trainer still sending never
/// waits on a channel nobody reads.
async fn drive(
    registrar: &Registrar,
    mut link: Link,
    mut up: mpsc::Receiver<Up>,
    commands: &mpsc::Sender<Envelope>,
    heartbeats: &Arc<AtomicBool>,
    reconnect: Duration,
) -> Result<()> {
    let mut epoch = 0u64;
    loop {
        let why = match run_session(&link, epoch, &mut up, commands, heartbeats).await {
            End::Done(result) => return result,
            End::Broken(why) => why,
        };
        warn!(
            "the session with the coordinator broke ({why}); keeping the model and reconnecting for up to {} s",
            reconnect.as_secs()
        );
        epoch += 1;
        if commands.send((epoch, Command::Leave)).await.is_err() {
            return Err(Error::Config("the trainer thread ended".into()));
        }
        let next = match registrar.reconnect(reconnect, &why).await {
            Ok(next) => same_job(&link.job, &next.job).map(|()| next),
            Err(e) => Err(e),
        };
        match next {
            Ok(next) => link = next,
            Err(e) => {
                let _ = commands.send((epoch, Command::Exit)).await;
                // The job finished while this worker was away: its part is done.
                if let Error::JobOver {
                    finished: true,
                    message,
                } = &e
                {
                    info!("the job finished while the session was broken: {message}");
                    return Ok(());
                }
                return Err(e);
            }
        }
    }
}

/// Sends a heartbeat every `every` while `on` holds, until aborted.
async fn heartbeat(
    out: mpsc::Sender<v1::WorkerMessage>,
    worker_id: String,
    every: Duration,
    on: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if !on.load(Ordering::Relaxed) {
            continue;
        }
        let msg = v1::WorkerMessage {
            worker_id: worker_id.clone(),
            kind: Some(v1::worker_message::Kind::Heartbeat(v1::Heartbeat {})),
        };
        if out.send(msg).await.is_err() {
            break;
        }
    }
}

/// How long a worker that stops waits for the coordinator to have read its last messages.
const FLUSH: Duration = Duration::from_secs(5);

/// One session: Hello, then the coordinator's messages down to the trainer and the trainer's
/// replies of this session (`epoch`) up, with heartbeats beside.
async fn run_session(
    link: &Link,
    epoch: u64,
    up: &mut mpsc::Receiver<Up>,
    commands: &mpsc::Sender<Envelope>,
    heartbeats: &Arc<AtomicBool>,
) -> End {
    let (out, out_rx) = mpsc::channel::<v1::WorkerMessage>(64);
    let message = |kind: Reply| v1::WorkerMessage {
        worker_id: link.worker_id.clone(),
        kind: Some(kind),
    };
    // The receiver is ours until the stream takes it: this send cannot fail or wait.
    let _ = out.send(message(Reply::Hello(v1::Hello {}))).await;
    let mut client = link.client.clone();
    let mut inbound = match client
        .session(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(e) => {
            return End::Broken(format!(
                "opening the session: {:?}: {}",
                e.code(),
                e.message()
            ))
        }
    };
    let beat = AbortOnDrop(tokio::spawn(heartbeat(
        out.clone(),
        link.worker_id.clone(),
        link.heartbeat,
        heartbeats.clone(),
    )));
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return End::Broken("the coordinator closed the session".into()),
                    Err(e) => return End::Broken(format!("{:?}: {}", e.code(), e.message())),
                };
                use v1::coordinator_message::Kind;
                let cmd = match msg.kind {
                    Some(Kind::World(w)) => Command::World(w),
                    Some(Kind::Work(w)) => Command::Work(w),
                    Some(Kind::Evaluate(e)) => Command::Evaluate(e),
                    Some(Kind::SaveCheckpoint(s)) => Command::Save(s),
                    Some(Kind::SyncState(s)) => Command::Sync(s),
                    Some(Kind::Stop(s)) => match s.reason() {
                        v1::StopReason::GenerationEnded => {
                            warn!(generation = s.generation, detail = %s.detail, "generation ended");
                            Command::Leave
                        }
                        v1::StopReason::JobFinished => {
                            info!("the job finished");
                            let _ = commands.send((epoch, Command::Exit)).await;
                            return End::Done(Ok(()));
                        }
                        _ => {
                            let _ = commands.send((epoch, Command::Exit)).await;
                            return End::Done(Err(Error::JobOver {
                                finished: false,
                                message: format!("the job failed: {}", s.detail),
                            }));
                        }
                    },
                    None => continue,
                };
                if commands.send((epoch, cmd)).await.is_err() {
                    return End::Done(Err(Error::Config("the trainer thread ended".into())));
                }
            }
            reply = up.recv() => match reply {
                Some(Up { epoch: e, kind }) if e == epoch => {
                    if out.send(message(kind)).await.is_err() {
                        return End::Broken("the session's outbound stream closed".into());
                    }
                }
                Some(_) => debug!("dropped a reply meant for an earlier session"),
                None => {
                    // The trainer ended; its last reply (why it could not go on) is queued on
                    // `out`. Close this side of the session and wait, briefly, for the
                    // coordinator to end its side: it has then handled every message.
                    drop(beat);
                    drop(out);
                    let _ = tokio::time::timeout(FLUSH, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    return End::Done(Err(Error::Config("the trainer thread ended".into())));
                }
            },
        }
    }
}

/// Whether this worker may train the job on the device it registered with: `--device` wins
/// over the job's `[train] device` (logged when they differ); without it the worker registered
/// as a CPU worker (the TCP backend: the backend is part of the registration, which is what
/// tells the worker the job), which a job whose device is a GPU refuses, saying to pass
/// `--device`. A CPU job (`cpu`, or no device) needs no `--device`.
fn check_device(requested: Option<&str>, job: &v1::JobSpec) -> Result<()> {
    let wanted = job.device.trim();
    match requested {
        Some(d) if !wanted.is_empty() && d.trim() != wanted => {
            info!(
                device = d,
                job_device = wanted,
                "--device overrides the job's [train] device"
            );
            Ok(())
        }
        Some(_) => Ok(()),
        None if wanted.is_empty() || wanted == "cpu" => Ok(()),
        None => Err(Error::Config(format!(
            "job {:?} trains on {wanted:?} ([train] device), but this worker was started without \
             --device and registered as a CPU worker (the collective backend is chosen at \
             registration, before the job is known); start it with --device {wanted} (or \
             --device cpu to train it on the CPU)",
            job.name
        ))),
    }
}

/// Runs `f`, which calls into libtorch or NCCL (it may load a library or initialise CUDA), on
/// tokio's blocking pool rather than on an async worker thread.
async fn off_async<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Config(format!("{what}: {e}")))?
}

fn fresh_nccl_id() -> Result<Vec<u8>> {
    Ok(nccl::unique_id()
        .map_err(|e| Error::Collective(e.to_string()))?
        .to_vec())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}

#[cfg(test)]
mod tests {
    use super::trainer::tests::{stage, step_done, work};
    use super::*;
    use crate::train::fixtures;

    /// A session as the fake coordinator sees it: the worker's messages, and where to put its
    /// own (dropping it ends the session).
    type FakeSession = (
        tonic::Streaming<v1::WorkerMessage>,
        mpsc::Sender<Result<v1::CoordinatorMessage, tonic::Status>>,
    );

    /// A coordinator's side of the Workers service, driven by the test: registrations and
    /// sessions are handed over as they arrive.
    struct FakeCoordinator {
        job: v1::JobSpec,
        registrations: mpsc::Sender<v1::RegisterRequest>,
        sessions: mpsc::Sender<FakeSession>,
        count: std::sync::atomic::AtomicU64,
        /// What Register answers instead of a registration, if set.
        refusal: Option<tonic::Status>,
    }

    #[tonic::async_trait]
    impl v1::workers_server::Workers for FakeCoordinator {
        async fn register(
            &self,
            request: tonic::Request<v1::RegisterRequest>,
        ) -> Result<tonic::Response<v1::RegisterResponse>, tonic::Status> {
            let n = 1 + self.count.fetch_add(1, Ordering::Relaxed);
            let _ = self.registrations.send(request.into_inner()).await;
            if let Some(refusal) = &self.refusal {
                return Err(refusal.clone());
            }
            Ok(tonic::Response::new(v1::RegisterResponse {
                worker_id: format!("w{n}"),
                lease_ms: 60_000,
                heartbeat_ms: 50,
                job: Some(self.job.clone()),
            }))
        }

        type SessionStream = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<v1::CoordinatorMessage, tonic::Status>>
                    + Send,
            >,
        >;

        async fn session(
            &self,
            request: tonic::Request<tonic::Streaming<v1::WorkerMessage>>,
        ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
            let (tx, rx) = mpsc::channel(16);
            let _ = self.sessions.send((request.into_inner(), tx)).await;
            Ok(tonic::Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        type NodeSessionStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<v1::NodeDown, tonic::Status>> + Send>,
        >;

        /// A worker holds its own session: it never opens a node session.
        async fn node_session(
            &self,
            _request: tonic::Request<tonic::Streaming<v1::NodeUp>>,
        ) -> Result<tonic::Response<Self::NodeSessionStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not a worker's call"))
        }
    }

    struct Fake {
        url: String,
        registrations: mpsc::Receiver<v1::RegisterRequest>,
        sessions: mpsc::Receiver<FakeSession>,
        server: tokio::task::JoinHandle<()>,
    }

    async fn fake_coordinator(job: v1::JobSpec) -> Fake {
        fake_coordinator_refusing(job, None).await
    }

    async fn fake_coordinator_refusing(job: v1::JobSpec, refusal: Option<tonic::Status>) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (reg_tx, registrations) = mpsc::channel(8);
        let (sess_tx, sessions) = mpsc::channel(8);
        let service = FakeCoordinator {
            job,
            registrations: reg_tx,
            sessions: sess_tx,
            count: Default::default(),
            refusal,
        };
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(v1::workers_server::WorkersServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Fake {
            url,
            registrations,
            sessions,
            server,
        }
    }

    /// The next message of a session other than a heartbeat, and the worker id it carries.
    async fn next(inbound: &mut tonic::Streaming<v1::WorkerMessage>) -> (String, Reply) {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), inbound.message())
                .await
                .expect("a message within 60 s")
                .expect("a healthy stream")
                .expect("an open stream");
            match msg.kind {
                Some(Reply::Heartbeat(_)) | None => continue,
                Some(kind) => return (msg.worker_id, kind),
            }
        }
    }

    fn join_options(url: &str, reconnect_secs: u64) -> JoinOptions {
        JoinOptions {
            coordinator: url.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            device: None,
            metrics_out: None,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            reconnect: Duration::from_secs(reconnect_secs),
            faults: Faults::default(),
            fast_path: Default::default(),
            auth: Default::default(),
        }
    }

    fn world_for(generation: u64, start_step: u64, address: &str) -> v1::CoordinatorMessage {
        v1::CoordinatorMessage {
            kind: Some(v1::coordinator_message::Kind::World(v1::World {
                generation,
                rank: 0,
                world_size: 1,
                next_peer: address.into(),
                start_step,
                ..Default::default()
            })),
        }
    }

    fn work_for(generation: u64, step: u64, samples: &[(usize, u64)]) -> v1::CoordinatorMessage {
        let Command::Work(w) = work(generation, step, samples, Some(stage(0, 16, 0.0, 2))) else {
            unreachable!()
        };
        v1::CoordinatorMessage {
            kind: Some(v1::coordinator_message::Kind::Work(w)),
        }
    }

    /// The coordinator ends a session with a step in flight: the worker keeps its model,
    /// registers again under a new id, never sends the old session's reply on the new one, and
    /// answers the new world with the steps it has taken (the one in flight included).
    #[test]
    fn a_broken_session_is_resumed_with_the_model_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut fake = fake_coordinator(spec).await;
            let opts = join_options(&fake.url, 30);
            let worker = std::thread::spawn(move || join(opts));

            let first = fake.registrations.recv().await.unwrap();
            let (mut inbound, out) = fake.sessions.recv().await.unwrap();
            let (id, hello) = next(&mut inbound).await;
            assert!(matches!(hello, Reply::Hello(_)) && id == "w1");
            out.send(Ok(world_for(1, 0, &first.collective_address)))
                .await
                .unwrap();
            assert!(matches!(next(&mut inbound).await.1, Reply::Ready(_)));
            out.send(Ok(work_for(1, 0, &[(0, 0), (1, 0)])))
                .await
                .unwrap();
            assert_eq!(step_done(next(&mut inbound).await.1).step, 0);
            // Step 1 is sent, then the session ends before its reply can come back.
            out.send(Ok(work_for(1, 1, &[(0, 16), (1, 16)])))
                .await
                .unwrap();
            drop(out);

            let second = fake.registrations.recv().await.unwrap();
            assert_eq!(second.collective_address, first.collective_address);
            let (mut inbound2, out) = fake.sessions.recv().await.unwrap();
            let (id, hello) = next(&mut inbound2).await;
            assert!(matches!(hello, Reply::Hello(_)) && id == "w2", "{id}");
            out.send(Ok(world_for(2, 2, &first.collective_address)))
                .await
                .unwrap();
            // Step 1's StepDone belonged to the first session: the next message is Ready.
            let (id, reply) = next(&mut inbound2).await;
            let Reply::Ready(ready) = reply else {
                panic!("expected Ready, got {reply:?}")
            };
            assert_eq!((id.as_str(), ready.generation, ready.step), ("w2", 2, 2));
            out.send(Ok(work_for(2, 2, &[(0, 32), (1, 32)])))
                .await
                .unwrap();
            assert_eq!(step_done(next(&mut inbound2).await.1).step, 2);
            out.send(Ok(v1::CoordinatorMessage {
                kind: Some(v1::coordinator_message::Kind::Stop(v1::Stop {
                    reason: v1::StopReason::JobFinished.into(),
                    generation: 2,
                    detail: String::new(),
                })),
            }))
            .await
            .unwrap();
            let result = tokio::task::spawn_blocking(move || worker.join().unwrap())
                .await
                .unwrap();
            assert!(result.is_ok(), "{result:?}");
            drop(inbound);
            fake.server.abort();
        });
    }

    /// Replicas: a standby answers Unavailable naming the leader; the worker given only the
    /// standby's URL (and a dead one) registers with the leader it named. A standby that knows
    /// no leader yet makes the worker wait and try again rather than give up.
    #[test]
    fn a_worker_follows_a_standby_to_the_leader() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut leader = fake_coordinator(spec.clone()).await;
            let mut named = tonic::Status::unavailable("this coordinator stands by");
            named.metadata_mut().insert(
                stagecoach_proto::LEADER_METADATA,
                leader.url.parse().unwrap(),
            );
            let mut standby = fake_coordinator_refusing(spec.clone(), Some(named)).await;
            let dead = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                format!("http://{}", l.local_addr().unwrap())
            };
            let opts = join_options(&format!("{dead}, {}", standby.url), 5);
            let worker = std::thread::spawn(move || join(opts));
            standby.registrations.recv().await.unwrap();
            leader.registrations.recv().await.unwrap();
            let (mut inbound, out) = leader.sessions.recv().await.unwrap();
            assert!(matches!(next(&mut inbound).await.1, Reply::Hello(_)));
            out.send(Ok(v1::CoordinatorMessage {
                kind: Some(v1::coordinator_message::Kind::Stop(v1::Stop {
                    reason: v1::StopReason::JobFinished.into(),
                    generation: 0,
                    detail: String::new(),
                })),
            }))
            .await
            .unwrap();
            let result = tokio::task::spawn_blocking(move || worker.join().unwrap())
                .await
                .unwrap();
            assert!(result.is_ok(), "{result:?}");
            leader.server.abort();
            standby.server.abort();

            // No leader yet: the worker keeps trying, within --reconnect-secs, and says so.
            let mut electing = tonic::Status::unavailable("an election is under way");
            electing.metadata_mut().insert(
                stagecoach_proto::LEADER_METADATA,
                tonic::metadata::MetadataValue::from_static(""),
            );
            let mut alone = fake_coordinator_refusing(spec, Some(electing)).await;
            let opts = join_options(&alone.url, 1);
            let worker = std::thread::spawn(move || join(opts));
            alone.registrations.recv().await.unwrap();
            alone.registrations.recv().await.unwrap();
            let result = tokio::task::spawn_blocking(move || worker.join().unwrap())
                .await
                .unwrap();
            let err = result.unwrap_err().to_string();
            assert!(err.contains("an election is under way"), "{err}");
            alone.server.abort();
        });
    }

    /// A worker that comes after the job finished has nothing to do and says so, exiting
    /// successfully (a supervisor must not restart it); after a failed job it exits with the
    /// coordinator's reason.
    #[test]
    fn a_worker_that_comes_after_the_end_exits_by_how_the_job_ended() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        for (state, ok) in [("finished", true), ("failed", false)] {
            let mut refusal =
                tonic::Status::failed_precondition(format!("the job is over ({state} at step 3)"));
            refusal
                .metadata_mut()
                .insert(stagecoach_proto::JOB_OVER_METADATA, state.parse().unwrap());
            let result = rt.block_on(async {
                let fake = fake_coordinator_refusing(spec.clone(), Some(refusal)).await;
                let opts = join_options(&fake.url, 1);
                let result = tokio::task::spawn_blocking(move || join(opts))
                    .await
                    .unwrap();
                fake.server.abort();
                result
            });
            assert_eq!(result.is_ok(), ok, "{state}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains("failed at step 3"), "{e}");
            }
        }
    }

    /// A job that trains on a GPU, joined without `--device`: the worker registered as a CPU
    /// worker, so it stops with an error that says to pass `--device`, before opening a
    /// session. A CPU job needs none.
    #[test]
    fn a_gpu_job_joined_without_device_is_refused_with_the_flag_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = fixtures::job(dir.path());
        spec.device = "cuda:0".into();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut fake = fake_coordinator(spec).await;
            let opts = join_options(&fake.url, 1);
            let worker = std::thread::spawn(move || join(opts));
            let registration = fake.registrations.recv().await.unwrap();
            assert_eq!(registration.backend(), v1::CollectiveBackend::Tcp);
            let result = tokio::task::spawn_blocking(move || worker.join().unwrap())
                .await
                .unwrap();
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("trains on \"cuda:0\" ([train] device)")
                    && err.contains("start it with --device cuda:0"),
                "{err}"
            );
            assert!(fake.sessions.try_recv().is_err(), "a session was opened");
            fake.server.abort();
        });
        let job = |device: &str| v1::JobSpec {
            device: device.into(),
            ..Default::default()
        };
        assert!(check_device(None, &job("cpu")).is_ok());
        assert!(check_device(None, &job("")).is_ok());
        assert!(check_device(Some("cpu"), &job("cuda")).is_ok());
        assert!(check_device(Some("cuda:1"), &job("cuda")).is_ok());
        assert!(check_device(None, &job("cuda")).is_err());
    }

    /// A coordinator that stays away longer than `--reconnect-secs`: the worker gives up with
    /// an error that says so.
    #[test]
    fn a_coordinator_gone_for_good_ends_the_worker_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut fake = fake_coordinator(spec).await;
            let opts = join_options(&fake.url, 1);
            let worker = std::thread::spawn(move || join(opts));
            fake.registrations.recv().await.unwrap();
            let (mut inbound, out) = fake.sessions.recv().await.unwrap();
            assert!(matches!(next(&mut inbound).await.1, Reply::Hello(_)));
            fake.server.abort();
            drop((out, inbound));
            let t0 = Instant::now();
            let result = tokio::task::spawn_blocking(move || worker.join().unwrap())
                .await
                .unwrap();
            let err = result.unwrap_err().to_string();
            assert!(err.contains("could be reached again within 1 s"), "{err}");
            assert!(t0.elapsed() < Duration::from_secs(30));
        });
    }
}
