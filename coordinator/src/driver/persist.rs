//! Writing to the state store, through an ordered queue that rides out outages.
//!
//! Every durable change the driver makes (a committed step, the curriculum's record, the
//! checkpoint index, events, rewinds, skipped ranges) is a [`Write`] appended to one queue and
//! written in order. When the store is unreachable (etcd down, a disk error), the write that
//! failed and every later one stay queued, **no step is dispatched** until the queue is empty,
//! and the driver tries again with backoff from its clock, while it goes on serving heartbeats,
//! status and control requests. When the store answers again the queue drains and training
//! resumes by itself. An outage longer than `[recovery] store_outage_ms`, or an error that
//! retrying cannot cure (a corrupt store, a request the store refuses), fails the job.
//!
//! Since nothing new is dispatched while a write waits, a coordinator that dies during an
//! outage loses at most the commit of the one step in flight, which its workers hold: the next
//! coordinator commits it from their reports (see `world.rs`).

use std::collections::VecDeque;
use std::time::Duration;

use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Driver;
use crate::store::StoreError;

/// One durable change.
#[derive(Debug, Clone)]
pub(super) enum Write {
    Commit(v1::LedgerStep),
    Curriculum(v1::CurriculumRecord),
    PutCheckpoint(v1::CheckpointRecord),
    DeleteCheckpoint(u64),
    PutEvent(u64, v1::SpikeEvent),
    /// Set the committed steps from `to_step` on aside for event `event`.
    Rewind {
        to_step: u64,
        event: u64,
    },
    PutSkipped(v1::SkippedRange),
}

impl Write {
    fn what(&self) -> &'static str {
        match self {
            Write::Commit(_) => "commit",
            Write::Curriculum(_) => "curriculum",
            Write::PutCheckpoint(_) | Write::DeleteCheckpoint(_) => "checkpoint_index",
            Write::PutEvent(..) => "event",
            Write::Rewind { .. } => "rewind",
            Write::PutSkipped(_) => "skipped",
        }
    }
}

/// The queue of writes the store has not taken yet, and the state of the outage.
#[derive(Debug, Default)]
pub(super) struct Pending {
    queue: VecDeque<Write>,
    /// When the first failed write of this outage failed.
    since: Option<Instant>,
    /// When to try again.
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

/// The first and the longest wait between attempts during an outage.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_RETRY: Duration = Duration::from_secs(5);

impl Pending {
    /// Writes waiting for the store.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether every write has been applied.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether it is time to try the queue again.
    pub(super) fn due(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t <= now)
    }

    /// The outage, for humans.
    pub(super) fn describe(&self) -> Option<String> {
        let since = self.since?;
        Some(format!(
            "the state store has been unreachable for {:.0} s ({} writes waiting; last error: {}); \
             no step is dispatched until it answers",
            since.elapsed().as_secs_f64(),
            self.queue.len(),
            self.last_error
        ))
    }

    fn push(&mut self, w: Write) {
        // Only the latest curriculum record matters: replace one still waiting at the end.
        if let (Write::Curriculum(_), Some(Write::Curriculum(_))) = (&w, self.queue.back()) {
            self.queue.pop_back();
        }
        self.queue.push_back(w);
    }
}

impl Driver {
    /// Queues `w` and writes what is queued; false when the job failed (a store error retrying
    /// cannot cure, or an outage past its budget). True while an outage keeps it queued.
    pub(super) async fn persist(&mut self, w: Write) -> bool {
        if self.deposed.is_some() {
            return false;
        }
        self.pending.push(w);
        if self.pending.since.is_some() {
            // An outage is under way: the retry timer writes the queue.
            return true;
        }
        self.flush().await
    }

