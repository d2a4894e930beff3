//! The coordinator-driven worker (`stagecoach-worker join`).
//!
//! Two halves: an async side (a small tokio runtime) that registers, holds the session stream,
//! sends heartbeats and relays messages; and one named OS thread, `trainer`, that owns the model,
//! the optimizer, the data and the collective. They talk over bounded channels: commands down
//! (`World`, `Work`, leave, exit), worker messages up. No libtorch or collective call runs on a
//! tokio thread.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::collective::nccl::{self, Nccl};
use crate::collective::tcp::{TcpConfig, TcpRing};
use crate::collective::{Collective, CollectiveError};
use crate::error::{Error, IoContext, Result};
use crate::metrics::Metrics;
use crate::train::Trainer;

/// How to join a job.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator's URL (http://host:port).
    pub coordinator: String,
    /// Where to accept the ring neighbour (port 0: any free port).
    pub listen: SocketAddr,
    /// Overrides the job's device.
    pub device: Option<String>,
    /// Write one JSON record per trained step (with its samples) here.
    pub metrics_out: Option<PathBuf>,
    /// Where to serve Prometheus metrics (GET /metrics; port 0: any free port, logged).
    pub metrics_listen: SocketAddr,
}

enum Command {
    World(v1::World),
    Work(v1::Work),
    /// Leave the current collective (the generation ended).
    Leave,
    Exit,
}

/// One trained step, as written to `--metrics-out`.
#[derive(Serialize)]
struct StepLine<'a> {
    generation: u64,
    rank: usize,
    step: u64,
    loss: f64,
    samples: &'a [(usize, u64)],
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
    Error::Config(format!(
        "{what}: the coordinator answered {:?}: {}",
        e.code(),
        e.message()
    ))
}

async fn session(opts: JoinOptions) -> Result<()> {
    let listener = TcpListener::bind(opts.listen).at(format!("{}", opts.listen))?;
    let address = listener.local_addr().at("collective listener")?;
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_listen)
        .await
        .at(format!("metrics endpoint {}", opts.metrics_listen))?;
    let metrics_address = metrics_listener.local_addr().at("metrics endpoint")?;
    tokio::spawn(stagecoach_coordinator::metrics::serve(
        metrics_listener,
        metrics.registry().clone(),
    ));
    info!("metrics on http://{metrics_address}/metrics");
    let endpoint = tonic::transport::Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| Error::Config(format!("coordinator URL {:?}: {e}", opts.coordinator)))?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        Error::Config(format!(
            "cannot reach the coordinator at {}: {e}",
            opts.coordinator
        ))
    })?;
    let mut client = WorkersClient::new(channel);
    let name = format!("{}:{}", hostname(), std::process::id());
    // The device decides the collective: NCCL between GPUs (its unique id travels through the
    // coordinator), the TCP ring between CPU workers.
    let device = crate::device::parse(opts.device.as_deref().unwrap_or("cpu"))?;
    let (backend, nccl_unique_id) = match device {
        tch::Device::Cuda(_) => (v1::CollectiveBackend::Nccl, fresh_nccl_id()?),
        _ => (v1::CollectiveBackend::Tcp, Vec::new()),
    };
    let reg = client
        .register(v1::RegisterRequest {
            name,
            backend: backend.into(),
            collective_address: address.to_string(),
            nccl_unique_id,
        })
        .await
        .map_err(|e| rpc("register", e))?
        .into_inner();
    let job = reg
        .job
        .ok_or_else(|| Error::Config("the coordinator sent no job".into()))?;
    let worker_id = reg.worker_id.clone();
    info!(worker = %worker_id, job = %job.name, %address, "registered");

    let (up_tx, up_rx) = mpsc::channel::<v1::WorkerMessage>(64);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(16);
    let trainer = {
        let (id, up, out) = (worker_id.clone(), up_tx.clone(), opts.metrics_out.clone());
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || trainer_thread(job, device, listener, id, cmd_rx, up, out, metrics))
            .map_err(|e| Error::Config(format!("cannot start the trainer thread: {e}")))?
    };

    let hello = v1::WorkerMessage {
        worker_id: worker_id.clone(),
        kind: Some(v1::worker_message::Kind::Hello(v1::Hello {})),
    };
    up_tx
        .send(hello)
        .await
        .map_err(|_| Error::Config("the trainer ended early".into()))?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(up_rx))
        .await
        .map_err(|e| rpc("session", e))?
        .into_inner();
    let beat = {
        let (up, id) = (up_tx.clone(), worker_id.clone());
        let every = Duration::from_millis(reg.heartbeat_ms.max(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let msg = v1::WorkerMessage {
                    worker_id: id.clone(),
                    kind: Some(v1::worker_message::Kind::Heartbeat(v1::Heartbeat {})),
                };
                if up.send(msg).await.is_err() {
                    break;
                }
            }
        })
    };
    drop(up_tx);
    let outcome = loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Err(Error::Config("the coordinator closed the session".into())),
            Err(e) => break Err(rpc("session", e)),
        };
        use v1::coordinator_message::Kind;
        let cmd = match msg.kind {
            Some(Kind::World(w)) => Command::World(w),
            Some(Kind::Work(w)) => Command::Work(w),
            Some(Kind::Stop(s)) => match s.reason() {
                v1::StopReason::GenerationEnded => {
                    warn!(generation = s.generation, detail = %s.detail, "generation ended");
                    Command::Leave
                }
                v1::StopReason::JobFinished => {
                    info!("the job finished");
                    let _ = cmd_tx.send(Command::Exit).await;
                    break Ok(());
                }
                _ => {
                    let _ = cmd_tx.send(Command::Exit).await;
                    break Err(Error::Config(format!("the job failed: {}", s.detail)));
                }
            },
            None => continue,
        };
        if cmd_tx.send(cmd).await.is_err() {
            break Err(Error::Config("the trainer thread ended".into()));
        }
    };
    beat.abort();
    drop(cmd_tx);
    let trained = tokio::task::spawn_blocking(move || trainer.join())
        .await
        .map_err(|e| Error::Config(format!("joining the trainer: {e}")))?
        .map_err(|_| Error::Config("the trainer thread panicked".into()))?;
    outcome.and(trained)
}

