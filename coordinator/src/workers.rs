//! The `Workers` gRPC service: registration and the per-worker session stream. Handlers only
//! validate the shape of a request, forward it to the [`driver`](crate::driver) as an event and
//! map its answer onto a status code; the driver decides.
//!
//! A session's inbound messages are read by one task that the response stream owns: when the
//! client goes away or the server stops, tonic drops the stream and the task ends with it.
//! Every message renews the sender's lease in the [`LeaseBook`] as it arrives, before it waits
//! in the driver's queue; a heartbeat does nothing else and never reaches the driver.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_server::Workers;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::auth::{Auth, Need};
use crate::driver::{Event, LeaseBook, Outbox};
use crate::error::clip;
use crate::server::Coordinator;
use crate::Error;

mod node;

/// Messages queued for one worker before the coordinator considers it too slow.
const OUTBOX: usize = 256;

/// The service: a handle on the coordinator, whose driver's event queue it talks to.
#[derive(Clone)]
pub struct WorkersService {
    coordinator: Arc<Coordinator>,
    /// Numbers sessions, so that the end of an old session never detaches a newer one.
    sessions: Arc<std::sync::atomic::AtomicU64>,
}

impl WorkersService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        WorkersService {
            coordinator,
            sessions: Default::default(),
        }
    }

    /// Only a worker registers and holds a session; an id belongs to who registered it.
    fn auth(&self) -> &Auth {
        self.coordinator.auth()
    }

    /// The driver's queue and lease book (a standby has none: it answered at the gate).
    fn driver(&self) -> Result<(mpsc::Sender<Event>, Arc<LeaseBook>), Status> {
        self.coordinator
            .driver()
            .map(|d| (d.events.clone(), d.leases.clone()))
            .ok_or_else(|| Status::unavailable("this coordinator runs no job"))
    }
}

/// Sends the driver an event made around a reply channel and waits for its answer.
pub(crate) async fn ask<T>(
    events: &mpsc::Sender<Event>,
    make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Event,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    events
        .send(make(tx))
        .await
        .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
    rx.await
        .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
        .map_err(Status::from)
}

/// The response stream of a session: what the driver sends (straight from the member's outbox,
/// with no task in between), and the status that ends the session on an invalid message. It
/// owns the task reading the inbound messages and aborts it when dropped.
struct SessionStream {
    from_driver: mpsc::Receiver<v1::CoordinatorMessage>,
    /// From the reader when the inbound side ends: the status that ends the session (an
    /// invalid message), or `None` when the worker closed it.
    ended: oneshot::Receiver<Option<Status>>,
    /// The worker closed its side: the queued messages go, then the end.
    closing: bool,
    /// The session is over: nothing more is yielded.
    over: bool,
    reader: tokio::task::JoinHandle<()>,
    /// To tell the driver the session is gone if the reader is aborted before it could.
    events: mpsc::Sender<Event>,
    worker_id: String,
    session: u64,
}

impl tokio_stream::Stream for SessionStream {
    type Item = Result<v1::CoordinatorMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.over {
            return Poll::Ready(None);
        }
        if !self.closing {
            if let Poll::Ready(end) = Pin::new(&mut self.ended).poll(cx) {
                // A reader that was aborted (the server stopping) ends the session as a close
                // does.
                if let Some(status) = end.ok().flatten() {
                    self.over = true;
                    return Poll::Ready(Some(Err(status)));
                }
                self.closing = true;
            }
        }
        if self.closing {
            // Closed by the worker: what the driver had queued still goes, then the end.
            return Poll::Ready(match self.from_driver.try_recv() {
                Ok(m) => Some(Ok(m)),
                Err(_) => {
                    self.over = true;
                    None
                }
            });
        }
        match self.from_driver.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(Ok(m))),
            // The driver dropped this member's outbox: the session stays open until the worker
            // next speaks and is told (or closes it); `ended` is what wakes us then.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.reader.abort();
        // A later session of the same worker is left alone (the driver compares sessions); if
        // the queue is full the worker's lease decides.
        let _ = self.events.try_send(Event::Detach {
            worker_id: std::mem::take(&mut self.worker_id),
            session: self.session,
        });
    }
}

