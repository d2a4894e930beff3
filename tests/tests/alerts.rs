//! The alert rules of `deploy/prometheus/alerts.yml`: checked and unit-tested by promtool
//! (`deploy/prometheus/tests/*.yml`, where every alert fires on its input series and does not
//! fire where it must not), and evaluated live: a real Prometheus scrapes a real job (a
//! coordinator and two workers) every second with the rules loaded, a poisoned step and then a
//! worker stopped with SIGSTOP past its lease, and each fault's alert is seen firing in
//! Prometheus's `ALERTS`.
//!
//! The live copy of the rules divides every `for:` by 60 (`for: 5m` waits 5 s): the faults are
//! real, the waits are not an hour long. The expressions are the shipped ones.

mod prom;

use std::process::Command;
use std::time::{Duration, Instant};

use prom::{poison_step, rules_dir, spikes, target, Prometheus, PROMTOOL};
use stagecoach_e2e::{
    coordinator_with_metrics, demo_corpus, join_worker, micro, wait_for_step, MIX,
};

/// Runs promtool with `args` in `deploy/prometheus`; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    prom::require(PROMTOOL);
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The alert names of a rule file's text.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_owned())
        .collect()
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    print!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["check", "config", "prometheus.yml"]);
    print!("{out}");

    let mut files: Vec<String> = std::fs::read_dir(rules_dir().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .map(|p| format!("tests/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no unit tests in deploy/prometheus/tests"
    );
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let out = promtool(&args);
    print!("{out}");

    // Every alert has a case where it fires and one where it must not.
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let tests: String = files
        .iter()
        .map(|f| std::fs::read_to_string(rules_dir().join(f)).unwrap())
        .collect();
    let alerts = alert_names(&rules);
    assert!(alerts.len() >= 15, "{alerts:?}");
    let checks: Vec<(&str, bool)> = tests
        .split("- eval_time:")
        .skip(1)
        .filter_map(|c| {
            let name = c
                .lines()
                .find_map(|l| l.trim().strip_prefix("alertname: "))?;
            Some((name.trim(), !c.contains("exp_alerts: []")))
        })
        .collect();
    for a in &alerts {
        assert!(
            checks.iter().any(|(n, fires)| n == a && *fires),
            "{a} has no promtool case where it fires"
        );
        assert!(
            checks.iter().any(|(n, fires)| n == a && !*fires),
            "{a} has no promtool case where it must not fire"
        );
    }
    println!(
        "{} alerts, {} promtool checks ({} firing, {} silent)",
        alerts.len(),
        checks.len(),
        checks.iter().filter(|c| c.1).count(),
        checks.iter().filter(|c| !c.1).count()
    );
}

/// `rules` with every `for: <N>m` divided by 60 (`for: 5m` becomes `for: 5s`).
fn shortened(rules: &str) -> String {
    rules
        .lines()
        .map(|l| match l.trim().strip_prefix("for: ") {
            Some(d) => {
                let minutes: u32 = d
                    .strip_suffix('m')
                    .and_then(|m| m.parse().ok())
                    .unwrap_or_else(|| panic!("a `for:` in minutes, not {d:?}"));
                format!("{}for: {minutes}s", &l[..l.len() - l.trim_start().len()])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The alerts firing now, by name, with their labels.
fn firing(p: &Prometheus, name: &str) -> Result<Vec<prom::Sample>, String> {
    let found = p.query(&format!(
        r#"ALERTS{{alertname="{name}", alertstate="firing"}}"#
    ))?;
    if found.is_empty() {
        let all = p.query("ALERTS")?;
        let names: Vec<String> = all
            .iter()
            .map(|(l, _)| format!("{} {}", l["alertname"], l["alertstate"]))
            .collect();
        return Err(format!("{name} is not firing; ALERTS: {names:?}"));
    }
    Ok(found)
}

#[test]
fn a_poisoned_step_and_a_stopped_worker_fire_their_alerts_in_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_corpus(d);

    // A job that outlasts the test, exactly two workers (lease 4 s), the spike guard armed.
    let path = spikes(micro("alerts", &data, 2))
        .stage("main", 100_000, 64, MIX)
        .set("schedule.warmup_steps", 5)
        .set("data.seed", 11)
        .set("workers.lease_ms", 4000)
        .write(d.join("alerts.toml"));
    const POISONED: u64 = 30;
    let poison = poison_step(&path, POISONED);

    let (_coord, url, metrics) =
        coordinator_with_metrics(&path, &d.join("state"), &d.join("coordinator.log"));
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    std::fs::write(d.join("alerts.yml"), shortened(&rules)).unwrap();
    let config = d.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n\
             \x20 - job_name: stagecoach-coordinator\n    static_configs:\n      - targets: ['{}']\n",
            target(&metrics),
        ),
    )
    .unwrap();
    let mut p = Prometheus::start(d, &config);
    // Prometheus sees the spike counter at 0 before any step, so that `increase()` sees it rise.
    p.wait_for(Duration::from_secs(60), "a first scrape", |p| {
        let spikes = p.query(r#"stagecoach_job_spikes_total{action="skip_step"}"#)?;
        match spikes.first() {
            Some((_, v)) if *v == 0.0 => Ok(()),
            other => Err(format!("skip_step counter: {other:?}")),
        }
    });
    let start = Instant::now();
    let args: Vec<&str> = poison.iter().map(String::as_str).collect();
    let _w0 = join_worker(&url, d, "worker-0", &args);
    let w1 = join_worker(&url, d, "worker-1", &args);

    // The poisoned step's update is dropped by every rank: StagecoachLossSpikeDetected.
    let spike = p.wait_for(Duration::from_secs(90), "the loss spike alert", |p| {
        firing(p, "StagecoachLossSpikeDetected")
    });
    let spike_at = start.elapsed();
    let (labels, _) = &spike[0];
    assert_eq!(labels["action"], "skip_step", "{labels:?}");
    assert_eq!(labels["instance"], target(&metrics), "{labels:?}");
    assert_eq!(labels["severity"], "warning", "{labels:?}");
    // Both workers hold their lease: the minimum alert has not fired, and it is not pending
    // either once its group has evaluated a scrape with both workers in (it went pending
    // before they joined, when none was alive; the groups evaluate at their own offsets, so
    // the spike group can see the step before the world group sees the workers).
    let alive = p.query("stagecoach_job_workers_alive").unwrap();
    assert_eq!(alive.first().map(|s| s.1), Some(2.0), "{alive:?}");
    let fired = p
        .query(r#"ALERTS{alertname="StagecoachWorkersBelowMinimum", alertstate="firing"}"#)
        .unwrap();
    assert!(fired.is_empty(), "{fired:?}");
    p.wait_for(
        Duration::from_secs(10),
        "the workers-below-minimum alert to clear with both workers in",
        |p| {
            let below = p.query(r#"ALERTS{alertname="StagecoachWorkersBelowMinimum"}"#)?;
            if below.is_empty() {
                Ok(())
            } else {
                Err(format!("{below:?}"))
            }
        },
    );
    let step = wait_for_step(&url, POISONED + 1)["step"].as_u64().unwrap();

    // A worker stopped (not killed: it holds its sockets and sends nothing) past its lease.
    let stopped = Command::new("kill")
        .args(["-STOP", &w1.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let stop_at = start.elapsed();
    let below = p.wait_for(
        Duration::from_secs(60),
        "the workers-below-minimum alert",
        |p| firing(p, "StagecoachWorkersBelowMinimum"),
    );
    let below_at = start.elapsed();
    let (labels, value) = &below[0];
    assert_eq!(labels["severity"], "critical", "{labels:?}");
    assert_eq!(labels["instance"], target(&metrics), "{labels:?}");
    assert_eq!(*value, 1.0);
    let alive = p.query("stagecoach_job_workers_alive").unwrap();
    assert!(alive.first().map(|s| s.1) < Some(2.0), "{alive:?}");
    let all: Vec<String> = p
        .query(r#"ALERTS{alertstate="firing"}"#)
        .unwrap()
        .iter()
        .map(|(l, _)| l["alertname"].clone())
        .collect();
    println!(
        "spike alert firing {:.1} s after the workers started (step {step}); worker stopped at \
         {:.1} s, StagecoachWorkersBelowMinimum firing {:.1} s later (lease 4 s, for 5 s); \
         firing now: {all:?}",
        spike_at.as_secs_f64(),
        stop_at.as_secs_f64(),
        (below_at - stop_at).as_secs_f64()
    );
    let _ = Command::new("kill")
        .args(["-CONT", &w1.child.id().to_string()])
        .status();
}
