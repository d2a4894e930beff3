//! The embedded store: the default [`StateStore`], a directory on local disk, no server needed.
//!
//! On disk, all in one directory (byte layouts in `embedded/format.rs`):
//! - `LOCK`: held with an exclusive `flock` while a store is open, so that two coordinators never
//!   share the directory.
//! - `wal`: the write-ahead log, one CRC-checked record per committed write, which is
//!   acknowledged only after its record is synced.
//! - `snapshot`: the whole state at some revision.
//!
//! - `wal.previous`: while a compaction is under way, the log it folds into the next snapshot.
//!
//! Opening loads the snapshot and replays `wal.previous` (if there is one) and the log, skipping
//! records the snapshot already holds.
//! A record that is cut short or fails its CRC ends the log: a crash can leave only the last
//! record torn, so it and anything after it were never acknowledged, and they are truncated
//! away with a warning.
//!
//! Compaction stays off the commit path: when the log passes its size, the write that crossed
//! it renames the log to `wal.previous`, starts an empty log and takes the state as of that
//! log's last record; a background thread then writes the snapshot to a temporary file, syncs
//! it, renames it over the old one, syncs the directory and only then deletes `wal.previous`.
//! Commits go on into the new log meanwhile. A crash at any point leaves the old snapshot with
//! both logs, or the new snapshot with logs whose records it holds or follows; a store opened
//! with a `wal.previous` folds it into a snapshot before it takes writes.
//!
//! Writes run on tokio's blocking pool, one at a time (the `log` mutex); readers take only the
//! short `state` mutex, which is never held across I/O or an `.await`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, mpsc};

use format::{decode_batch, decode_snapshot, encode_batch, encode_snapshot, frame, unframe};

use super::{
    check_key, check_txn, Compare, Op, StateStore, StoreError, Versioned, WatchEvent, WatchStream,
    WATCH_CHANNEL_CAPACITY,
};

mod format;

pub const LOCK_FILE: &str = "LOCK";
pub const WAL_FILE: &str = "wal";
pub const SNAPSHOT_FILE: &str = "snapshot";
pub const WAL_PREVIOUS_FILE: &str = "wal.previous";
const SNAPSHOT_TMP_FILE: &str = "snapshot.tmp";

/// The log size after which a write compacts the store into a fresh snapshot.
pub const DEFAULT_COMPACT_AFTER_BYTES: u64 = 64 << 20;

/// Commits a watcher may fall behind (beyond its channel) before it gets [`StoreError::WatchLagged`].
pub const WATCH_LAG_LIMIT: usize = 256;

/// The file-backed [`StateStore`]; see the module docs for its format and guarantees.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    state: Mutex<State>,
    log: Mutex<Log>,
    events: broadcast::Sender<Arc<[WatchEvent]>>,
    /// The revision of the snapshot in place, held while one is written (by the background
    /// compaction or [`EmbeddedStore::compact`]), so that an older one never replaces a newer.
    installed: Mutex<u64>,
    /// The background compaction under way, if any.
    compacting: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Holds the directory's `flock` until the store is dropped.
    _lock: File,
}

