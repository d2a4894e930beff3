//! The trainer thread of `join`: it owns the model, the optimizer, the data, the collective
//! and the checkpoint writer, and handles the session's commands one at a time (joining a
//! world, restoring a checkpoint, training a step under its stage and guard, evaluating,
//! checkpointing), answering each with the session it came on.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stagecoach_proto::v1;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use stagecoach_core::plan::samples_digest;

use super::{fresh_nccl_id, Command, Envelope, Reply, Up};
use crate::checkpoint::{self, Saved};
use crate::collective::nccl::{self, Nccl};
use crate::collective::tcp::{TcpConfig, TcpRing};
use crate::collective::{Collective, CollectiveError};
use crate::error::{Error, IoContext, Result};
use crate::fault::Faults;
use crate::metrics::Metrics;
use crate::steplog::{self, StepRecord};
use crate::train::{Guard, Shape, Trainer};

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
    let next = w.next_peer.parse::<SocketAddr>().map_err(|e| {
        Error::Collective(format!(
            "the address of the next rank, {:?}: {e}",
            w.next_peer
        ))
    })?;
    let l = listener.try_clone().at("collective listener")?;
    let ring = TcpRing::connect(
        w.rank as usize,
        w.world_size as usize,
        l,
        next,
        TcpConfig::new(w.generation, timeout),
    )
    .map_err(collective)?;
    Ok(Box::new(ring))
}

/// Everything the trainer thread owns, moved in once.
pub(super) struct Setup {
    pub(super) job: v1::JobSpec,
    pub(super) device: tch::Device,
    pub(super) listener: TcpListener,
    pub(super) worker_id: String,
    pub(super) commands: mpsc::Receiver<Envelope>,
    pub(super) up: mpsc::Sender<Up>,
    pub(super) metrics_out: Option<PathBuf>,
    pub(super) prom: Arc<Metrics>,
    pub(super) faults: Faults,
    pub(super) fast_path: crate::train::FastPath,
    /// Cleared to stop heartbeats (fault injection).
    pub(super) heartbeats: Arc<AtomicBool>,
}

/// The thread that owns the tensors.
pub(super) fn trainer_thread(setup: Setup) -> Result<()> {
    let Setup {
        job,
        device,
        listener,
        worker_id,
        mut commands,
        up,
        metrics_out,
        prom,
        faults,
        fast_path,
        heartbeats,
    } = setup;
    let _span = tracing::info_span!("trainer", job = %job.name, worker = %worker_id).entered();
    let send = |epoch: u64, kind: Reply| {
        let _ = up.blocking_send(Up { epoch, kind });
    };
    let built = Trainer::new(&job, device).and_then(|mut t| {
        t.set_fast_path(fast_path)?;
        t.set_poison(faults.poison.clone())?;
        let writer = checkpoint::Writer::new()?;
        Ok((t, writer))
    });
    let (trainer, writer) = match built {
        Ok(t) => t,
        Err(e) => {
            send(
                0,
                Reply::Failed(v1::Failed {
                    generation: 0,
                    reason: e.to_string(),
                    kind: e.failure_kind().into(),
                    ..Default::default()
                }),
            );
            return Err(e);
        }
    };
    if !faults.poison.is_empty() {
        let ranges: Vec<String> = faults.poison.iter().map(ToString::to_string).collect();
        warn!(
            "fault injection: training samples in {} are replaced by noise",
            ranges.join(", ")
        );
    }
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
        last_step: None,
        stage: None,
        metrics,
        prom,
        writer,
        up: up.clone(),
        epoch: 0,
        faults,
        heartbeats,
    };
    while let Some((epoch, cmd)) = commands.blocking_recv() {
        state.epoch = epoch;
        let reply = match cmd {
            Command::World(w) => Some(state.join_world(&w, &listener)?),
            Command::Work(work) => state.work(&work)?,
            Command::Evaluate(e) => state.evaluate(&e),
            Command::Save(s) => state.save(&s),
            Command::Sync(s) => Some(state.sync(&s)?),
            Command::Leave => {
                state.leave();
                None
            }
            Command::Exit => break,
        };
        if let Some(kind) = reply {
            send(epoch, kind);
        }
    }
    // Dropping the state waits for the checkpoint writes already handed over.
    Ok(())
}

