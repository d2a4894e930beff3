//! Several coordinator replicas for one job (`--ha`, on etcd): one leads, the others stand by.
//!
//! Every replica holds an etcd lease (`--election-ttl` seconds, renewed at a third of it) and
//! campaigns in the job's election (etcd's election API: a key under the election name per
//! candidate, bound to its lease, whose value is the replica's URL; the oldest key leads). The
//! leader runs the driver over a store **fenced** on its election key
//! ([`EtcdStore::fenced`]): once its lease lapses (the process was paused, cut off from etcd,
//! or killed) the key is deleted, a standby's campaign returns, and any write the old leader
//! still makes is refused by etcd. A leader that cannot renew its lease within the TTL, or
//! whose write is fenced, steps down: it stops talking to workers and exits, to be restarted
//! as a standby.
//!
//! Standbys answer every RPC with `Unavailable` and the leader's URL in the
//! [`LEADER_METADATA`](stagecoach_proto::LEADER_METADATA) metadata; workers and the CLI follow
//! it. [`Candidates`] is what every replica knows of the others, read from the election's keys.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, SortOrder, SortTarget};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::etcd::{store_error, Fence, REQUEST_TIMEOUT};
use crate::store::StoreError;

/// The replicas of the job as the election shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// The URL of the replica that leads (the oldest candidate), if any.
    pub leader: Option<String>,
    /// The others, oldest first.
    pub standbys: Vec<String>,
}

/// This replica's part in the election: its lease (kept alive by a task) and its URL.
pub struct Election {
    client: Client,
    /// The etcd endpoints, for errors.
    endpoints: String,
    name: String,
    advertise: String,
    lease: i64,
    ttl: Duration,
    /// `Some(reason)` once the lease could not be renewed in time: leadership is lost.
    lost: watch::Receiver<Option<String>>,
    candidates: watch::Receiver<Candidates>,
    _keepalive: AbortOnDrop,
    _watcher: AbortOnDrop,
}

/// What winning the election gives: the fence every write of the leader carries.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub fence: Fence,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unavailable(endpoints: &[String], what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        endpoints: endpoints.join(","),
        reason: format!("{what}: {e}"),
    }
}

/// The election's name for `job` under the store's key `prefix` (see `keys.rs`).
pub fn election_name(prefix: &str, job: &str) -> String {
    let key = crate::keys::election(job);
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}/{key}")
    }
}

/// How long a replica keeps campaigning again after errors in a row before it gives up.
const CAMPAIGN_RETRIES: Duration = Duration::from_secs(30);

/// A campaign etcd held this long before it failed had been taken up: its error starts a new
/// run of errors rather than continuing the last one. Longer than any attempt that fails to
/// reach etcd takes (connecting and every request are bounded by [`REQUEST_TIMEOUT`]).
const CAMPAIGN_HELD: Duration = Duration::from_secs(2 * REQUEST_TIMEOUT.as_secs());

/// The errors of a campaign in a row, to give up on after [`CAMPAIGN_RETRIES`].
///
/// A standby campaigns for as long as another replica leads, which can be days; an etcd member
/// lost in that time cuts its campaign short, and so can the next one, a day later. Only errors
/// that follow each other without a campaign held in between count together.
#[derive(Debug, Default)]
struct CampaignErrors {
    since: Option<std::time::Instant>,
}

impl CampaignErrors {
    /// An attempt begun at `began` failed at `now`: how long errors have followed each other
    /// (from the first one's), or `None` while that is within [`CAMPAIGN_RETRIES`].
    fn failed(&mut self, began: std::time::Instant, now: std::time::Instant) -> Option<Duration> {
        if now.saturating_duration_since(began) >= CAMPAIGN_HELD {
            self.since = None;
        }
        let since = *self.since.get_or_insert(now);
        let failing = now.saturating_duration_since(since);
        (failing > CAMPAIGN_RETRIES).then_some(failing)
    }
}

