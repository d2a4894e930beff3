//! `NodeSession`: the sessions of several workers over one stream, which a node agent opens for
//! the ranks of its node. Each worker inside it behaves as on a `Session` of its own (its Hello
//! attaches it, every message renews its lease as it arrives, a heartbeat never reaches the
//! driver, a refused message ends its session and only its session), but the coordinator reads
//! and writes one message per node where it would one per rank: a step's reports come up
//! together and its `Work` goes down together, packed into one `NodeDown` as the driver queues
//! it.
//!
//! The messages of different workers in one `NodeUp` go to the driver as one event; a worker's
//! second message in it goes in the next event, after the answer to its first, so each
//! worker's messages are judged in order, exactly as on its own session. A `NodeStepDone`
//! counts as a message of every worker it speaks for, each of which must be attached here.
//!
//! A client that says it splits them (`NodeUp.combined`) gets a step's Work for its workers as
//! one `NodeWork`: the driver builds one message per node session, and the relay on the node
//! hands each worker its share.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use stagecoach_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::{Status, Streaming};
use tracing::debug;

use crate::driver::{Event, Lease, LeaseBook, Outbox};
use crate::error::clip;
use crate::{metrics, Error};

/// Workers one node session may hold at once (a node has a rank per device).
pub(super) const MAX_WORKERS: usize = 256;

/// Messages queued for a node session's workers together before the coordinator considers
/// them too slow: a worker's own session may hold `OUTBOX`, a node's workers share this.
const QUEUE: usize = super::OUTBOX * 64;

/// The most messages one `NodeDown` carries.
const BATCH: usize = 1024;

/// The workers attached to a node session, by id, with the session number of the attachment
/// (so that ending this node session never detaches a newer session of the same worker) and
/// the worker's lease, which the reader renews as its messages arrive, counted in the
/// process's `stagecoach_node_session_workers`.
#[derive(Clone, Default)]
struct Attached(Arc<Mutex<HashMap<String, Attachment>>>);

struct Attachment {
    session: u64,
    lease: Arc<Lease>,
}

impl Attached {
    /// For looking: changes go through the methods below, which keep the count.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attachment>> {
        self.0.lock().expect("not poisoned")
    }

    fn insert(&self, id: String, attachment: Attachment) {
        let fresh = self.lock().insert(id, attachment).is_none();
        if fresh {
            metrics::node_session_workers(1);
        }
    }

    fn remove(&self, id: &str) -> Option<u64> {
        let session = self.lock().remove(id).map(|a| a.session);
        if session.is_some() {
            metrics::node_session_workers(-1);
        }
        session
    }

    /// Every attachment, by worker id and session number, leaving none.
    fn take(&self) -> Vec<(String, u64)> {
        let all = std::mem::take(&mut *self.lock());
        metrics::node_session_workers(-(all.len() as i64));
        all.into_iter().map(|(id, a)| (id, a.session)).collect()
    }

    /// Renews the lease of attached worker `id`: `None` if it is not attached here, `Some(false)`
    /// if it is no longer a member.
    fn renew(&self, id: &str) -> Option<bool> {
        self.lock().get(id).map(|a| a.lease.renew())
    }
}

/// What the reader of a node session works with.
pub(super) struct Node {
    pub(super) events: mpsc::Sender<Event>,
    pub(super) leases: Arc<LeaseBook>,
    /// The authenticated caller: it must be who registered every worker it attaches.
    pub(super) identity: String,
    pub(super) sessions: Arc<AtomicU64>,
}

/// Opens a node session: the response stream, which owns the task reading `inbound`.
pub(super) fn open(node: Node, inbound: Streaming<v1::NodeUp>) -> NodeStream {
    metrics::node_session_opened();
    let (queue, from_driver) = mpsc::channel(QUEUE);
    let (end_tx, ended) = oneshot::channel::<Option<Status>>();
    let attached = Attached::default();
    let events = node.events.clone();
    let number = 1 + node.sessions.fetch_add(1, Ordering::Relaxed);
    let reader = Reader {
        node,
        queue,
        attached: attached.clone(),
        number,
        combined: Arc::default(),
    };
    let reader = tokio::spawn(async move {
        let mut reader = reader;
        let result = reader.read(inbound).await;
        debug!(?result, "node session ended");
        let _ = end_tx.send(result.err());
        reader.detach_all().await;
    });
    NodeStream {
        from_driver,
        ended,
        closing: false,
        over: false,
        reader,
        events,
        attached,
    }
}

/// The response stream of a node session: what the driver queued for its workers, packed into
/// one `NodeDown` as far as it is there, and the status that ends the whole node session (the
/// client's stream broke, or the coordinator shuts down).
pub(super) struct NodeStream {
    from_driver: mpsc::Receiver<v1::NodeMessage>,
    ended: oneshot::Receiver<Option<Status>>,
    closing: bool,
    over: bool,
    reader: tokio::task::JoinHandle<()>,
    events: mpsc::Sender<Event>,
    attached: Attached,
}

