//! Durable state of the coordinator behind one trait, [`StateStore`]: point reads, prefix ranges,
//! writes, compare-and-set transactions and prefix watches, with etcd's data model (a global
//! store revision that every committed write advances, and per-key versions).
//!
//! Two implementations, chosen by the URL given to [`open`]:
//! - [`embedded::EmbeddedStore`] (`file:///dir` or a bare path), the default: a crash-safe
//!   write-ahead log and sorted segment files in a local directory, for one coordinator, in
//!   bounded memory whatever the state's size.
//! - [`etcd::EtcdStore`] (`etcd://host:port[,host:port...][/prefix]`): an etcd cluster, every key
//!   under an optional prefix so that several jobs can share one cluster.
//!
//! [`conformance`] holds the behaviour both must share, as a test suite run against each;
//! [`local_etcd`] starts a real local etcd for the tests that need one.
//! This module knows nothing of key formats: keys are opaque, non-empty strings here.

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod local_etcd;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

/// A stored value with its etcd-style metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Writes to this key since it was (last) created: 1 after the first put. A delete resets it;
    /// 0 means absent, which [`Compare::Version`] uses for "create if absent".
    pub version: u64,
    /// The store revision of the write that produced this value.
    pub mod_revision: u64,
}

/// A condition of a [`StateStore::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's [`Versioned::version`] equals `version`; `0` holds exactly when the key is absent.
    Version { key: String, version: u64 },
    /// The key is present and holds exactly `value` (false for an absent key, as in etcd).
    Value { key: String, value: Vec<u8> },
}

/// A write of a [`StateStore::txn`]. A transaction may name a key in at most one `Put`, and not
/// in both a `Put` and a `Delete` (etcd's rule; both stores answer [`StoreError::InvalidArgument`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// A committed change seen by a watch. The ops of one transaction share a `mod_revision` and
/// arrive in the order they were given; deleting an absent key produces no event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        mod_revision: u64,
    },
    Delete {
        key: String,
        mod_revision: u64,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key, .. } => key,
        }
    }
}

/// The receiving end of a watch: a bounded channel of events in commit order. An `Err` item is
/// the last one (the watch has ended, e.g. [`StoreError::WatchLagged`]); the stream also ends
/// when the store goes away. Dropping the receiver cancels the watch.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<WatchEvent, StoreError>>;

/// How many events a watcher may have unread before the store stops filling its channel.
pub const WATCH_CHANNEL_CAPACITY: usize = 1024;

/// Everything that can go wrong in a [`StateStore`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL given by the user cannot be used.
    #[error("invalid state store URL {url:?}: {reason} (expected file:///dir, a path, or etcd://host:port[,host:port...][/prefix])")]
    InvalidUrl { url: String, reason: String },

    /// The request itself is malformed (an empty key, a key written twice in one transaction, a
    /// request etcd rejects as too large). Retrying it unchanged will fail again.
    #[error("invalid state store request: {0}")]
    InvalidArgument(String),

    /// Another process holds the embedded store's directory.
    #[error(
        "state directory {} is in use by another coordinator (lock file {} is held); \
         stop it or choose another --state directory", .dir.display(), .lock_file.display()
    )]
    Locked { dir: PathBuf, lock_file: PathBuf },

    /// The etcd cluster cannot be reached or has no leader, or the request timed out. A write
    /// that failed this way may or may not have been applied: retry it, reading first where
    /// that matters (a transaction guarded by a version compare just fails its compare).
    #[error("etcd at {endpoints} is unavailable: {reason}")]
    Unavailable { endpoints: String, reason: String },

    /// A watcher fell too far behind and events were dropped; read the state again with
    /// [`StateStore::range`] and start a new watch.
    #[error("watch fell behind and missed events: {0}; re-read the state and watch again")]
    WatchLagged(String),

    /// A file of the embedded store could not be read, written or synced.
    #[error("state store I/O on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Stored data is damaged beyond the repairable torn tail of the log: `path` names the file,
    /// or the key whose value does not decode.
    #[error("state store data in {} is corrupt: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// The write was refused because this coordinator no longer leads (a fenced store whose
    /// election key is gone): nothing was written, and nothing this process writes will be.
    #[error("fenced: {0}")]
    Fenced(String),

    /// etcd answered with an error that is none of the above.
    #[error("etcd error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether the same request may succeed if retried later.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::WatchLagged(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// Durable coordinator state: etcd's data model, whichever store is behind it.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The key's value, or `None` if absent.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// All keys that start with `prefix` (as strings: `"job/a"` covers `"job/ab"`), in key order.
    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Writes the key; returns the store revision after the write.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;

    /// Deletes the key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Atomically: if every compare holds, apply every op (as one revision) and return
    /// `Ok(true)`; else change nothing and return `Ok(false)`.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError>;

    /// Events for keys under `prefix` that happen after the call returns, in order.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError>;
}

