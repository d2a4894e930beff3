//! [`StateStore`] over an etcd cluster (v3 API, `etcd-client`).
//!
//! Versions and revisions are etcd's own: `version` and `mod_revision` of its key-values, and the
//! response header's revision after a put. Every key is stored under the store's prefix
//! (`<prefix>/`, from `etcd://hosts/<prefix>`), which is added and stripped here, so that
//! several jobs can share one cluster. Each request is bounded by [`REQUEST_TIMEOUT`]; one that
//! cannot reach a quorum in time fails with the retryable [`StoreError::Unavailable`].
//!
//! A store may be **fenced** ([`EtcdStore::fenced`]): each of its writes is then one etcd
//! transaction that also asks that a given key (a leader's election key) still exists with the
//! create revision it had when leadership was won. A coordinator whose leadership lapsed (its
//! election lease expired while it was paused or cut off) thus cannot write anything, however
//! late its write arrives: etcd refuses it, atomically, and the store answers
//! [`StoreError::Fenced`].

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, Event, EventType, GetOptions,
    KeyValue, KvClient, Txn, TxnOp, WatchClient, WatchOptions,
};
use tokio::sync::mpsc;
use tonic::Code;

use super::{
    check_key, check_txn, Compare, Op, StateStore, StoreError, Versioned, WatchEvent, WatchStream,
    WATCH_CHANNEL_CAPACITY,
};

/// The longest a single etcd request (or connecting) may take before it counts as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest range answer accepted from etcd (tonic's default is 4 MiB).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// The etcd-backed [`StateStore`].
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    names: Names,
    /// Every write is conditioned on this (see the module documentation).
    fence: Option<Fence>,
}

