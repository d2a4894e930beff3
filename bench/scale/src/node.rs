//! One simulated node, one task (`--node-client direct`): it registers its ranks and holds
//! one `NodeSession` for them, sending what a node agent's relay (`stagecoach_proto::relay`)
//! sends when its ranks agree: the ranks' Hellos together, one `NodeStepDone` per step (the
//! node's reports summed, as [`crate::rank`] would report them one by one), the other
//! answers per rank in one `NodeUp`, and the ranks' heartbeats riding along with the next
//! message up or, when nothing went up for a heartbeat period, alone.
//!
//! Against `--node-client relay` (a task per rank behind a real relay) the coordinator reads
//! the same messages; the load generator saves the rank tasks and the relay's batching, so
//! that on a small machine more of it is left to the coordinator.
//!
//! A rank's session that the coordinator ends (`SessionEnd`) ends the node's: all its ranks
//! register again, after [`crate::rank::RETRY`].

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use stagecoach_proto::v1;
use stagecoach_proto::v1::workers_client::WorkersClient;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::rank::{self, Link, RankLog, Shared};

/// How a node session ended.
enum End {
    JobOver,
    Stopped,
    Lost,
}

/// Runs the node of ranks `ranks` until the job ends or `stop` is set. Its log holds a `Work`
/// entry per rank (each rank's arrival is the node's) and a `StepDone` entry per node.
pub async fn run(
    ranks: std::ops::Range<usize>,
    shared: Arc<Shared>,
    channel: Channel,
    mut stop: watch::Receiver<bool>,
) -> RankLog {
    let mut log = RankLog::default();
    let mut client = WorkersClient::with_interceptor(channel, Default::default());
    let n = ranks.len();
    let mut first = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let joined = tokio::select! {
            j = register_all(ranks.clone(), &shared, &mut client) => j,
            () = rank::stopped(&mut stop) => break,
        };
        let end = match joined {
            Ok(Some(links)) => {
                if first {
                    shared.counts.registered.fetch_add(n, Ordering::Relaxed);
                    first = false;
                }
                match open(&links, &mut client).await {
                    Ok((inbound, out)) => {
                        shared.counts.attached.fetch_add(n, Ordering::Relaxed);
                        let end = session(&shared, &links, inbound, out, &mut stop, &mut log).await;
                        shared.counts.attached.fetch_sub(n, Ordering::Relaxed);
                        end
                    }
                    Err(status) => {
                        let c = &shared.counts;
                        c.broke(&c.join_errors, || {
                            format!("opening the node session: {}", rank::describe(&status))
                        });
                        End::Lost
                    }
                }
            }
            Ok(None) => End::JobOver,
            Err(status) => {
                let c = &shared.counts;
                c.broke(&c.join_errors, || {
                    format!("joining: {}", rank::describe(&status))
                });
                End::Lost
            }
        };
        match end {
            End::JobOver => {
                shared.counts.job_over.fetch_add(n, Ordering::Relaxed);
                break;
            }
            End::Stopped => break,
            End::Lost => {}
        }
        tokio::select! {
            () = tokio::time::sleep(rank::RETRY) => {}
            () = rank::stopped(&mut stop) => break,
        }
    }
    log
}

/// Registers every rank of the node, one [`Shared::joining`] permit per registration. `None`
/// when the coordinator says the job is over.
async fn register_all(
    ranks: std::ops::Range<usize>,
    shared: &Shared,
    client: &mut WorkersClient<stagecoach_proto::connect::AuthedChannel>,
) -> Result<Option<Vec<Link>>, tonic::Status> {
    let mut links = Vec::with_capacity(ranks.len());
    for index in ranks {
        let _permit = shared.joining.acquire().await.expect("never closed");
        match rank::register(index, shared, client).await? {
            Some(link) => links.push(link),
            None => return Ok(None),
        }
    }
    Ok(Some(links))
}

fn up(worker: &Link, kind: v1::worker_message::Kind) -> v1::WorkerMessage {
    v1::WorkerMessage {
        worker_id: worker.worker_id.clone(),
        kind: Some(kind),
    }
}

