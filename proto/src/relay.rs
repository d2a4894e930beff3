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

    /// Hands one message from the coordinator to its worker's session.
    fn deliver(&self, m: v1::NodeMessage) -> Option<String> {
        let mut routes = self.routes.lock().expect("not poisoned");
        let route = routes.get(&m.worker_id)?;
        let (item, last) = match m.kind? {
            v1::node_message::Kind::Message(message) => (Ok(message), false),
            v1::node_message::Kind::Ended(end) => {
                (Err(Status::new(Code::from(end.code), end.message)), true)
            }
        };
        match route.down.try_send(item) {
            Ok(()) if last => {
                routes.remove(&m.worker_id);
                None
            }
            Ok(()) => None,
            // The worker's session is gone or reads nothing: it ends, and the coordinator is
            // told, as it would be by a worker's own session closing.
            Err(mpsc::error::TrySendError::Full(_)) => {
                let route = routes.remove(&m.worker_id).expect("looked up");
                let slow = Status::resource_exhausted(format!(
                    "this worker's session did not read its last {SESSION_QUEUE} messages"
                ));
                // The queue is full; the session gets the end once it reads.
                tokio::spawn(async move {
                    let _ = route.down.send(Err(slow)).await;
                });
                (!last).then_some(m.worker_id)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                routes.remove(&m.worker_id);
                (!last).then_some(m.worker_id)
            }
        }
    }
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
                }
                self.up.messages.push(m);
            }
            Up::Closed(id) => {
                self.other = true;
                self.up.closed.push(id);
            }
        }
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
                for m in down.messages {
                    if let Some(gone) = link.deliver(m) {
                        let _ = link.up.send(Up::Closed(gone)).await;
                    }
                }
            }
            Ok(None) => break Status::unavailable("the coordinator closed the node session"),
            Err(status) => break status,
        }
    };
    link.fail(&end);
}