/// The endpoints (`http://host:port`) and key prefix of an `etcd://host:port[,...][/prefix]`
/// URL; `None` when the URL is not an etcd one.
pub fn etcd_url(url: &str) -> Option<Result<(Vec<String>, String), StoreError>> {
    let rest = url.strip_prefix("etcd://")?;
    let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if hosts.split(',').any(|h| h.trim().is_empty()) {
        return Some(Err(StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: "an etcd endpoint is empty".to_owned(),
        }));
    }
    let endpoints = hosts
        .split(',')
        .map(|h| format!("http://{}", h.trim()))
        .collect();
    Some(Ok((endpoints, prefix.trim_matches('/').to_owned())))
}

/// Opens the store a URL names: `file:///path/to/dir` or a bare path for the embedded store
/// (the directory is created if missing), `etcd://host:port[,host:port...][/prefix]` for etcd.
pub async fn open(url: &str) -> Result<Arc<dyn StateStore>, StoreError> {
    if let Some(parsed) = etcd_url(url) {
        let (endpoints, prefix) = parsed?;
        let store = etcd::EtcdStore::connect(&endpoints, &prefix).await?;
        return Ok(Arc::new(store));
    }
    let path = match url.split_once("://") {
        None => url,
        Some(("file", path)) if path.starts_with('/') => path,
        Some(("file", _)) => {
            return Err(StoreError::InvalidUrl {
                url: url.to_owned(),
                reason: "a file URL needs an absolute path (file:///dir)".to_owned(),
            })
        }
        Some((scheme, _)) => {
            return Err(StoreError::InvalidUrl {
                url: url.to_owned(),
                reason: format!("unknown scheme {scheme:?}"),
            })
        }
    };
    if path.is_empty() {
        return Err(StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: "the path is empty".to_owned(),
        });
    }
    let path = PathBuf::from(path);
    let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(path))
        .await
        .expect("opening the embedded store panicked")?;
    Ok(Arc::new(store))
}

/// Rejects a key that neither store can serve: etcd has no empty key.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("the key is empty".to_owned()));
    }
    Ok(())
}

/// Rejects what etcd rejects in a transaction: empty keys, and a key put twice or both put and
/// deleted (the order of such ops would be ambiguous).
pub(crate) fn check_txn(compares: &[Compare], ops: &[Op]) -> Result<(), StoreError> {
    for compare in compares {
        match compare {
            Compare::Version { key, .. } | Compare::Value { key, .. } => check_key(key)?,
        }
    }
    let (mut puts, mut deletes) = (HashSet::new(), HashSet::new());
    for op in ops {
        let duplicate = match op {
            Op::Put { key, .. } => {
                check_key(key)?;
                !puts.insert(key.as_str()) || deletes.contains(key.as_str())
            }
            Op::Delete { key } => {
                check_key(key)?;
                deletes.insert(key.as_str());
                puts.contains(key.as_str())
            }
        };
        if duplicate {
            return Err(StoreError::InvalidArgument(format!(
                "a transaction writes key {:?} more than once",
                op.key()
            )));
        }
    }
    Ok(())
}