/// Opens the node session with every rank's Hello in its first message.
async fn open(
    links: &[Link],
    client: &mut WorkersClient<stagecoach_proto::connect::AuthedChannel>,
) -> Result<(tonic::Streaming<v1::NodeDown>, mpsc::Sender<v1::NodeUp>), tonic::Status> {
    let (out, out_rx) = mpsc::channel(rank::OUTBOUND);
    let hellos = links
        .iter()
        .map(|l| up(l, v1::worker_message::Kind::Hello(v1::Hello {})))
        .collect();
    // The receiver is ours until the call takes it: this cannot wait or fail.
    let _ = out.try_send(v1::NodeUp {
        messages: hellos,
        closed: vec![],
        combined: true,
    });
    let inbound = client
        .node_session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    Ok((inbound, out))
}

/// The world the node's ranks are in, and which of them got work in it yet.
struct InWorld {
    world: v1::World,
    got_work: HashSet<String>,
}

impl InWorld {
    /// Counts the first `Work` of `workers` in this world (those not counted yet).
    fn worked<'a>(&mut self, shared: &Shared, workers: impl Iterator<Item = &'a str>, at: Instant) {
        let mut first = 0;
        for w in workers {
            if !self.got_work.contains(w) {
                self.got_work.insert(w.to_string());
                first += 1;
            }
        }
        if first > 0 {
            shared.first_work(&self.world, at, first);
        }
    }
}

