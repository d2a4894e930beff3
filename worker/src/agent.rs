//! The coordinator-driven worker (`stagecoach-worker join`).
//!
//! Two halves: an async side (a small tokio runtime) that registers, holds the session stream,
//! sends heartbeats and relays messages; and one named OS thread, `trainer`, that owns the model,
//! the optimizer, the data and the collective. They talk over bounded channels: commands down
//! (`World`, `Work`, `Evaluate`, leave, exit), worker messages up. No libtorch or collective call
//! runs on a tokio thread.
//!
//! Each `Work` carries its curriculum stage (sequence length, RoPE θ, micro-batch), applied
//! before the step; an `Evaluate` computes held-out losses between two steps without touching
//! the model or the optimizer.

use std::collections::BTreeMap;
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
use crate::train::{Shape, Trainer};

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
    Evaluate(v1::Evaluate),
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
    stage: u32,
    seq_len: u32,
    /// The RoPE θ the step trained with (the model's own when the stage gives none).
    rope_theta: f64,
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
            Some(Kind::Evaluate(e)) => Command::Evaluate(e),
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
    let trainer = match Trainer::new(&job, device) {
        Ok(t) => t,
        Err(e) => {
            send(v1::worker_message::Kind::Failed(v1::Failed {
                generation: 0,
                reason: e.to_string(),
            }));
            return Err(e);
        }
    };
    let metrics = match &metrics_out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).at(p)?)),
        None => None,
    };
    let mut state = TrainerState {
        sizes: trainer.sources().sizes(),
        trainer,
        device,
        timeout: Duration::from_millis(job.collective_timeout_ms.max(100)),
        ring: None,
        steps_taken: 0,
        synced: false,
        stage: None,
        metrics,
        prom,
    };
    while let Some(cmd) = commands.blocking_recv() {
        let reply = match cmd {
            Command::World(w) => Some(state.join_world(&w, &listener)?),
            Command::Work(work) => state.work(&work)?,
            Command::Evaluate(e) => state.evaluate(&e),
            Command::Leave => {
                state.leave();
                None
            }
            Command::Exit => break,
        };
        if let Some(kind) = reply {
            send(kind);
        }
    }
    Ok(())
}

/// What the trainer thread keeps between commands.
struct TrainerState {
    trainer: Trainer,
    sizes: Vec<v1::SourceSize>,
    device: tch::Device,
    timeout: Duration,
    /// The collective of the generation this worker is in, if any.
    ring: Option<(u64, Box<dyn Collective>)>,
    steps_taken: u64,
    /// Whether the parameters have been made identical to the other ranks' (once per process:
    /// later worlds are formed only from workers at the same committed step).
    synced: bool,
    /// The stage of the last step trained.
    stage: Option<v1::StepStage>,
    metrics: Option<std::io::BufWriter<std::fs::File>>,
    prom: Arc<Metrics>,
}

type Reply = v1::worker_message::Kind;

impl TrainerState {
    fn join_world(&mut self, w: &v1::World, listener: &TcpListener) -> Result<Reply> {
        self.ring = None;
        let joined = (|| -> Result<Box<dyn Collective>> {
            let mut r = connect(w, self.device, listener, self.timeout)?;
            if !self.synced {
                self.trainer.broadcast_parameters(r.as_mut())?;
            }
            Ok(r)
        })();
        match joined {
            Ok(r) => {
                self.synced = true;
                info!(
                    generation = w.generation,
                    rank = w.rank,
                    world_size = w.world_size,
                    "joined the world"
                );
                self.ring = Some((w.generation, r));
                self.prom.joined(w.generation, w.rank);
                let next_nccl_unique_id = match self.device {
                    tch::Device::Cuda(_) => fresh_nccl_id()?,
                    _ => Vec::new(),
                };
                Ok(Reply::Ready(v1::Ready {
                    generation: w.generation,
                    sources: self.sizes.clone(),
                    step: self.steps_taken,
                    next_nccl_unique_id,
                }))
            }
            Err(e) => {
                warn!(generation = w.generation, error = %e, "cannot join the world");
                Ok(Reply::Failed(v1::Failed {
                    generation: w.generation,
                    reason: e.to_string(),
                }))
            }
        }
    }

