//! The figures of a run, from the ranks' logs and the probes: one markdown row and one JSON
//! object.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use serde_json::json;

use crate::rank::RankLog;

/// Latencies from the last `StepDone` of step k to each rank's `Work` of step k+1 (the same
/// generation), for the `Work`s of the steps in `steps` (those the run counted), in
/// nanoseconds, sorted.
pub fn step_latencies(logs: &[RankLog], steps: RangeInclusive<u64>) -> Vec<u64> {
    let mut last_done: HashMap<(u64, u64), u64> = HashMap::new();
    for log in logs {
        for &(generation, step, t) in &log.done {
            let e = last_done.entry((generation, step)).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let mut latencies: Vec<u64> = logs
        .iter()
        .flat_map(|log| log.work.iter())
        .filter(|(_, step, _)| *step > 0 && steps.contains(step))
        .filter_map(|&(generation, step, t)| {
            last_done
                .get(&(generation, step - 1))
                .map(|done| t.saturating_sub(*done))
        })
        .collect();
    latencies.sort_unstable();
    latencies
}

/// The value at quantile `q` (0..=1) of sorted `values` (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Everything one run measured. `None`: not measured (the world never ran, a probe was not
/// given or failed).
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub label: String,
    pub ranks: usize,
    /// Ranks per node session (1: a session per rank).
    pub ranks_per_node: u32,
    /// What spoke for each node (`--node-client`), when there were nodes.
    pub node_client: Option<&'static str>,
    /// Seconds from the first Register to the first `Work` at every rank.
    pub formed_seconds: Option<f64>,
    /// The formation timeout, when the world did not run within it.
    pub form_timeout_seconds: f64,
    pub run_seconds: f64,
    /// Steps committed in the run window, as the ranks saw them (work for step k+1 means k is
    /// committed) and as the coordinator's `stagecoach_job_step` counted them.
    pub steps: Option<u64>,
    pub coordinator_steps: Option<u64>,
    /// Work latency quantiles, milliseconds, and the number of samples.
    pub latency_ms: Option<(f64, f64, f64)>,
    pub latency_samples: usize,
    pub leases_lost: usize,
    pub sessions_broken: usize,
    pub stops: usize,
    pub join_errors: usize,
    /// Ranks registered at least once, holding a session at the end of formation, having
    /// answered a `World`.
    pub registered: usize,
    pub attached: usize,
    pub readies: usize,
    /// Generations formed and ended (the coordinator's counters; else what the ranks saw).
    pub generations: Option<u64>,
    pub generations_ended: Option<u64>,
    pub coordinator_cpu_formation: Option<f64>,
    pub coordinator_cpu_run: Option<f64>,
    pub coordinator_peak_rss_bytes: Option<u64>,
    pub store_bytes_per_step: Option<f64>,
    /// The state folder shrank during the window (the store compacted): no bytes per step.
    pub store_compacted: bool,
    pub bench_cpu: Option<f64>,
    pub job_over: usize,
    /// The highest step any rank was given work for (so far the job committed every step
    /// before it).
    pub last_work_step: u64,
    /// Why the first session broke or join failed.
    pub first_break: Option<String>,
}

fn or_dash<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "–".to_owned(), f)
}

impl Figures {
    /// Whether the world ran.
    pub fn formed(&self) -> bool {
        self.formed_seconds.is_some()
    }

    pub fn steps_per_second(&self) -> Option<f64> {
        self.steps
            .filter(|_| self.run_seconds > 0.0)
            .map(|s| s as f64 / self.run_seconds)
    }

