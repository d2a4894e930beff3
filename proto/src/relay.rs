//! The sessions of a node's workers carried to the coordinator over one `NodeSession` stream
//! (see `stagecoach.proto`): what a node agent runs for the ranks of its node, so that the
//! coordinator reads one message per node where it would one per rank.
//!
//! A [`Relay`] holds the node session (opened on the first worker's session, opened again after
//! it breaks) and hands out a [`RelaySession`] per worker, which behaves as a worker's own
//! `Session` call does: messages go up with [`RelaySession::send`], the coordinator's come
//! down with [`RelaySession::message`], and the status that ends it (a lease lost, a refused
//! message, the node session broken) comes as an error. Dropping it closes it.
//!
//! Going up, what the node's workers send while the previous batch is on its way goes in the
//! next `NodeUp` (a step's reports, which the ranks send together after their all-reduce, in
//! one message; a report waits up to [`STEP_HOLD`] for the others). A heartbeat may wait for
//! company (see [`hold`]): anything else goes at once
//! and takes the waiting heartbeats along, and each worker's heartbeat is sent once per batch,
//! so a node whose ranks are idle sends one message per heartbeat period, not one per rank.
//!
//! A step's reports that agree (the same step and the numbers every rank shares) are summed
//! into one `NodeStepDone` where that keeps each worker's messages in order, and the relay
//! says it splits `NodeWork`s: a step's Work for the node's ranks comes down as one message,
//! which it hands to each worker as its own `Work`. The coordinator then judges one report
//! and builds one message per node and step, not per rank.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::connect::AuthedChannel;
use crate::v1;
use crate::v1::workers_client::WorkersClient;

/// How long a worker's heartbeat may wait for other messages to go up with, given what its
/// registration said: at most a heartbeat period, and at most half the margin its lease leaves
/// beyond one, so that the gaps the coordinator sees between heartbeats stay within the lease.
pub fn hold(registered: &v1::RegisterResponse) -> Duration {
    let heartbeat = registered.heartbeat_ms;
    let margin = registered.lease_ms.saturating_sub(heartbeat) / 2;
    Duration::from_millis(heartbeat.min(margin))
}

/// Messages queued for one worker before the relay considers it too slow (as the coordinator
/// does for a worker's own session).
const SESSION_QUEUE: usize = 256;

/// Messages of the node's workers waiting to go up.
const UP_QUEUE: usize = 4096;

/// The most messages one `NodeUp` carries.
const BATCH: usize = 1024;

/// How long a step's report waits for the reports of the node's other workers: they finish
/// the same all-reduce at the same moment, so theirs come within this; while a worker of the
/// node is not in the world (restarting), each step waits this much longer.
pub const STEP_HOLD: Duration = Duration::from_millis(2);

/// What goes up: a worker's message (a heartbeat with the time it may wait until), or the end
/// of its session on the node.
enum Up {
    Message(v1::WorkerMessage),
    Heartbeat(String, tokio::time::Instant),
    Closed(String),
}

/// Where a worker's messages from the coordinator go: its session's queue, and which session
/// (a newer session of the same worker replaces an older one).
struct Route {
    session: u64,
    down: mpsc::Sender<Result<v1::CoordinatorMessage, Status>>,
}

/// One node session with the coordinator.
struct Link {
    up: mpsc::Sender<Up>,
    routes: Mutex<HashMap<String, Route>>,
    /// The node session ended: the next worker session opens another.
    dead: AtomicBool,
}

impl Link {
    /// Ends every worker's session with `status`: the node session is over.
    fn fail(&self, status: &Status) {
        self.dead.store(true, Ordering::Relaxed);
        let routes = std::mem::take(&mut *self.routes.lock().expect("not poisoned"));
        for (_, route) in routes {
            let _ = route.down.try_send(Err(status.clone()));
        }
    }

