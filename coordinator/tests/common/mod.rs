//! What the driver tests share: job files, an in-memory ledger (that can play an unreachable
//! store), a harness that drives a [`Driver`] through its events on tokio's paused clock, and
//! worker messages.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stagecoach_coordinator::driver::{
    ControlReply, ControlRequest, Driver, Event, Outbox, Policy, Settings,
};
use stagecoach_coordinator::ledger::Ledger;
use stagecoach_coordinator::status::Snapshot;
use stagecoach_coordinator::store::StoreError;
use stagecoach_coordinator::Error;
use stagecoach_core::spec::builder::JobBuilder;
use stagecoach_core::spec::JobFile;
use stagecoach_proto::v1;
use stagecoach_proto::v1::worker_message::Kind;
use tokio::sync::{mpsc, oneshot, watch};

/// What every job of these tests shares: the micro preset, 64 tokens per step in
/// micro-batches of 32, exactly two workers with a lease of 1 s and heartbeats every 100 ms.
pub fn base() -> JobBuilder {
    JobBuilder::bare()
        .set("model.preset", "micro")
        .set("schedule.peak_lr", 1e-3)
        .set("data.global_batch_tokens", 64)
        .set("data.micro_batch_tokens", 32)
        .set("workers.min", 2)
        .set("workers.max", 2)
        .set("workers.lease_ms", 1000)
        .set("workers.heartbeat_ms", 100)
}

/// One stage of 3 steps, 4 samples of 16 tokens per step.
pub fn job() -> String {
    base()
        .source("a", "x")
        .source("b", "y")
        .stage("only", 3, 16, &[("a", 0.5), ("b", 0.5)])
        .to_toml()
}

/// Two stages: 2 steps of a alone at seq_len 16, then 2 steps of an even mix at seq_len 32
/// with a new RoPE θ; 2 held-out samples per source evaluated at each stage's end.
pub fn curriculum() -> String {
    base()
        .set("data.eval_samples", 2)
        .set("data.eval_seq_len", 16)
        .source_with_eval("a", "x", "xv")
        .source_with_eval("b", "y", "yv")
        .stage("one", 2, 16, &[("a", 1.0)])
        .stage("two", 4, 32, &[("a", 0.5), ("b", 0.5)])
        .stage_set("rope_theta", 40000.0)
        .to_toml()
}

#[derive(Clone, Default)]
pub struct MemLedger(
    pub Arc<Mutex<Vec<v1::LedgerStep>>>,
    pub Arc<Mutex<Option<v1::CurriculumRecord>>>,
    /// Steps set aside by rollbacks, and the skipped ranges.
    pub Arc<Mutex<Vec<v1::LedgerStep>>>,
    pub Arc<Mutex<Vec<v1::SkippedRange>>>,
    /// Writes that fail (as an unreachable store) before the next one succeeds.
    pub Arc<AtomicU32>,
);

impl MemLedger {
    /// The next `n` writes fail as if the store were unreachable.
    pub fn fail_next(&self, n: u32) {
        self.4.store(n, Ordering::SeqCst);
    }

    fn outage(&self) -> Result<(), StoreError> {
        let left = self.4.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(());
        }
        self.4.store(left - 1, Ordering::SeqCst);
        Err(StoreError::Unavailable {
            endpoints: "memory".into(),
            reason: "the store is down (test)".into(),
        })
    }

    /// The committed steps, in order.
    pub fn steps(&self) -> Vec<v1::LedgerStep> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Ledger for MemLedger {
    async fn commit(&self, step: &v1::LedgerStep) -> Result<(), StoreError> {
        self.outage()?;
        // What a reader of a real store gets back: the record encoded, decoded and its samples
        // drawn again from the plan's state it holds.
        let stored = prost::Message::encode_to_vec(step);
        let read = stagecoach_coordinator::ledger::decode_step("memory", &stored)?;
        self.0.lock().unwrap().push(read);
        Ok(())
    }

    async fn save_curriculum(&self, record: &v1::CurriculumRecord) -> Result<(), StoreError> {
        self.outage()?;
        *self.1.lock().unwrap() = Some(record.clone());
        Ok(())
    }

    async fn rewind(&self, to_step: u64, _event: u64) -> Result<(), StoreError> {
        let mut steps = self.0.lock().unwrap();
        let (kept, aside): (Vec<_>, Vec<_>) = steps.drain(..).partition(|s| s.step < to_step);
        *steps = kept;
        self.2.lock().unwrap().extend(aside);
        Ok(())
    }

    async fn put_skipped(&self, range: &v1::SkippedRange) -> Result<(), StoreError> {
        self.3.lock().unwrap().push(range.clone());
        Ok(())
    }
}

