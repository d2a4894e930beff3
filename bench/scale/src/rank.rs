//! One simulated rank: it registers, holds a session and answers the coordinator the way a
//! real worker does (`worker/src/agent/`), without a model: `Ready` at the step the world
//! starts from, `StepDone` at once for every `Work`, with numbers every rank agrees on.
//!
//! Each rank keeps its own log of when it sent each `StepDone` and when each `Work` arrived;
//! the figures are computed from all logs once the run is over ([`crate::report`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use stagecoach_proto::connect::AuthedChannel;
use stagecoach_proto::relay::{self, Relay, RelaySession};
use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How a rank reaches the coordinator: a session of its own on a shared connection, or inside
/// its node's session through the node's relay (as the ranks behind a node agent do).
#[derive(Clone)]
pub enum Transport {
    Own(Channel),
    Node(Arc<Relay>),
}

/// A rank's open session, either way.
enum Pipe {
    Own {
        inbound: tonic::Streaming<v1::CoordinatorMessage>,
        out: mpsc::Sender<v1::WorkerMessage>,
    },
    Node(RelaySession),
}

impl Pipe {
    async fn message(&mut self) -> Result<Option<v1::CoordinatorMessage>, tonic::Status> {
        match self {
            Pipe::Own { inbound, .. } => inbound.message().await,
            Pipe::Node(session) => session.message().await,
        }
    }

    /// False when the session's outbound side is gone.
    async fn send(&self, message: v1::WorkerMessage) -> bool {
        match self {
            Pipe::Own { out, .. } => out.send(message).await.is_ok(),
            Pipe::Node(session) => match message.kind {
                Some(kind) => session.send(kind).await.is_ok(),
                None => true,
            },
        }
    }
}

/// The loss every rank reports for each of its samples (a plausible cross-entropy).
pub const LOSS: f64 = 2.5;
/// The gradient norm every rank reports.
pub const GRAD_NORM: f64 = 1.0;
/// The state digest every rank reports: all ranks hold "the same model".
pub const STATE_DIGEST: u64 = 0x5ca1_ab1e_0000_0001;
/// Tokens each source holds as the simulated ranks see it: far more than any run draws.
pub const SOURCE_TOKENS: u64 = 1 << 40;
/// Tokens of a held-out folder, for sources that name one.
pub const EVAL_TOKENS: u64 = 1 << 30;

/// How long a rank waits before registering again after its session ended or a registration
/// failed.
pub(crate) const RETRY: Duration = Duration::from_millis(500);

/// Messages a rank queues for the coordinator (it answers one message with one message).
pub(crate) const OUTBOUND: usize = 16;

/// What every rank shares: the clock the logs count from, the stop signal, the counters the
/// progress line and the report read.
pub struct Shared {
    /// Every logged time is nanoseconds since this.
    pub base: Instant,
    pub ranks: usize,
    /// Registrations (with their session's opening) in progress at once.
    pub joining: Semaphore,
    /// When the first Register was sent.
    pub first_register: OnceLock<Instant>,
    /// The first world in which every rank got its first `Work`.
    pub running: OnceLock<Running>,
    /// Per generation, the ranks that got a first `Work` in it.
    first_work: Mutex<std::collections::HashMap<u64, usize>>,
    /// Tells the caller that [`Shared::running`] is set.
    running_tx: watch::Sender<bool>,
    pub counts: Counts,
    /// The highest step any rank was given work for.
    pub max_work_step: AtomicU64,
}

/// When the world first ran.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    pub at: Instant,
    pub generation: u64,
    pub world_size: u32,
    /// The step it started from.
    pub start_step: u64,
}

/// Counters over all ranks.
#[derive(Default)]
pub struct Counts {
    /// Ranks registered at least once.
    pub registered: AtomicUsize,
    /// Registrations, first ones and those after a lost session.
    pub registrations: AtomicUsize,
    /// Registrations or session openings the coordinator refused or that failed.
    pub join_errors: AtomicUsize,
    /// Sessions open now.
    pub attached: AtomicUsize,
    /// `World` messages received, and `Ready` answers sent.
    pub worlds: AtomicUsize,
    pub readies: AtomicUsize,
    /// `Stop` (generation ended) messages received.
    pub stops: AtomicUsize,
    /// Sessions the coordinator ended because it no longer knew the rank (its lease expired).
    pub leases_lost: AtomicUsize,
    /// Sessions that ended otherwise (another error, or closed by the coordinator).
    pub sessions_broken: AtomicUsize,
    /// `Evaluate` and `SaveCheckpoint` requests answered, and `SyncState`.
    pub evaluations: AtomicUsize,
    pub checkpoints: AtomicUsize,
    pub syncs: AtomicUsize,
    /// Ranks that saw the job end (finished or failed).
    pub job_over: AtomicUsize,
    /// Why the first session broke or the first join failed, for the report.
    pub first_break: Mutex<Option<String>>,
}

