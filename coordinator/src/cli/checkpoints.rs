//! The text and JSON forms of `checkpoints` (the checkpoint index and its lineage) and
//! `events` (spike detections and rollbacks).

use std::path::Path;

use serde::Serialize;
use stagecoach_proto::v1::{
    CheckpointRecord, ListCheckpointsResponse, ListEventsResponse, SpikeAction,
};

use super::render::{or_dash, to_json, Align, Table};
use crate::metrics::action_label;

/// The JSON form of `stagecoach checkpoints`.
#[derive(Debug, Serialize)]
struct CheckpointsReport<'a> {
    checkpoints: Vec<CheckpointReport<'a>>,
    /// The path of the checkpoint a rollback without argument goes to; `null` when none.
    latest_known_good: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct CheckpointReport<'a> {
    step: u64,
    path: &'a str,
    /// From 0.
    stage: u32,
    /// `null` when the coordinator did not say.
    stage_name: Option<&'a str>,
    /// `null` when no step was committed before it.
    loss: Option<f64>,
    known_good: bool,
    pinned: bool,
    /// `""` for the first lineage.
    parent: &'a str,
    generation: u64,
    cursors: &'a [u64],
    stage_taken: &'a [u64],
    blocking_seconds: f64,
    write_seconds: f64,
    bytes: u64,
    trigger: &'a str,
    unix_ms: u64,
}

/// The checkpoint a rollback without argument goes to: the latest known-good one by step.
fn latest_known_good(records: &[CheckpointRecord]) -> Option<&CheckpointRecord> {
    records
        .iter()
        .filter(|r| r.known_good)
        .max_by_key(|r| (r.step, r.unix_ms))
}

/// `stagecoach checkpoints`: the index oldest first, as a table or one line of JSON;
/// `stage_names` (index = stage) name the stages when the coordinator gave them.
pub fn render_checkpoints(
    list: &ListCheckpointsResponse,
    stage_names: &[String],
    json: bool,
) -> String {
    let mut records: Vec<&CheckpointRecord> = list.checkpoints.iter().collect();
    records.sort_by_key(|r| (r.step, r.unix_ms));
    let good = latest_known_good(&list.checkpoints);
    if json {
        let report = CheckpointsReport {
            checkpoints: records
                .iter()
                .map(|r| CheckpointReport {
                    step: r.step,
                    path: &r.path,
                    stage: r.stage,
                    stage_name: stage_names.get(r.stage as usize).map(String::as_str),
                    loss: r.loss.is_finite().then_some(r.loss),
                    known_good: r.known_good,
                    pinned: r.pinned,
                    parent: &r.parent,
                    generation: r.generation,
                    cursors: &r.cursors,
                    stage_taken: &r.stage_taken,
                    blocking_seconds: r.blocking_seconds,
                    write_seconds: r.write_seconds,
                    bytes: r.bytes,
                    trigger: &r.trigger,
                    unix_ms: r.unix_ms,
                })
                .collect(),
            latest_known_good: good.map(|r| r.path.as_str()),
        };
        return to_json(&report);
    }
    if records.is_empty() {
        return "checkpoints: none yet (`stagecoach checkpoint now` takes one)".to_owned();
    }
    let mut table = Table::new(&[
        ("step", Align::Right),
        ("path", Align::Left),
        ("stage", Align::Left),
        ("loss", Align::Right),
        ("known-good", Align::Left),
        ("pinned", Align::Left),
        ("parent", Align::Left),
        ("held", Align::Right),
        ("write", Align::Right),
        ("size", Align::Right),
        ("trigger", Align::Left),
    ]);
    for r in &records {
        let stage = match stage_names.get(r.stage as usize) {
            Some(name) => name.clone(),
            None => format!("#{}", r.stage + 1),
        };
        table.row(vec![
            r.step.to_string(),
            r.path.clone(),
            stage,
            format_loss(r.loss),
            yes_no(r.known_good),
            yes_no(r.pinned),
            or_dash(folder_name(&r.parent)).to_owned(),
            format_seconds(r.blocking_seconds),
            format_seconds(r.write_seconds),
            format_bytes(r.bytes),
            or_dash(&r.trigger).to_owned(),
        ]);
    }
    let mut out = table.render();
    out += &match good {
        Some(r) => format!(
            "\n\nlatest known-good: {} (step {}); `stagecoach rollback` goes there",
            r.path, r.step
        ),
        None => "\n\nlatest known-good: none".to_owned(),
    };
    out
}

