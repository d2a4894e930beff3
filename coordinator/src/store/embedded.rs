//! The embedded store: the default [`StateStore`], a directory on local disk, no server needed.
//! Its memory is bounded whatever the state's size: recent writes in a memtable, older ones in
//! sorted segment files of which only a block index is held.
//!
//! On disk, all in one directory (byte layouts in `embedded/format.rs` and
//! `embedded/segment.rs`):
//! - `LOCK`: held with an exclusive `flock` while a store is open, so that two coordinators never
//!   share the directory.
//! - `wal`: the write-ahead log, one CRC-checked record per committed write, which is
//!   acknowledged only after its record is synced. Its records since the last flush are also
//!   in memory, in the memtable (the latest state of each key they wrote).
//! - `*.seg`: segments, each the latest state of the keys written by a run of flushes (values,
//!   and deletions that hide older values), every write up to its revision; newer ones win.
//! - `wal.previous`: while a flush is under way, the log it writes out as a segment.
//! - `snapshot`: the whole state, as stores before segments kept it; opening one turns it into
//!   the first segment.
//!
//! Opening reads the segments' indexes and replays `wal.previous` (if there is one) and the log
//! into the memtable, skipping records the segments already hold.
//! A record that is cut short or fails its CRC ends the log: a crash can leave only the last
//! record torn, so it and anything after it were never acknowledged, and they are truncated
//! away with a warning.
//!
//! Compaction is incremental and stays off the commit path: when the log passes its size, the
//! write that crossed it renames the log to `wal.previous`, starts an empty log and freezes the
//! memtable (still read) in place of an empty one; a background thread writes the frozen table
//! as a new segment (temporary file, sync, rename, directory sync), and only then deletes
//! `wal.previous`. The thread then merges the two newest segments while the older is at most
//! half as large again as the newer (a binary counter: O(log n) segments, each write rewritten
//! O(log n) times), dropping deletions when the merge reaches the oldest segment; a merge's
//! inputs are deleted after its output is in place. Commits go on into the new log meanwhile;
//! one that finds the log grown to twice its size with that work still running waits for it,
//! which bounds the memtable.
//! A crash at any point leaves segments and logs whose records they hold or follow; a store
//! opened with a `wal.previous` writes it out as a segment before it takes writes.
//!
//! Writes run on tokio's blocking pool, one at a time (the `log` mutex); readers take only the
//! short `state` mutex, which is never held across I/O or an `.await`, and read segments on
//! the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, mpsc};

use format::{decode_batch, decode_snapshot, encode_batch, frame, unframe};
use segment::{Entry, Segment};

use super::{
    check_key, check_txn, Compare, Op, StateStore, StoreError, Versioned, WatchEvent, WatchStream,
    WATCH_CHANNEL_CAPACITY,
};

mod format;
mod segment;

pub use segment::SEGMENT_EXTENSION;

pub const LOCK_FILE: &str = "LOCK";
pub const WAL_FILE: &str = "wal";
pub const WAL_PREVIOUS_FILE: &str = "wal.previous";
/// The whole state as stores before segments kept it (read once, at open).
pub const SNAPSHOT_FILE: &str = "snapshot";

/// The log size after which a write flushes the memtable into a segment. The memtable and a
/// table being flushed hold at most [`STALL_FACTOR`] times this each (as log bytes): that and
/// the segments' indexes are what the store holds in memory.
pub const DEFAULT_COMPACT_AFTER_BYTES: u64 = 16 << 20;

/// Commits a watcher may fall behind (beyond its channel) before it gets [`StoreError::WatchLagged`].
pub const WATCH_LAG_LIMIT: usize = 256;

/// A write that finds the log this many times its size and a compaction still running waits
/// for it: the memtable, and so memory, stays within this many flushes' worth.
const STALL_FACTOR: u64 = 2;

/// A merge joins the two newest segments while the older is at most this many times the newer.
const MERGE_RATIO: f64 = 1.5;

/// The file-backed [`StateStore`]; see the module docs for its format and guarantees.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// What an embedded store holds, in memory and on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    /// The store revision.
    pub revision: u64,
    /// Writes not yet in a segment: the memtable and a table being flushed (keys, values and
    /// the tables' own overhead, estimated).
    pub memtable_bytes: u64,
    /// The segments' block indexes.
    pub index_bytes: u64,
    pub segments: usize,
    /// The segments' size on disk.
    pub segment_bytes: u64,
    /// The entries in the segments (a key in several counts in each; deletions count).
    pub segment_entries: u64,
    /// Bytes written to segments by every flush and merge since the store was opened.
    pub written_bytes: u64,
}