#[derive(Default)]
struct State {
    kvs: BTreeMap<String, Versioned>,
    revision: u64,
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

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`. Blocking: call it from a blocking context.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_COMPACT_AFTER_BYTES)
    }

    /// Like [`EmbeddedStore::open`], compacting whenever the log grows past `compact_after` bytes.
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

        let mut state = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let installed = state.revision;
        // A compaction cut short: its set-aside log comes before the log.
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
            keys = state.kvs.len(),
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
            installed: Mutex::new(installed),
            compacting: Mutex::new(None),
            _lock: lock,
        };
        if had_previous {
            inner.compact(&mut self::lock(&inner.log))?;
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Writes a snapshot of the whole state and empties the log, now (waiting for a background
    /// compaction under way first).
    pub async fn compact(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            inner.join_compaction();
            inner.compact(&mut lock(&inner.log))
        })
        .await
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
        // Only writers change `state`, and we are the only writer: what we check here still
        // holds when we apply below.
        let (revision, ops) = {
            let state = lock(&self.state);
            if !compares.iter().all(|c| holds(&state.kvs, c)) {
                return Ok(Outcome {
                    succeeded: false,
                    changed: false,
                    revision: state.revision,
                });
            }
            // Deleting an absent key changes nothing, as in etcd: no record, no event.
            let mut deleted = HashSet::new();
            let ops: Vec<Op> = ops
                .into_iter()
                .filter(|op| match op {
                    Op::Put { .. } => true,
                    Op::Delete { key } => {
                        state.kvs.contains_key(key) && deleted.insert(key.clone())
                    }
                })
                .collect();
            (state.revision + u64::from(!ops.is_empty()), ops)
        };
        if ops.is_empty() {
            return Ok(Outcome {
                succeeded: true,
                changed: false,
                revision,
            });
        }
        log.append(&encode_batch(revision, &ops))?;
        {
            let mut state = lock(&self.state);
            let events = apply(&mut state, revision, ops);
            // No receivers is fine; sending under the lock keeps events in revision order.
            let _ = self.events.send(events.into());
        }
        if log.len >= log.compact_after {
            // The write is already durable; a failed compaction leaves the logs intact.
            if let Err(e) = self.start_compaction(&mut log) {
                tracing::warn!(error = %e, "compacting the state store failed; will retry");
            }
        }
        Ok(Outcome {
            succeeded: true,
            changed: true,
            revision,
        })
    }

    /// The state as of now, as a snapshot frame, and its revision.
    fn snapshot_frame(&self) -> Result<(Vec<u8>, u64), StoreError> {
        let state = lock(&self.state);
        Ok((
            frame(&encode_snapshot(state.revision, &state.kvs))?,
            state.revision,
        ))
    }

    /// Sets the log aside as `wal.previous`, starts an empty one and leaves the snapshot of the
    /// state it ends at to a background thread. With a background compaction still running
    /// (the log filled again meanwhile), nothing is done: the next write asks again.
    fn start_compaction(self: &Arc<Self>, log: &mut Log) -> Result<(), StoreError> {
        let mut running = lock(&self.compacting);
        if running.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        if let Some(done) = running.take() {
            let _ = done.join();
        }
        let previous = self.dir.join(WAL_PREVIOUS_FILE);
        if previous.exists() {
            // An earlier snapshot failed to install: fold both logs into one now.
            return self.compact(log);
        }
        let (frame, revision) = self.snapshot_frame()?;
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
        let inner = Arc::clone(self);
        *running = Some(std::thread::spawn(move || {
            let installed = inner.install(&frame, revision).and_then(|()| {
                fs::remove_file(&previous)
                    .map_err(StoreError::io(&previous))
                    .and_then(|()| sync_dir(&inner.dir))
            });
            if let Err(e) = installed {
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

    /// Puts a snapshot of `revision` in place, unless a newer one already is.
    fn install(&self, frame: &[u8], revision: u64) -> Result<(), StoreError> {
        let mut installed = lock(&self.installed);
        if *installed > revision {
            return Ok(());
        }
        let tmp = self.dir.join(SNAPSHOT_TMP_FILE);
        let snapshot = self.dir.join(SNAPSHOT_FILE);
        let mut file = File::create(&tmp).map_err(StoreError::io(&tmp))?;
        file.write_all(frame)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io(&tmp))?;
        fs::rename(&tmp, &snapshot).map_err(StoreError::io(&snapshot))?;
        sync_dir(&self.dir)?;
        *installed = revision;
        Ok(())
    }

    /// A snapshot of the whole state now, in place before both logs are emptied (the caller
    /// holds the log, so nothing is appended meanwhile).
    fn compact(&self, log: &mut Log) -> Result<(), StoreError> {
        let (frame, revision) = self.snapshot_frame()?;
        self.install(&frame, revision)?;
        // From here the snapshot holds every record of both logs, so emptying them is safe.
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
        Ok(lock(&self.inner.state).kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let state = lock(&self.inner.state);
        Ok(state
            .kvs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
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

fn holds(kvs: &BTreeMap<String, Versioned>, compare: &Compare) -> bool {
    match compare {
        Compare::Version { key, version } => kvs.get(key).map_or(0, |v| v.version) == *version,
        Compare::Value { key, value } => kvs.get(key).is_some_and(|v| v.value == *value),
    }
}

/// Applies a committed batch at `revision`, returning its events.
fn apply(state: &mut State, revision: u64, ops: Vec<Op>) -> Vec<WatchEvent> {
    state.revision = revision;
    ops.into_iter()
        .filter_map(|op| match op {
            Op::Put { key, value } => {
                let version = state.kvs.get(&key).map_or(0, |v| v.version) + 1;
                let stored = Versioned {
                    value: value.clone(),
                    version,
                    mod_revision: revision,
                };
                state.kvs.insert(key.clone(), stored);
                Some(WatchEvent::Put {
                    key,
                    value,
                    mod_revision: revision,
                })
            }
            Op::Delete { key } => state.kvs.remove(&key).map(|_| WatchEvent::Delete {
                key,
                mod_revision: revision,
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
            apply(state, revision, ops);
        }
        at = next;
    }
    Ok(at as u64)
}

fn read_snapshot(path: &Path) -> Result<State, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(StoreError::io(path)(e)),
    };
    // A snapshot is renamed into place only once complete and synced: any damage is real.
    unframe(&bytes, 0)
        .filter(|&(_, end)| end == bytes.len())
        .and_then(|(payload, _)| decode_snapshot(payload))
        .map(|(revision, kvs)| State { kvs, revision })
        .ok_or_else(|| StoreError::Corrupt {
            path: path.to_owned(),
            reason: "the snapshot fails its checksum or cannot be decoded".to_owned(),
        })
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