    /// The generation this worker is in, if it is `generation`; warns otherwise.
    fn in_generation(&self, generation: u64, what: &str) -> bool {
        match &self.ring {
            Some((g, _)) if *g == generation => true,
            current => {
                warn!(
                    generation,
                    current = current.as_ref().map(|(g, _)| *g),
                    "ignored {what} of a generation this worker is not in"
                );
                false
            }
        }
    }

    fn leave(&mut self) {
        self.ring = None;
        self.prom.left();
    }

    /// Leaves the collective after a failed step or evaluation, and says why.
    fn fail(&mut self, generation: u64, e: &Error) -> Reply {
        self.leave();
        Reply::Failed(v1::Failed {
            generation,
            reason: e.to_string(),
        })
    }

    fn work(&mut self, work: &v1::Work) -> Result<Option<Reply>> {
        if !self.in_generation(work.generation, "work") {
            return Ok(None);
        }
        let generation = work.generation;
        if work.step != self.steps_taken {
            let reason = format!(
                "asked for step {} but this worker has taken {} steps",
                work.step, self.steps_taken
            );
            return Ok(Some(Reply::Failed(v1::Failed { generation, reason })));
        }
        let samples: Vec<(usize, u64)> = work
            .samples
            .iter()
            .map(|s| (s.source as usize, s.index))
            .collect();
        let res = match self.train(work, &samples) {
            Ok(res) => res,
            Err(e) => {
                warn!(generation, step = work.step, error = %e, "step failed; leaving the collective");
                return Ok(Some(self.fail(generation, &e)));
            }
        };
        self.steps_taken += 1;
        let stage = self.stage.unwrap_or_default();
        let loss = res.loss_sum / res.samples.max(1) as f64;
        self.prom.step_done(
            self.steps_taken,
            loss,
            res.samples as u64 * u64::from(stage.seq_len),
            &res.timing,
        );
        if let Some(m) = &mut self.metrics {
            let rank = self.ring.as_ref().map_or(0, |(_, r)| r.rank());
            let line = StepLine {
                generation,
                rank,
                step: work.step,
                stage: stage.index,
                seq_len: stage.seq_len,
                rope_theta: self.trainer.rope_theta(),
                loss,
                samples: &samples,
            };
            writeln!(m, "{}", serde_json::to_string(&line).expect("serializable"))
                .at("metrics file")?;
            m.flush().at("metrics file")?;
        }
        let t = res.timing;
        Ok(Some(Reply::StepDone(v1::StepDone {
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
        })))
    }

    /// Applies the step's stage, then trains it.
    fn train(
        &mut self,
        work: &v1::Work,
        samples: &[(usize, u64)],
    ) -> Result<crate::train::StepResult> {
        let stage = work.stage.as_ref().ok_or_else(|| {
            Error::Config(format!("the work of step {} carries no stage", work.step))
        })?;
        let shape = Shape::of(stage)?;
        self.trainer.set_rope_theta(stage.rope_theta)?;
        if self.stage.as_ref().map(|s| s.index) != Some(stage.index) {
            info!(
                step = work.step,
                "stage {}: seq_len {}, rope θ {}, micro-batch {}",
                stage.index,
                stage.seq_len,
                self.trainer.rope_theta(),
                stage.micro_batch_size
            );
            self.prom.stage(stage.index, stage.seq_len);
        }
        self.stage = Some(*stage);
        let Some((_, ring)) = self.ring.as_mut() else {
            return Err(Error::Collective("not in a world".into()));
        };
        self.trainer.step(
            samples,
            shape,
            work.global_batch as usize,
            work.lr,
            ring.as_mut(),
        )
    }