impl NodeStream {
    /// Adds what is queued now to `messages`, up to a batch.
    fn take_queued(&mut self, messages: &mut Vec<v1::NodeMessage>) {
        while messages.len() < BATCH {
            match self.from_driver.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
    }
}

impl tokio_stream::Stream for NodeStream {
    type Item = Result<v1::NodeDown, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.over {
            return Poll::Ready(None);
        }
        if !self.closing {
            if let Poll::Ready(end) = Pin::new(&mut self.ended).poll(cx) {
                if let Some(status) = end.ok().flatten() {
                    self.over = true;
                    return Poll::Ready(Some(Err(status)));
                }
                self.closing = true;
            }
        }
        let mut messages = Vec::new();
        if self.closing {
            // Closed by the agent: what is queued still goes, then the end.
            self.take_queued(&mut messages);
            if messages.is_empty() {
                self.over = true;
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(Ok(v1::NodeDown { messages })));
        }
        match self.from_driver.poll_recv(cx) {
            Poll::Ready(Some(m)) => {
                messages.push(m);
                self.take_queued(&mut messages);
                Poll::Ready(Some(Ok(v1::NodeDown { messages })))
            }
            // The reader holds a sender until it ends, and its end wakes `ended`.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for NodeStream {
    fn drop(&mut self) {
        self.reader.abort();
        metrics::node_session_closed();
        // The reader detaches its workers when it ends; aborted, it could not.
        let attached = self.attached.take();
        for (worker_id, session) in attached {
            let _ = self.events.try_send(Event::Detach { worker_id, session });
        }
    }
}

/// A `NodeUp`'s messages on their way to the driver as one event, at most one per worker,
/// with the other workers each speaks for (those a `NodeStepDone` names; none for the rest).
#[derive(Default)]
struct Pending {
    messages: Vec<(String, v1::worker_message::Kind)>,
    also: Vec<Vec<String>>,
    workers: HashSet<String>,
}

struct Reader {
    node: Node,
    /// The node session's queue: the driver's messages for its workers (through each one's
    /// `Outbox::Node`) and the ends of their sessions.
    queue: mpsc::Sender<v1::NodeMessage>,
    attached: Attached,
    /// The number of this node session (its outboxes carry it).
    number: u64,
    /// The client splits `NodeWork`s (it said so in a `NodeUp`).
    combined: Arc<AtomicBool>,
}

/// The driver is gone: the whole node session ends.
fn shutting_down() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

impl Reader {
    async fn read(&mut self, mut inbound: Streaming<v1::NodeUp>) -> Result<(), Status> {
        use v1::worker_message::Kind;
        while let Some(up) = inbound.message().await? {
            if up.combined {
                self.combined.store(true, Ordering::Relaxed);
            }
            let mut pending = Pending::default();
            for msg in up.messages {
                let id = msg.worker_id;
                let also: &[String] = match &msg.kind {
                    Some(Kind::NodeStepDone(n)) => &n.also,
                    _ => &[],
                };
                // A worker's messages are judged in order: the next waits for the answer to the
                // previous one, and an attachment for everything before it.
                if matches!(msg.kind, Some(Kind::Hello(_)))
                    || pending.workers.contains(&id)
                    || also.iter().any(|a| pending.workers.contains(a))
                {
                    self.flush(&mut pending).await?;
                }
                let Some(kind) = msg.kind else {
                    self.end(&id, Status::invalid_argument("empty worker message"))
                        .await?;
                    continue;
                };
                let kind = match kind {
                    Kind::Hello(_) => {
                        self.attach(id).await?;
                        continue;
                    }
                    kind => kind,
                };
                // Every message renews its worker's lease as it arrives.
                let member = match self.attached.renew(&id) {
                    None => {
                        let why = format!(
                            "worker {:?} is not attached to this node session: its Hello comes first",
                            clip(&id, 80)
                        );
                        self.end(&id, Status::invalid_argument(why)).await?;
                        continue;
                    }
                    Some(member) => member,
                };
                match kind {
                    // A heartbeat only renews the lease, here, as on a worker's own session.
                    Kind::Heartbeat(_) => {
                        if !member {
                            let unknown = Status::from(Error::UnknownWorker(clip(&id, 80)));
                            self.end(&id, unknown).await?;
                        }
                    }
                    Kind::NodeStepDone(n) => {
                        let mut speakers = Vec::with_capacity(1 + n.also.len());
                        speakers.push(id.clone());
                        speakers.extend(n.also.iter().cloned());
                        let refused = if speakers.len() > MAX_WORKERS {
                            Some(format!(
                                "a NodeStepDone speaks for {} workers, a node session holds at most {MAX_WORKERS}",
                                speakers.len()
                            ))
                        } else {
                            // The others' leases are renewed as they are found attached.
                            let attached = self.attached.lock();
                            let stranger = speakers[1..].iter().find(|a| {
                                attached.get(a.as_str()).map(|a| a.lease.renew()).is_none()
                            });
                            stranger.map(|stranger| {
                                format!(
                                    "a NodeStepDone of {:?} speaks for worker {:?}, which is not attached to this node session",
                                    clip(&id, 80),
                                    clip(stranger, 80)
                                )
                            })
                        };
                        if let Some(why) = refused {
                            speakers.truncate(MAX_WORKERS);
                            for w in &speakers {
                                self.end(w, Status::invalid_argument(why.clone())).await?;
                            }
                            continue;
                        }
                        pending.workers.extend(speakers.iter().cloned());
                        pending.messages.push((id, Kind::NodeStepDone(n)));
                        pending.also.push(speakers.split_off(1));
                    }
                    kind => {
                        pending.workers.insert(id.clone());
                        pending.messages.push((id, kind));
                        pending.also.push(Vec::new());
                    }
                }
            }
            self.flush(&mut pending).await?;
            for id in up.closed {
                let session = self.attached.remove(&id);
                if let Some(session) = session {
                    self.detach(id, session).await?;
                }
            }
        }
        Ok(())
    }

