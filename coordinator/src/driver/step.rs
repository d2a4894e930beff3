//! Stepping: what comes next in a running world, the ranks' step reports, and committing a
//! finished step to the ledger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stagecoach_core::curriculum::StepPlan;
use stagecoach_core::plan::{rank_slice, SampleId};
use stagecoach_core::spike::Detector;
use stagecoach_proto::v1;
use tokio::time::Instant;
use tracing::{info, warn};

use super::membership::Outbox;
use super::persist::Write;
use super::{refs, send, Driver, Error, Members};

impl Driver {
    /// What comes next in a running world: nothing while a step, an evaluation or a store write
    /// is pending or the job is paused; else an evaluation (asked for, or at a stage's end), the
    /// checkpoint of a stage's end, a stage change, the next step, or the end of the job.
    pub(super) async fn dispatch(&mut self) {
        let Some(world) = self.world.as_ref() else {
            return;
        };
        if !world.running
            || world.in_flight.is_some()
            || world.eval.is_some()
            || !self.pending.is_empty()
        {
            return;
        }
        let Some(c) = self.curriculum.as_ref() else {
            return;
        };
        let (finished, due) = (c.finished(), c.due());
        let at_boundary = finished
            || due
                .as_ref()
                .is_some_and(|d| d.cause != v1::TransitionCause::MixChange);
        let stage_name = c.current_spec().name.clone();
        let evaluated_here = self.last_eval_step == Some(self.step);
        if self.job.eval_samples > 0 && !evaluated_here {
            if at_boundary {
                let trigger = if self.eval_wanted.is_some() {
                    "stage end, on demand"
                } else {
                    "stage end"
                };
                return self.start_eval(trigger);
            }
            if self.eval_wanted.is_some() {
                return self.start_eval("on demand");
            }
        }
        // Every stage's end and the last step are checkpointed (the state just evaluated), so
        // each can be exported; the job ends once the last one is written.
        if at_boundary && self.boundary_checkpoint(finished, &stage_name) {
            return;
        }
        if finished {
            return self.finish();
        }
        if let Some(who) = &self.paused {
            if self.state != v1::JobState::Paused {
                info!(step = self.step, by = %who, "paused");
            }
            self.state = v1::JobState::Paused;
            if !self.held {
                self.detail = format!("paused by {who} after step {}", self.step);
            }
            return;
        }
        if self.checkpoint_due() {
            self.start_checkpoint(None);
        }
        if let Some(skip) = self.skip.filter(|s| s.at == self.step) {
            self.skip = None;
            if !self.skip_range(skip).await {
                return;
            }
        }
        if let Some(change) = due {
            let c = self.curriculum.as_mut().expect("checked");
            match c.apply(change) {
                Ok(t) => {
                    info!(step = t.step, from = %t.from, to = %t.to, cause = ?t.cause(), by = %t.requested_by, detail = %t.detail, "stage transition");
                    // A new mixture, sequence length or RoPE θ moves the loss for good reasons.
                    if let Some(d) = self.detector.as_mut() {
                        d.level_changed(t.step);
                    }
                    if let Some(m) = &self.metrics {
                        m.stage_changed(&t.to, c.current() as u32);
                        m.transition(t.cause());
                    }
                }
                Err(e) => return self.fail(format!("stage transition: {e}")),
            }
            if !self.save_record().await {
                return;
            }
        }
        let c = self.curriculum.as_mut().expect("checked");
        let mut plan = c.plan_step();
        if let Some((factor, until)) = self.lr_scale {
            if plan.step < until {
                plan.lr *= factor;
            } else {
                self.lr_scale = None;
            }
        }
        self.lr = plan.lr;
        let guard = self
            .detector
            .as_ref()
            .map_or_else(v1::StepGuard::default, Detector::guard);
        let world = self.world.as_mut().expect("checked");
        let header = v1::Work {
            generation: world.generation,
            step: plan.step,
            samples: vec![],
            lr: plan.lr,
            global_batch: plan.global_batch,
            stage: Some(plan.stage),
            guard: Some(guard),
        };
        let routes = Routes::current(
            world.routes.take(),
            self.roster.version,
            &self.members,
            &world.members,
        );
        send_work(
            &self.members,
            &routes,
            &world.members,
            &header,
            &plan.samples,
        );
        world.routes = Some(routes);
        world.in_flight = Some((plan, Reports::new(world.members.len())));
        world.dispatched_at = Some(Instant::now());
    }