impl Election {
    /// Joins the election of `job` at `endpoints` as `advertise` (the URL clients reach this
    /// replica at), with a lease of `ttl`. Returns before leadership: [`Election::campaign`]
    /// waits for it.
    pub async fn join(
        endpoints: &[String],
        prefix: &str,
        job: &str,
        advertise: &str,
        ttl: Duration,
    ) -> Result<Election, StoreError> {
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        // No per-request timeout on this client: a campaign waits as long as another leads.
        // Every other call is bounded here.
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT);
        let timed_out = |what: &str| StoreError::Unavailable {
            endpoints: endpoints.join(","),
            reason: format!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()),
        };
        let mut client =
            tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
                .map_err(|_| timed_out("connecting for the election"))?
                .map_err(|e| unavailable(endpoints, "connecting for the election", e))?;
        let lease = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(secs, None))
            .await
            .map_err(|_| timed_out("granting the election lease"))?
            .map_err(|e| unavailable(endpoints, "granting the election lease", e))?
            .id();
        let (keeper, stream) =
            tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease))
                .await
                .map_err(|_| timed_out("keeping the election lease alive"))?
                .map_err(|e| unavailable(endpoints, "keeping the election lease alive", e))?;
        let (lost_tx, lost) = watch::channel(None);
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            keeper,
            stream,
            ttl,
            lost_tx,
        ));
        let name = election_name(prefix, job);
        let (cand_tx, candidates) = watch::channel(Candidates::default());
        let watcher = tokio::spawn(watch_candidates(client.clone(), name.clone(), cand_tx));
        info!(%name, lease = format!("{lease:x}"), ttl_s = secs, %advertise, "joined the election");
        Ok(Election {
            client,
            endpoints: endpoints.join(","),
            name,
            advertise: advertise.to_owned(),
            lease,
            ttl,
            lost,
            candidates,
            _keepalive: AbortOnDrop(keepalive),
            _watcher: AbortOnDrop(watcher),
        })
    }

    /// The replicas as last read from the election (refreshed every second).
    pub fn candidates(&self) -> watch::Receiver<Candidates> {
        self.candidates.clone()
    }

    /// Resolves with the reason once this replica's lease could not be renewed in time.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }

    /// Waits until this replica leads. Fails if its lease is lost first; a campaign cut short
    /// by etcd (a member gone, a connection broken) is taken up again with the same lease,
    /// which etcd counts as the same candidate.
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        let mut election = self.client.election_client();
        let mut lost = self.lost.clone();
        let mut errors = CampaignErrors::default();
        let won = loop {
            let began = std::time::Instant::now();
            let attempt = tokio::select! {
                won = election.campaign(self.name.clone(), self.advertise.clone(), self.lease) => won,
                reason = lost.wait_for(Option::is_some) => {
                    let reason = reason.map(|r| r.clone().unwrap_or_default()).unwrap_or_default();
                    return Err(StoreError::Fenced(format!("the election lease was lost while campaigning: {reason}")));
                }
            };
            match attempt {
                Ok(won) => break won,
                Err(e) if lease_gone(&e) => {
                    return Err(StoreError::Fenced(format!(
                        "the election lease was lost while campaigning: etcd says it is gone: {e}"
                    )));
                }
                Err(e) => {
                    // Classified as every other etcd request is: what etcd refused ends the
                    // campaign at once; an outage is retried.
                    let e = store_error(&self.endpoints, e);
                    let StoreError::Unavailable { reason, .. } = &e else {
                        return Err(e);
                    };
                    if let Some(failing) = errors.failed(began, std::time::Instant::now()) {
                        return Err(StoreError::Unavailable {
                            endpoints: self.endpoints.clone(),
                            reason: format!(
                                "campaigning in the election {} failed again and again for {:.0} s; the last error: {reason}",
                                self.name,
                                failing.as_secs_f64()
                            ),
                        });
                    }
                    warn!(error = %e, "campaigning was cut short; campaigning again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let key = won.leader().ok_or_else(|| {
            StoreError::Backend("etcd's campaign answer names no leader key".into())
        })?;
        info!(key = %String::from_utf8_lossy(key.key()), revision = key.rev(), "elected: this coordinator leads the job");
        Ok(Leadership {
            fence: Fence {
                key: key.key().to_vec(),
                create_revision: key.rev(),
            },
        })
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Gives the lease up (its keys go at once): a replica that stops cleanly hands over
    /// without the others waiting for the TTL.
    pub async fn resign(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.lease_revoke(self.lease))
            .await;
    }
}