impl StoreStats {
    /// What the store holds in memory for its state.
    pub fn memory_bytes(&self) -> u64 {
        self.memtable_bytes + self.index_bytes
    }
}

struct Inner {
    dir: PathBuf,
    state: Mutex<State>,
    log: Mutex<Log>,
    events: broadcast::Sender<Arc<[WatchEvent]>>,
    /// The background flush (and merges) under way, if any.
    compacting: Mutex<Option<std::thread::JoinHandle<()>>>,
    written: AtomicU64,
    /// Holds the directory's `flock` until the store is dropped.
    _lock: File,
}

type Table = BTreeMap<String, Entry>;

#[derive(Default)]
struct State {
    revision: u64,
    /// The latest state of every key written since the last flush began.
    memtable: Table,
    memtable_bytes: u64,
    /// The table a background flush is writing out, read until its segment is in place.
    frozen: Option<(Arc<Table>, u64)>,
    /// Oldest first; they hold consecutive flushes.
    segments: Vec<Arc<Segment>>,
    /// The number of the next flush.
    next_flush: u64,
}

struct Log {
    file: File,
    path: PathBuf,
    len: u64,
    compact_after: u64,
    /// Set when an append failed: the file's tail is then unknown, so no later write may be
    /// acknowledged.
    failed: bool,
}

/// What a commit did: whether the compares held, and the store revision afterwards.
struct Outcome {
    succeeded: bool,
    changed: bool,
    revision: u64,
}

impl State {
    /// The key's state if the memtables know it (`Some(None)`: deleted since the last flush).
    fn in_memory(&self, key: &str) -> Option<&Entry> {
        self.memtable
            .get(key)
            .or_else(|| self.frozen.as_ref().and_then(|(t, _)| t.get(key)))
    }

    fn insert(&mut self, key: String, entry: Entry) {
        let bytes = entry_bytes(key.len(), &entry);
        let key_len = key.len();
        if let Some(old) = self.memtable.insert(key, entry) {
            self.memtable_bytes -= entry_bytes(key_len, &old);
        }
        self.memtable_bytes += bytes;
    }

    /// The key's state now, reading segments as needed (a blocking call).
    fn find(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self.in_memory(key) {
            Some(entry) => Ok(entry.clone()),
            None => find_in(&self.segments, key),
        }
    }
}

fn stats_of(state: &State, written_bytes: u64) -> StoreStats {
    StoreStats {
        revision: state.revision,
        memtable_bytes: state.memtable_bytes + state.frozen.as_ref().map_or(0, |(_, b)| *b),
        index_bytes: state.segments.iter().map(|s| s.index_bytes()).sum(),
        segments: state.segments.len(),
        segment_bytes: state.segments.iter().map(|s| s.bytes).sum(),
        segment_entries: state.segments.iter().map(|s| s.entries).sum(),
        written_bytes,
    }
}

/// Memory a memtable entry takes, estimated: its key and value and the map's overhead.
fn entry_bytes(key_len: usize, entry: &Entry) -> u64 {
    const OVERHEAD: usize = 96;
    (key_len + entry.as_ref().map_or(0, |v| v.value.len()) + OVERHEAD) as u64
}

