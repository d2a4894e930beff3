//! The `Workers` gRPC service: registration and the per-worker session stream. Handlers only
//! validate the shape of a request, forward it to the [`driver`](crate::driver) as an event and
//! map its answer onto a status code; the driver decides.

use std::pin::Pin;

use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_server::Workers;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::driver::{DriverError, Event};

/// Messages queued for one worker before the coordinator considers it too slow.
const OUTBOX: usize = 256;

/// The service: a handle on the driver's event queue.
#[derive(Clone)]
pub struct WorkersService {
    events: mpsc::Sender<Event>,
    /// Numbers sessions, so that the end of an old session never detaches a newer one.
    sessions: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WorkersService {
    pub fn new(events: mpsc::Sender<Event>) -> Self {
        WorkersService {
            events,
            sessions: Default::default(),
        }
    }
}

impl From<DriverError> for Status {
    fn from(e: DriverError) -> Status {
        match e {
            DriverError::UnknownWorker(_) => Status::not_found(e.to_string()),
            DriverError::InvalidArgument(m) => Status::invalid_argument(m),
            DriverError::FailedPrecondition(m) => Status::failed_precondition(m),
            DriverError::NotFound(m) => Status::not_found(m),
        }
    }
}

/// Sends the driver an event made around a reply channel and waits for its answer.
pub(crate) async fn ask<T>(
    events: &mpsc::Sender<Event>,
    make: impl FnOnce(oneshot::Sender<Result<T, DriverError>>) -> Event,
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

type SessionStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkersService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let request = request.into_inner();
        if request.backend() == v1::CollectiveBackend::Unspecified {
            return Err(Status::invalid_argument("backend must be TCP or NCCL"));
        }
        let response = ask(&self.events, |reply| Event::Register { request, reply }).await?;
        Ok(Response::new(response))
    }

    type SessionStream = SessionStream;

    /// The first message must be `Hello` with the registered worker id; every later message
    /// must carry the same id.
    async fn session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
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
        // The driver writes to `outbox`; a relay moves its messages onto the response stream,
        // which also carries the status that ends a session on an invalid message.
        let (outbox, mut from_driver) = mpsc::channel(OUTBOX);
        let (out_tx, out_rx) = mpsc::channel::<Result<v1::CoordinatorMessage, Status>>(OUTBOX);
        let id = worker_id.clone();
        let session = 1 + self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ask(&self.events, |reply| Event::Attach {
            worker_id: id,
            session,
            outbox,
            reply,
        })
        .await?;
        let relay = out_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = from_driver.recv().await {
                if relay.send(Ok(m)).await.is_err() {
                    break;
                }
            }
        });
        // Inbound messages go to the driver from this task, which ends with the stream.
        let events = self.events.clone();
        tokio::spawn(async move {
            let result: Result<(), Status> = async {
                while let Some(msg) = inbound.message().await? {
                    if msg.worker_id != worker_id {
                        return Err(Status::invalid_argument(format!(
                            "message for worker {:?} on the session of {worker_id:?}",
                            msg.worker_id
                        )));
                    }
                    let kind = msg
                        .kind
                        .ok_or_else(|| Status::invalid_argument("empty worker message"))?;
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
            if let Err(status) = result {
                let _ = out_tx.send(Err(status)).await;
            }
            let _ = events.send(Event::Detach { worker_id, session }).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}