    /// Hands one message from the coordinator to its workers' sessions (one, or each worker
    /// of a `NodeWork` its share); adds to `gone` the workers whose sessions could not take
    /// it, of which the coordinator must be told.
    fn deliver(&self, m: v1::NodeMessage, gone: &mut Vec<String>) {
        let mut routes = self.routes.lock().expect("not poisoned");
        match m.kind {
            Some(v1::node_message::Kind::Message(message)) => {
                Self::hand(&mut routes, m.worker_id, Ok(message), false, gone);
            }
            Some(v1::node_message::Kind::Ended(end)) => {
                let status = Status::new(Code::from(end.code), end.message);
                Self::hand(&mut routes, m.worker_id, Err(status), true, gone);
            }
            Some(v1::node_message::Kind::Work(node)) => {
                for (worker_id, work) in split(node) {
                    let item = work.map(|w| v1::CoordinatorMessage {
                        kind: Some(v1::coordinator_message::Kind::Work(w)),
                    });
                    let last = item.is_err();
                    Self::hand(&mut routes, worker_id, item, last, gone);
                }
            }
            None => {}
        }
    }

    /// Queues `item` for `worker_id`'s session (`last`: it ends it).
    fn hand(
        routes: &mut HashMap<String, Route>,
        worker_id: String,
        item: Result<v1::CoordinatorMessage, Status>,
        last: bool,
        gone: &mut Vec<String>,
    ) {
        let Some(route) = routes.get(&worker_id) else {
            return;
        };
        match route.down.try_send(item) {
            Ok(()) if last => {
                routes.remove(&worker_id);
            }
            Ok(()) => {}
            // The worker's session is gone or reads nothing: it ends, and the coordinator is
            // told, as it would be by a worker's own session closing.
            Err(mpsc::error::TrySendError::Full(_)) => {
                let route = routes.remove(&worker_id).expect("looked up");
                let slow = Status::resource_exhausted(format!(
                    "this worker's session did not read its last {SESSION_QUEUE} messages"
                ));
                // The queue is full; the session gets the end once it reads.
                tokio::spawn(async move {
                    let _ = route.down.send(Err(slow)).await;
                });
                if !last {
                    gone.push(worker_id);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                routes.remove(&worker_id);
                if !last {
                    gone.push(worker_id);
                }
            }
        }
    }
}

/// A `NodeWork` as each of its workers' `Work`: the common part with the worker's share of the
/// samples. Counts that do not match the samples (or the workers) end those sessions: the
/// coordinator broke the protocol, and no worker can know its share.
fn split(node: v1::NodeWork) -> Vec<(String, Result<v1::Work, Status>)> {
    let mut header = node.work.unwrap_or_default();
    let samples = std::mem::take(&mut header.samples);
    let total: u64 = node.samples.iter().map(|&n| u64::from(n)).sum();
    if node.samples.len() != node.workers.len() || total != samples.len() as u64 {
        let why = format!(
            "the coordinator sent work for {} workers with {} sample counts adding up to {total}, for {} samples",
            node.workers.len(),
            node.samples.len(),
            samples.len()
        );
        return node
            .workers
            .into_iter()
            .map(|w| (w, Err(Status::internal(why.clone()))))
            .collect();
    }
    let mut rest = samples.into_iter();
    node.workers
        .into_iter()
        .zip(node.samples)
        .map(|(worker_id, n)| {
            let work = v1::Work {
                samples: rest.by_ref().take(n as usize).collect(),
                ..header.clone()
            };
            (worker_id, Ok(work))
        })
        .collect()
}

/// The relay of one node: its workers' sessions over one node session.
pub struct Relay {
    client: WorkersClient<AuthedChannel>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    sessions: AtomicU64,
}

impl Relay {
    /// A relay that reaches the coordinator through `client` (its channel carries the node's
    /// credentials). Nothing is opened until the first session.
    pub fn new(client: WorkersClient<AuthedChannel>) -> Self {
        Relay {
            client,
            link: tokio::sync::Mutex::new(None),
            sessions: AtomicU64::new(0),
        }
    }

    /// The client the relay reaches the coordinator with (for the calls it does not carry,
    /// such as `Register`).
    pub fn client(&self) -> WorkersClient<AuthedChannel> {
        self.client.clone()
    }