/// The key's state in `segments` (oldest first), newest segment first.
fn find_in(segments: &[Arc<Segment>], key: &str) -> Result<Option<Versioned>, StoreError> {
    for segment in segments.iter().rev() {
        if let Some(entry) = segment.get(key)? {
            return Ok(entry);
        }
    }
    Ok(None)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`. Blocking: call it from a blocking context.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_COMPACT_AFTER_BYTES)
    }

    /// Like [`EmbeddedStore::open`], flushing whenever the log grows past `compact_after` bytes.
    pub fn open_with(dir: impl Into<PathBuf>, compact_after: u64) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let lock_file = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_file)
            .map_err(StoreError::io(&lock_file))?;
        match fs4::FileExt::try_lock(&lock) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { dir, lock_file })
            }
            Err(fs4::TryLockError::Error(e)) => return Err(StoreError::io(&lock_file)(e)),
        }

        let mut state = State {
            segments: open_segments(&dir)?,
            ..State::default()
        };
        migrate_snapshot(&dir, &mut state.segments)?;
        state.revision = state.segments.iter().map(|s| s.revision).max().unwrap_or(0);
        state.next_flush = state.segments.last().map_or(1, |s| s.hi + 1);
        // A flush cut short: its set-aside log comes before the log.
        let previous = dir.join(WAL_PREVIOUS_FILE);
        let had_previous = previous.exists();
        if had_previous {
            let len = fs::metadata(&previous)
                .map_err(StoreError::io(&previous))?
                .len();
            if replay(&previous, &mut state)? < len {
                return Err(StoreError::Corrupt {
                    path: previous,
                    reason: "the log set aside by a compaction ends in a damaged record (it was \
                             complete and synced when set aside)"
                        .into(),
                });
            }
        }
        let path = dir.join(WAL_FILE);
        let valid_len = replay(&path, &mut state)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        let len = file.metadata().map_err(StoreError::io(&path))?.len();
        if len > valid_len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = len - valid_len,
                revision = state.revision,
                "the state log ends in a torn or corrupt record (an unacknowledged write cut \
                 short by a crash); truncating it"
            );
            file.set_len(valid_len).map_err(StoreError::io(&path))?;
            file.sync_all().map_err(StoreError::io(&path))?;
        }
        sync_dir(&dir)?;
        tracing::debug!(
            dir = %dir.display(),
            revision = state.revision,
            segments = state.segments.len(),
            "opened the embedded state store"
        );
        let inner = Inner {
            dir,
            state: Mutex::new(state),
            log: Mutex::new(Log {
                file,
                path,
                len: valid_len,
                compact_after,
                failed: false,
            }),
            events: broadcast::channel(WATCH_LAG_LIMIT).0,
            compacting: Mutex::new(None),
            written: AtomicU64::new(0),
            _lock: lock,
        };
        if had_previous {
            inner.flush_now(&mut self::lock(&inner.log))?;
        }
        inner.report(&self::lock(&inner.state));
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Compacts everything now (after a background compaction under way): the memtable into a
    /// segment, emptying the log, and every segment into one, dropping deletions.
    pub async fn compact(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut log = lock(&inner.log);
            inner.join_compaction();
            inner.flush_now(&mut log)?;
            let segments = lock(&inner.state).segments.clone();
            if segments.len() > 1 {
                inner.merge(&segments, true)?;
            }
            Ok(())
        })
        .await
    }

    /// What the store holds now, in memory and on disk.
    pub fn stats(&self) -> StoreStats {
        stats_of(
            &lock(&self.inner.state),
            self.inner.written.load(Ordering::Relaxed),
        )
    }

    async fn commit(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<Outcome, StoreError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.commit(&compares, ops)).await
    }
}

impl Drop for EmbeddedStore {
    /// The directory's lock is released only once a background compaction has finished.
    fn drop(&mut self) {
        self.inner.join_compaction();
    }
}

impl Inner {
    fn commit(self: &Arc<Self>, compares: &[Compare], ops: Vec<Op>) -> Result<Outcome, StoreError> {
        let mut log = lock(&self.log);
        if log.failed {
            return Err(StoreError::io(&log.path)(std::io::Error::other(
                "an earlier write to the log failed; reopen the store",
            )));
        }
        // Only writers change the keys' state, and we are the only writer: what we read here
        // still holds when we apply below (a flush or merge moves state, never changes it).
        let mut current = HashMap::new();
        for key in compares
            .iter()
            .map(compare_key)
            .chain(ops.iter().map(Op::key))
        {
            if !current.contains_key(key) {
                current.insert(key.to_owned(), self.find(key)?);
            }
        }
        let now = lock(&self.state).revision;
        if !compares.iter().all(|c| holds(&current, c)) {
            return Ok(Outcome {
                succeeded: false,
                changed: false,
                revision: now,
            });
        }
        // Deleting an absent key changes nothing, as in etcd: no record, no event.
        let mut deleted = HashSet::new();
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| match op {
                Op::Put { .. } => true,
                Op::Delete { key } => current[key].is_some() && deleted.insert(key.clone()),
            })
            .collect();
        if ops.is_empty() {
            return Ok(Outcome {
                succeeded: true,
                changed: false,
                revision: now,
            });
        }
        let revision = now + 1;
        log.append(&encode_batch(revision, &ops))?;
        {
            let mut state = lock(&self.state);
            let events = apply(&mut state, revision, ops, &current);
            // No receivers is fine; sending under the lock keeps events in revision order.
            let _ = self.events.send(events.into());
            self.report(&state);
        }
        if log.len >= log.compact_after {
            if log.len >= STALL_FACTOR * log.compact_after {
                // Compaction has fallen behind the writes (a long merge): wait for it rather
                // than let the memtable grow without bound.
                self.join_compaction();
            }
            // The write is already durable; a failed compaction leaves the logs intact.
            if let Err(e) = self.start_flush(&mut log) {
                tracing::warn!(error = %e, "compacting the state store failed; will retry");
            }
        }
        Ok(Outcome {
            succeeded: true,
            changed: true,
            revision,
        })
    }

    /// Publishes what the store holds (`stagecoach_store_*` in the coordinator's metrics).
    fn report(&self, state: &State) {
        let stats = stats_of(state, 0);
        crate::metrics::embedded_store(stats.memory_bytes(), stats.segments, stats.segment_bytes);
    }

    /// The key's state now; reads segments without holding the state lock.
    fn find(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let segments = {
            let state = lock(&self.state);
            if let Some(entry) = state.in_memory(key) {
                return Ok(entry.clone());
            }
            state.segments.clone()
        };
        find_in(&segments, key)
    }

    /// Sets the log aside as `wal.previous`, starts an empty one, freezes the memtable and
    /// leaves writing it out to a background thread. With a background compaction still
    /// running (the log filled again meanwhile), nothing is done: the next write asks again.
    fn start_flush(self: &Arc<Self>, log: &mut Log) -> Result<(), StoreError> {
        let mut running = lock(&self.compacting);
        if running.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        if let Some(done) = running.take() {
            let _ = done.join();
        }
        let previous = self.dir.join(WAL_PREVIOUS_FILE);
        if previous.exists() {
            // An earlier flush failed: write out both tables now.
            return self.flush_now(log);
        }
        fs::rename(&log.path, &previous).map_err(StoreError::io(&log.path))?;
        let fresh = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log.path)
            .and_then(|f| {
                sync_dir(&self.dir)
                    .map_err(std::io::Error::other)
                    .map(|()| f)
            });
        match fresh {
            Ok(file) => {
                log.file = file;
                log.len = 0;
            }
            Err(e) => {
                // The open file is `wal.previous` now: no later write may be acknowledged.
                log.failed = true;
                return Err(StoreError::io(&log.path)(e));
            }
        }
        let (table, revision, flush) = {
            let mut state = lock(&self.state);
            let table = Arc::new(std::mem::take(&mut state.memtable));
            let bytes = std::mem::take(&mut state.memtable_bytes);
            state.frozen = Some((Arc::clone(&table), bytes));
            state.next_flush += 1;
            (table, state.revision, state.next_flush - 1)
        };
        let inner = Arc::clone(self);
        *running = Some(std::thread::spawn(move || {
            let flushed = inner
                .install_flush(&table, revision, flush, false)
                .and_then(|()| {
                    fs::remove_file(&previous)
                        .map_err(StoreError::io(&previous))
                        .and_then(|()| sync_dir(&inner.dir))
                })
                .and_then(|()| inner.merge_tiers());
            if let Err(e) = flushed {
                tracing::warn!(error = %e, "compacting the state store failed; will retry");
            }
        }));
        Ok(())
    }

    /// Waits for the background compaction under way, if any.
    fn join_compaction(&self) {
        if let Some(t) = lock(&self.compacting).take() {
            let _ = t.join();
        }
    }

    /// Writes `table` (every write up to `revision`) as the segment of flush `flush` and puts
    /// it in place of the frozen table, or of the memtable too with `all`.
    fn install_flush(
        &self,
        table: &Table,
        revision: u64,
        flush: u64,
        all: bool,
    ) -> Result<(), StoreError> {
        // Only compactions change the segments, one at a time: this stays true while we write.
        let oldest = lock(&self.state).segments.is_empty();
        let segment = segment::write(&self.dir, (flush, flush), revision, table, oldest)?;
        self.written.fetch_add(segment.bytes, Ordering::Relaxed);
        crate::metrics::store_compaction_written(segment.bytes);
        let mut state = lock(&self.state);
        state.segments.push(Arc::new(segment));
        state.frozen = None;
        if all {
            state.memtable.clear();
            state.memtable_bytes = 0;
        }
        self.report(&state);
        Ok(())
    }

    /// Writes everything not yet in a segment out now, deletes `wal.previous` and empties the
    /// log (the caller holds the log and no background compaction runs).
    fn flush_now(&self, log: &mut Log) -> Result<(), StoreError> {
        let pending = {
            let mut state = lock(&self.state);
            if state.memtable.is_empty() && state.frozen.is_none() {
                None
            } else {
                let mut table = state
                    .frozen
                    .as_ref()
                    .map_or_else(Table::new, |(t, _)| Table::clone(t));
                table.extend(state.memtable.iter().map(|(k, e)| (k.clone(), e.clone())));
                state.next_flush += 1;
                Some((table, state.revision, state.next_flush - 1))
            }
        };
        if let Some((table, revision, flush)) = pending {
            self.install_flush(&table, revision, flush, true)?;
        }
        // From here the segments hold every record of both logs, so emptying them is safe.
        let previous = self.dir.join(WAL_PREVIOUS_FILE);
        match fs::remove_file(&previous) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&previous)(e)),
        }
        log.file
            .set_len(0)
            .and_then(|()| log.file.sync_all())
            .map_err(StoreError::io(&log.path))?;
        log.len = 0;
        Ok(())
    }

    /// Merges the two newest segments while the older is not much larger than the newer.
    fn merge_tiers(&self) -> Result<(), StoreError> {
        loop {
            let segments = lock(&self.state).segments.clone();
            let [.., older, newer] = segments.as_slice() else {
                return Ok(());
            };
            if older.bytes as f64 > newer.bytes as f64 * MERGE_RATIO {
                return Ok(());
            }
            let inputs = [Arc::clone(older), Arc::clone(newer)];
            self.merge(&inputs, segments.len() == 2)?;
        }
    }

    /// Merges `inputs` (consecutive segments, oldest first) into one, in their place; deletions
    /// are dropped with `oldest` (the inputs start with the oldest segment).
    fn merge(&self, inputs: &[Arc<Segment>], oldest: bool) -> Result<(), StoreError> {
        let refs: Vec<&Segment> = inputs.iter().map(|s| &**s).collect();
        let merged = Arc::new(segment::merge(&self.dir, &refs, oldest)?);
        self.written.fetch_add(merged.bytes, Ordering::Relaxed);
        crate::metrics::store_compaction_written(merged.bytes);
        {
            let mut state = lock(&self.state);
            let at = state
                .segments
                .iter()
                .position(|s| Arc::ptr_eq(s, &inputs[0]))
                .expect("a merge's inputs are in place (only compactions change them)");
            state
                .segments
                .splice(at..at + inputs.len(), [Arc::clone(&merged)]);
            self.report(&state);
        }
        // Readers that still hold an input read it through its open file.
        for input in inputs {
            fs::remove_file(&input.path).map_err(StoreError::io(&input.path))?;
        }
        sync_dir(&self.dir)
    }
}

impl Log {
    fn append(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        let frame = frame(payload)?;
        if let Err(e) = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data())
        {
            self.failed = true;
            let _ = self.file.set_len(self.len);
            return Err(StoreError::io(&self.path)(e));
        }
        self.len += frame.len() as u64;
        Ok(())
    }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let segments = {
            let state = lock(&self.inner.state);
            if let Some(entry) = state.in_memory(key) {
                return Ok(entry.clone());
            }
            state.segments.clone()
        };
        if segments.is_empty() {
            return Ok(None);
        }
        let key = key.to_owned();
        blocking(move || find_in(&segments, &key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        // The memtables' entries and the segments as of one instant; older entries first, so
        // that newer ones replace them.
        let (segments, recent) = {
            let state = lock(&self.inner.state);
            let tables = state
                .frozen
                .iter()
                .map(|(t, _)| &**t)
                .chain([&state.memtable]);
            let recent: Vec<(String, Entry)> = tables
                .flat_map(|t| {
                    t.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, e)| (k.clone(), e.clone()))
                })
                .collect();
            (state.segments.clone(), recent)
        };
        let on_disk = !segments.is_empty();
        let prefix = prefix.to_owned();
        let merge = move || {
            let mut merged = BTreeMap::new();
            for segment in &segments {
                merged.extend(segment.range(&prefix)?);
            }
            merged.extend(recent);
            Ok(merged
                .into_iter()
                .filter_map(|(k, e)| e.map(|v| (k, v)))
                .collect())
        };
        if on_disk {
            blocking(merge).await
        } else {
            merge()
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let op = Op::Put {
            key: key.to_owned(),
            value,
        };
        Ok(self.commit(Vec::new(), vec![op]).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let op = Op::Delete {
            key: key.to_owned(),
        };
        Ok(self.commit(Vec::new(), vec![op]).await?.changed)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        check_txn(&compares, &ops)?;
        Ok(self.commit(compares, ops).await?.succeeded)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        // Subscribing before returning is what makes every later commit visible to the watch.
        let mut commits = self.inner.events.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let prefix = prefix.to_owned();
        // Ends when the receiver is dropped, when the store is dropped, or after reporting a lag.
        tokio::spawn(async move {
            loop {
                let commit = tokio::select! {
                    () = tx.closed() => return,
                    commit = commits.recv() => commit,
                };
                match commit {
                    Ok(events) => {
                        for event in events.iter().filter(|e| e.key().starts_with(&prefix)) {
                            if tx.send(Ok(event.clone())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let reason = format!("{missed} commits were dropped");
                        let _ = tx.send(Err(StoreError::WatchLagged(reason))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
}

/// The key a compare reads.
fn compare_key(compare: &Compare) -> &str {
    match compare {
        Compare::Version { key, .. } | Compare::Value { key, .. } => key,
    }
}

/// Whether `compare` holds, given the state of the keys it names.
fn holds(current: &HashMap<String, Option<Versioned>>, compare: &Compare) -> bool {
    let now = current.get(compare_key(compare)).and_then(Option::as_ref);
    match compare {
        Compare::Version { version, .. } => now.map_or(0, |v| v.version) == *version,
        Compare::Value { value, .. } => now.is_some_and(|v| v.value == *value),
    }
}

/// Applies a committed batch at `revision` to the memtable, given the state before it of every
/// key it writes; returns its events.
fn apply(
    state: &mut State,
    revision: u64,
    ops: Vec<Op>,
    current: &HashMap<String, Option<Versioned>>,
) -> Vec<WatchEvent> {
    state.revision = revision;
    let existing = |key: &str| current.get(key).and_then(Option::as_ref);
    ops.into_iter()
        .filter_map(|op| match op {
            Op::Put { key, value } => {
                let version = existing(&key).map_or(0, |v| v.version) + 1;
                let stored = Versioned {
                    value: value.clone(),
                    version,
                    mod_revision: revision,
                };
                state.insert(key.clone(), Some(stored));
                Some(WatchEvent::Put {
                    key,
                    value,
                    mod_revision: revision,
                })
            }
            Op::Delete { key } => existing(&key).is_some().then(|| {
                state.insert(key.clone(), None);
                WatchEvent::Delete {
                    key,
                    mod_revision: revision,
                }
            }),
        })
        .collect()
}

/// Replays the log at `path` onto `state`; returns the length of its valid prefix.
fn replay(path: &Path, state: &mut State) -> Result<u64, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io(path)(e)),
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let mut at = 0;
    while let Some((payload, next)) = unframe(&bytes, at) {
        let (revision, ops) = decode_batch(payload)
            .ok_or_else(|| corrupt(format!("undecodable record at byte {at}")))?;
        if revision > state.revision {
            if revision != state.revision + 1 {
                return Err(corrupt(format!(
                    "record at byte {at} has revision {revision}, expected {}",
                    state.revision + 1
                )));
            }
            let mut current = HashMap::new();
            for op in &ops {
                current.insert(op.key().to_owned(), state.find(op.key())?);
            }
            apply(state, revision, ops, &current);
        }
        at = next;
    }
    Ok(at as u64)
}

/// The segments in `dir`, oldest first. Deletes what a compaction cut short left: temporary
/// files, and segments a merge's output (in place) covers.
fn open_segments(dir: &Path) -> Result<Vec<Arc<Segment>>, StoreError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let entry = entry.map_err(StoreError::io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            fs::remove_file(entry.path()).map_err(StoreError::io(entry.path()))?;
        } else if let Some((lo, hi)) = segment::parse_name(name) {
            found.push((lo, hi, entry.path()));
        }
    }
    // By first flush, the widest first: a merge's leftover inputs follow their output.
    found.sort_by_key(|&(lo, hi, _)| (lo, std::cmp::Reverse(hi)));
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    for (lo, hi, path) in found {
        if let Some(last) = segments.last() {
            if hi <= last.hi {
                fs::remove_file(&path).map_err(StoreError::io(&path))?;
                continue;
            }
            if lo <= last.hi {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!(
                        "the segment overlaps {} without covering it or being covered",
                        last.path.display()
                    ),
                });
            }
        }
        segments.push(Arc::new(Segment::open(path, lo, hi)?));
    }
    sync_dir(dir)?;
    Ok(segments)
}

/// Turns the whole-state snapshot of a store from before segments into its first segment
/// (flush 0), then deletes it.
fn migrate_snapshot(dir: &Path, segments: &mut Vec<Arc<Segment>>) -> Result<(), StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(&path)(e)),
    };
    // Already migrated by an open that stopped before deleting it.
    if segments.first().is_none_or(|s| s.lo > 0) {
        // A snapshot is renamed into place only once complete and synced: any damage is real.
        let (revision, kvs) = unframe(&bytes, 0)
            .filter(|&(_, end)| end == bytes.len())
            .and_then(|(payload, _)| decode_snapshot(payload))
            .ok_or_else(|| StoreError::Corrupt {
                path: path.clone(),
                reason: "the snapshot fails its checksum or cannot be decoded".to_owned(),
            })?;
        let table: Table = kvs.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let first = segment::write(dir, (0, 0), revision, &table, true)?;
        segments.insert(0, Arc::new(first));
    }
    fs::remove_file(&path).map_err(StoreError::io(&path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a state store mutex was poisoned by a panic")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a state store write panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before segments (a whole-state `snapshot` and a log after it) opens with
    /// all its state, the snapshot turned into the first segment; an open that stopped after
    /// writing that segment but before deleting the snapshot is finished by the next.
    #[tokio::test]
    async fn a_store_from_before_segments_opens_with_everything() -> Result<(), StoreError> {
        let dir = tempfile::TempDir::new().map_err(StoreError::io("tempdir"))?;
        let v = |value: &[u8], version, mod_revision| Versioned {
            value: value.to_vec(),
            version,
            mod_revision,
        };
        let kvs = BTreeMap::from([
            ("a".to_owned(), v(b"1", 2, 2)),
            ("b".to_owned(), v(b"2", 1, 3)),
        ]);
        let snapshot = frame(&format::encode_snapshot(3, &kvs))?;
        fs::write(dir.path().join(SNAPSHOT_FILE), &snapshot).map_err(StoreError::io("snapshot"))?;
        let put = Op::Put {
            key: "a".to_owned(),
            value: b"3".to_vec(),
        };
        let records = [
            frame(&encode_batch(3, std::slice::from_ref(&put)))?, // already in the snapshot
            frame(&encode_batch(4, &[put]))?,
        ]
        .concat();
        fs::write(dir.path().join(WAL_FILE), records).map_err(StoreError::io("wal"))?;

        let want = vec![
            ("a".to_owned(), v(b"3", 3, 4)),
            ("b".to_owned(), v(b"2", 1, 3)),
        ];
        let s = EmbeddedStore::open(dir.path())?;
        assert_eq!(s.range("").await?, want);
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        assert_eq!(s.stats().segments, 1);
        assert_eq!(s.put("c", Vec::new()).await?, 5, "the revision carries on");
        drop(s);

        // The snapshot back beside the segment made of it: deleted, not read twice.
        fs::write(dir.path().join(SNAPSHOT_FILE), &snapshot).map_err(StoreError::io("snapshot"))?;
        let s = EmbeddedStore::open(dir.path())?;
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        assert_eq!(s.get("a").await?, Some(v(b"3", 3, 4)));
        assert_eq!(s.range("").await?.len(), 3);
        Ok(())
    }
}