    fn evaluate(&mut self, e: &v1::Evaluate) -> Option<Reply> {
        if !self.in_generation(e.generation, "an evaluation") {
            return None;
        }
        let samples: Vec<(usize, u64)> = e
            .samples
            .iter()
            .map(|s| (s.source as usize, s.index))
            .collect();
        let losses = Shape::new(e.seq_len, e.micro_batch_size)
            .and_then(|shape| self.trainer.evaluate(&samples, shape, e.rope_theta));
        match losses {
            Ok(losses) => {
                info!(
                    id = e.id,
                    samples = samples.len(),
                    seq_len = e.seq_len,
                    "evaluated held-out samples"
                );
                Some(Reply::EvalDone(v1::EvalDone {
                    generation: e.generation,
                    id: e.id,
                    losses: per_source(&samples, &losses),
                }))
            }
            Err(err) => {
                warn!(generation = e.generation, id = e.id, error = %err, "evaluation failed; leaving the collective");
                Some(self.fail(e.generation, &err))
            }
        }
    }
}

/// Sums per-sample losses by source, in source order (sources without a sample are left out).
fn per_source(samples: &[(usize, u64)], losses: &[f64]) -> Vec<v1::EvalLoss> {
    let mut by_source: BTreeMap<usize, (f64, u32)> = BTreeMap::new();
    for (&(source, _), &loss) in samples.iter().zip(losses) {
        let e = by_source.entry(source).or_default();
        e.0 += loss;
        e.1 += 1;
    }
    by_source
        .into_iter()
        .map(|(source, (loss_sum, samples))| v1::EvalLoss {
            source: source as u32,
            loss_sum,
            samples,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fixtures;

    fn refs(samples: &[(usize, u64)]) -> Vec<v1::SampleRef> {
        samples
            .iter()
            .map(|&(source, index)| v1::SampleRef {
                source: source as u32,
                index,
            })
            .collect()
    }

    fn stage(index: u32, seq_len: u32, rope_theta: f64, micro_batch_size: u32) -> v1::StepStage {
        v1::StepStage {
            index,
            seq_len,
            rope_theta,
            micro_batch_size,
        }
    }

    /// Drives the trainer thread as the session does: a world of one, steps in two stages with
    /// an evaluation between them, messages of another generation, and bad work. A trainer built
    /// from the same job, run alongside, gives the numbers every reply must carry exactly.
    #[test]
    fn trainer_thread_applies_stages_and_evaluates_between_steps() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut reference = Trainer::new(&spec, tch::Device::Cpu).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (up_tx, mut up_rx) = mpsc::channel(64);
        let steps_file = dir.path().join("steps.jsonl");
        let thread = {
            let (spec, out) = (spec.clone(), steps_file.clone());
            let prom = Arc::new(Metrics::new());
            std::thread::spawn(move || {
                trainer_thread(
                    spec,
                    tch::Device::Cpu,
                    listener,
                    "w1".into(),
                    cmd_rx,
                    up_tx,
                    Some(out),
                    prom,
                )
            })
        };
        let send = |cmd: Command| cmd_tx.blocking_send(cmd).unwrap();
        let mut reply = || up_rx.blocking_recv().unwrap().kind.unwrap();
        let work = |generation, step, samples: &[(usize, u64)], stage| {
            Command::Work(v1::Work {
                generation,
                step,
                samples: refs(samples),
                lr: 1e-3,
                global_batch: samples.len() as u32,
                stage,
            })
        };

        send(Command::World(v1::World {
            generation: 1,
            rank: 0,
            world_size: 1,
            peers: vec![address],
            ..Default::default()
        }));
        let Reply::Ready(ready) = reply() else {
            panic!("expected Ready")
        };
        assert_eq!((ready.generation, ready.step), (1, 0));
        assert_eq!(ready.sources, reference.sources().sizes());

        // Stage 0: seq_len 16, the model's own θ, micro-batches of 3.
        let samples = [(0, 0), (0, 16), (1, 0), (1, 16)];
        send(work(1, 0, &samples, Some(stage(0, 16, 0.0, 3))));
        let expected = reference
            .step(
                &samples,
                Shape::new(16, 3).unwrap(),
                4,
                1e-3,
                &mut crate::collective::Solo,
            )
            .unwrap();
        let Reply::StepDone(done) = reply() else {
            panic!("expected StepDone")
        };
        assert_eq!(
            (done.generation, done.step, done.samples, done.loss_sum),
            (1, 0, 4, expected.loss_sum)
        );

        // Another generation's evaluation and work are ignored (no reply), then an evaluation
        // at seq_len 32 and θ 40,000 of held-out windows of source "a" (one spans its two files).
        send(Command::Evaluate(v1::Evaluate {
            generation: 2,
            id: 1,
            seq_len: 32,
            micro_batch_size: 1,
            samples: refs(&[(0, 0)]),
            ..Default::default()
        }));
        send(work(2, 1, &samples, Some(stage(0, 16, 0.0, 3))));
        let held_out = [(0, 0), (0, 32), (0, 64), (0, 127)];
        send(Command::Evaluate(v1::Evaluate {
            generation: 1,
            id: 7,
            seq_len: 32,
            rope_theta: 40_000.0,
            micro_batch_size: 3,
            samples: refs(&held_out),
        }));
        let losses = reference
            .evaluate(&held_out, Shape::new(32, 3).unwrap(), 40_000.0)
            .unwrap();
        let Reply::EvalDone(eval) = reply() else {
            panic!("expected EvalDone")
        };
        assert_eq!((eval.generation, eval.id), (1, 7));
        assert_eq!(eval.losses, per_source(&held_out, &losses));
        assert_eq!(eval.losses[0].samples, 4);

        // Stage 1: seq_len 32, θ 20,000, micro-batches of 1. The same loss as the reference
        // shows the evaluation left the model, its θ and the optimizer as they were.
        let samples = [(0, 32), (1, 17)];
        send(work(1, 1, &samples, Some(stage(1, 32, 20_000.0, 1))));
        reference.set_rope_theta(20_000.0).unwrap();
        let expected = reference
            .step(
                &samples,
                Shape::new(32, 1).unwrap(),
                2,
                1e-3,
                &mut crate::collective::Solo,
            )
            .unwrap();
        let Reply::StepDone(done) = reply() else {
            panic!("expected StepDone")
        };
        assert_eq!((done.step, done.loss_sum), (1, expected.loss_sum));

        // A step out of order, then work without a stage: refused, and the second leaves the
        // world, after which the generation's messages are ignored.
        send(work(1, 5, &samples, Some(stage(1, 32, 20_000.0, 1))));
        let Reply::Failed(failed) = reply() else {
            panic!("expected Failed")
        };
        assert!(failed
            .reason
            .contains("asked for step 5 but this worker has taken 2 steps"));
        send(work(1, 2, &samples, None));
        let Reply::Failed(failed) = reply() else {
            panic!("expected Failed")
        };
        assert!(
            failed.reason.contains("carries no stage"),
            "{}",
            failed.reason
        );
        send(work(1, 2, &samples, Some(stage(1, 32, 20_000.0, 1))));
        send(Command::Exit);
        thread.join().unwrap().unwrap();
        assert!(up_rx.blocking_recv().is_none(), "no reply after leaving");

        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&steps_file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (&lines[0]["stage"], &lines[0]["seq_len"]),
            (&0.into(), &16.into())
        );
        assert_eq!(
            (&lines[1]["stage"], &lines[1]["seq_len"]),
            (&1.into(), &32.into())
        );
    }

    #[test]
    fn eval_losses_are_summed_per_source_in_source_order() {
        let samples = [(2, 0), (0, 64), (2, 128), (0, 0), (2, 256)];
        let losses = [1.0, 2.0, 3.0, 4.0, 5.0];
        let got = per_source(&samples, &losses);
        assert_eq!(
            got,
            [
                v1::EvalLoss {
                    source: 0,
                    loss_sum: 6.0,
                    samples: 2
                },
                v1::EvalLoss {
                    source: 2,
                    loss_sum: 9.0,
                    samples: 3
                },
            ]
        );
        assert!(per_source(&[], &[]).is_empty());
    }
}