    /// Writes the queue in order, stopping at the first failure; false when the job failed.
    pub(super) async fn flush(&mut self) -> bool {
        while let Some(w) = self.pending.queue.front().cloned() {
            match self.apply(&w).await {
                Ok(()) => {
                    self.pending.queue.pop_front();
                }
                Err(e) => return self.store_failed(&w, e),
            }
        }
        if let Some(since) = self.pending.since.take() {
            info!(
                seconds = since.elapsed().as_secs_f64(),
                "the state store answers again; every waiting write is in"
            );
            self.pending.retry_at = None;
            self.pending.backoff = Duration::ZERO;
            if let Some(m) = &self.metrics {
                m.store_available(true);
            }
        }
        if let Some(m) = &self.metrics {
            m.store_pending(0);
        }
        true
    }

    /// Stops leading at once: no message goes to a worker any more (their sessions' outboxes
    /// are dropped, so the sessions end and the workers look for the new leader), nothing more
    /// is written, and the event loop returns [`RunEnd::Deposed`](super::RunEnd).
    fn depose(&mut self, reason: String) {
        tracing::error!(%reason, "deposed: another coordinator leads this job now; stepping down");
        for m in self.members.values_mut() {
            m.outbox = None;
        }
        self.roster.detached_all();
        self.world = None;
        self.pending.queue.clear();
        self.deposed = Some(reason);
    }

    /// Tries the queue again if it is time; dispatches once it is empty.
    pub(super) async fn retry_writes(&mut self) {
        if !self.pending.due(Instant::now()) {
            return;
        }
        self.pending.retry_at = None;
        if self.flush().await && self.pending.is_empty() {
            self.dispatch().await;
        }
    }

    async fn apply(&self, w: &Write) -> Result<(), StoreError> {
        match w {
            Write::Commit(step) => self.ledger.commit(step).await,
            Write::Curriculum(r) => self.ledger.save_curriculum(r).await,
            Write::PutCheckpoint(r) => self.ledger.put_checkpoint(r).await,
            Write::DeleteCheckpoint(step) => self.ledger.delete_checkpoint(*step).await,
            Write::PutEvent(i, e) => self.ledger.put_event(*i, e).await,
            Write::Rewind { to_step, event } => self.ledger.rewind(*to_step, *event).await,
            Write::PutSkipped(r) => self.ledger.put_skipped(r).await,
        }
    }

    /// A write failed: wait and retry (an outage), or fail the job (an error retrying cannot
    /// cure, or an outage past `store_outage_ms`).
    fn store_failed(&mut self, w: &Write, e: StoreError) -> bool {
        if let Some(m) = &self.metrics {
            m.store_error(w.what());
            m.store_pending(self.pending.len());
        }
        if let StoreError::Fenced(reason) = &e {
            if let Some(m) = &self.metrics {
                m.fenced_write();
            }
            self.depose(format!("the {} was refused: {reason}", w.what()));
            return false;
        }
        let curable = e.retryable() || matches!(e, StoreError::Io { .. });
        let now = Instant::now();
        let since = *self.pending.since.get_or_insert(now);
        let budget = Duration::from_millis(self.recovery.store_outage_ms);
        if !curable || now.duration_since(since) >= budget {
            let why = if curable {
                format!(
                    "the state store stayed unreachable for {} s ([recovery] store_outage_ms = {})",
                    now.duration_since(since).as_secs(),
                    self.recovery.store_outage_ms
                )
            } else {
                "the state store refused".to_owned()
            };
            self.fail(format!("{why}: cannot write the {}: {e}", w.what()));
            return false;
        }
        let first = self.pending.backoff.is_zero();
        self.pending.backoff = if first {
            FIRST_RETRY
        } else {
            (self.pending.backoff * 2).min(LONGEST_RETRY)
        };
        self.pending.retry_at = Some(now + self.pending.backoff);
        self.pending.last_error = crate::error::clip(&e.to_string(), 300);
        if first {
            warn!(error = %e, write = w.what(), "the state store cannot be written; training waits and retries");
            if let Some(m) = &self.metrics {
                m.store_available(false);
            }
        }
        true
    }
}
