//! What the status page sees beyond the [`Snapshot`](crate::status::Snapshot): the committed
//! steps' losses as a bounded, downsampled [`LossHistory`], and the workers. The driver
//! publishes a [`View`] through a watch channel: the loss after each commit, the workers after
//! each event (when they changed). Readers copy it out and render without asking the driver.
//!
//! **Why in memory, and why bounded.** A page view must cost neither a scan of the ledger (a
//! million steps of sample lists) nor memory that grows with the run. The history keeps the
//! last [`FINE`] steps at full resolution and every older step in at most [`COARSE`] buckets
//! of equal width (a power of two: when the buckets overflow, neighbours merge and the width
//! doubles), each with the mean, least and greatest loss of its steps, so a spike in the long
//! tail stays visible as the top of its bucket. At a million steps the buckets hold 1024 steps
//! each and the whole history is about 2,000 points (~100 KB), whatever the run's length; a
//! commit costs O(1) amortized. The price: a coordinator that restarts draws the loss from
//! where it picked the job up (the page says so); `stagecoach plot` draws a whole run from
//! the ledger, offline.
//!
//! **Rollbacks.** A commit at or before the last recorded step means the committed lineage
//! went back (a rollback, or a restore): the points from that step on move to the
//! [`Abandoned`] lineages (the last [`ABANDONED_SEGMENTS`], each downsampled to at most
//! [`ABANDONED_POINTS`] points), so the spike that caused a rollback stays on the chart.

use std::collections::VecDeque;

use super::Driver;

/// Steps kept at full resolution.
pub const FINE: usize = 1024;
/// Buckets of the coarser long tail.
pub const COARSE: usize = 1024;
/// Abandoned lineages kept, and the points of each.
pub const ABANDONED_SEGMENTS: usize = 8;
pub const ABANDONED_POINTS: usize = 256;

/// The losses of one or more consecutive committed steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossPoint {
    pub first: u64,
    pub last: u64,
    /// Sum, least and greatest of the finite losses among them.
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Steps with a finite loss, with a NaN or infinite one, and whose update the step guard
    /// dropped.
    pub finite: u32,
    pub nonfinite: u32,
    pub skipped: u32,
}

impl LossPoint {
    /// One step.
    pub fn step(step: u64, loss: f64, skipped: bool) -> LossPoint {
        let finite = loss.is_finite();
        LossPoint {
            first: step,
            last: step,
            sum: if finite { loss } else { 0.0 },
            min: if finite { loss } else { f64::INFINITY },
            max: if finite { loss } else { f64::NEG_INFINITY },
            finite: u32::from(finite),
            nonfinite: u32::from(!finite),
            skipped: u32::from(skipped),
        }
    }

    /// The steps it covers.
    pub fn steps(&self) -> u64 {
        self.last.saturating_sub(self.first) + 1
    }

    /// The mean finite loss, if any step had one.
    pub fn mean(&self) -> Option<f64> {
        (self.finite > 0).then(|| self.sum / f64::from(self.finite))
    }

    /// This point and the `later` one as one.
    fn merge(&mut self, later: &LossPoint) {
        self.first = self.first.min(later.first);
        self.last = self.last.max(later.last);
        self.sum += later.sum;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.finite += later.finite;
        self.nonfinite += later.nonfinite;
        self.skipped += later.skipped;
    }
}

/// Merges neighbours until at most `cap` points remain.
fn downsample(mut points: Vec<LossPoint>, cap: usize) -> Vec<LossPoint> {
    while points.len() > cap.max(1) {
        points = points
            .chunks(2)
            .map(|pair| {
                let mut p = pair[0];
                if let Some(q) = pair.get(1) {
                    p.merge(q);
                }
                p
            })
            .collect();
    }
    points
}

/// Steps of a lineage a rollback (or a restore) abandoned.
#[derive(Debug, Clone, PartialEq)]
pub struct Abandoned {
    /// The step training went back to (the first step of the lineage that replaced it).
    pub resumed_at: u64,
    pub points: Vec<LossPoint>,
}

/// The committed steps' losses, bounded (see the module's documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct LossHistory {
    fine: VecDeque<LossPoint>,
    fine_cap: usize,
    coarse: Vec<LossPoint>,
    coarse_cap: usize,
    /// Steps per coarse bucket.
    width: u64,
    abandoned: VecDeque<Abandoned>,
    /// The first step recorded (where this coordinator picked the job up).
    since: Option<u64>,
}

impl Default for LossHistory {
    fn default() -> Self {
        LossHistory::new(FINE, COARSE)
    }
}

impl LossHistory {
    /// A history keeping the last `fine` steps one by one and older ones in at most `coarse`
    /// buckets (`fine` = 0: every step in buckets, an even resolution over the whole run).
    pub fn new(fine: usize, coarse: usize) -> LossHistory {
        LossHistory {
            fine: VecDeque::new(),
            fine_cap: fine,
            coarse: Vec::new(),
            coarse_cap: coarse.max(2),
            width: 1,
            abandoned: VecDeque::new(),
            since: None,
        }
    }