pub struct Harness {
    pub events: mpsc::Sender<Event>,
    /// The last session number used by `attach`.
    pub sessions: std::cell::Cell<u64>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub ledger: MemLedger,
}

impl Harness {
    pub fn start() -> Harness {
        Harness::with_job(&job())
    }

    pub fn with_job(text: &str) -> Harness {
        Harness::with_policy(text, Policy::default())
    }

    pub fn with_policy(text: &str, policy: Policy) -> Harness {
        Harness::resumed(text, policy, MemLedger::default(), None)
    }

    /// A driver picking the job up where `resume` says, over `ledger`.
    pub fn resumed(
        text: &str,
        policy: Policy,
        ledger: MemLedger,
        resume: Option<stagecoach_coordinator::driver::Resume>,
    ) -> Harness {
        let job: JobFile = toml::from_str(text).unwrap();
        job.validate().unwrap();
        let w = &job.workers;
        let settings = Settings {
            min: w.min,
            max: w.max,
            lease: Duration::from_millis(w.lease_ms),
            heartbeat: Duration::from_millis(w.heartbeat_ms),
            rendezvous: Duration::from_millis(w.rendezvous_ms),
        };
        let (driver, snapshot) =
            Driver::new(job.to_proto(), settings, Box::new(ledger.clone()), resume).unwrap();
        let driver = driver.with_policy(policy);
        let (events, rx) = mpsc::channel(64);
        tokio::spawn(driver.run(rx));
        Harness {
            events,
            sessions: Default::default(),
            snapshot,
            ledger,
        }
    }

    pub async fn register(&self, addr: &str) -> Result<v1::RegisterResponse, Error> {
        let (reply, rx) = oneshot::channel();
        let request = v1::RegisterRequest {
            name: "t".into(),
            backend: v1::CollectiveBackend::Tcp.into(),
            collective_address: addr.into(),
            ..Default::default()
        };
        self.events
            .send(Event::Register {
                request,
                identity: "anonymous".into(),
                reply,
            })
            .await
            .unwrap();
        rx.await.unwrap()
    }

    pub async fn attach(&self, id: &str) -> mpsc::Receiver<v1::CoordinatorMessage> {
        let (outbox, inbox) = mpsc::channel(64);
        let (reply, rx) = oneshot::channel();
        self.sessions.set(self.sessions.get() + 1);
        self.events
            .send(Event::Attach {
                worker_id: id.into(),
                identity: "anonymous".into(),
                session: self.sessions.get(),
                outbox: Outbox::Session(outbox),
                reply,
            })
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        inbox
    }

    pub async fn send(&self, id: &str, kind: Kind) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Message {
                worker_id: id.into(),
                kind,
                reply,
            })
            .await
            .unwrap();
        rx.await.unwrap()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    pub async fn control(&self, request: ControlRequest) -> Result<ControlReply, Error> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Control { request, reply })
            .await
            .unwrap();
        rx.await.unwrap()
    }

    pub async fn stages(&self) -> v1::ListStagesResponse {
        match self.control(ControlRequest::ListStages).await.unwrap() {
            ControlReply::Stages(s) => s,
            other => panic!("expected Stages, got {other:?}"),
        }
    }
}

pub fn ready(generation: u64) -> Kind {
    Kind::Ready(v1::Ready {
        generation,
        step: 0,
        next_nccl_unique_id: vec![],
        sources: vec![
            v1::SourceSize {
                name: "a".into(),
                num_tokens: 50 * 16 + 1,
                eval_tokens: 100,
            },
            v1::SourceSize {
                name: "b".into(),
                num_tokens: 30 * 16 + 1,
                eval_tokens: 100,
            },
        ],
        ..Default::default()
    })
}

pub fn done(generation: u64, step: u64, samples: u32) -> Kind {
    Kind::StepDone(v1::StepDone {
        generation,
        step,
        loss_sum: 2.0 * samples as f64,
        samples,
        grad_norm: 1.0,
        global_loss: 2.0,
        ..Default::default()
    })
}

pub async fn next(
    inbox: &mut mpsc::Receiver<v1::CoordinatorMessage>,
) -> v1::coordinator_message::Kind {
    tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .expect("a message")
        .expect("open")
        .kind
        .expect("kind")
}