    /// Hands the pending messages to the driver and waits for its answers; a refusal ends the
    /// sessions of the workers the message speaks for.
    async fn flush(&mut self, pending: &mut Pending) -> Result<(), Status> {
        pending.workers.clear();
        let messages = std::mem::take(&mut pending.messages);
        let also = std::mem::take(&mut pending.also);
        if messages.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = messages.iter().map(|(id, _)| id.clone()).collect();
        let (reply, rx) = oneshot::channel();
        self.node
            .events
            .send(Event::Messages { messages, reply })
            .await
            .map_err(|_| shutting_down())?;
        let answers = rx.await.map_err(|_| shutting_down())?;
        for ((id, also), answer) in ids.iter().zip(&also).zip(answers) {
            if let Err(e) = answer {
                let status = Status::from(e);
                for id in std::iter::once(id).chain(also) {
                    self.end(id, status.clone()).await?;
                }
            }
        }
        Ok(())
    }

    /// A Hello: the driver takes the worker's session if the caller registered it.
    async fn attach(&mut self, id: String) -> Result<(), Status> {
        let full = {
            let attached = self.attached.lock();
            attached.len() >= MAX_WORKERS && !attached.contains_key(&id)
        };
        if full {
            let why = format!("a node session holds at most {MAX_WORKERS} workers");
            return self.end(&id, Status::resource_exhausted(why)).await;
        }
        let session = 1 + self.node.sessions.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.node
            .events
            .send(Event::Attach {
                worker_id: id.clone(),
                identity: self.node.identity.clone(),
                session,
                outbox: Outbox::Node {
                    queue: self.queue.clone(),
                    worker_id: id.clone(),
                    node: self.number,
                    combined: self.combined.clone(),
                },
                reply,
            })
            .await
            .map_err(|_| shutting_down())?;
        match rx.await.map_err(|_| shutting_down())? {
            Ok(()) => {
                // The driver took the session: the worker is a member, with a lease.
                let Some(lease) = self.node.leases.lease(&id) else {
                    let unknown = Status::from(Error::UnknownWorker(clip(&id, 80)));
                    return self.end(&id, unknown).await;
                };
                lease.renew();
                self.attached.insert(id, Attachment { session, lease });
                Ok(())
            }
            Err(e) => self.end(&id, Status::from(e)).await,
        }
    }

    /// Ends one worker's session with `status`, after what was queued for it; the node session
    /// goes on.
    async fn end(&mut self, id: &str, status: Status) -> Result<(), Status> {
        let session = self.attached.remove(id);
        if let Some(session) = session {
            self.detach(id.to_string(), session).await?;
        }
        let ended = v1::NodeMessage {
            worker_id: id.to_string(),
            kind: Some(v1::node_message::Kind::Ended(v1::SessionEnd {
                code: status.code() as i32,
                message: status.message().to_string(),
            })),
        };
        // Waits while the agent reads nothing: its workers' messages wait too.
        self.queue.send(ended).await.map_err(|_| shutting_down())
    }

    async fn detach(&self, worker_id: String, session: u64) -> Result<(), Status> {
        self.node
            .events
            .send(Event::Detach { worker_id, session })
            .await
            .map_err(|_| shutting_down())
    }

    /// The node session ended: every worker still attached is detached.
    async fn detach_all(&mut self) {
        let attached = self.attached.take();
        for (worker_id, session) in attached {
            let _ = self.detach(worker_id, session).await;
        }
    }
}