    /// Step `step` was committed with `loss`; `skipped`: the guard dropped its update.
    pub fn record(&mut self, step: u64, loss: f64, skipped: bool) {
        if self.last_step().is_some_and(|last| step <= last) {
            self.rewind(step);
        }
        if self.since.is_none_or(|s| step < s) {
            self.since = Some(step);
        }
        self.fine.push_back(LossPoint::step(step, loss, skipped));
        while self.fine.len() > self.fine_cap {
            let p = self.fine.pop_front().expect("not empty");
            self.push_coarse(p);
        }
    }

    /// Adds a lineage abandoned at `resumed_at` (for a history built from the ledger, where
    /// the steps set aside are read apart from the committed ones).
    pub fn add_abandoned(&mut self, resumed_at: u64, points: Vec<LossPoint>) {
        if points.is_empty() {
            return;
        }
        self.abandoned.push_back(Abandoned {
            resumed_at,
            points: downsample(points, ABANDONED_POINTS),
        });
        while self.abandoned.len() > ABANDONED_SEGMENTS {
            self.abandoned.pop_front();
        }
    }

    /// Every point, in step order: the coarse tail, then the recent steps.
    pub fn points(&self) -> impl DoubleEndedIterator<Item = &LossPoint> {
        self.coarse.iter().chain(self.fine.iter())
    }

    /// The lineages rollbacks abandoned, oldest first.
    pub fn abandoned(&self) -> impl Iterator<Item = &Abandoned> {
        self.abandoned.iter()
    }

    /// How many points it holds (committed and abandoned).
    pub fn len(&self) -> usize {
        self.coarse.len()
            + self.fine.len()
            + self.abandoned.iter().map(|a| a.points.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Steps per point of the coarse tail.
    pub fn bucket_width(&self) -> u64 {
        self.width
    }

    /// The first step recorded, if any.
    pub fn since(&self) -> Option<u64> {
        self.since
    }

    /// The last step recorded, if any.
    pub fn last_step(&self) -> Option<u64> {
        self.fine
            .back()
            .or_else(|| self.coarse.last())
            .map(|p| p.last)
    }

    fn push_coarse(&mut self, p: LossPoint) {
        match self.coarse.last_mut() {
            Some(b) if b.steps() + p.steps() <= self.width && p.first > b.last => b.merge(&p),
            _ => self.coarse.push(p),
        }
        if self.coarse.len() > self.coarse_cap {
            self.width *= 2;
            let width = self.width;
            let mut merged: Vec<LossPoint> = Vec::with_capacity(self.coarse.len() / 2 + 1);
            for p in self.coarse.drain(..) {
                match merged.last_mut() {
                    Some(b) if b.steps() + p.steps() <= width => b.merge(&p),
                    _ => merged.push(p),
                }
            }
            self.coarse = merged;
        }
    }

    /// The committed lineage went back to `step`: what was recorded from it on is abandoned.
    fn rewind(&mut self, step: u64) {
        let mut cut = Vec::new();
        while self.fine.back().is_some_and(|p| p.first >= step) {
            cut.push(self.fine.pop_back().expect("checked"));
        }
        if self.fine.is_empty() {
            while self.coarse.last().is_some_and(|p| p.first >= step) {
                cut.push(self.coarse.pop().expect("checked"));
            }
            // A bucket that straddles the step keeps its earlier steps' range; its numbers
            // still include the later ones (they cannot be taken apart again).
            if let Some(b) = self.coarse.last_mut().filter(|b| b.last >= step) {
                b.last = step - 1;
            }
        }
        cut.reverse();
        if self.since.is_some_and(|s| s >= step) {
            self.since = None;
        }
        self.add_abandoned(step, cut);
    }
}

/// A worker as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    /// Its rank in the current world (none: not in it, a spare or waiting).
    pub rank: Option<u32>,
    /// Where its ring neighbour reaches it.
    pub address: String,
    /// Who registered it (the authenticated identity).
    pub owner: String,
    /// A session stream is open.
    pub connected: bool,
}

/// What the driver publishes for the status page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub loss: LossHistory,
    /// In registration order.
    pub workers: Vec<WorkerView>,
}

impl Driver {
    /// A committed step's loss, for the history.
    pub(super) fn record_loss(&self, step: u64, loss: f64, skipped: bool) {
        self.view
            .send_modify(|v| v.loss.record(step, loss, skipped));
    }