/// The JSON form of `stagecoach events`.
#[derive(Debug, Serialize)]
struct EventsReport<'a> {
    events: Vec<EventReport<'a>>,
}

#[derive(Debug, Serialize)]
struct EventReport<'a> {
    detected_at: u64,
    first_step: u64,
    loss: Option<f64>,
    grad_norm: Option<f64>,
    /// The statistics it was judged against; `null` when there were none.
    mean: Option<f64>,
    std: Option<f64>,
    rule: &'a str,
    /// `skip_step`, `rollback`, `pause` or `manual_rollback`, as the metrics' `action` label.
    action: &'static str,
    rolled_back_to: &'a str,
    resumed_at_step: u64,
    skipped_from_step: u64,
    skipped_steps: u64,
    skipped_samples: u64,
    lr_factor: f64,
    lr_steps: u64,
    requested_by: &'a str,
    unix_ms: u64,
    detail: &'a str,
}

fn action_name(action: i32) -> &'static str {
    SpikeAction::try_from(action).map_or("unknown", action_label)
}

/// `stagecoach events`: every spike event oldest first, as a table or one line of JSON.
pub fn render_events(list: &ListEventsResponse, json: bool) -> String {
    let finite = |x: f64| x.is_finite().then_some(x);
    if json {
        let report = EventsReport {
            events: list
                .events
                .iter()
                .map(|e| EventReport {
                    detected_at: e.detected_at,
                    first_step: e.first_step,
                    loss: finite(e.loss),
                    grad_norm: finite(e.grad_norm),
                    mean: finite(e.mean),
                    std: finite(e.std),
                    rule: &e.rule,
                    action: action_name(e.action),
                    rolled_back_to: &e.rolled_back_to,
                    resumed_at_step: e.resumed_at_step,
                    skipped_from_step: e.skipped_from_step,
                    skipped_steps: e.skipped_steps,
                    skipped_samples: e.skipped_samples,
                    lr_factor: e.lr_factor,
                    lr_steps: e.lr_steps,
                    requested_by: &e.requested_by,
                    unix_ms: e.unix_ms,
                    detail: &e.detail,
                })
                .collect(),
        };
        return to_json(&report);
    }
    if list.events.is_empty() {
        return "events: none yet (no spike flagged, no rollback)".to_owned();
    }
    let mut table = Table::new(&[
        ("detected at", Align::Right),
        ("first step", Align::Right),
        ("loss", Align::Right),
        ("mean ± std", Align::Right),
        ("rule", Align::Left),
        ("action", Align::Left),
        ("rolled back to", Align::Left),
        ("skipped", Align::Left),
        ("lr", Align::Left),
        ("detail", Align::Left),
    ]);
    for e in &list.events {
        let action = SpikeAction::try_from(e.action).unwrap_or(SpikeAction::Unspecified);
        let rollback = matches!(
            action,
            SpikeAction::Rollback | SpikeAction::ManualRollback | SpikeAction::CheckpointFallback
        );
        // Only the detector's own events judge a step's loss.
        let judged = matches!(
            action,
            SpikeAction::SkipStep | SpikeAction::Rollback | SpikeAction::Pause
        );
        // A manual rollback judges no step: it may carry no statistics (zeros).
        let stats = match (judged, finite(e.mean), finite(e.std)) {
            (true, Some(m), Some(s)) if m != 0.0 || s != 0.0 => format!("{m:.4} ± {s:.4}"),
            _ => "-".to_owned(),
        };
        let to = match (rollback, e.rolled_back_to.as_str()) {
            (false, _) => "-".to_owned(),
            (true, "") if e.resumed_at_step == 0 => "the initial state (step 0)".to_owned(),
            (true, "") => "-".to_owned(),
            (true, path) => format!("{path} (step {})", e.resumed_at_step),
        };
        let skipped = if e.skipped_steps > 0 {
            format!(
                "steps {}..={} ({} samples)",
                e.skipped_from_step,
                e.skipped_from_step + e.skipped_steps - 1,
                e.skipped_samples
            )
        } else {
            "-".to_owned()
        };
        let lr = if rollback && e.lr_factor != 1.0 && e.lr_factor > 0.0 && e.lr_steps > 0 {
            format!("x{} for {} steps", e.lr_factor, e.lr_steps)
        } else {
            "-".to_owned()
        };
        let detail = match (action, e.requested_by.as_str()) {
            (SpikeAction::ManualRollback, by) if !by.is_empty() => {
                let by = format!("by {by}");
                if e.detail.is_empty() {
                    by
                } else {
                    format!("{by}: {}", e.detail)
                }
            }
            _ => e.detail.clone(),
        };
        // A manual rollback judges no step: it may carry no loss.
        let loss = match (judged, e.loss) {
            (false, 0.0) => "-".to_owned(),
            (_, l) => format_loss(l),
        };
        table.row(vec![
            e.detected_at.to_string(),
            e.first_step.to_string(),
            loss,
            stats,
            or_dash(&e.rule).to_owned(),
            action_name(e.action).to_owned(),
            to,
            skipped,
            lr,
            detail,
        ]);
    }
    table.render()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "-" }.to_owned()
}