/// The last step trained and where: its report, the digest of its samples, rank and world size.
#[derive(Clone)]
struct LastStep {
    done: v1::StepDone,
    samples_digest: u64,
    rank: u32,
    world_size: u32,
}

/// What the trainer thread keeps between commands.
struct TrainerState {
    trainer: Trainer,
    sizes: Vec<v1::SourceSize>,
    device: tch::Device,
    timeout: Duration,
    /// The collective of the generation this worker is in, if any.
    ring: Option<(u64, Box<dyn Collective>)>,
    /// Committed steps the model has taken (steps whose update the guard dropped included).
    steps_taken: u64,
    /// The last step trained since the model was last set (started, restored, synced), as it
    /// was reported: a coordinator that lost the report commits the step from it.
    last_step: Option<LastStep>,
    /// The stage of the last step trained.
    stage: Option<v1::StepStage>,
    metrics: Option<std::io::BufWriter<std::fs::File>>,
    prom: Arc<Metrics>,
    writer: checkpoint::Writer,
    /// Where a background checkpoint write reports.
    up: mpsc::Sender<Up>,
    /// The session of the command being handled.
    epoch: u64,
    faults: Faults,
    heartbeats: Arc<AtomicBool>,
}

impl TrainerState {
    fn join_world(&mut self, w: &v1::World, listener: &TcpListener) -> Result<Reply> {
        self.ring = None;
        let joined = (|| -> Result<Box<dyn Collective>> {
            let mut r = connect(w, self.device, listener, self.timeout)?;
            // Every rank decides alike, from the world alone: a restored checkpoint is the
            // same on every rank; at step 0 rank 0's initialisation wins; otherwise the
            // coordinator formed the world from workers at the same committed step.
            if let Some(restore) = &w.restore {
                self.restore(restore)?;
            } else if w.start_step == 0 {
                self.trainer.broadcast_parameters(r.as_mut())?;
            }
            Ok(r)
        })();
        let restoring = w.restore.as_ref().map(|r| r.path.clone());
        match joined {
            Ok(r) => {
                info!(
                    generation = w.generation,
                    rank = w.rank,
                    world_size = w.world_size,
                    step = self.steps_taken,
                    "joined the world"
                );
                self.ring = Some((w.generation, r));
                self.prom.joined(w.generation, w.rank);
                self.ready(w.generation)
            }
            Err(e) => {
                warn!(generation = w.generation, error = %e, "cannot join the world");
                // A checkpoint that cannot be loaded is named, so the coordinator falls back.
                let checkpoint = match (&e, restoring) {
                    (Error::Checkpoint { .. } | Error::Io { .. }, Some(path)) => path,
                    _ => String::new(),
                };
                let kind = if checkpoint.is_empty() {
                    e.failure_kind()
                } else {
                    v1::FailureKind::Checkpoint
                };
                Ok(Reply::Failed(v1::Failed {
                    generation: w.generation,
                    reason: e.to_string(),
                    kind: kind.into(),
                    step: self.steps_taken,
                    checkpoint,
                }))
            }
        }
    }

    /// `Ready` for `generation`: the data as this worker sees it, its steps, the digest of its
    /// state and its last step.
    fn ready(&mut self, generation: u64) -> Result<Reply> {
        let next_nccl_unique_id = match self.device {
            tch::Device::Cuda(_) => fresh_nccl_id()?,
            _ => Vec::new(),
        };
        let last = self.last_step.clone();
        Ok(Reply::Ready(v1::Ready {
            generation,
            sources: self.sizes.clone(),
            step: self.steps_taken,
            next_nccl_unique_id,
            state_digest: self.trainer.state_digest()?,
            last_samples_digest: last.as_ref().map_or(0, |l| l.samples_digest),
            last_rank: last.as_ref().map_or(0, |l| l.rank),
            last_world_size: last.as_ref().map_or(0, |l| l.world_size),
            last_step: last.map(|l| l.done),
        }))
    }