    /// The workers as they are now, published when they changed. Building the list walks every
    /// member, so for a large job it is rebuilt at most once per [`WORKERS_EVERY`] (the clock's
    /// tick publishes what changed since): not after every registration of thousands.
    pub(super) fn publish_workers(&self) {
        let key = (
            self.roster.version,
            self.world.as_ref().map_or(0, |w| w.generation),
        );
        let mut published = self.workers_published.lock().expect("not poisoned");
        let (last_key, last_at) = *published;
        if key == last_key {
            return;
        }
        if self.members.len() > WORKERS_ALWAYS
            && last_at.is_some_and(|t| t.elapsed() < WORKERS_EVERY)
        {
            return;
        }
        *published = (key, Some(tokio::time::Instant::now()));
        drop(published);
        let ranks = self.world.as_ref().map(|w| &w.ranks);
        let workers: Vec<WorkerView> = self
            .order
            .iter()
            .filter_map(|id| {
                let m = self.members.get(id)?;
                Some(WorkerView {
                    id: id.clone(),
                    rank: ranks.and_then(|w| w.get(id)).copied(),
                    address: m.address.clone(),
                    owner: m.owner.clone(),
                    connected: m.outbox.is_some(),
                })
            })
            .collect();
        self.view.send_if_modified(|v| {
            let changed = v.workers != workers;
            if changed {
                v.workers = workers;
            }
            changed
        });
    }
}

/// Up to this many members, the workers' view follows every change at once.
const WORKERS_ALWAYS: usize = 256;
/// Beyond, it is rebuilt at most this often.
const WORKERS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(h: &LossHistory) -> Vec<(u64, u64)> {
        h.points().map(|p| (p.first, p.last)).collect()
    }

    #[test]
    fn a_million_steps_stay_bounded_and_cover_the_run() {
        let mut h = LossHistory::default();
        for s in 0..1_000_000u64 {
            let loss = if s == 400_000 { 50.0 } else { 3.0 };
            h.record(s, loss, false);
        }
        let points: Vec<&LossPoint> = h.points().collect();
        assert!(points.len() <= FINE + COARSE, "{}", points.len());
        assert!(h.bucket_width() <= 1024, "{}", h.bucket_width());
        // Contiguous, in order, from the first step to the last.
        assert_eq!(points[0].first, 0);
        assert_eq!(points.last().unwrap().last, 999_999);
        for w in points.windows(2) {
            assert_eq!(w[1].first, w[0].last + 1);
        }
        let total: u64 = points.iter().map(|p| p.steps()).sum();
        assert_eq!(total, 1_000_000);
        // The spike is still the top of its bucket; the recent steps are single.
        let spike = points
            .iter()
            .find(|p| p.first <= 400_000 && 400_000 <= p.last);
        assert_eq!(spike.unwrap().max, 50.0);
        assert!(points[points.len() - FINE..].iter().all(|p| p.steps() == 1));
        println!(
            "1,000,000 steps in {} points (buckets of {} steps)",
            points.len(),
            h.bucket_width()
        );
    }

    #[test]
    fn a_rewind_moves_the_abandoned_steps_aside() {
        let mut h = LossHistory::new(8, 4);
        for s in 0..32 {
            h.record(s, 2.0, false);
        }
        h.record(31, f64::NAN, true); // the same step again: nothing abandoned but step 31
        h.record(32, 2.5, false);
        let a: Vec<&Abandoned> = h.abandoned().collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].resumed_at, 31);
        assert_eq!(a[0].points.len(), 1);
        let last: Vec<&LossPoint> = h.points().rev().take(2).collect();
        assert_eq!(last[0].first, 32);
        assert_eq!(
            (last[1].first, last[1].nonfinite, last[1].skipped),
            (31, 1, 1)
        );
        assert_eq!(last[1].mean(), None);
        // Back into the coarse tail: the buckets from the step on go too.
        h.record(10, 1.0, false);
        let cut = h.abandoned().last().unwrap();
        assert_eq!(cut.resumed_at, 10);
        assert_eq!(cut.points.last().unwrap().last, 32);
        assert_eq!(h.last_step(), Some(10));
        let s = steps(&h);
        assert!(s.iter().all(|(_, last)| *last <= 10), "{s:?}");
        assert_eq!(s.last(), Some(&(10, 10)));
    }

    #[test]
    fn an_even_history_for_plots() {
        let mut h = LossHistory::new(0, 100);
        for s in 0..1000 {
            h.record(s, 1.0 + s as f64, s == 500);
        }
        let points: Vec<&LossPoint> = h.points().collect();
        assert!(points.len() <= 100);
        // Every bucket but the last (still filling) is one width: 1000 steps in buckets of 16.
        let (last, full) = points.split_last().unwrap();
        assert_eq!(h.bucket_width(), 16);
        assert!(full.iter().all(|p| p.steps() == h.bucket_width()));
        assert!(last.steps() <= h.bucket_width());
        assert_eq!(points.iter().map(|p| p.steps()).sum::<u64>(), 1000);
        assert_eq!(last.last, 999);
        assert_eq!(points.iter().map(|p| p.skipped).sum::<u32>(), 1);
        assert_eq!(points[0].min, 1.0);
    }
}