/// The condition of a fenced store's writes: `key` (a full etcd key, outside the store's
/// prefix) exists with this create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// Key prefixing and error mapping, shared with watch tasks.
#[derive(Clone)]
struct Names {
    prefix: String,
    endpoints: String,
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`), storing keys under `prefix`
    /// (none if empty), and checks with one read that it answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let names = Names {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoints: endpoints.join(","),
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), REQUEST_TIMEOUT);
        let client = match names.call(Client::connect(endpoints, Some(options))).await {
            Err(StoreError::InvalidArgument(reason)) => {
                let url = names.endpoints.clone();
                return Err(StoreError::InvalidUrl { url, reason });
            }
            client => client?,
        };
        let store = Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client.watch_client(),
            names,
            fence: None,
        };
        // The client connects lazily; a linearizable read proves a quorum answers.
        let mut kv = store.kv.clone();
        let probe = format!("{}\0", store.names.prefix);
        store.names.call(kv.get(probe, None)).await?;
        Ok(store)
    }
}

impl EtcdStore {
    /// This store with every write conditioned on `fence`.
    pub fn fenced(&self, fence: Fence) -> EtcdStore {
        EtcdStore {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// Runs `ops` (with `compares`) as one transaction, inside the fence's when there is one:
    /// whether the compares held, and the answers of the ops.
    async fn write(
        &self,
        compares: Vec<EtcdCompare>,
        ops: Vec<TxnOp>,
    ) -> Result<(bool, etcd_client::TxnResponse), StoreError> {
        let mut kv = self.kv.clone();
        let inner = Txn::new().when(compares).and_then(ops);
        let Some(fence) = &self.fence else {
            let resp = self.names.call(kv.txn(inner)).await?;
            return Ok((resp.succeeded(), resp));
        };
        let guard = EtcdCompare::create_revision(
            fence.key.clone(),
            CompareOp::Equal,
            fence.create_revision,
        );
        let outer = Txn::new()
            .when(vec![guard])
            .and_then(vec![TxnOp::txn(inner)]);
        let resp = self.names.call(kv.txn(outer)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Fenced(format!(
                "the election key {} (created at revision {}) is gone: another coordinator leads now",
                String::from_utf8_lossy(&fence.key),
                fence.create_revision
            )));
        }
        match resp.op_responses().into_iter().next() {
            Some(etcd_client::TxnOpResponse::Txn(inner)) => Ok((inner.succeeded(), inner)),
            other => Err(StoreError::Backend(format!(
                "a fenced transaction answered {other:?} instead of its inner transaction"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl StateStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let mut kv = self.kv.clone();
        let mut resp = self.names.call(kv.get(self.names.full(key), None)).await?;
        Ok(resp.take_kvs().into_iter().next().map(versioned))
    }

    async fn range(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut kv = self.kv.clone();
        // etcd answers a range in key order.
        let options = GetOptions::new().with_prefix();
        let get = kv.get(self.names.full(prefix), Some(options));
        let mut resp = self.names.call(get).await?;
        resp.take_kvs()
            .into_iter()
            .map(|kv| Ok((self.names.key(&kv)?, versioned(kv))))
            .collect()
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let (_, resp) = self
            .write(vec![], vec![TxnOp::put(self.names.full(key), value, None)])
            .await?;
        resp.header()
            .map(|h| revision(h.revision()))
            .ok_or_else(|| StoreError::Backend("a put answer without a header".to_owned()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let (_, resp) = self
            .write(vec![], vec![TxnOp::delete(self.names.full(key), None)])
            .await?;
        Ok(resp.op_responses().into_iter().any(|r| match r {
            etcd_client::TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        }))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        check_txn(&compares, &ops)?;
        let full = |key: &str| self.names.full(key);
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| match c {
                Compare::Version { key, version } => {
                    let version = i64::try_from(*version).unwrap_or(i64::MAX);
                    EtcdCompare::version(full(key), CompareOp::Equal, version)
                }
                Compare::Value { key, value } => {
                    EtcdCompare::value(full(key), CompareOp::Equal, value.clone())
                }
            })
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(full(&key), value, None),
                Op::Delete { key } => TxnOp::delete(full(&key), None),
            })
            .collect();
        Ok(self.write(when, then).await?.0)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let mut client = self.watch.clone();
        let options = WatchOptions::new().with_prefix();
        let names = &self.names;
        let mut stream = names
            .call(client.watch(names.full(prefix), Some(options)))
            .await?;
        // etcd delivers every event after the revision at which it confirms the watch.
        match names.call(stream.message()).await? {
            Some(resp) if resp.created() && !resp.canceled() => {}
            other => {
                let reason = format!("etcd did not create the watch: {other:?}");
                return Err(StoreError::Backend(reason));
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let names = names.clone();
        // Ends when the receiver is dropped or the etcd stream ends or fails; dropping `stream`
        // closes the gRPC stream, which cancels the watch in etcd.
        tokio::spawn(async move {
            let end = loop {
                let message = tokio::select! {
                    () = tx.closed() => return,
                    message = stream.message() => message,
                };
                let resp = match message {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break names.unavailable("etcd closed the watch stream".to_owned()),
                    Err(e) => break names.error(e),
                };
                if resp.canceled() {
                    break StoreError::WatchLagged(format!(
                        "etcd canceled the watch (compacted at revision {}): {}",
                        resp.compact_revision(),
                        resp.cancel_reason()
                    ));
                }
                for event in resp.events() {
                    let event = names.event(event);
                    let failed = event.is_err();
                    if tx.send(event).await.is_err() || failed {
                        return;
                    }
                }
            };
            let _ = tx.send(Err(end)).await;
        });
        Ok(rx)
    }
}

impl Names {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The key of an etcd key-value, without this store's prefix.
    fn key(&self, kv: &KeyValue) -> Result<String, StoreError> {
        kv.key_str()
            .ok()
            .and_then(|k| k.strip_prefix(&self.prefix))
            .map(str::to_owned)
            .ok_or_else(|| {
                let key = String::from_utf8_lossy(kv.key());
                StoreError::Backend(format!("etcd returned an unexpected key {key:?}"))
            })
    }

    fn event(&self, event: &Event) -> Result<WatchEvent, StoreError> {
        let kv = event
            .kv()
            .ok_or_else(|| StoreError::Backend("a watch event without a key".to_owned()))?;
        let (key, mod_revision) = (self.key(kv)?, revision(kv.mod_revision()));
        Ok(match event.event_type() {
            EventType::Put => WatchEvent::Put {
                key,
                value: kv.value().to_vec(),
                mod_revision,
            },
            EventType::Delete => WatchEvent::Delete { key, mod_revision },
        })
    }

    /// Runs one request under [`REQUEST_TIMEOUT`], mapping its errors.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(self.unavailable(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    fn error(&self, err: etcd_client::Error) -> StoreError {
        store_error(&self.endpoints, err)
    }

    fn unavailable(&self, reason: String) -> StoreError {
        unavailable(&self.endpoints, reason)
    }
}

/// etcd's error as a [`StoreError`]: [`StoreError::Unavailable`] (retryable) where the request's
/// fate is unknown or etcd could not serve it, otherwise what etcd refused.
pub(crate) fn store_error(endpoints: &str, err: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match err {
        E::TransportError(_) | E::IoError(_) => {
            let text = with_causes(err.to_string(), std::error::Error::source(&err));
            unavailable(endpoints, text)
        }
        E::GRpcStatus(status) => match status.code() {
            // etcd's "no leader", "leader changed", "request timed out", and lost
            // connections. A connection that breaks with a request in flight comes back
            // from the client as `Unknown` ("transport error", a broken pipe) or
            // `Internal` ("h2 protocol error"): not etcd's answer, so the request's fate is
            // unknown, as with `Unavailable`. (etcd itself answers with neither code for a
            // request it refuses.)
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal => unavailable(endpoints, describe_status(&status)),
            Code::InvalidArgument | Code::OutOfRange => {
                StoreError::InvalidArgument(status.message().to_owned())
            }
            _ => StoreError::Backend(status.to_string()),
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::EndpointError(_) => {
            StoreError::InvalidArgument(err.to_string())
        }
        _ => StoreError::Backend(err.to_string()),
    }
}

fn unavailable(endpoints: &str, reason: String) -> StoreError {
    StoreError::Unavailable {
        endpoints: endpoints.to_owned(),
        reason,
    }
}

/// A status's message with the errors that caused it ("transport error: broken pipe").
fn describe_status(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_owned(),
        std::error::Error::source(status),
    )
}

/// `text` followed by each error of the chain from `source`, each said once: the layers of
/// hyper, tonic and the etcd client often repeat their cause's text as their own.
fn with_causes(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = source {
        let cause = e.to_string();
        if !cause.is_empty() && !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
        source = e.source();
    }
    text
}

fn versioned(kv: KeyValue) -> Versioned {
    let (version, mod_revision) = (revision(kv.version()), revision(kv.mod_revision()));
    Versioned {
        value: kv.into_key_value().1,
        version,
        mod_revision,
    }
}

/// etcd's counters are non-negative `i64`s.
fn revision(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            prefix: String::new(),
            endpoints: "http://127.0.0.1:2379".into(),
        }
    }

    /// A connection broken with a request in flight is an outage to wait out, however the
    /// client library words it; what etcd itself refuses is not.
    #[test]
    fn broken_connections_are_outages_and_refusals_are_not() {
        let broken = std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "stream closed because of a broken pipe",
        );
        let transport = tonic::Status::from_error(Box::new(broken));
        assert_eq!(transport.code(), Code::Unknown);
        for status in [
            transport,
            tonic::Status::internal("h2 protocol error: error reading a body from connection"),
            tonic::Status::unavailable("etcdserver: no leader"),
            tonic::Status::deadline_exceeded("context deadline exceeded"),
        ] {
            let e = names().error(etcd_client::Error::GRpcStatus(status));
            assert!(e.retryable(), "{e}");
        }
        let e = names().error(etcd_client::Error::GRpcStatus(tonic::Status::from_error(
            Box::new(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "broken pipe",
            )),
        )));
        assert!(e.to_string().contains("broken pipe"), "{e}");
        for status in [
            tonic::Status::invalid_argument("etcdserver: request is too large"),
            tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
            tonic::Status::permission_denied("etcdserver: permission denied"),
            tonic::Status::data_loss("etcdserver: corrupt cluster"),
        ] {
            let e = names().error(etcd_client::Error::GRpcStatus(status));
            assert!(!e.retryable(), "{e}");
        }
    }
}