impl Counts {
    /// Counts a broken session (or a failed join) in `counter`, keeping the first reason.
    pub(crate) fn broke(&self, counter: &AtomicUsize, why: impl FnOnce() -> String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_break.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(why());
        }
    }
}

impl Shared {
    pub fn new(ranks: usize, joining: usize) -> (Arc<Shared>, watch::Receiver<bool>) {
        let (running_tx, running_rx) = watch::channel(false);
        let shared = Shared {
            base: Instant::now(),
            ranks,
            joining: Semaphore::new(joining.max(1)),
            first_register: OnceLock::new(),
            running: OnceLock::new(),
            first_work: Mutex::new(Default::default()),
            running_tx,
            counts: Counts::default(),
            max_work_step: AtomicU64::new(0),
        };
        (Arc::new(shared), running_rx)
    }

    /// Nanoseconds from [`Shared::base`] to `t`.
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// `ranks` ranks got their first `Work` of `world`'s generation at `at`.
    pub(crate) fn first_work(&self, world: &v1::World, at: Instant, ranks: usize) {
        let mut by_generation = self.first_work.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_generation.entry(world.generation).or_default();
        *n += ranks;
        if *n == world.world_size as usize && self.running.get().is_none() {
            let _ = self.running.set(Running {
                at,
                generation: world.generation,
                world_size: world.world_size,
                start_step: world.start_step,
            });
            self.running_tx.send_replace(true);
        }
    }
}

/// What one rank logged: `(generation, step, nanoseconds)` of every `StepDone` it sent and
/// every `Work` it received.
#[derive(Debug, Default)]
pub struct RankLog {
    pub done: Vec<(u64, u64, u64)>,
    pub work: Vec<(u64, u64, u64)>,
}

/// How a session ended.
enum End {
    /// The job finished or failed: nothing more to do.
    JobOver,
    /// The bench is over.
    Stopped,
    /// The coordinator dropped this rank (`NotFound`: its lease expired) or the session broke.
    Lost,
}

