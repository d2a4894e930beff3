//! The sample ledger: which samples of which source every committed step trained, in the state
//! store. A step and the "last committed" pointer are written in one transaction, so a reader
//! (or a restarted coordinator) never sees one without the other.

use std::sync::Arc;

use prost::Message;
use stagecoach_proto::v1;

use crate::keys;
use crate::store::{Op, StateStore, StoreError};

/// Where committed steps and the curriculum's record go (the state store).
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    async fn commit(&self, step: &v1::LedgerStep) -> Result<(), StoreError>;
    /// Replaces the curriculum's durable record (mixture edits, transitions, evaluations).
    async fn save_curriculum(&self, record: &v1::CurriculumRecord) -> Result<(), StoreError>;
    /// Adds or replaces a checkpoint in the index.
    async fn put_checkpoint(&self, _record: &v1::CheckpointRecord) -> Result<(), StoreError> {
        Ok(())
    }
    /// Removes a checkpoint from the index (its folder is gone).
    async fn delete_checkpoint(&self, _step: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Adds or replaces spike event number `index`.
    async fn put_event(&self, _index: u64, _event: &v1::SpikeEvent) -> Result<(), StoreError> {
        Ok(())
    }
    /// A rollback (event `event`) to the state after `to_step` committed steps: the committed
    /// steps from `to_step` on move aside (kept, as rolled back), the last committed step is
    /// `to_step - 1` again.
    async fn rewind(&self, _to_step: u64, _event: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records samples a rollback skipped.
    async fn put_skipped(&self, _range: &v1::SkippedRange) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The ledger of one job in a state store.
pub struct StoreLedger {
    store: Arc<dyn StateStore>,
    job: String,
}

impl StoreLedger {
    pub fn new(store: Arc<dyn StateStore>, job: impl Into<String>) -> Self {
        StoreLedger {
            store,
            job: job.into(),
        }
    }

    /// The last committed step, if any.
    pub async fn last(&self) -> Result<Option<v1::LedgerStep>, StoreError> {
        let key = keys::ledger_last(&self.job);
        let Some(v) = self.store.get(&key).await? else {
            return Ok(None);
        };
        Ok(Some(decode_step(&key, &v.value)?))
    }

    /// The curriculum's record, if one was written.
    pub async fn curriculum(&self) -> Result<Option<v1::CurriculumRecord>, StoreError> {
        let key = keys::curriculum(&self.job);
        let Some(v) = self.store.get(&key).await? else {
            return Ok(None);
        };
        v1::CurriculumRecord::decode(v.value.as_slice())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: key.into(),
                reason: format!("the curriculum record does not decode: {e}"),
            })
    }

    /// The checkpoint index, by step.
    pub async fn checkpoints(&self) -> Result<Vec<v1::CheckpointRecord>, StoreError> {
        self.decode_all(&keys::checkpoints(&self.job)).await
    }

    /// The spike events, in order.
    pub async fn events(&self) -> Result<Vec<v1::SpikeEvent>, StoreError> {
        self.decode_all(&keys::events(&self.job)).await
    }

    /// Every range of samples a rollback skipped.
    pub async fn skipped(&self) -> Result<Vec<v1::SkippedRange>, StoreError> {
        self.decode_all(&keys::skipped_all(&self.job)).await
    }

    async fn decode_all<M: Message + Default>(&self, prefix: &str) -> Result<Vec<M>, StoreError> {
        let entries = self.store.range(prefix).await?;
        entries
            .iter()
            .map(|(k, v)| {
                M::decode(v.value.as_slice()).map_err(|e| StoreError::Corrupt {
                    path: k.into(),
                    reason: format!("the entry does not decode: {e}"),
                })
            })
            .collect()
    }

    /// Every committed step, in order, with its samples.
    pub async fn steps(&self) -> Result<Vec<v1::LedgerStep>, StoreError> {
        let entries = self.store.range(&keys::ledger_steps(&self.job)).await?;
        entries
            .iter()
            .map(|(k, v)| decode_step(k, &v.value))
            .collect()
    }

    /// Every committed step as stored (a compact record's samples not drawn again).
    async fn raw_steps(&self) -> Result<Vec<v1::LedgerStep>, StoreError> {
        let entries = self.store.range(&keys::ledger_steps(&self.job)).await?;
        entries
            .iter()
            .map(|(k, v)| decode_raw(k, &v.value))
            .collect()
    }

    /// Finishes a rewind that was cut short (the coordinator died while it moved steps aside).
    /// Call before reading the ledger.
    pub async fn recover(&self) -> Result<(), StoreError> {
        let key = keys::rewinding(&self.job);
        let Some(v) = self.store.get(&key).await? else {
            return Ok(());
        };
        let marker = v1::Rewind::decode(v.value.as_slice()).map_err(|e| StoreError::Corrupt {
            path: key.into(),
            reason: format!("the rewind marker does not decode: {e}"),
        })?;
        let steps = self.raw_steps().await?;
        self.move_aside(steps, &marker).await
    }

    /// Moves the steps of `steps` from `marker.to_step` on to the rolled-back keys of its
    /// event, in batches, then removes the marker.
    async fn move_aside(
        &self,
        steps: Vec<v1::LedgerStep>,
        marker: &v1::Rewind,
    ) -> Result<(), StoreError> {
        let aside: Vec<v1::LedgerStep> = steps
            .into_iter()
            .filter(|s| s.step >= marker.to_step)
            .collect();
        for batch in aside.chunks(REWIND_BATCH) {
            let mut ops = Vec::with_capacity(2 * batch.len());
            for s in batch {
                ops.push(Op::Put {
                    key: keys::rolled_back_step(&self.job, marker.event, s.step),
                    value: s.encode_to_vec(),
                });
                ops.push(Op::Delete {
                    key: keys::ledger_step(&self.job, s.step),
                });
            }
            refused_if_false(
                self.store.txn(vec![], ops).await?,
                "moving rewound steps aside",
            )?;
        }
        self.store.delete(&keys::rewinding(&self.job)).await?;
        Ok(())
    }
}