#[tonic::async_trait]
impl Workers for WorkersService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        // An unauthenticated caller learns nothing: not the job, not whether its request is sound.
        let caller = self.auth().check(&request, Need::Work)?;
        let (events, _) = self.driver()?;
        let request = request.into_inner();
        if request.backend() == v1::CollectiveBackend::Unspecified {
            return Err(Status::invalid_argument("backend must be TCP or NCCL"));
        }
        let identity = caller.describe();
        let response = ask(&events, |reply| Event::Register {
            request,
            identity,
            reply,
        })
        .await?;
        Ok(Response::new(response))
    }

    type SessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

    /// The first message must be `Hello` with the registered worker id; every later message
    /// must carry the same id.
    async fn session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = self.auth().check(&request, Need::Work)?;
        let (events, leases) = self.driver()?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session closed before its Hello"))?;
        if !matches!(first.kind, Some(v1::worker_message::Kind::Hello(_))) {
            return Err(Status::invalid_argument(
                "the first session message must be Hello",
            ));
        }
        let worker_id = first.worker_id;
        // The driver writes to `outbox`, which the response stream reads; the reader moves the
        // session's inbound messages to the driver and says how the inbound side ended.
        let (outbox, from_driver) = mpsc::channel(OUTBOX);
        let (end_tx, ended) = oneshot::channel::<Option<Status>>();
        let id = worker_id.clone();
        let session = 1 + self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let identity = caller.describe();
        ask(&events, |reply| Event::Attach {
            worker_id: id,
            identity,
            session,
            outbox: Outbox::Session(outbox),
            reply,
        })
        .await?;
        // The driver took the session (the worker is a member), so this only renews.
        leases.renew(&worker_id);
        let session_events = events.clone();
        let stream_id = worker_id.clone();
        let reader = tokio::spawn(async move {
            let result: Result<(), Status> = async {
                while let Some(msg) = inbound.message().await? {
                    if msg.worker_id != worker_id {
                        return Err(Status::invalid_argument(format!(
                            "message for worker {:?} on the session of {worker_id:?}",
                            clip(&msg.worker_id, 80)
                        )));
                    }
                    let known = leases.renew(&worker_id);
                    let kind = msg
                        .kind
                        .ok_or_else(|| Status::invalid_argument("empty worker message"))?;
                    // A heartbeat only renews the lease, here: it never waits in the driver's
                    // queue behind step reports, and costs the driver nothing.
                    if matches!(kind, v1::worker_message::Kind::Heartbeat(_)) {
                        if known {
                            continue;
                        }
                        return Err(Status::from(Error::UnknownWorker(clip(&worker_id, 80))));
                    }
                    // Reports of other workers: only a node session carries those.
                    if matches!(kind, v1::worker_message::Kind::NodeStepDone(_)) {
                        return Err(Status::invalid_argument(
                            "a NodeStepDone speaks for several workers: send it on a NodeSession, or a StepDone here",
                        ));
                    }
                    let id = worker_id.clone();
                    ask(&events, |reply| Event::Message {
                        worker_id: id,
                        kind,
                        reply,
                    })
                    .await?;
                }
                Ok(())
            }
            .await;
            debug!(worker = %worker_id, ?result, "session ended");
            let _ = end_tx.send(result.err());
            let _ = events.send(Event::Detach { worker_id, session }).await;
        });
        Ok(Response::new(Box::pin(SessionStream {
            from_driver,
            ended,
            closing: false,
            over: false,
            reader,
            events: session_events,
            worker_id: stream_id,
            session,
        })))
    }
    type NodeSessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::NodeDown, Status>> + Send>>;

    /// The sessions of a node's workers over one stream (see [`node`]).
    async fn node_session(
        &self,
        request: Request<Streaming<v1::NodeUp>>,
    ) -> Result<Response<Self::NodeSessionStream>, Status> {
        let caller = self.auth().check(&request, Need::Work)?;
        let (events, leases) = self.driver()?;
        let node = node::Node {
            events,
            leases,
            identity: caller.describe(),
            sessions: self.sessions.clone(),
        };
        Ok(Response::new(Box::pin(node::open(
            node,
            request.into_inner(),
        ))))
    }
}