    /// Takes the state of the rank the coordinator names, with every rank of the world, and
    /// answers `Ready` again.
    fn sync(&mut self, s: &v1::SyncState) -> Result<Reply> {
        if !self.in_generation(s.generation, "a state sync") {
            return Ok(Reply::Failed(v1::Failed {
                generation: s.generation,
                reason: format!(
                    "asked to sync in generation {}, which this worker is not in",
                    s.generation
                ),
                kind: v1::FailureKind::State.into(),
                step: self.steps_taken,
                ..Default::default()
            }));
        }
        let t0 = Instant::now();
        let ring = &mut self.ring.as_mut().expect("checked by in_generation").1;
        let source = s.source_rank as usize;
        let taken = self.trainer.take_state(ring.as_mut(), source);
        if let Err(e) = taken {
            warn!(generation = s.generation, error = %e, "cannot take the state of rank {source}");
            return Ok(self.fail(s.generation, &e));
        }
        if self.steps_taken != s.step {
            info!(
                from = self.steps_taken,
                to = s.step,
                source_rank = source,
                seconds = t0.elapsed().as_secs_f64(),
                "took the committed state from another rank"
            );
            self.last_step = None;
            self.stage = None;
        }
        self.steps_taken = s.step;
        self.ready(s.generation)
    }