/// Runs rank `index` until the job ends or `stop` is set.
pub async fn run(
    index: usize,
    shared: Arc<Shared>,
    transport: Transport,
    mut stop: watch::Receiver<bool>,
) -> RankLog {
    let mut log = RankLog::default();
    let mut client = match &transport {
        Transport::Own(channel) => {
            WorkersClient::with_interceptor(channel.clone(), Default::default())
        }
        Transport::Node(relay) => relay.client(),
    };
    let mut first = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let joined = tokio::select! {
            j = join(index, &shared, &mut client, &transport) => j,
            () = stopped(&mut stop) => break,
        };
        match joined {
            Ok(Some((link, pipe))) => {
                if first {
                    shared.counts.registered.fetch_add(1, Ordering::Relaxed);
                    first = false;
                }
                shared.counts.attached.fetch_add(1, Ordering::Relaxed);
                let end = session(&shared, &link, pipe, &mut stop, &mut log).await;
                shared.counts.attached.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::JobOver => {
                        shared.counts.job_over.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    End::Stopped => break,
                    End::Lost => {}
                }
            }
            // The job is over: registering again cannot change that.
            Ok(None) => {
                shared.counts.job_over.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(status) => {
                let c = &shared.counts;
                c.broke(&c.join_errors, || format!("joining: {}", describe(&status)));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = stopped(&mut stop) => break,
        }
    }
    log
}

/// A registration: the id, the heartbeat and the job's sources.
pub(crate) struct Link {
    pub(crate) worker_id: String,
    pub(crate) heartbeat: Duration,
    /// How long its heartbeat may wait for company in a node session ([`relay::hold`]).
    pub(crate) hold: Duration,
    pub(crate) sources: Vec<v1::SourceSize>,
}

type Joined = (Link, Pipe);

/// Registers and opens the session, within the bound on joins in progress. `None` when the
/// coordinator says the job is over.
async fn join(
    index: usize,
    shared: &Shared,
    client: &mut WorkersClient<AuthedChannel>,
    transport: &Transport,
) -> Result<Option<Joined>, tonic::Status> {
    let _permit = shared.joining.acquire().await.expect("never closed");
    let Some(link) = register(index, shared, client).await? else {
        return Ok(None);
    };
    if let Transport::Node(relay) = transport {
        let session = relay.session(link.worker_id.clone(), link.hold).await?;
        return Ok(Some((link, Pipe::Node(session))));
    }
    let (out, out_rx) = mpsc::channel(OUTBOUND);
    // The receiver is ours until the call takes it: this cannot wait or fail.
    let _ = out.try_send(message(
        &link,
        v1::worker_message::Kind::Hello(v1::Hello {}),
    ));
    let inbound = client
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    Ok(Some((link, Pipe::Own { inbound, out })))
}

/// Registers rank `index` (the caller holds a [`Shared::joining`] permit). `None` when the
/// coordinator says the job is over.
pub(crate) async fn register(
    index: usize,
    shared: &Shared,
    client: &mut WorkersClient<AuthedChannel>,
) -> Result<Option<Link>, tonic::Status> {
    let _ = shared.first_register.set(Instant::now());
    shared.counts.registrations.fetch_add(1, Ordering::Relaxed);
    let reg = client
        .register(v1::RegisterRequest {
            name: format!("bench-rank-{index}"),
            backend: v1::CollectiveBackend::Tcp.into(),
            collective_address: fake_address(index),
            nccl_unique_id: vec![],
        })
        .await;
    let reg = match reg {
        Ok(r) => r.into_inner(),
        Err(s)
            if s.metadata()
                .contains_key(stagecoach_proto::JOB_OVER_METADATA) =>
        {
            return Ok(None)
        }
        Err(s) => return Err(s),
    };
    let hold = relay::hold(&reg);
    let job = reg
        .job
        .ok_or_else(|| tonic::Status::internal("the registration carried no job"))?;
    let sources = job
        .sources
        .iter()
        .map(|s| v1::SourceSize {
            name: s.name.clone(),
            num_tokens: SOURCE_TOKENS,
            eval_tokens: if s.eval_path.is_empty() {
                0
            } else {
                EVAL_TOKENS
            },
        })
        .collect();
    Ok(Some(Link {
        worker_id: reg.worker_id,
        heartbeat: Duration::from_millis(reg.heartbeat_ms.max(10)),
        hold,
        sources,
    }))
}

/// A collective address nothing listens on (the coordinator only stores it), unique per rank.
pub fn fake_address(index: usize) -> String {
    format!("127.0.{}.1:{}", index / 50_000, 10_000 + index % 50_000)
}

fn message(link: &Link, kind: v1::worker_message::Kind) -> v1::WorkerMessage {
    v1::WorkerMessage {
        worker_id: link.worker_id.clone(),
        kind: Some(kind),
    }
}

/// One session: heartbeats, and an answer to every message, until it ends.
async fn session(
    shared: &Shared,
    link: &Link,
    mut pipe: Pipe,
    stop: &mut watch::Receiver<bool>,
    log: &mut RankLog,
) -> End {
    use v1::coordinator_message::Kind;
    use v1::worker_message::Kind as Up;
    let mut beat = tokio::time::interval(link.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    // The world this rank is in, and whether it got work in it yet.
    let mut world: Option<(v1::World, bool)> = None;
    // One wait for the stop, not one per message.
    let stopped = stopped(stop);
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            m = pipe.message() => m,
            _ = beat.tick() => {
                if !pipe.send(message(link, Up::Heartbeat(v1::Heartbeat {}))).await {
                    let c = &shared.counts;
                    c.broke(&c.sessions_broken, || "the session's outbound stream closed".into());
                    return End::Lost;
                }
                continue;
            }
            () = &mut stopped => return End::Stopped,
        };
        let arrived = Instant::now();
        let kind = match msg {
            Ok(Some(m)) => m.kind,
            Ok(None) => {
                let c = &shared.counts;
                c.broke(&c.sessions_broken, || {
                    "the coordinator closed the session".into()
                });
                return End::Lost;
            }
            Err(status) => {
                let c = &shared.counts;
                let counter = if status.code() == tonic::Code::NotFound {
                    &c.leases_lost
                } else {
                    &c.sessions_broken
                };
                c.broke(counter, || format!("session: {}", describe(&status)));
                return End::Lost;
            }
        };
        let reply = match kind {
            Some(Kind::World(w)) => {
                shared.counts.worlds.fetch_add(1, Ordering::Relaxed);
                // A restore names the step the ranks must then be at; "loading" it changes
                // nothing here, every rank holds the same state.
                let step = w.restore.as_ref().map_or(w.start_step, |r| r.step);
                let ready = ready(link, w.generation, step);
                world = Some((w, false));
                shared.counts.readies.fetch_add(1, Ordering::Relaxed);
                Some(ready)
            }
            Some(Kind::SyncState(s)) => {
                shared.counts.syncs.fetch_add(1, Ordering::Relaxed);
                Some(ready(link, s.generation, s.step))
            }
            Some(Kind::Work(work)) => {
                let arrived_ns = shared.ns(arrived);
                log.work.push((work.generation, work.step, arrived_ns));
                shared.max_work_step.fetch_max(work.step, Ordering::Relaxed);
                if let Some((w, got_work)) = world.as_mut() {
                    if w.generation == work.generation && !*got_work {
                        *got_work = true;
                        shared.first_work(w, arrived, 1);
                    }
                }
                let done = step_done(&work, work.samples.len() as u32);
                // The time is taken before the send: the next step's work cannot come before.
                log.done
                    .push((work.generation, work.step, shared.ns(Instant::now())));
                Some(Up::StepDone(done))
            }
            Some(Kind::Evaluate(e)) => Some(eval_done(shared, &e)),
            Some(Kind::SaveCheckpoint(s)) => Some(not_saved(shared, s)),
            Some(Kind::Stop(s)) => match s.reason() {
                v1::StopReason::GenerationEnded => {
                    shared.counts.stops.fetch_add(1, Ordering::Relaxed);
                    world = None;
                    None
                }
                _ => return End::JobOver,
            },
            None => None,
        };
        if let Some(kind) = reply {
            if !pipe.send(message(link, kind)).await {
                let c = &shared.counts;
                c.broke(&c.sessions_broken, || {
                    "the session's outbound stream closed".into()
                });
                return End::Lost;
            }
        }
    }
}