    /// The step reports of `workers` (one, or several of a node's in one `NodeStepDone`):
    /// `done.samples` and `done.loss_sum` are their sums, the rest what each reported.
    pub(super) async fn step_done(
        &mut self,
        workers: &[&str],
        done: v1::StepDone,
    ) -> Result<(), Error> {
        let mut ranks = Vec::with_capacity(workers.len());
        for id in workers {
            ranks.push(self.rank_in(id, done.generation)?);
        }
        let world = self.world.as_mut().expect("checked by rank_in");
        let n = world.members.len();
        let Some((plan, reports)) = world.in_flight.as_mut() else {
            return Err(Error::FailedPrecondition("no step is in flight".into()));
        };
        let step = plan.step;
        if done.step != step {
            return Err(Error::FailedPrecondition(format!(
                "report for step {}, but step {step} is in flight",
                done.step
            )));
        }
        let batch = plan.samples.len();
        let expected: u64 = ranks
            .iter()
            .map(|&r| rank_slice(batch, n, r as usize).len() as u64)
            .sum();
        if u64::from(done.samples) != expected {
            let (who, s) = subject(&ranks);
            let given = if ranks.len() == 1 {
                "it was"
            } else {
                "they were"
            };
            return Err(Error::InvalidArgument(format!(
                "{who} report{s} {} samples for step {step}, {given} given {expected}",
                done.samples
            )));
        }
        // A loss is a mean of cross-entropies: never negative. NaN, Inf or a negative loss or
        // gradient norm is only acceptable in a step whose update was dropped.
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        let numbers_sane = sane(done.loss_sum) && sane(done.global_loss) && sane(done.grad_norm);
        if !(done.skipped || numbers_sane) {
            let (who, s) = subject(&ranks);
            return Err(Error::InvalidArgument(format!(
                "{who} report{s} a loss of {} (global {}) and a gradient norm of {} for step {step} and applied the update anyway; a loss and a norm are finite and never negative",
                done.loss_sum, done.global_loss, done.grad_norm
            )));
        }
        if let Some(&rank) = ranks.iter().find(|&&r| reports.contains(r)) {
            return Err(Error::FailedPrecondition(format!(
                "rank {rank} reported step {step} twice"
            )));
        }
        if ranks.len() > 1 {
            let mut sorted = ranks.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::InvalidArgument(format!(
                    "rank {} is named twice in one report of step {step}",
                    w[0]
                )));
            }
        }
        if let Some(other) = reports.first() {
            if other.skipped != done.skipped {
                let (who, s) = subject(&ranks);
                return Err(Error::InvalidArgument(format!(
                    "{who} report{s} skipped = {} for step {step}, another rank {}; the guard must decide the same everywhere",
                    done.skipped, other.skipped
                )));
            }
        }
        reports.add(&ranks, done);
        if reports.len() < n {
            self.quiet = true;
            return Ok(());
        }
        let generation = world.generation;
        let took = world.dispatched_at.take().map(|t| t.elapsed());
        let (plan, reports) = world.in_flight.take().expect("in flight");
        if let Some(d) = took {
            self.step_took(d);
        }
        if self.commit(generation, plan, &reports).await && self.judge(&reports).await {
            self.dispatch().await;
        }
        Ok(())
    }

    /// Commits a step to the ledger with the loss of the global batch (the all-reduced loss
    /// the ranks report; from the reported samples for reports without it); false if the job
    /// failed on it.
    pub(super) async fn commit(
        &mut self,
        generation: u64,
        plan: StepPlan,
        reports: &Reports,
    ) -> bool {
        let first = reports.first();
        let loss = match first.map(|r| r.global_loss) {
            Some(g) if g != 0.0 => g,
            _ => reports.loss_sum / reports.samples.max(1) as f64,
        };
        let grad_norm = first.map_or(0.0, |r| r.grad_norm);
        let skipped = reports.skipped;
        let state_digest = first.map_or(0, |r| r.state_digest);
        let c = self
            .curriculum
            .as_ref()
            .expect("a curriculum while running");
        // The samples are recorded as the plan's state before their draw (a reader draws them
        // again): a few numbers per source, whatever the global batch.
        let entry = v1::LedgerStep {
            step: plan.step,
            samples: vec![],
            draw: Some(plan.draw.clone()),
            cursors: c.cursors().to_vec(),
            loss,
            generation,
            stage: plan.stage.index,
            seq_len: plan.stage.seq_len,
            stage_taken: c.taken().to_vec(),
            grad_norm,
            lr: plan.lr,
            skipped,
            state_digest,
        };
        let committed = c.clone();
        if !self.persist(Write::Commit(entry)).await {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.step_committed(&self.job, &plan.samples, plan.stage.seq_len);
            m.epochs(committed.cursors(), &self.source_tokens);
            if !(loss.is_finite() && grad_norm.is_finite()) {
                m.nonfinite_step();
            }
        }
        self.committed = Some(committed);
        self.step = plan.step + 1;
        self.loss = Some(loss);
        self.record_loss(plan.step, loss, skipped);
        self.digest = (state_digest != 0).then_some(state_digest);
        self.failures.reset();
        self.rate.record(std::time::Instant::now(), 1);
        if self.step.is_multiple_of(self.job.log_every.max(1)) || self.step == self.job.total_steps
        {
            info!(step = self.step, loss, stage = %plan.stage_name, lr = plan.lr, generation, "step committed");
        }
        true
    }
}