    /// Opens the session of `worker_id` (registered by the caller this relay's client
    /// authenticates as): its Hello goes up. An error is what opening the node session came to.
    ///
    /// `hold`: how long its heartbeats may wait for company ([`hold`] of its registration).
    pub async fn session(&self, worker_id: String, hold: Duration) -> Result<RelaySession, Status> {
        let link = self.open().await?;
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let (down, from_coordinator) = mpsc::channel(SESSION_QUEUE);
        link.routes
            .lock()
            .expect("not poisoned")
            .insert(worker_id.clone(), Route { session, down });
        let hello = v1::WorkerMessage {
            worker_id: worker_id.clone(),
            kind: Some(v1::worker_message::Kind::Hello(v1::Hello {})),
        };
        let sender = RelaySender {
            worker_id,
            session,
            link,
            hold,
        };
        sender.up(Up::Message(hello)).await?;
        Ok(RelaySession {
            sender,
            from_coordinator,
        })
    }

    /// The node session, opened if there is none (or it ended).
    async fn open(&self) -> Result<Arc<Link>, Status> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref() {
            if !link.dead.load(Ordering::Relaxed) {
                return Ok(link.clone());
            }
        }
        let (up, from_workers) = mpsc::channel(UP_QUEUE);
        let (batches, outbound) = mpsc::channel(1);
        let link = Arc::new(Link {
            up,
            routes: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(batch_up(from_workers, batches, Arc::downgrade(&link)));
        let inbound = self
            .client
            .clone()
            .node_session(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        tokio::spawn(route_down(inbound, link.clone()));
        *current = Some(link.clone());
        Ok(link)
    }
}

/// One worker's session over the node session.
pub struct RelaySession {
    sender: RelaySender,
    from_coordinator: mpsc::Receiver<Result<v1::CoordinatorMessage, Status>>,
}

impl RelaySession {
    pub fn worker_id(&self) -> &str {
        &self.sender.worker_id
    }

    /// Sends a message of this worker (its id is filled in).
    pub async fn send(&self, kind: v1::worker_message::Kind) -> Result<(), Status> {
        self.sender
            .send(v1::WorkerMessage {
                worker_id: self.sender.worker_id.clone(),
                kind: Some(kind),
            })
            .await
    }

    /// The next message from the coordinator: `None` once the session ended without a status
    /// (a newer session of the same worker took its place).
    pub async fn message(&mut self) -> Result<Option<v1::CoordinatorMessage>, Status> {
        self.from_coordinator.recv().await.transpose()
    }

    /// The sending half and the coordinator's messages, for a server that streams them on; the
    /// session ends when the sending half is dropped.
    pub fn into_parts(
        self,
    ) -> (
        RelaySender,
        mpsc::Receiver<Result<v1::CoordinatorMessage, Status>>,
    ) {
        (self.sender, self.from_coordinator)
    }
}

/// The sending half of a [`RelaySession`]: dropping it ends the session.
pub struct RelaySender {
    worker_id: String,
    session: u64,
    link: Arc<Link>,
    hold: Duration,
}

impl RelaySender {
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Sends a message of this worker as it came; one naming another worker is refused.
    pub async fn send(&self, message: v1::WorkerMessage) -> Result<(), Status> {
        if message.worker_id != self.worker_id {
            return Err(Status::invalid_argument(format!(
                "message for worker {:?} on the session of {:?}",
                message.worker_id.chars().take(80).collect::<String>(),
                self.worker_id
            )));
        }
        if matches!(message.kind, Some(v1::worker_message::Kind::Heartbeat(_))) {
            let until = tokio::time::Instant::now() + self.hold;
            return self.up(Up::Heartbeat(message.worker_id, until)).await;
        }
        self.up(Up::Message(message)).await
    }

    async fn up(&self, up: Up) -> Result<(), Status> {
        self.link
            .up
            .send(up)
            .await
            .map_err(|_| Status::unavailable("the node session with the coordinator ended"))
    }
}

/// The session of `worker_id` numbered `session` ended on the node: the coordinator is told,
/// unless a newer session of the worker took its place.
fn close(link: &Arc<Link>, worker_id: &str, session: u64) {
    {
        let mut routes = link.routes.lock().expect("not poisoned");
        match routes.get(worker_id) {
            Some(r) if r.session == session => {
                routes.remove(worker_id);
            }
            // A newer session, or the coordinator already ended this one.
            _ => return,
        }
    }
    let closed = Up::Closed(worker_id.to_string());
    if let Err(mpsc::error::TrySendError::Full(closed)) = link.up.try_send(closed) {
        let up = link.up.clone();
        tokio::spawn(async move {
            let _ = up.send(closed).await;
        });
    }
}

impl Drop for RelaySender {
    fn drop(&mut self) {
        close(&self.link, &self.worker_id, self.session);
    }
}

/// Packs the workers' messages into `NodeUp`s: what is queued when one is sent goes in the
/// next, a batch of heartbeats alone waits for company until the first of them may wait no
/// longer, and a step's report waits up to [`STEP_HOLD`] for those of the node's other workers.
async fn batch_up(
    mut from_workers: mpsc::Receiver<Up>,
    batches: mpsc::Sender<v1::NodeUp>,
    link: std::sync::Weak<Link>,
) {
    while let Some(first) = from_workers.recv().await {
        let mut batch = Batch::default();
        batch.add(first);
        batch.take_queued(&mut from_workers);
        while batch.len() < BATCH {
            let workers = link
                .upgrade()
                .map_or(0, |l| l.routes.lock().expect("not poisoned").len());
            let Some(until) = batch.wait_until(workers) else {
                break;
            };
            tokio::select! {
                next = from_workers.recv() => match next {
                    Some(up) => {
                        batch.add(up);
                        batch.take_queued(&mut from_workers);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        batch.take_queued(&mut from_workers);
        batch.up.combined = true;
        // Waits for the stream to take it: meanwhile the next batch gathers.
        if batches.send(batch.up).await.is_err() {
            return;
        }
    }
}

#[derive(Default)]
struct Batch {
    up: v1::NodeUp,
    /// Workers with a heartbeat in this batch (one is enough).
    beats: HashSet<String>,
    /// The index of each worker's last message in it (heartbeats aside: they are not ordered
    /// with the others).
    last: HashMap<String, usize>,
    /// The message later step reports are summed into, if they agree with it.
    summed: Option<usize>,
    /// The earliest time a heartbeat in it may wait until.
    until: Option<tokio::time::Instant>,
    /// The step of the first report in it, how many reports of that step it holds, and when
    /// the first came.
    step: Option<(u64, usize, tokio::time::Instant)>,
    other: bool,
}

impl Batch {
    fn len(&self) -> usize {
        self.up.messages.len() + self.up.closed.len()
    }

    /// How long to wait for more, with `workers` sessions on the node: heartbeats alone until
    /// the first must go; a step's reports until every worker's is in, for at most
    /// [`STEP_HOLD`] after the first; else not at all.
    fn wait_until(&self, workers: usize) -> Option<tokio::time::Instant> {
        if !self.other {
            return self.until;
        }
        match self.step {
            Some((_, reports, first)) if reports < workers => Some(first + STEP_HOLD),
            _ => None,
        }
    }

    fn add(&mut self, up: Up) {
        match up {
            Up::Heartbeat(worker_id, until) => {
                self.until = Some(self.until.map_or(until, |u| u.min(until)));
                if self.beats.insert(worker_id.clone()) {
                    self.up.messages.push(v1::WorkerMessage {
                        worker_id,
                        kind: Some(v1::worker_message::Kind::Heartbeat(v1::Heartbeat {})),
                    });
                }
            }
            Up::Message(m) => {
                self.other = true;
                if let Some(v1::worker_message::Kind::StepDone(done)) = &m.kind {
                    match &mut self.step {
                        None => self.step = Some((done.step, 1, tokio::time::Instant::now())),
                        Some((step, reports, _)) if *step == done.step => *reports += 1,
                        Some(_) => {}
                    }
                    if self.sum(&m) {
                        return;
                    }
                    self.summed = Some(self.up.messages.len());
                }
                self.last
                    .insert(m.worker_id.clone(), self.up.messages.len());
                self.up.messages.push(m);
            }
            Up::Closed(id) => {
                self.other = true;
                self.up.closed.push(id);
            }
        }
    }

    /// Adds the step report `m` to the one summed so far if they agree and nothing of its
    /// worker comes after that one in the batch (its messages stay in order); false if not.
    fn sum(&mut self, m: &v1::WorkerMessage) -> bool {
        use v1::worker_message::Kind;
        let (Some(i), Some(Kind::StepDone(done))) = (self.summed, &m.kind) else {
            return false;
        };
        if self.last.get(&m.worker_id).is_some_and(|&j| j >= i) {
            return false;
        }
        let into = &mut self.up.messages[i];
        let sum = match &into.kind {
            Some(Kind::StepDone(first)) => first,
            Some(Kind::NodeStepDone(n)) => match &n.done {
                Some(d) => d,
                None => return false,
            },
            _ => return false,
        };
        let agree = sum.generation == done.generation
            && sum.step == done.step
            && sum.skipped == done.skipped
            && sum.global_loss.to_bits() == done.global_loss.to_bits()
            && sum.grad_norm.to_bits() == done.grad_norm.to_bits()
            && sum.state_digest == done.state_digest;
        let Some(samples) = sum.samples.checked_add(done.samples) else {
            return false;
        };
        if !agree {
            return false;
        }
        if let Some(Kind::StepDone(first)) = &mut into.kind {
            let first = std::mem::take(first);
            into.kind = Some(Kind::NodeStepDone(v1::NodeStepDone {
                done: Some(first),
                also: vec![],
            }));
        }
        let Some(Kind::NodeStepDone(n)) = &mut into.kind else {
            unreachable!("a NodeStepDone, or made one above");
        };
        let total = n.done.as_mut().expect("checked above");
        total.samples = samples;
        total.loss_sum += done.loss_sum;
        total.timing = None;
        n.also.push(m.worker_id.clone());
        self.last.insert(m.worker_id.clone(), i);
        true
    }

    fn take_queued(&mut self, from_workers: &mut mpsc::Receiver<Up>) {
        while self.len() < BATCH {
            match from_workers.try_recv() {
                Ok(up) => self.add(up),
                Err(_) => break,
            }
        }
    }
}

/// Hands the coordinator's messages to the workers' sessions until the node session ends, then
/// ends every one of them.
async fn route_down(mut inbound: Streaming<v1::NodeDown>, link: Arc<Link>) {
    let end = loop {
        match inbound.message().await {
            Ok(Some(down)) => {
                let mut gone = Vec::new();
                for m in down.messages {
                    link.deliver(m, &mut gone);
                    for id in gone.drain(..) {
                        let _ = link.up.send(Up::Closed(id)).await;
                    }
                }
            }
            Ok(None) => break Status::unavailable("the coordinator closed the node session"),
            Err(status) => break status,
        }
    };
    link.fail(&end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::worker_message::Kind;

    fn done(worker: &str, step: u64, samples: u32) -> Up {
        Up::Message(v1::WorkerMessage {
            worker_id: worker.into(),
            kind: Some(Kind::StepDone(v1::StepDone {
                generation: 3,
                step,
                loss_sum: 2.0 * f64::from(samples),
                samples,
                grad_norm: 1.5,
                global_loss: 2.0,
                state_digest: 11,
                timing: Some(v1::StepTiming::default()),
                ..Default::default()
            })),
        })
    }

    fn failed(worker: &str) -> Up {
        Up::Message(v1::WorkerMessage {
            worker_id: worker.into(),
            kind: Some(Kind::Failed(v1::Failed {
                generation: 3,
                ..Default::default()
            })),
        })
    }

    /// Each message of the batch as (worker, what, the workers it speaks for, samples).
    fn shape(batch: &Batch) -> Vec<(String, &'static str, Vec<String>, u32)> {
        batch
            .up
            .messages
            .iter()
            .map(|m| match &m.kind {
                Some(Kind::StepDone(d)) => (m.worker_id.clone(), "done", vec![], d.samples),
                Some(Kind::NodeStepDone(n)) => (
                    m.worker_id.clone(),
                    "summed",
                    n.also.clone(),
                    n.done.as_ref().unwrap().samples,
                ),
                Some(Kind::Heartbeat(_)) => (m.worker_id.clone(), "beat", vec![], 0),
                _ => (m.worker_id.clone(), "other", vec![], 0),
            })
            .collect()
    }

    #[test]
    fn reports_that_agree_are_summed_into_the_first() {
        let mut batch = Batch::default();
        for (w, n) in [("a", 2), ("b", 3), ("c", 1)] {
            batch.add(done(w, 7, n));
        }
        let s = |x: &str| x.to_string();
        assert_eq!(shape(&batch), [(s("a"), "summed", vec![s("b"), s("c")], 6)]);
        let Some(Kind::NodeStepDone(n)) = &batch.up.messages[0].kind else {
            unreachable!()
        };
        let d = n.done.as_ref().unwrap();
        assert_eq!((d.loss_sum, d.generation, d.step), (12.0, 3, 7));
        assert_eq!((d.global_loss, d.grad_norm, d.state_digest), (2.0, 1.5, 11));
        assert!(d.timing.is_none(), "per-rank timing cannot be summed");
        // The hold still counts one report per worker.
        assert_eq!(batch.step.map(|(step, n, _)| (step, n)), Some((7, 3)));
    }

    #[test]
    fn a_report_is_summed_only_where_its_workers_order_and_numbers_allow() {
        let s = |x: &str| x.to_string();
        // b failed after the first report went in: its report stays after its failure, and
        // the reports after it are summed into it.
        let mut batch = Batch::default();
        batch.add(done("a", 7, 1));
        batch.add(failed("b"));
        batch.add(done("b", 7, 1));
        batch.add(done("c", 7, 1));
        assert_eq!(
            shape(&batch),
            [
                (s("a"), "done", vec![], 1),
                (s("b"), "other", vec![], 0),
                (s("b"), "summed", vec![s("c")], 2),
            ]
        );
        // A worker that failed before the first report went in is summed: its failure stays first.
        let mut batch = Batch::default();
        batch.add(failed("b"));
        batch.add(done("a", 7, 1));
        batch.add(done("b", 7, 1));
        assert_eq!(
            shape(&batch),
            [
                (s("b"), "other", vec![], 0),
                (s("a"), "summed", vec![s("b")], 2),
            ]
        );
        // A worker's second report, another step, or other numbers are never summed in; a
        // heartbeat does not count as a message of its worker.
        let mut batch = Batch::default();
        batch.add(done("a", 7, 1));
        batch.add(done("a", 7, 1));
        batch.add(done("b", 8, 1));
        let other = |w: &str| {
            let Up::Message(mut other) = done(w, 8, 1) else {
                unreachable!()
            };
            if let Some(Kind::StepDone(d)) = &mut other.kind {
                d.grad_norm = 9.0;
            }
            Up::Message(other)
        };
        batch.add(other("c"));
        batch.add(Up::Heartbeat(s("d"), tokio::time::Instant::now()));
        batch.add(other("d"));
        assert_eq!(
            shape(&batch),
            [
                (s("a"), "done", vec![], 1),
                (s("a"), "done", vec![], 1),
                (s("b"), "done", vec![], 1),
                (s("c"), "summed", vec![s("d")], 2),
                (s("d"), "beat", vec![], 0),
            ]
        );
        let Some(Kind::NodeStepDone(n)) = &batch.up.messages[3].kind else {
            unreachable!()
        };
        assert_eq!(n.done.as_ref().unwrap().grad_norm, 9.0);
    }

    #[test]
    fn a_node_work_is_split_into_each_workers_share() {
        let sample = |index| v1::SampleRef { source: 0, index };
        let node = v1::NodeWork {
            work: Some(v1::Work {
                generation: 2,
                step: 5,
                samples: (0..5).map(sample).collect(),
                lr: 0.25,
                global_batch: 40,
                ..Default::default()
            }),
            workers: vec!["a".into(), "b".into(), "c".into()],
            samples: vec![2, 0, 3],
        };
        let works: Vec<(String, Vec<u64>, u64, f64, u32)> = split(node.clone())
            .into_iter()
            .map(|(w, work)| {
                let work = work.unwrap();
                let indices = work.samples.iter().map(|s| s.index).collect();
                (w, indices, work.step, work.lr, work.global_batch)
            })
            .collect();
        assert_eq!(
            works,
            [
                ("a".into(), vec![0, 1], 5, 0.25, 40),
                ("b".into(), vec![], 5, 0.25, 40),
                ("c".into(), vec![2, 3, 4], 5, 0.25, 40),
            ]
        );
        for (counts, workers) in [(vec![2, 0, 2], 3), (vec![2, 3], 3), (vec![5], 2)] {
            let mut bad = node.clone();
            bad.samples = counts;
            bad.workers.truncate(workers);
            let split = split(bad);
            assert_eq!(split.len(), workers, "every worker named hears of it");
            for (_, work) in split {
                let status = work.unwrap_err();
                assert_eq!(status.code(), Code::Internal);
                assert!(status.message().contains("sample counts"), "{status:?}");
            }
        }
    }
}