    /// Loads the checkpoint `r` names (the empty path at step 0: the job's initial state); on
    /// refusal the model is as it was.
    fn restore(&mut self, r: &v1::CheckpointRef) -> Result<()> {
        let t0 = Instant::now();
        self.last_step = None;
        if r.path.is_empty() {
            if r.step != 0 {
                return Err(Error::Config(format!(
                    "asked to restore no checkpoint at step {}; only step 0 (the initial state) has none",
                    r.step
                )));
            }
            self.trainer.reinitialize()?;
            self.steps_taken = 0;
            self.stage = None;
            self.prom.restored(0);
            info!("back to the job's initial state");
            return Ok(());
        }
        let m = checkpoint::load(&mut self.trainer, Path::new(&r.path), r)?;
        self.steps_taken = m.step;
        self.stage = None;
        self.prom.restored(m.step);
        info!(
            path = %r.path,
            step = m.step,
            optimizer_steps = m.optimizer_steps,
            seconds = t0.elapsed().as_secs_f64(),
            "restored the checkpoint"
        );
        Ok(())
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
            kind: e.failure_kind().into(),
            step: self.steps_taken,
            ..Default::default()
        })
    }

    /// Fault injection before step `step` is trained.
    fn inject_faults(&self, step: u64) {
        if self.faults.kill_at_step == Some(step) {
            error!(
                step,
                "fault injection: aborting the process before this step (--kill-at-step)"
            );
            std::process::abort();
        }
        if let Some(n) = self.faults.stop_heartbeats_at_step {
            if step >= n && self.heartbeats.swap(false, Ordering::Relaxed) {
                warn!(
                    step,
                    "fault injection: heartbeats stopped (--stop-heartbeats-at-step); the process stays alive"
                );
            }
        }
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
            return Ok(Some(Reply::Failed(v1::Failed {
                generation,
                reason,
                kind: v1::FailureKind::State.into(),
                step: self.steps_taken,
                ..Default::default()
            })));
        }
        self.inject_faults(work.step);
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
            res.global_loss,
            res.skipped,
            res.samples as u64 * u64::from(stage.seq_len),
            &res.timing,
        );
        if let Some(m) = &mut self.metrics {
            let t = &res.timing;
            let seconds = t.data + t.forward_backward + t.allreduce + t.optimizer;
            let sources = self.sizes.len();
            let line = StepRecord {
                step: work.step,
                stage: stage.index,
                stage_name: self.trainer.stage_name(stage.index).map(str::to_owned),
                seq_len: stage.seq_len,
                rope_theta: self.trainer.rope_theta(),
                loss,
                global_loss: res.global_loss,
                lr: work.lr,
                grad_norm: res.grad_norm,
                skipped: res.skipped,
                generation,
                rank: self.ring.as_ref().map_or(0, |(_, r)| r.rank()),
                tokens: None,
                tokens_per_second: work.global_batch as f64 * f64::from(stage.seq_len)
                    / seconds.max(f64::MIN_POSITIVE),
                samples_per_source: steplog::per_source(&samples, sources)
                    .unwrap_or_else(|| vec![0; sources]),
                samples,
                timing: res.timing,
            };
            line.write_line(m).at("metrics file")?;
            m.flush().at("metrics file")?;
        }
        let t = res.timing;
        let done = v1::StepDone {
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
            skipped: res.skipped,
            global_loss: res.global_loss,
            state_digest: self.trainer.state_digest()?,
        };
        let (rank, world_size) = self
            .ring
            .as_ref()
            .map_or((0, 1), |(_, r)| (r.rank() as u32, r.world_size() as u32));
        self.last_step = Some(LastStep {
            done,
            samples_digest: samples_digest(work.samples.iter().map(|s| (s.source, s.index))),
            rank,
            world_size,
        });
        Ok(Some(Reply::StepDone(done)))
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
            Guard::of(work.guard.as_ref()),
            ring.as_mut(),
        )
    }

    /// Copies the state off and hands it to the checkpoint writer; `CheckpointSaved` follows
    /// when the write ends (now, if the request is refused or the copy fails).
    fn save(&mut self, s: &v1::SaveCheckpoint) -> Option<Reply> {
        let refuse = |error: String| {
            Some(Reply::CheckpointSaved(v1::CheckpointSaved {
                generation: s.generation,
                id: s.id,
                path: s.path.clone(),
                error,
                ..Default::default()
            }))
        };
        if !self.in_generation(s.generation, "a checkpoint request") {
            return refuse(format!(
                "this worker is not in generation {}; no checkpoint written",
                s.generation
            ));
        }
        if s.step != self.steps_taken {
            return refuse(format!(
                "asked to checkpoint the state after step {} but this worker has taken {} steps; no checkpoint written",
                s.step, self.steps_taken
            ));
        }
        if s.path.is_empty() {
            return refuse("the request names no path; no checkpoint written".into());
        }
        let request = checkpoint::Request {
            path: PathBuf::from(&s.path),
            id: s.id,
            delete: s.delete.iter().map(PathBuf::from).collect(),
        };
        let (up, epoch, prom) = (self.up.clone(), self.epoch, self.prom.clone());
        let (generation, id, path) = (s.generation, s.id, s.path.clone());
        let done = move |saved: Saved| {
            prom.checkpoint_saved(&saved);
            let kind = Reply::CheckpointSaved(v1::CheckpointSaved {
                generation,
                id,
                path,
                blocking_seconds: saved.blocking_seconds,
                write_seconds: saved.write_seconds,
                bytes: saved.bytes,
                error: saved.error.unwrap_or_default(),
            });
            let _ = up.blocking_send(Up { epoch, kind });
        };
        let meta = checkpoint::Meta::from(s);
        match self.writer.save(self.trainer.state(), &meta, request, done) {
            Ok(blocking) => {
                info!(
                    step = s.step,
                    path = %s.path,
                    blocking_seconds = blocking,
                    "checkpoint state copied off; writing it in the background"
                );
                None
            }
            Err(e) => {
                warn!(path = %s.path, error = %e, "cannot take a checkpoint");
                self.prom.checkpoint_saved(&Saved {
                    path: PathBuf::from(&s.path),
                    blocking_seconds: 0.0,
                    write_seconds: 0.0,
                    bytes: 0,
                    error: Some(e.to_string()),
                });
                refuse(e.to_string())
            }
        }
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
pub(super) mod tests {
    use super::*;
    use crate::train::fixtures;

    pub(in crate::agent) fn refs(samples: &[(usize, u64)]) -> Vec<v1::SampleRef> {
        samples
            .iter()
            .map(|&(source, index)| v1::SampleRef {
                source: source as u32,
                index,
            })
            .collect()
    }

    pub(in crate::agent) fn stage(
        index: u32,
        seq_len: u32,
        rope_theta: f64,
        micro_batch_size: u32,
    ) -> v1::StepStage {
        v1::StepStage {
            index,
            seq_len,
            rope_theta,
            micro_batch_size,
        }
    }

    /// A trainer thread driven as the session drives it (session 0), and its replies.
    struct Harness {
        commands: mpsc::Sender<Envelope>,
        replies: mpsc::Receiver<Up>,
        thread: std::thread::JoinHandle<Result<()>>,
        address: String,
        prom: Arc<Metrics>,
        heartbeats: Arc<AtomicBool>,
    }

    impl Harness {
        fn start(spec: &v1::JobSpec, metrics_out: Option<PathBuf>, faults: Faults) -> Harness {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let (cmd_tx, cmd_rx) = mpsc::channel(16);
            let (up_tx, up_rx) = mpsc::channel(64);
            let prom = Arc::new(Metrics::new());
            let heartbeats = Arc::new(AtomicBool::new(true));
            let setup = Setup {
                job: spec.clone(),
                device: tch::Device::Cpu,
                listener,
                worker_id: "w1".into(),
                commands: cmd_rx,
                up: up_tx,
                metrics_out,
                prom: prom.clone(),
                faults,
                fast_path: Default::default(),
                heartbeats: heartbeats.clone(),
            };
            Harness {
                commands: cmd_tx,
                replies: up_rx,
                thread: std::thread::spawn(move || trainer_thread(setup)),
                address,
                prom,
                heartbeats,
            }
        }

        fn send(&self, cmd: Command) {
            self.commands.blocking_send((0, cmd)).unwrap();
        }

        fn reply(&mut self) -> Reply {
            let up = self.replies.blocking_recv().expect("a reply");
            assert_eq!(up.epoch, 0);
            up.kind
        }

        fn world(&self, generation: u64, start_step: u64, restore: Option<v1::CheckpointRef>) {
            self.send(Command::World(v1::World {
                generation,
                rank: 0,
                world_size: 1,
                next_peer: self.address.clone(),
                start_step,
                restore,
                ..Default::default()
            }));
        }

        fn exit(mut self) {
            self.send(Command::Exit);
            self.thread.join().unwrap().unwrap();
            assert!(
                self.replies.blocking_recv().is_none(),
                "no reply after exit"
            );
        }
    }

    pub(in crate::agent) fn work(
        generation: u64,
        step: u64,
        samples: &[(usize, u64)],
        stage: Option<v1::StepStage>,
    ) -> Command {
        Command::Work(v1::Work {
            generation,
            step,
            samples: refs(samples),
            lr: 1e-3,
            global_batch: samples.len() as u32,
            stage,
            guard: None,
        })
    }

    /// Drives the trainer thread as the session does: a world of one, steps in two stages with
    /// an evaluation between them, messages of another generation, and bad work. A trainer built
    /// from the same job, run alongside, gives the numbers every reply must carry exactly.
    #[test]
    fn trainer_thread_applies_stages_and_evaluates_between_steps() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let mut reference = Trainer::new(&spec, tch::Device::Cpu).unwrap();
        let steps_file = dir.path().join("steps.jsonl");
        let mut h = Harness::start(&spec, Some(steps_file.clone()), Faults::default());
        h.world(1, 0, None);
        let Reply::Ready(ready) = h.reply() else {
            panic!("expected Ready")
        };
        assert_eq!((ready.generation, ready.step), (1, 0));
        assert_eq!(ready.sources, reference.sources().sizes());

        // Stage 0: seq_len 16, the model's own θ, micro-batches of 3.
        let samples = [(0, 0), (0, 16), (1, 0), (1, 16)];
        h.send(work(1, 0, &samples, Some(stage(0, 16, 0.0, 3))));
        let expected = reference
            .step(
                &samples,
                Shape::new(16, 3).unwrap(),
                4,
                1e-3,
                Guard::default(),
                &mut crate::collective::Solo,
            )
            .unwrap();
        let Reply::StepDone(done) = h.reply() else {
            panic!("expected StepDone")
        };
        assert_eq!(
            (done.generation, done.step, done.samples, done.loss_sum),
            (1, 0, 4, expected.loss_sum)
        );

        // Another generation's evaluation and work are ignored (no reply), then an evaluation
        // at seq_len 32 and θ 40,000 of held-out windows of source "a" (one spans its two files).
        h.send(Command::Evaluate(v1::Evaluate {
            generation: 2,
            id: 1,
            seq_len: 32,
            micro_batch_size: 1,
            samples: refs(&[(0, 0)]),
            ..Default::default()
        }));
        h.send(work(2, 1, &samples, Some(stage(0, 16, 0.0, 3))));
        let held_out = [(0, 0), (0, 32), (0, 64), (0, 127)];
        h.send(Command::Evaluate(v1::Evaluate {
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
        let Reply::EvalDone(eval) = h.reply() else {
            panic!("expected EvalDone")
        };
        assert_eq!((eval.generation, eval.id), (1, 7));
        assert_eq!(eval.losses, per_source(&held_out, &losses));
        assert_eq!(eval.losses[0].samples, 4);

        // Stage 1: seq_len 32, θ 20,000, micro-batches of 1. The same loss as the reference
        // shows the evaluation left the model, its θ and the optimizer as they were.
        let samples = [(0, 32), (1, 17)];
        h.send(work(1, 1, &samples, Some(stage(1, 32, 20_000.0, 1))));
        reference.set_rope_theta(20_000.0).unwrap();
        let expected = reference
            .step(
                &samples,
                Shape::new(32, 1).unwrap(),
                2,
                1e-3,
                Guard::default(),
                &mut crate::collective::Solo,
            )
            .unwrap();
        let Reply::StepDone(done) = h.reply() else {
            panic!("expected StepDone")
        };
        assert_eq!((done.step, done.loss_sum), (1, expected.loss_sum));

        // A step out of order, then work without a stage: refused, and the second leaves the
        // world, after which the generation's messages are ignored.
        h.send(work(1, 5, &samples, Some(stage(1, 32, 20_000.0, 1))));
        let Reply::Failed(failed) = h.reply() else {
            panic!("expected Failed")
        };
        assert!(failed
            .reason
            .contains("asked for step 5 but this worker has taken 2 steps"));
        h.send(work(1, 2, &samples, None));
        let Reply::Failed(failed) = h.reply() else {
            panic!("expected Failed")
        };
        assert!(
            failed.reason.contains("carries no stage"),
            "{}",
            failed.reason
        );
        h.send(work(1, 2, &samples, Some(stage(1, 32, 20_000.0, 1))));
        h.exit();

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
        assert_eq!(lines[1]["skipped"], false);
    }

    fn save_request(generation: u64, id: u64, step: u64, path: &Path, delete: &[&Path]) -> Command {
        Command::Save(v1::SaveCheckpoint {
            generation,
            id,
            step,
            path: path.display().to_string(),
            job: "test".into(),
            stage: 0,
            cursors: vec![32, 32],
            stage_taken: vec![2, 2],
            parent: String::new(),
            delete: delete.iter().map(|p| p.display().to_string()).collect(),
        })
    }

    pub(in crate::agent) fn step_done(reply: Reply) -> v1::StepDone {
        match reply {
            Reply::StepDone(d) => d,
            other => panic!("expected StepDone, got {other:?}"),
        }
    }

    /// A checkpoint taken between two steps answers CheckpointSaved once written (requests for
    /// another step are refused with the reason); a fresh worker told to restore it refuses a
    /// ledger that disagrees, then loads it before Ready and trains the next step exactly as the
    /// worker that never stopped.
    #[test]
    fn trainer_thread_checkpoints_in_the_background_and_restores_before_ready() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let s0 = Some(stage(0, 16, 0.0, 2));
        let batches: [&[(usize, u64)]; 3] =
            [&[(0, 0), (1, 0)], &[(0, 16), (1, 16)], &[(0, 32), (0, 48)]];
        let path = dir.path().join("checkpoints").join("step-2");

        let mut a = Harness::start(&spec, None, Faults::default());
        a.world(1, 0, None);
        assert!(matches!(a.reply(), Reply::Ready(_)));
        a.send(work(1, 0, batches[0], s0));
        step_done(a.reply());
        a.send(work(1, 1, batches[1], s0));
        step_done(a.reply());
        a.send(save_request(1, 1, 5, &path, &[]));
        let Reply::CheckpointSaved(refused) = a.reply() else {
            panic!("expected CheckpointSaved")
        };
        assert!(
            refused
                .error
                .contains("after step 5 but this worker has taken 2 steps"),
            "{}",
            refused.error
        );
        assert!(!path.exists());
        a.send(save_request(1, 2, 2, &path, &[]));
        let Reply::CheckpointSaved(saved) = a.reply() else {
            panic!("expected CheckpointSaved")
        };
        assert_eq!(
            (saved.generation, saved.id, saved.error.as_str()),
            (1, 2, "")
        );
        assert_eq!(saved.path, path.display().to_string());
        assert!(saved.bytes > 0 && saved.blocking_seconds > 0.0 && saved.write_seconds > 0.0);
        assert!(path.join(checkpoint::MANIFEST).is_file());
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&a.prom.registry().gather())
            .unwrap();
        assert!(
            text.lines()
                .any(|l| l == "stagecoach_worker_checkpoints_total{outcome=\"written\"} 1"),
            "{text}"
        );
        a.send(work(1, 2, batches[2], s0));
        let uninterrupted = step_done(a.reply());
        a.exit();

        let mut b = Harness::start(&spec, None, Faults::default());
        let good = v1::CheckpointRef {
            path: path.display().to_string(),
            step: 2,
            stage: 0,
            cursors: vec![32, 32],
        };
        b.world(
            2,
            2,
            Some(v1::CheckpointRef {
                cursors: vec![32, 48],
                ..good.clone()
            }),
        );
        let Reply::Failed(failed) = b.reply() else {
            panic!("expected Failed")
        };
        assert!(
            failed
                .reason
                .contains("cursors [32, 32] but the coordinator's ledger says [32, 48]"),
            "{}",
            failed.reason
        );
        b.world(3, 2, Some(good));
        let Reply::Ready(ready) = b.reply() else {
            panic!("expected Ready")
        };
        assert_eq!((ready.generation, ready.step), (3, 2));
        b.send(work(3, 2, batches[2], s0));
        let resumed = step_done(b.reply());
        assert_eq!(
            (resumed.loss_sum, resumed.grad_norm),
            (uninterrupted.loss_sum, uninterrupted.grad_norm)
        );
        b.exit();
    }

    /// `--stop-heartbeats-at-step` clears the heartbeat flag when that step is asked for, and
    /// `--poison` reaches the data: the poisoned worker's losses are those of a trainer with
    /// the same poison, and differ from a clean worker's exactly on the step that reads it.
    #[test]
    fn fault_injection_stops_heartbeats_and_poisons_samples() {
        let dir = tempfile::tempdir().unwrap();
        let spec = fixtures::job(dir.path());
        let poison: crate::fault::Poison = "0:16..17".parse().unwrap();
        let faults = Faults {
            poison: vec![poison.clone()],
            stop_heartbeats_at_step: Some(1),
            kill_at_step: None,
        };
        let s0 = Some(stage(0, 16, 0.0, 2));
        let steps: [&[(usize, u64)]; 2] = [&[(0, 0), (0, 32)], &[(0, 16), (0, 48)]];
        let mut reference = Trainer::new(&spec, tch::Device::Cpu).unwrap();
        reference.set_poison(vec![poison]).unwrap();
        let expected: Vec<f64> = steps
            .iter()
            .map(|samples| {
                reference
                    .step(
                        samples,
                        Shape::new(16, 2).unwrap(),
                        2,
                        1e-3,
                        Guard::default(),
                        &mut crate::collective::Solo,
                    )
                    .unwrap()
                    .loss_sum
            })
            .collect();
        let mut poisoned = Harness::start(&spec, None, faults);
        let mut clean = Harness::start(&spec, None, Faults::default());
        let mut losses = Vec::new();
        for h in [&mut poisoned, &mut clean] {
            h.world(1, 0, None);
            assert!(matches!(h.reply(), Reply::Ready(_)));
            h.send(work(1, 0, steps[0], s0));
            let first = step_done(h.reply()).loss_sum;
            assert!(
                h.heartbeats.load(Ordering::Relaxed),
                "heartbeats before step 1"
            );
            h.send(work(1, 1, steps[1], s0));
            losses.push(vec![first, step_done(h.reply()).loss_sum]);
        }
        assert!(!poisoned.heartbeats.load(Ordering::Relaxed));
        assert!(clean.heartbeats.load(Ordering::Relaxed));
        assert_eq!(losses[0], expected);
        assert_eq!(
            losses[0][0], losses[1][0],
            "step 0 reads no poisoned sample"
        );
        assert_ne!(losses[0][1], losses[1][1], "step 1 reads one");
        poisoned.exit();
        clean.exit();
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