/// Steps moved aside per transaction: two operations each, well inside etcd's default limit
/// of 128 operations per transaction.
const REWIND_BATCH: usize = 50;

impl StoreLedger {
    async fn put(&self, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        self.store.put(&key, value).await.map(|_| ())
    }
}

/// A transaction without compares is never refused; if one is, say so.
fn refused_if_false(applied: bool, what: &str) -> Result<(), StoreError> {
    if applied {
        Ok(())
    } else {
        Err(StoreError::Backend(format!("{what} was refused")))
    }
}

/// A ledger record as stored: compact records keep their samples as the plan's state (`draw`).
fn decode_raw(key: &str, bytes: &[u8]) -> Result<v1::LedgerStep, StoreError> {
    v1::LedgerStep::decode(bytes).map_err(|e| StoreError::Corrupt {
        path: key.into(),
        reason: format!("the ledger entry does not decode: {e}"),
    })
}

/// Decodes a ledger record (a committed step, or one set aside by a rollback) with its samples:
/// a compact record's samples are drawn again from the plan's state it holds, an older record
/// lists them.
pub fn decode_step(key: &str, bytes: &[u8]) -> Result<v1::LedgerStep, StoreError> {
    let mut step = decode_raw(key, bytes)?;
    if let Some(draw) = step.draw.as_ref().filter(|_| step.samples.is_empty()) {
        let samples =
            stagecoach_core::plan::Plan::replay(draw).map_err(|e| StoreError::Corrupt {
                path: key.into(),
                reason: format!("the ledger entry's sample plan cannot be drawn again: {e}"),
            })?;
        step.samples = sample_refs(&samples);
    }
    Ok(step)
}

/// Samples of the plan as the protocol and the ledger name them.
pub(crate) fn sample_refs(samples: &[stagecoach_core::plan::SampleId]) -> Vec<v1::SampleRef> {
    samples
        .iter()
        .map(|s| v1::SampleRef {
            source: s.source as u32,
            index: s.index,
        })
        .collect()
}

#[async_trait::async_trait]
impl Ledger for StoreLedger {
    async fn commit(&self, step: &v1::LedgerStep) -> Result<(), StoreError> {
        let value = step.encode_to_vec();
        let ops = vec![
            Op::Put {
                key: keys::ledger_step(&self.job, step.step),
                value: value.clone(),
            },
            Op::Put {
                key: keys::ledger_last(&self.job),
                value,
            },
        ];
        refused_if_false(self.store.txn(vec![], ops).await?, "the ledger transaction")
    }

    async fn put_checkpoint(&self, record: &v1::CheckpointRecord) -> Result<(), StoreError> {
        self.put(
            keys::checkpoint(&self.job, record.step),
            record.encode_to_vec(),
        )
        .await
    }

    async fn delete_checkpoint(&self, step: u64) -> Result<(), StoreError> {
        self.store
            .delete(&keys::checkpoint(&self.job, step))
            .await
            .map(|_| ())
    }

    async fn put_event(&self, index: u64, event: &v1::SpikeEvent) -> Result<(), StoreError> {
        self.put(keys::event(&self.job, index), event.encode_to_vec())
            .await
    }

    async fn put_skipped(&self, range: &v1::SkippedRange) -> Result<(), StoreError> {
        self.put(keys::skipped(&self.job, range.event), range.encode_to_vec())
            .await
    }

    /// Moves the committed steps from `to_step` on aside and points `last` at the step before.
    /// `last` moves first, with a marker of the rewind, in one transaction; the steps then move
    /// in batches small enough for etcd's limit of operations per transaction, and the marker
    /// goes. A rewind cut short is finished by [`StoreLedger::recover`].
    async fn rewind(&self, to_step: u64, event: u64) -> Result<(), StoreError> {
        let steps = self.raw_steps().await?;
        let last = steps.iter().rev().find(|s| s.step < to_step);
        let marker = v1::Rewind { to_step, event };
        let ops = vec![
            Op::Put {
                key: keys::rewinding(&self.job),
                value: marker.encode_to_vec(),
            },
            match last {
                Some(l) => Op::Put {
                    key: keys::ledger_last(&self.job),
                    value: l.encode_to_vec(),
                },
                None => Op::Delete {
                    key: keys::ledger_last(&self.job),
                },
            },
        ];
        refused_if_false(self.store.txn(vec![], ops).await?, "the rewind transaction")?;
        self.move_aside(steps, &marker).await
    }

    async fn save_curriculum(&self, record: &v1::CurriculumRecord) -> Result<(), StoreError> {
        self.store
            .put(&keys::curriculum(&self.job), record.encode_to_vec())
            .await
            .map(|_| ())
    }
}