/// What a rank reports for `work` with `samples` samples: the numbers every rank agrees on.
pub(crate) fn step_done(work: &v1::Work, samples: u32) -> v1::StepDone {
    v1::StepDone {
        generation: work.generation,
        step: work.step,
        loss_sum: LOSS * f64::from(samples),
        samples,
        grad_norm: GRAD_NORM,
        timing: None,
        skipped: false,
        global_loss: LOSS,
        state_digest: STATE_DIGEST,
    }
}

/// The answer to an evaluation: [`LOSS`] for every sample, by source.
pub(crate) fn eval_done(shared: &Shared, e: &v1::Evaluate) -> v1::worker_message::Kind {
    shared.counts.evaluations.fetch_add(1, Ordering::Relaxed);
    let mut per_source = std::collections::BTreeMap::<u32, u32>::new();
    for s in &e.samples {
        *per_source.entry(s.source).or_default() += 1;
    }
    let losses = per_source
        .into_iter()
        .map(|(source, samples)| v1::EvalLoss {
            source,
            loss_sum: LOSS * f64::from(samples),
            samples,
        })
        .collect();
    v1::worker_message::Kind::EvalDone(v1::EvalDone {
        generation: e.generation,
        id: e.id,
        losses,
    })
}

/// The answer to a checkpoint request: a simulated rank holds no model, so the write fails,
/// and says why.
pub(crate) fn not_saved(shared: &Shared, s: v1::SaveCheckpoint) -> v1::worker_message::Kind {
    shared.counts.checkpoints.fetch_add(1, Ordering::Relaxed);
    v1::worker_message::Kind::CheckpointSaved(v1::CheckpointSaved {
        generation: s.generation,
        id: s.id,
        path: s.path,
        error: "a simulated rank (stagecoach-bench) holds no model to write".into(),
        ..Default::default()
    })
}

/// A status for the report: its code, its message (clipped) and its source's.
pub(crate) fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(&format!(" ({source})"));
    }
    text.chars().take(300).collect()
}

/// Resolves once `stop` is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub(crate) fn ready(link: &Link, generation: u64, step: u64) -> v1::worker_message::Kind {
    v1::worker_message::Kind::Ready(v1::Ready {
        generation,
        sources: link.sources.clone(),
        step,
        state_digest: STATE_DIGEST,
        ..Default::default()
    })
}