/// One node session: an answer to every message, heartbeats, until it ends.
async fn session(
    shared: &Shared,
    links: &[Link],
    mut inbound: tonic::Streaming<v1::NodeDown>,
    out: mpsc::Sender<v1::NodeUp>,
    stop: &mut watch::Receiver<bool>,
    log: &mut RankLog,
) -> End {
    use v1::coordinator_message::Kind;
    use v1::node_message::Kind as Node;
    use v1::worker_message::Kind as Up;
    let by_id: std::collections::HashMap<&str, &Link> =
        links.iter().map(|l| (l.worker_id.as_str(), l)).collect();
    // The heartbeat of the node's ranks; each waits at most one period (no more than the
    // relay's `hold` lets it) for a message to go up with.
    let period = links.iter().map(|l| l.heartbeat.min(l.hold)).min();
    let mut beat = tokio::time::interval(period.unwrap_or(rank::RETRY));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let mut beats_due = false;
    let mut world: Option<InWorld> = None;
    let stopped = rank::stopped(stop);
    tokio::pin!(stopped);
    loop {
        let down = tokio::select! {
            m = inbound.message() => m,
            _ = beat.tick() => {
                if beats_due && !send(shared, &out, links, &mut beats_due, vec![]).await {
                    return End::Lost;
                }
                beats_due = true;
                continue;
            }
            () = &mut stopped => return End::Stopped,
        };
        let arrived = Instant::now();
        let down = match down {
            Ok(Some(d)) => d,
            Ok(None) => {
                let c = &shared.counts;
                c.broke(&c.sessions_broken, || {
                    "the coordinator closed the node session".into()
                });
                return End::Lost;
            }
            Err(status) => {
                let c = &shared.counts;
                c.broke(&c.sessions_broken, || {
                    format!("node session: {}", rank::describe(&status))
                });
                return End::Lost;
            }
        };
        let mut replies = Vec::new();
        for m in down.messages {
            match m.kind {
                Some(Node::Work(node_work)) => {
                    let Some(work) = node_work.work else {
                        let c = &shared.counts;
                        c.broke(&c.sessions_broken, || "a NodeWork without its Work".into());
                        return End::Lost;
                    };
                    let Some(first) = node_work
                        .workers
                        .first()
                        .and_then(|w| by_id.get(w.as_str()))
                    else {
                        let c = &shared.counts;
                        c.broke(&c.sessions_broken, || {
                            format!(
                                "a NodeWork for workers not on this node: {:?}",
                                node_work.workers
                            )
                        });
                        return End::Lost;
                    };
                    let at = shared.ns(arrived);
                    for _ in &node_work.workers {
                        log.work.push((work.generation, work.step, at));
                    }
                    shared.max_work_step.fetch_max(work.step, Ordering::Relaxed);
                    if let Some(w) = world
                        .as_mut()
                        .filter(|w| w.world.generation == work.generation)
                    {
                        w.worked(
                            shared,
                            node_work.workers.iter().map(String::as_str),
                            arrived,
                        );
                    }
                    let samples: u32 = node_work.samples.iter().sum();
                    log.done
                        .push((work.generation, work.step, shared.ns(Instant::now())));
                    replies.push(up(
                        first,
                        Up::NodeStepDone(v1::NodeStepDone {
                            done: Some(rank::step_done(&work, samples)),
                            also: node_work.workers[1..].to_vec(),
                        }),
                    ));
                }
                Some(Node::Ended(end)) => {
                    let c = &shared.counts;
                    let counter = if end.code == tonic::Code::NotFound as i32 {
                        &c.leases_lost
                    } else {
                        &c.sessions_broken
                    };
                    c.broke(counter, || {
                        format!("{}'s session ended: {}", m.worker_id, end.message)
                    });
                    return End::Lost;
                }
                Some(Node::Message(message)) => {
                    let Some(&link) = by_id.get(m.worker_id.as_str()) else {
                        let c = &shared.counts;
                        c.broke(&c.sessions_broken, || {
                            format!("a message for {}, not on this node", m.worker_id)
                        });
                        return End::Lost;
                    };
                    let reply = match message.kind {
                        Some(Kind::World(w)) => {
                            shared.counts.worlds.fetch_add(1, Ordering::Relaxed);
                            shared.counts.readies.fetch_add(1, Ordering::Relaxed);
                            let step = w.restore.as_ref().map_or(w.start_step, |r| r.step);
                            let ready = rank::ready(link, w.generation, step);
                            if world.as_ref().map(|x| x.world.generation) != Some(w.generation) {
                                world = Some(InWorld {
                                    world: w,
                                    got_work: HashSet::new(),
                                });
                            }
                            Some(ready)
                        }
                        Some(Kind::SyncState(s)) => {
                            shared.counts.syncs.fetch_add(1, Ordering::Relaxed);
                            Some(rank::ready(link, s.generation, s.step))
                        }
                        Some(Kind::Work(work)) => {
                            log.work
                                .push((work.generation, work.step, shared.ns(arrived)));
                            shared.max_work_step.fetch_max(work.step, Ordering::Relaxed);
                            if let Some(w) = world
                                .as_mut()
                                .filter(|w| w.world.generation == work.generation)
                            {
                                w.worked(shared, std::iter::once(link.worker_id.as_str()), arrived);
                            }
                            log.done
                                .push((work.generation, work.step, shared.ns(Instant::now())));
                            Some(Up::StepDone(rank::step_done(
                                &work,
                                work.samples.len() as u32,
                            )))
                        }
                        Some(Kind::Evaluate(e)) => Some(rank::eval_done(shared, &e)),
                        Some(Kind::SaveCheckpoint(s)) => Some(rank::not_saved(shared, s)),
                        Some(Kind::Stop(s)) => match s.reason() {
                            v1::StopReason::GenerationEnded => {
                                shared.counts.stops.fetch_add(1, Ordering::Relaxed);
                                world = None;
                                None
                            }
                            _ => return End::JobOver,
                        },
                        None => None,
                    };
                    if let Some(kind) = reply {
                        replies.push(up(link, kind));
                    }
                }
                None => {}
            }
        }
        if !replies.is_empty() && !send(shared, &out, links, &mut beats_due, replies).await {
            return End::Lost;
        }
    }
}

/// Sends `messages` up in one `NodeUp`, with every rank's heartbeat when they are due. False
/// when the node session's outbound side is gone.
async fn send(
    shared: &Shared,
    out: &mpsc::Sender<v1::NodeUp>,
    links: &[Link],
    beats_due: &mut bool,
    mut messages: Vec<v1::WorkerMessage>,
) -> bool {
    if *beats_due {
        messages.extend(
            links
                .iter()
                .map(|l| up(l, v1::worker_message::Kind::Heartbeat(v1::Heartbeat {}))),
        );
        *beats_due = false;
    }
    let sent = out
        .send(v1::NodeUp {
            messages,
            closed: vec![],
            combined: true,
        })
        .await
        .is_ok();
    if !sent {
        let c = &shared.counts;
        c.broke(&c.sessions_broken, || {
            "the node session's outbound stream closed".into()
        });
    }
    sent
}