fn fresh_nccl_id() -> Result<Vec<u8>> {
    Ok(nccl::unique_id()
        .map_err(|e| Error::Collective(e.to_string()))?
        .to_vec())
}

/// Joins the world `w` with the backend of `device`.
fn connect(
    w: &v1::World,
    device: tch::Device,
    listener: &TcpListener,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    let collective = |e: CollectiveError| Error::Collective(e.to_string());
    if let tch::Device::Cuda(index) = device {
        let id: [u8; nccl::UNIQUE_ID_BYTES] =
            w.nccl_unique_id.as_slice().try_into().map_err(|_| {
                Error::Collective(format!(
                    "the world carries a {}-byte NCCL id",
                    w.nccl_unique_id.len()
                ))
            })?;
        let comm = Nccl::new(w.rank as usize, w.world_size as usize, &id, index, timeout)
            .map_err(collective)?;
        return Ok(Box::new(comm));
    }
    let peers = w
        .peers
        .iter()
        .map(|p| {
            p.parse::<SocketAddr>()
                .map_err(|e| Error::Collective(format!("peer address {p:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let l = listener.try_clone().at("collective listener")?;
    let ring = TcpRing::connect(
        w.rank as usize,
        w.world_size as usize,
        l,
        &peers,
        TcpConfig::new(w.generation, timeout),
    )
    .map_err(collective)?;
    Ok(Box::new(ring))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}

/// The thread that owns the tensors.
#[allow(clippy::too_many_arguments)] // everything it owns, moved in once
fn trainer_thread(
    job: v1::JobSpec,
    device: tch::Device,
    listener: TcpListener,
    worker_id: String,
    mut commands: mpsc::Receiver<Command>,
    up: mpsc::Sender<v1::WorkerMessage>,
    metrics_out: Option<PathBuf>,
    prom: Arc<Metrics>,
) -> Result<()> {
    let _span = tracing::info_span!("trainer", job = %job.name, worker = %worker_id).entered();
    let send = |kind: v1::worker_message::Kind| {
        let _ = up.blocking_send(v1::WorkerMessage {
            worker_id: worker_id.clone(),
            kind: Some(kind),
        });
    };
    let mut trainer = match Trainer::new(&job, device) {
        Ok(t) => t,
        Err(e) => {
            send(v1::worker_message::Kind::Failed(v1::Failed {
                generation: 0,
                reason: e.to_string(),
            }));
            return Err(e);
        }
    };
    let mut metrics = match &metrics_out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).at(p)?)),
        None => None,
    };
    let sizes: Vec<v1::SourceSize> = trainer
        .sources()
        .names
        .iter()
        .zip(&trainer.sources().sizes)
        .map(|(name, &num_samples)| v1::SourceSize {
            name: name.clone(),
            num_samples,
        })
        .collect();
    let timeout = Duration::from_millis(job.collective_timeout_ms.max(100));
    let mut ring: Option<(u64, Box<dyn Collective>)> = None;
    let mut steps_taken = 0u64;
    let mut synced = false;
    while let Some(cmd) = commands.blocking_recv() {
        match cmd {
            Command::World(w) => {
                ring = None;
                let joined = (|| -> Result<Box<dyn Collective>> {
                    let mut r = connect(&w, device, &listener, timeout)?;
                    if !synced {
                        trainer.broadcast_parameters(r.as_mut())?;
                    }
                    Ok(r)
                })();
                match joined {
                    Ok(r) => {
                        synced = true;
                        info!(
                            generation = w.generation,
                            rank = w.rank,
                            world_size = w.world_size,
                            "joined the world"
                        );
                        ring = Some((w.generation, r));
                        prom.joined(w.generation, w.rank);
                        let next_nccl_unique_id = match device {
                            tch::Device::Cuda(_) => fresh_nccl_id()?,
                            _ => Vec::new(),
                        };
                        send(v1::worker_message::Kind::Ready(v1::Ready {
                            generation: w.generation,
                            sources: sizes.clone(),
                            step: steps_taken,
                            next_nccl_unique_id,
                        }));
                    }
                    Err(e) => {
                        warn!(generation = w.generation, error = %e, "cannot join the world");
                        send(v1::worker_message::Kind::Failed(v1::Failed {
                            generation: w.generation,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Work(work) => {
                let Some((generation, r)) = ring.as_mut().filter(|(g, _)| *g == work.generation)
                else {
                    continue; // work of a generation we have left
                };
                let generation = *generation;
                if work.step != steps_taken {
                    let reason = format!(
                        "asked for step {} but this worker has taken {steps_taken} steps",
                        work.step
                    );
                    send(v1::worker_message::Kind::Failed(v1::Failed {
                        generation,
                        reason,
                    }));
                    continue;
                }
                let samples: Vec<(usize, u64)> = work
                    .samples
                    .iter()
                    .map(|s| (s.source as usize, s.index))
                    .collect();
                let rank = r.rank();
                match trainer.step(&samples, work.global_batch as usize, work.lr, r.as_mut()) {
                    Ok(res) => {
                        steps_taken += 1;
                        prom.step_done(
                            steps_taken,
                            res.loss_sum / res.samples.max(1) as f64,
                            res.samples as u64 * u64::from(job.seq_len),
                            &res.timing,
                        );
                        if let Some(m) = &mut metrics {
                            let line = StepLine {
                                generation,
                                rank,
                                step: work.step,
                                loss: res.loss_sum / res.samples.max(1) as f64,
                                samples: &samples,
                            };
                            writeln!(m, "{}", serde_json::to_string(&line).expect("serializable"))
                                .at("metrics file")?;
                            m.flush().at("metrics file")?;
                        }
                        let t = res.timing;
                        send(v1::worker_message::Kind::StepDone(v1::StepDone {
                            generation,
                            step: work.step,
                            loss_sum: res.loss_sum,
                            samples: res.samples as u32,
                            grad_norm: res.grad_norm,
                            timing: Some(v1::StepTiming {
                                data_seconds: t.data,
                                forward_backward_seconds: t.forward_backward,
                                allreduce_seconds: t.allreduce,
                                optimizer_seconds: t.optimizer,
                            }),
                        }));
                    }
                    Err(e) => {
                        warn!(generation, step = work.step, error = %e, "step failed; leaving the collective");
                        ring = None;
                        prom.left();
                        send(v1::worker_message::Kind::Failed(v1::Failed {
                            generation,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Leave => {
                ring = None;
                prom.left();
            }
            Command::Exit => break,
        }
    }
    Ok(())
}