fn format_loss(loss: f64) -> String {
    if loss.is_finite() {
        format!("{loss:.4}")
    } else if loss.is_nan() {
        "-".to_owned()
    } else {
        loss.to_string()
    }
}

/// The last component of a checkpoint path: lineage rows stay narrow (the folder is the
/// same for a whole job).
fn folder_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// `0.0123` → `12ms`, `1.5` → `1.50s`; 0 (not measured) → `-`.
fn format_seconds(s: f64) -> String {
    if !(s.is_finite() && s > 0.0) {
        "-".to_owned()
    } else if s < 1.0 {
        format!("{:.0}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

/// Sizes in binary units with one decimal: `1536` → `1.5 KiB`; 0 (not known) → `-`.
pub(super) fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n == 0 {
        return "-".to_owned();
    }
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    for unit in &UNITS[..UNITS.len() - 1] {
        if x < 1023.95 {
            return format!("{x:.1} {unit}");
        }
        x /= 1024.0;
    }
    format!("{x:.1} {}", UNITS[UNITS.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagecoach_proto::v1::SpikeEvent;

    fn record(step: u64, known_good: bool) -> CheckpointRecord {
        CheckpointRecord {
            step,
            path: format!("runs/demo/checkpoints/step-{step:08}"),
            parent: String::new(),
            generation: 1,
            stage: 0,
            cursors: vec![step * 10, step * 2],
            stage_taken: vec![step * 10, step * 2],
            loss: 2.5,
            known_good,
            pinned: false,
            unix_ms: 1_700_000_000_000 + step,
            blocking_seconds: 0.0125,
            write_seconds: 1.5,
            bytes: 4_404_019,
            trigger: "every 50 steps".into(),
            ..Default::default()
        }
    }

    fn index() -> ListCheckpointsResponse {
        let mut after = record(150, false);
        after.parent = "runs/demo/checkpoints/step-00000100".into();
        after.stage = 1;
        after.generation = 3;
        after.trigger = "on demand (ana@gpu-07)".into();
        let mut pinned = record(50, true);
        pinned.pinned = true;
        pinned.loss = f64::NAN;
        // Out of order: the CLI sorts by step.
        ListCheckpointsResponse {
            checkpoints: vec![record(100, true), after, pinned],
        }
    }

    #[test]
    fn renders_the_checkpoint_index_as_text() {
        let names = vec!["stable-1".to_owned(), "stable-2".to_owned()];
        let text = render_checkpoints(&index(), &names, false);
        let expected = "\
step  path                                 stage       loss  known-good  pinned  parent         held  write     size  trigger
  50  runs/demo/checkpoints/step-00000050  stable-1       -  yes         yes     -              12ms  1.50s  4.2 MiB  every 50 steps
 100  runs/demo/checkpoints/step-00000100  stable-1  2.5000  yes         -       -              12ms  1.50s  4.2 MiB  every 50 steps
 150  runs/demo/checkpoints/step-00000150  stable-2  2.5000  -           -       step-00000100  12ms  1.50s  4.2 MiB  on demand (ana@gpu-07)

latest known-good: runs/demo/checkpoints/step-00000100 (step 100); `stagecoach rollback` goes there";
        assert_eq!(text, expected, "\n{text}");
        // Without stage names, stages are numbered from 1 as in `stagecoach stages`.
        let text = render_checkpoints(&index(), &[], false);
        assert!(text.contains(" #2  "), "{text}");
        assert_eq!(
            render_checkpoints(&ListCheckpointsResponse::default(), &[], false),
            "checkpoints: none yet (`stagecoach checkpoint now` takes one)"
        );
        let bad = ListCheckpointsResponse {
            checkpoints: vec![record(150, false)],
        };
        assert!(render_checkpoints(&bad, &[], false).ends_with("\n\nlatest known-good: none"));
    }

    #[test]
    fn renders_the_checkpoint_index_as_json() {
        let names = vec!["stable-1".to_owned()];
        let json: serde_json::Value =
            serde_json::from_str(&render_checkpoints(&index(), &names, true)).unwrap();
        assert_eq!(
            json["latest_known_good"],
            "runs/demo/checkpoints/step-00000100"
        );
        let list = json["checkpoints"].as_array().unwrap();
        let steps: Vec<u64> = list.iter().map(|c| c["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [50, 100, 150]);
        assert_eq!(list[0]["loss"], serde_json::Value::Null);
        assert_eq!(list[0]["pinned"], true);
        assert_eq!(
            list[2],
            serde_json::json!({
                "step": 150, "path": "runs/demo/checkpoints/step-00000150", "stage": 1,
                "stage_name": null, "loss": 2.5, "known_good": false, "pinned": false,
                "parent": "runs/demo/checkpoints/step-00000100", "generation": 3,
                "cursors": [1500, 300], "stage_taken": [1500, 300],
                "blocking_seconds": 0.0125, "write_seconds": 1.5, "bytes": 4_404_019,
                "trigger": "on demand (ana@gpu-07)", "unix_ms": 1_700_000_000_150u64
            })
        );
        let empty: serde_json::Value = serde_json::from_str(&render_checkpoints(
            &ListCheckpointsResponse::default(),
            &[],
            true,
        ))
        .unwrap();
        assert_eq!(
            empty,
            serde_json::json!({"checkpoints": [], "latest_known_good": null})
        );
    }

    fn events() -> ListEventsResponse {
        let skip = SpikeEvent {
            detected_at: 212,
            first_step: 212,
            loss: 4.25,
            grad_norm: 3.0,
            mean: 2.1,
            std: 0.05,
            rule: "loss z-score 43.0 > 6".into(),
            action: SpikeAction::SkipStep.into(),
            requested_by: "coordinator".into(),
            detail: "the ranks dropped the step's update".into(),
            ..Default::default()
        };
        let rollback = SpikeEvent {
            detected_at: 214,
            first_step: 212,
            action: SpikeAction::Rollback.into(),
            rolled_back_to: "ck/step-00000200".into(),
            resumed_at_step: 200,
            skipped_from_step: 210,
            skipped_steps: 7,
            skipped_samples: 112,
            lr_factor: 0.5,
            lr_steps: 20,
            detail: String::new(),
            ..skip.clone()
        };
        let pause = SpikeEvent {
            detected_at: 260,
            first_step: 260,
            loss: f64::NAN,
            mean: f64::NAN,
            std: f64::NAN,
            rule: "loss is NaN".into(),
            action: SpikeAction::Pause.into(),
            detail: "no rollback allowed (spikes.max_rollbacks = 0)".into(),
            ..SpikeEvent::default()
        };
        let manual = SpikeEvent {
            detected_at: 270,
            first_step: 270,
            action: SpikeAction::ManualRollback.into(),
            rolled_back_to: "ck/step-00000100".into(),
            resumed_at_step: 100,
            requested_by: "ana@gpu-07".into(),
            lr_factor: 1.0,
            ..SpikeEvent::default()
        };
        ListEventsResponse {
            events: vec![skip, rollback, pause, manual],
        }
    }

    #[test]
    fn renders_the_events_as_text() {
        let text = render_events(&events(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let expected = [
            "detected at  first step    loss       mean ± std  rule                   action           rolled back to               skipped                        lr                 detail",
            "        212         212  4.2500  2.1000 ± 0.0500  loss z-score 43.0 > 6  skip_step        -                            -                              -                  the ranks dropped the step's update",
            "        214         212  4.2500  2.1000 ± 0.0500  loss z-score 43.0 > 6  rollback         ck/step-00000200 (step 200)  steps 210..=216 (112 samples)  x0.5 for 20 steps",
            "        260         260       -                -  loss is NaN            pause            -                            -                              -                  no rollback allowed (spikes.max_rollbacks = 0)",
            "        270         270       -                -  -                      manual_rollback  ck/step-00000100 (step 100)  -                              -                  by ana@gpu-07",
        ];
        assert_eq!(lines, expected, "\n{text}");
        assert_eq!(
            render_events(&ListEventsResponse::default(), false),
            "events: none yet (no spike flagged, no rollback)"
        );
    }

    #[test]
    fn renders_the_events_as_json() {
        let json: serde_json::Value =
            serde_json::from_str(&render_events(&events(), true)).unwrap();
        let list = json["events"].as_array().unwrap();
        let actions: Vec<&str> = list.iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(
            actions,
            ["skip_step", "rollback", "pause", "manual_rollback"]
        );
        assert_eq!(
            list[1],
            serde_json::json!({
                "detected_at": 214, "first_step": 212, "loss": 4.25, "grad_norm": 3.0,
                "mean": 2.1, "std": 0.05, "rule": "loss z-score 43.0 > 6", "action": "rollback",
                "rolled_back_to": "ck/step-00000200", "resumed_at_step": 200,
                "skipped_from_step": 210, "skipped_steps": 7, "skipped_samples": 112,
                "lr_factor": 0.5, "lr_steps": 20, "requested_by": "coordinator", "unix_ms": 0,
                "detail": ""
            })
        );
        assert_eq!(list[2]["loss"], serde_json::Value::Null);
        assert_eq!(list[2]["mean"], serde_json::Value::Null);
    }

    #[test]
    fn formats_sizes_and_durations() {
        assert_eq!(format_bytes(0), "-");
        assert_eq!(format_bytes(612), "612 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_bytes(6_850_000_000), "6.4 GiB");
        assert_eq!(format_seconds(0.0), "-");
        assert_eq!(format_seconds(0.0125), "12ms");
        assert_eq!(format_seconds(12.345), "12.35s");
        assert_eq!(folder_name("a/b/step-1"), "step-1");
        assert_eq!(format_loss(f64::INFINITY), "inf");
    }
}