/// Renews the lease every third of `ttl`; reports it lost when etcd says the lease is gone, or
/// when no renewal succeeded for [`LOST_AFTER_TTLS`] × `ttl`. A keep-alive stream that breaks
/// (the etcd member it went to died) is opened again, through the client's other endpoints.
///
/// Not renewing for one TTL does not mean the lease expired: while etcd elects a new raft
/// leader (a member died) nothing is renewed and nothing expires, and the new raft leader
/// gives every lease its whole TTL again. Safety never rests on this judgement: every write of
/// a leader is fenced on its election key, which goes with the lease.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let mut renewed = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut channel = Some((keeper, stream));
    loop {
        tick.tick().await;
        // Until renewed or the next tick is due: a client spreads requests over etcd's members,
        // so an attempt that went to a dead one is followed by one that goes elsewhere.
        let deadline = tokio::time::Instant::now() + every;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if channel.is_none() {
                match tokio::time::timeout(left, client.lease_keep_alive(lease)).await {
                    Ok(Ok(c)) => channel = Some(c),
                    Ok(Err(e)) if lease_gone(&e) => {
                        let _ =
                            lost.send(Some(format!("etcd says the election lease is gone: {e}")));
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot reopen the election lease's keep-alive")
                    }
                    Err(_) => warn!("no answer to reopening the election lease's keep-alive"),
                }
            }
            if let Some((keeper, stream)) = channel.as_mut() {
                let attempt = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(left.max(Duration::from_millis(50)), attempt).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        renewed = tokio::time::Instant::now();
                        break;
                    }
                    Ok(Ok(Some(_))) => {
                        let _ = lost.send(Some("etcd says the election lease has expired".into()));
                        return;
                    }
                    Ok(Ok(None)) => {
                        warn!("the election lease's keep-alive stream ended; opening it again");
                        channel = None;
                    }
                    Ok(Err(e)) if lease_gone(&e) => {
                        let _ =
                            lost.send(Some(format!("etcd says the election lease is gone: {e}")));
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot renew the election lease; opening its keep-alive again");
                        channel = None;
                    }
                    Err(_) => warn!("no answer to renewing the election lease"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if renewed.elapsed() >= ttl * LOST_AFTER_TTLS {
            let _ = lost.send(Some(format!(
                "the election lease could not be renewed for {:.1} s ({LOST_AFTER_TTLS} times its TTL)",
                renewed.elapsed().as_secs_f64()
            )));
            return;
        }
    }
}

/// How many TTLs without a renewal make a replica give its lease up for lost.
const LOST_AFTER_TTLS: u32 = 3;

/// Whether etcd answered that the lease does not exist (it expired, or was revoked).
fn lease_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}

/// Reads the election's candidates every second.
async fn watch_candidates(mut client: Client, name: String, out: watch::Sender<Candidates>) {
    let prefix = format!("{name}/");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader: Option<String> = None;
    loop {
        tick.tick().await;
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let read = tokio::time::timeout(REQUEST_TIMEOUT, client.get(prefix.clone(), Some(options)));
        let Ok(Ok(resp)) = read.await else {
            continue;
        };
        let mut urls = resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let now = Candidates {
            leader: urls.next(),
            standbys: urls.collect(),
        };
        if now.leader != last_leader {
            if last_leader.is_some() || now.leader.is_some() {
                info!(
                    leader = now.leader.as_deref().unwrap_or("none"),
                    "the job's leader is now"
                );
                crate::metrics::leader_changed();
            }
            last_leader = now.leader.clone();
        }
        out.send_if_modified(|c| {
            let changed = *c != now;
            *c = now;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{CampaignErrors, CAMPAIGN_HELD, CAMPAIGN_RETRIES};

    const MS: Duration = Duration::from_millis(1);

    /// Attempts failing one after another, each `lasting` long with a 250 ms pause between:
    /// after how long (from the first attempt's start) the replica gives up, if within `limit`.
    fn gives_up_after(lasting: Duration, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut errors = CampaignErrors::default();
        let mut began = start;
        while began - start < limit {
            let failed = began + lasting;
            if errors.failed(began, failed).is_some() {
                return Some(failed - start);
            }
            began = failed + 250 * MS;
        }
        None
    }

    #[test]
    fn errors_in_a_row_are_given_up_on_after_the_retry_budget() {
        // Refused at once, or after a connect timeout: given up just past the budget.
        for lasting in [MS, 5_000 * MS] {
            let after = gives_up_after(lasting, 10 * CAMPAIGN_RETRIES).expect("given up");
            assert!(
                after > CAMPAIGN_RETRIES && after <= CAMPAIGN_RETRIES + 2 * (lasting + 250 * MS),
                "attempts of {lasting:?}: given up after {after:?}"
            );
        }
    }

    #[test]
    fn a_campaign_held_before_its_error_starts_the_count_again() {
        // A standby waits 40 s, loses its campaign to an etcd member's death, campaigns again
        // at once, waits 40 s more and loses it to another: it campaigns a third time.
        let start = Instant::now();
        let mut errors = CampaignErrors::default();
        assert_eq!(errors.failed(start, start + 40_000 * MS), None);
        let again = start + 40_250 * MS;
        assert_eq!(errors.failed(again, again + 40_000 * MS), None);
        // Campaigns held for long between errors never add up to giving up.
        assert_eq!(gives_up_after(CAMPAIGN_HELD, 100 * CAMPAIGN_RETRIES), None);
        // A short error after a long campaign starts a new run: the budget counts from it.
        let third = again + 40_250 * MS;
        assert_eq!(errors.failed(third, third + MS), None);
        let late = third + CAMPAIGN_RETRIES + 10 * MS;
        assert!(errors.failed(late, late + MS).is_some());
    }
}