/// The reports of the step in flight, summed as they come: which ranks reported, and what the
/// commit and the spike detector need of them (the sums, and the first report, whose global
/// loss, gradient norm and state digest every rank reports the same).
#[derive(Debug)]
pub(super) struct Reports {
    reported: Vec<bool>,
    count: usize,
    pub(super) samples: u64,
    pub(super) loss_sum: f64,
    /// Any rank dropped the update (the ranks are checked to agree).
    pub(super) skipped: bool,
    first: Option<v1::StepDone>,
}

impl Reports {
    pub(super) fn new(world_size: usize) -> Self {
        Reports {
            reported: vec![false; world_size],
            count: 0,
            samples: 0,
            loss_sum: 0.0,
            skipped: false,
            first: None,
        }
    }

    /// Ranks that reported.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn contains(&self, rank: u32) -> bool {
        self.reported.get(rank as usize).copied().unwrap_or(false)
    }

    pub(super) fn first(&self) -> Option<&v1::StepDone> {
        self.first.as_ref()
    }

    /// Adds the report of `ranks` (checked: ranks of this world that had not reported).
    pub(super) fn add(&mut self, ranks: &[u32], done: v1::StepDone) {
        for &r in ranks {
            self.reported[r as usize] = true;
        }
        self.count += ranks.len();
        self.samples += u64::from(done.samples);
        self.loss_sum += done.loss_sum;
        self.skipped |= done.skipped;
        if self.first.is_none() {
            self.first = Some(done);
        }
    }
}

/// "rank 3" and "", or "ranks 3, 4 and 5" and "" for the verb that follows (`report{s}`).
fn subject(ranks: &[u32]) -> (String, &'static str) {
    const NAMED: usize = 8;
    match ranks {
        [one] => (format!("rank {one}"), "s"),
        _ => {
            let named: Vec<String> = ranks.iter().take(NAMED).map(u32::to_string).collect();
            let more = ranks.len().saturating_sub(NAMED);
            let list = if more > 0 {
                format!("{} and {more} more", named.join(", "))
            } else {
                let (last, rest) = named.split_last().expect("at least two");
                format!("{} and {last}", rest.join(", "))
            };
            (format!("ranks {list}"), "")
        }
    }
}