    /// The header of the table [`Figures::row`] writes rows of.
    pub fn header() -> String {
        [
            "| N | world running after (s) | steps/s | Work latency p50 / p99 / max (ms) | leases lost | generations (ended) | coordinator CPU s (formation + run) | coordinator peak RSS (MiB) | store bytes / step | bench CPU s | outcome |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        .join("\n")
    }

    /// One markdown row.
    pub fn row(&self) -> String {
        let formed = match self.formed_seconds {
            Some(s) => format!("{s:.2}"),
            None => format!("not within {:.0}", self.form_timeout_seconds),
        };
        let latency = or_dash(self.latency_ms, |(p50, p99, max)| {
            format!("{p50:.2} / {p99:.2} / {max:.2}")
        });
        let generations = match (self.generations, self.generations_ended) {
            (Some(g), Some(e)) => format!("{g} ({e})"),
            (Some(g), None) => g.to_string(),
            _ => "–".into(),
        };
        let cpu = match (self.coordinator_cpu_formation, self.coordinator_cpu_run) {
            (Some(f), Some(r)) => format!("{f:.1} + {r:.1}"),
            (Some(f), None) => format!("{f:.1} + –"),
            _ => "–".into(),
        };
        let store = if self.store_compacted {
            "compacted".to_owned()
        } else {
            or_dash(self.store_bytes_per_step, |b| format!("{b:.0}"))
        };
        let outcome = if self.formed() {
            let mut o = format!(
                "ran {:.0} s: {} steps",
                self.run_seconds,
                or_dash(self.steps, |s| s.to_string())
            );
            if let Some(c) = self.coordinator_steps {
                o.push_str(&format!(" ({c} by the coordinator)"));
            }
            o
        } else {
            format!(
                "no world: {}/{} registered, {} in a session, {} answered a World",
                self.registered, self.ranks, self.attached, self.readies
            )
        };
        let outcome = match (self.join_errors, self.sessions_broken, self.job_over) {
            (0, 0, 0) => outcome,
            (e, b, o) => format!(
                "{outcome}; {e} failed joins, {b} broken sessions{}",
                if o > 0 {
                    format!(", the job ended for {o} ranks")
                } else {
                    String::new()
                }
            ),
        };
        let outcome = match &self.first_break {
            Some(why) => format!("{outcome} (first: {})", why.replace('|', "/")),
            None => outcome,
        };
        format!(
            "| {} | {formed} | {} | {latency} | {} | {generations} | {cpu} | {} | {store} | {} | {outcome} |",
            self.ranks,
            or_dash(self.steps_per_second(), |s| if s < 1.0 {
                format!("{s:.3}")
            } else {
                format!("{s:.1}")
            }),
            self.leases_lost,
            or_dash(self.coordinator_peak_rss_bytes, |b| format!(
                "{:.0}",
                b as f64 / (1024.0 * 1024.0)
            )),
            or_dash(self.bench_cpu, |c| format!("{c:.1}")),
        )
    }

    /// The same figures as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "label": self.label,
            "ranks": self.ranks,
            "ranks_per_node": self.ranks_per_node,
            "node_client": self.node_client,
            "formed": self.formed(),
            "formed_seconds": self.formed_seconds,
            "form_timeout_seconds": self.form_timeout_seconds,
            "run_seconds": self.run_seconds,
            "steps": self.steps,
            "coordinator_steps": self.coordinator_steps,
            "steps_per_second": self.steps_per_second(),
            "latency_ms": self.latency_ms.map(|(p50, p99, max)| json!({"p50": p50, "p99": p99, "max": max})),
            "latency_samples": self.latency_samples,
            "leases_lost": self.leases_lost,
            "sessions_broken": self.sessions_broken,
            "stops_generation_ended": self.stops,
            "join_errors": self.join_errors,
            "registered": self.registered,
            "attached": self.attached,
            "readies": self.readies,
            "generations": self.generations,
            "generations_ended": self.generations_ended,
            "coordinator_cpu_seconds_formation": self.coordinator_cpu_formation,
            "coordinator_cpu_seconds_run": self.coordinator_cpu_run,
            "coordinator_peak_rss_bytes": self.coordinator_peak_rss_bytes,
            "store_bytes_per_step": self.store_bytes_per_step,
            "store_compacted": self.store_compacted,
            "bench_cpu_seconds": self.bench_cpu,
            "ranks_that_saw_the_job_end": self.job_over,
            "last_work_step": self.last_work_step,
            "first_break": self.first_break,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_runs_from_the_last_report_to_each_next_work_of_the_same_generation() {
        // Two ranks, generation 1: step 0 reported at 10 and 30, step 1's work at 35 and 40;
        // generation 2 starts at step 1 again (no report of step 0 in it: no latency).
        let logs = vec![
            RankLog {
                done: vec![(1, 0, 10), (1, 1, 50)],
                work: vec![(1, 0, 5), (1, 1, 35), (2, 1, 200), (1, 2, 60)],
            },
            RankLog {
                done: vec![(1, 0, 30), (1, 1, 45)],
                work: vec![(1, 0, 6), (1, 1, 40), (2, 1, 201), (1, 2, 58)],
            },
        ];
        assert_eq!(step_latencies(&logs, 0..=2), vec![5, 8, 10, 10]);
        // The steps counted leave out the work of the steps before them.
        assert_eq!(step_latencies(&logs, 2..=2), vec![8, 10]);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_world_that_did_not_form_is_a_row_that_says_so() {
        let f = Figures {
            ranks: 16384,
            form_timeout_seconds: 120.0,
            registered: 16000,
            attached: 15000,
            readies: 0,
            leases_lost: 3,
            coordinator_cpu_formation: Some(200.0),
            coordinator_peak_rss_bytes: Some(3 << 30),
            ..Default::default()
        };
        let row = f.row();
        assert!(
            row.starts_with("| 16384 | not within 120 | – | – | 3 |"),
            "{row}"
        );
        assert!(row.contains("| 200.0 + – | 3072 |"), "{row}");
        assert!(
            row.contains(
                "no world: 16000/16384 registered, 15000 in a session, 0 answered a World"
            ),
            "{row}"
        );
        assert_eq!(f.json()["formed"], false);
        assert_eq!(
            Figures::header()
                .lines()
                .next()
                .unwrap()
                .matches('|')
                .count(),
            row.matches('|').count()
        );
    }

    #[test]
    fn a_run_row_has_its_rates() {
        let f = Figures {
            ranks: 64,
            formed_seconds: Some(1.25),
            run_seconds: 10.0,
            steps: Some(1234),
            coordinator_steps: Some(1235),
            latency_ms: Some((1.0, 2.5, 7.0)),
            generations: Some(1),
            generations_ended: Some(0),
            coordinator_cpu_formation: Some(0.5),
            coordinator_cpu_run: Some(9.5),
            store_bytes_per_step: Some(812.4),
            ..Default::default()
        };
        let row = f.row();
        assert!(
            row.starts_with("| 64 | 1.25 | 123.4 | 1.00 / 2.50 / 7.00 | 0 | 1 (0) | 0.5 + 9.5 |"),
            "{row}"
        );
        assert!(
            row.contains("| 812 |")
                && row.contains("ran 10 s: 1234 steps (1235 by the coordinator)"),
            "{row}"
        );
        // A step in 90 s is not "0.0" steps/s.
        let slow = Figures {
            steps: Some(1),
            run_seconds: 90.0,
            ..f
        };
        assert!(
            slow.row().starts_with("| 64 | 1.25 | 0.011 |"),
            "{}",
            slow.row()
        );
    }
}