/// How a step's Work reaches the ranks of a world: worked out once, and again only when a
/// member or a session changes (the roster's version), not every step.
pub(super) struct Routes {
    /// The roster version this was worked out at.
    version: u64,
    /// Ranks that get a `Work` of their own: on a session of their own, or with none.
    own: Vec<u32>,
    /// The ranks on each node session, in rank order.
    nodes: Vec<NodeRoute>,
}

struct NodeRoute {
    queue: tokio::sync::mpsc::Sender<v1::NodeMessage>,
    /// The node session splits `NodeWork`s (it may say so after this was worked out).
    combined: Arc<AtomicBool>,
    ranks: Vec<u32>,
    /// The ranks' worker ids, as a `NodeWork` names them.
    workers: Vec<String>,
}

impl Routes {
    /// `routes` if they are of roster `version`, else worked out again for `world`.
    pub(super) fn current(
        routes: Option<Routes>,
        version: u64,
        members: &Members,
        world: &[String],
    ) -> Routes {
        match routes {
            Some(r) if r.version == version => r,
            _ => Routes::new(version, members, world),
        }
    }

    fn new(version: u64, members: &Members, world: &[String]) -> Routes {
        let mut own = Vec::new();
        let mut nodes: Vec<NodeRoute> = Vec::new();
        let mut by_node: HashMap<u64, usize> = HashMap::default();
        for (rank, id) in world.iter().enumerate() {
            let rank = rank as u32;
            match members.get(id).and_then(|m| m.outbox.as_ref()) {
                Some(Outbox::Node {
                    queue,
                    worker_id,
                    node,
                    combined,
                }) => {
                    let i = *by_node.entry(*node).or_insert_with(|| {
                        nodes.push(NodeRoute {
                            queue: queue.clone(),
                            combined: combined.clone(),
                            ranks: vec![],
                            workers: vec![],
                        });
                        nodes.len() - 1
                    });
                    nodes[i].ranks.push(rank);
                    nodes[i].workers.push(worker_id.clone());
                }
                _ => own.push(rank),
            }
        }
        Routes {
            version,
            own,
            nodes,
        }
    }
}

/// Queues a step's Work for every rank of `world` (`header` with each rank's share of
/// `samples`) along `routes`. The ranks on one node session that splits `NodeWork`s get one
/// for all of them: the node reads one message where it would one per rank.
fn send_work(
    members: &Members,
    routes: &Routes,
    world: &[String],
    header: &v1::Work,
    samples: &[SampleId],
) {
    let n = world.len();
    let all = refs(samples);
    let share = |rank: u32| &all[rank_slice(all.len(), n, rank as usize)];
    let own = |rank: u32| {
        let work = v1::Work {
            samples: share(rank).to_vec(),
            ..header.clone()
        };
        let id = &world[rank as usize];
        send(members, id, v1::coordinator_message::Kind::Work(work));
    };
    for &rank in &routes.own {
        own(rank);
    }
    for node in &routes.nodes {
        if !node.combined.load(Ordering::Relaxed) {
            for &rank in &node.ranks {
                own(rank);
            }
            continue;
        }
        let mut work = header.clone();
        let mut counts = Vec::with_capacity(node.ranks.len());
        for &rank in &node.ranks {
            let share = share(rank);
            work.samples.extend_from_slice(share);
            counts.push(share.len() as u32);
        }
        let message = v1::NodeMessage {
            worker_id: String::new(),
            kind: Some(v1::node_message::Kind::Work(v1::NodeWork {
                work: Some(work),
                workers: node.workers.clone(),
                samples: counts,
            })),
        };
        if let Err(e) = node.queue.try_send(message) {
            warn!(workers = node.ranks.len(), first = %node.workers[0], error = %e, "cannot queue a node's work");
            for &rank in &node.ranks {
                super::undeliverable(members, &world[rank as usize]);
            }
        }
    }
}
