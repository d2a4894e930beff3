//! The text and JSON forms of what the coordinator answers: `status` and `stages`.

use serde::Serialize;
use stagecoach_proto::v1::{
    GetStatusResponse, JobState, ListStagesResponse, LrPhase, SourceWeight, StageInfo,
    TransitionCause,
};

use crate::metrics::cause_label;

/// The JSON form of `stagecoach status`.
#[derive(Debug, Serialize)]
struct StatusReport<'a> {
    job: &'a str,
    state: String,
    version: &'a str,
    uptime_seconds: u64,
    generation: u64,
    step: u64,
    total_steps: u64,
    /// `null` before the first committed step.
    loss: Option<f64>,
    workers_alive: u32,
    world_size: u32,
    detail: &'a str,
    stage: &'a str,
    /// From 0.
    stage_index: u32,
    stages: u32,
    tokens: u64,
    total_tokens: u64,
    seq_len: u32,
    rope_theta: f64,
    lr: f64,
    steps_per_second: f64,
    /// `null` in the last stage.
    next_transition: Option<NextReport<'a>>,
    /// The last failure and what is done about it (`null` before the first).
    last_failure: Option<FailureReport<'a>>,
    /// Writes waiting for the state store (above 0 during an outage).
    pending_writes: u32,
    /// The leading replica's URL (`null` without `--ha`).
    leader: Option<&'a str>,
    /// The replicas standing by (empty without `--ha`).
    standbys: &'a [String],
}

#[derive(Debug, Serialize)]
struct FailureReport<'a> {
    worker: &'a str,
    kind: &'static str,
    step: u64,
    attempts: u32,
    reason: &'a str,
    recovery: &'a str,
    unix_ms: u64,
}

#[derive(Debug, Serialize)]
struct NextReport<'a> {
    to: &'a str,
    at_step: u64,
    at_tokens: u64,
    /// `null` when unknown.
    eta_seconds: Option<f64>,
}

/// `stagecoach status`: one `label: value` line each, or one line of JSON.
pub fn render_status(status: &GetStatusResponse, json: bool) -> String {
    let report = StatusReport {
        job: &status.job,
        state: state_name(status.state),
        version: &status.coordinator_version,
        uptime_seconds: status.uptime_seconds,
        generation: status.generation,
        step: status.step,
        total_steps: status.total_steps,
        loss: status.loss.is_finite().then_some(status.loss),
        workers_alive: status.workers_alive,
        world_size: status.world_size,
        detail: &status.detail,
        stage: &status.stage,
        stage_index: status.stage_index,
        stages: status.stages,
        tokens: status.tokens,
        total_tokens: status.total_tokens,
        seq_len: status.seq_len,
        rope_theta: status.rope_theta,
        lr: status.lr,
        steps_per_second: status.steps_per_second,
        next_transition: status.next_transition.as_ref().map(|n| NextReport {
            to: &n.to,
            at_step: n.at_step,
            at_tokens: n.at_tokens,
            eta_seconds: (n.eta_seconds >= 0.0 && n.eta_seconds.is_finite())
                .then_some(n.eta_seconds),
        }),
        last_failure: status.last_failure.as_ref().map(|f| FailureReport {
            worker: &f.worker,
            kind: stagecoach_core::recovery::kind_label(f.kind()),
            step: f.step,
            attempts: f.attempts,
            reason: &f.reason,
            recovery: &f.recovery,
            unix_ms: f.unix_ms,
        }),
        pending_writes: status.pending_writes,
        leader: (!status.leader.is_empty()).then_some(status.leader.as_str()),
        standbys: &status.standbys,
    };
    if json {
        return to_json(&report);
    }
    let mut lines = vec![
        ("job", report.job.to_owned()),
        ("state", report.state.clone()),
        ("version", report.version.to_owned()),
        ("uptime", format_uptime(report.uptime_seconds)),
    ];
    if let Some(leader) = report.leader {
        lines.push(("leader", leader.to_owned()));
        lines.push((
            "standbys",
            match report.standbys {
                [] => "none".to_owned(),
                s => s.join(", "),
            },
        ));
    }
    if report.stages > 0 {
        lines.push((
            "stage",
            format!(
                "{} ({}/{})",
                report.stage,
                report.stage_index + 1,
                report.stages
            ),
        ));
    }
    if report.total_steps > 0 {
        lines.push(("step", format!("{} / {}", report.step, report.total_steps)));
        if report.total_tokens > 0 {
            lines.push((
                "tokens",
                format!(
                    "{} / {}",
                    human_count(report.tokens),
                    human_count(report.total_tokens)
                ),
            ));
        }
        let loss = report.loss.map_or("-".to_owned(), |l| format!("{l:.4}"));
        lines.push(("loss", loss));
        lines.push((
            "workers",
            format!(
                "{} alive, {} in generation {}",
                report.workers_alive, report.world_size, report.generation
            ),
        ));
    }
    if report.stages > 0 {
        lines.push(("seq_len", report.seq_len.to_string()));
        lines.push(("rope θ", format_theta(report.rope_theta)));
        // The lr of the last dispatched step: none before the first.
        let lr = match report.step == 0 && report.lr == 0.0 {
            true => "-".to_owned(),
            false => format_lr(report.lr),
        };
        lines.push(("lr", lr));
        if report.steps_per_second > 0.0 {
            lines.push(("speed", format!("{:.2} steps/s", report.steps_per_second)));
        }
        let next = match &report.next_transition {
            Some(n) => format!(
                "{} at step {} ({} tokens), {}",
                n.to,
                n.at_step,
                human_count(n.at_tokens),
                n.eta_seconds.map_or("eta unknown".to_owned(), format_eta)
            ),
            None => "none: this is the last stage".to_owned(),
        };
        lines.push(("next", next));
    }
    if !report.detail.is_empty() {
        lines.push(("detail", report.detail.to_owned()));
    }
    if let Some(f) = &report.last_failure {
        let who = if f.worker.is_empty() {
            String::new()
        } else {
            format!("worker {} ", f.worker)
        };
        lines.push((
            "failure",
            format!(
                "{who}({} failure {} at step {}): {}; {}",
                f.kind, f.attempts, f.step, f.reason, f.recovery
            ),
        ));
    }
    if report.pending_writes > 0 {
        lines.push((
            "store",
            format!(
                "{} writes waiting: the state store is unreachable",
                report.pending_writes
            ),
        ));
    }
    lines
        .iter()
        .map(|(label, value)| format!("{:<10}{value}", format!("{label}:")))
        .collect::<Vec<_>>()
        .join("\n")
}
// ---------------------------------------------------------------------------------------------
// `stages`
// ---------------------------------------------------------------------------------------------

/// The JSON form of `stagecoach stages`.
#[derive(Debug, Serialize)]
struct StagesReport<'a> {
    step: u64,
    /// Index of the current stage.
    current: u32,
    stages: Vec<StageReport<'a>>,
    transitions: Vec<TransitionReport<'a>>,
    evaluations: Vec<EvaluationReport<'a>>,
}

#[derive(Debug, Serialize)]
struct StageReport<'a> {
    index: u32,
    name: &'a str,
    until_step: u64,
    until_tokens: u64,
    seq_len: u32,
    rope_theta: f64,
    lr_phase: &'static str,
    samples_per_step: u32,
    micro_batch_size: u32,
    mix: Vec<WeightReport<'a>>,
    /// `done`, `current`, `planned`, or `skipped` (a later stage was set by hand).
    status: &'static str,
    start_step: Option<u64>,
    end_step: Option<u64>,
    tokens: Vec<TokensReport<'a>>,
}

#[derive(Debug, Serialize)]
pub(super) struct WeightReport<'a> {
    pub(super) source: &'a str,
    pub(super) weight: f64,
}

#[derive(Debug, Serialize)]
struct TokensReport<'a> {
    source: &'a str,
    tokens: u64,
}

#[derive(Debug, Serialize)]
struct TransitionReport<'a> {
    step: u64,
    tokens: u64,
    from: &'a str,
    to: &'a str,
    cause: &'static str,
    requested_by: &'a str,
    unix_ms: u64,
    detail: &'a str,
}

#[derive(Debug, Serialize)]
struct EvaluationReport<'a> {
    step: u64,
    stage: &'a str,
    trigger: &'a str,
    seq_len: u32,
    unix_ms: u64,
    losses: Vec<LossReport<'a>>,
}

#[derive(Debug, Serialize)]
struct LossReport<'a> {
    source: &'a str,
    loss: f64,
    samples: u32,
}

fn stage_status(stage: &StageInfo, current: u32) -> &'static str {
    match (stage.started, stage.ended) {
        (_, true) => "done",
        (true, false) => "current",
        (false, false) if stage.index < current => "skipped",
        (false, false) => "planned",
    }
}

/// `stagecoach stages`: the plan with each stage's status, the tokens each trained per source,
/// the transitions and the evaluations, as tables; or one line of JSON.
pub fn render_stages(list: &ListStagesResponse, json: bool) -> String {
    let report = StagesReport {
        step: list.step,
        current: list.current,
        stages: list
            .stages
            .iter()
            .map(|s| StageReport {
                index: s.index,
                name: &s.name,
                until_step: s.until_step,
                until_tokens: s.until_tokens,
                seq_len: s.seq_len,
                rope_theta: s.rope_theta,
                lr_phase: lr_phase_name(s.lr_phase),
                samples_per_step: s.global_batch,
                micro_batch_size: s.micro_batch_size,
                mix: s
                    .mix
                    .iter()
                    .map(|w| WeightReport {
                        source: &w.source,
                        weight: w.weight,
                    })
                    .collect(),
                status: stage_status(s, list.current),
                start_step: s.started.then_some(s.start_step),
                end_step: s.ended.then_some(s.end_step),
                tokens: s
                    .tokens
                    .iter()
                    .map(|t| TokensReport {
                        source: &t.source,
                        tokens: t.tokens,
                    })
                    .collect(),
            })
            .collect(),
        transitions: list
            .transitions
            .iter()
            .map(|t| TransitionReport {
                step: t.step,
                tokens: t.tokens,
                from: &t.from,
                to: &t.to,
                cause: cause_name(t.cause),
                requested_by: &t.requested_by,
                unix_ms: t.unix_ms,
                detail: &t.detail,
            })
            .collect(),
        evaluations: list
            .evaluations
            .iter()
            .map(|e| EvaluationReport {
                step: e.step,
                stage: &e.stage,
                trigger: &e.trigger,
                seq_len: e.seq_len,
                unix_ms: e.unix_ms,
                losses: e
                    .losses
                    .iter()
                    .map(|l| LossReport {
                        source: &l.source,
                        loss: l.loss,
                        samples: l.samples,
                    })
                    .collect(),
            })
            .collect(),
    };
    if json {
        return to_json(&report);
    }

    let current = report
        .stages
        .iter()
        .find(|s| s.index == report.current)
        .map_or("-", |s| s.name);
    let mut out = format!(
        "step {}, stage {}/{} ({current})\n\n",
        report.step,
        report.current + 1,
        report.stages.len()
    );

    let mut plan = Table::new(&[
        ("#", Align::Right),
        ("stage", Align::Left),
        ("until step", Align::Right),
        ("until tokens", Align::Right),
        ("seq_len", Align::Right),
        ("rope θ", Align::Right),
        ("lr", Align::Left),
        ("samples/step", Align::Right),
        ("mix", Align::Left),
        ("status", Align::Left),
    ]);
    for (s, info) in report.stages.iter().zip(&list.stages) {
        let status = match s.status {
            "done" => format!("done ({}..{})", info.start_step, info.end_step),
            "current" => format!("current (since step {})", info.start_step),
            other => other.to_owned(),
        };
        plan.row(vec![
            (s.index + 1).to_string(),
            s.name.to_owned(),
            s.until_step.to_string(),
            human_count(s.until_tokens),
            s.seq_len.to_string(),
            format_theta(s.rope_theta),
            s.lr_phase.to_owned(),
            s.samples_per_step.to_string(),
            format_mix(&info.mix),
            status,
        ]);
    }
    out += &plan.render();

    // One column per source, in the order the stages first name them.
    let mut sources: Vec<&str> = Vec::new();
    for s in &list.stages {
        let names = s.mix.iter().map(|w| w.source.as_str());
        for name in names.chain(s.tokens.iter().map(|t| t.source.as_str())) {
            if !sources.contains(&name) {
                sources.push(name);
            }
        }
    }
    out += "\n\ntokens trained per source\n";
    let mut header = vec![("#", Align::Right), ("stage", Align::Left)];
    header.extend(sources.iter().map(|s| (*s, Align::Right)));
    let mut tokens = Table::new(&header);
    for s in &report.stages {
        let mut row = vec![(s.index + 1).to_string(), s.name.to_owned()];
        row.extend(sources.iter().map(|source| {
            if s.start_step.is_none() {
                return "-".to_owned();
            }
            let n = s.tokens.iter().find(|t| t.source == *source);
            human_count(n.map_or(0, |t| t.tokens))
        }));
        tokens.row(row);
    }
    out += &tokens.render();

    if report.transitions.is_empty() {
        out += "\n\ntransitions: none yet";
    } else {
        out += "\n\ntransitions\n";
        let mut table = Table::new(&[
            ("step", Align::Right),
            ("tokens", Align::Right),
            ("from → to", Align::Left),
            ("cause", Align::Left),
            ("requested by", Align::Left),
            ("detail", Align::Left),
        ]);
        for t in &report.transitions {
            table.row(vec![
                t.step.to_string(),
                human_count(t.tokens),
                format!("{} → {}", or_dash(t.from), t.to),
                t.cause.to_owned(),
                or_dash(t.requested_by).to_owned(),
                t.detail.to_owned(),
            ]);
        }
        out += &table.render();
    }

    if report.evaluations.is_empty() {
        out += "\n\nevaluations: none yet";
    } else {
        // Columns for the sources the evaluations measured, which may be fewer than the job's.
        let mut evaluated: Vec<&str> = Vec::new();
        for l in report.evaluations.iter().flat_map(|e| &e.losses) {
            if !evaluated.contains(&l.source) {
                evaluated.push(l.source);
            }
        }
        out += "\n\nevaluations (validation loss per source)\n";
        let mut header = vec![
            ("stage", Align::Left),
            ("step", Align::Right),
            ("trigger", Align::Left),
        ];
        header.extend(evaluated.iter().map(|s| (*s, Align::Right)));
        let mut table = Table::new(&header);
        for e in &report.evaluations {
            let mut row = vec![e.stage.to_owned(), e.step.to_string(), e.trigger.to_owned()];
            row.extend(evaluated.iter().map(|source| {
                e.losses
                    .iter()
                    .find(|l| l.source == *source)
                    .map_or("-".to_owned(), |l| format!("{:.4}", l.loss))
            }));
            table.row(row);
        }
        out += &table.render();
    }
    out
}
pub(super) fn to_json(value: &impl Serialize) -> String {
    // Non-finite floats become `null`; nothing else in these reports can fail to serialize.
    serde_json::to_string(value).expect("reports hold strings, numbers and options")
}

/// `JOB_STATE_WAITING` → `waiting`; a value this CLI does not know → `unknown (7)`.
fn state_name(state: i32) -> String {
    match JobState::try_from(state) {
        Ok(state) => {
            let name = state.as_str_name();
            name.strip_prefix("JOB_STATE_")
                .unwrap_or(name)
                .to_lowercase()
        }
        Err(_) => format!("unknown ({state})"),
    }
}

/// The lr column: `schedule` when the stage follows the job's schedule.
pub(super) fn lr_phase_name(phase: i32) -> &'static str {
    match LrPhase::try_from(phase) {
        Ok(LrPhase::Unspecified) => "schedule",
        Ok(LrPhase::Stable) => "stable",
        Ok(LrPhase::Decay) => "decay",
        Err(_) => "unknown",
    }
}

/// The same names as the metrics' `cause` label.
fn cause_name(cause: i32) -> &'static str {
    TransitionCause::try_from(cause).map_or("unknown", cause_label)
}

pub(super) fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// `prose=0.75 code=0.20 math=0.05`; sources that weigh 0 are left out, as in the job file.
pub fn format_mix(mix: &[SourceWeight]) -> String {
    format_weights(mix.iter().map(|w| (w.source.as_str(), w.weight)))
}

pub(super) fn format_weights<'a>(weights: impl Iterator<Item = (&'a str, f64)>) -> String {
    let mix: Vec<String> = weights
        .filter(|(_, w)| *w != 0.0)
        .map(|(source, w)| format!("{source}={}", format_weight(w)))
        .collect();
    if mix.is_empty() {
        "-".to_owned()
    } else {
        mix.join(" ")
    }
}

/// Two decimals, more when they matter (up to four): `0.2` → `0.20`, `0.125` → `0.125`.
fn format_weight(w: f64) -> String {
    let mut s = format!("{w:.4}");
    while s.ends_with('0') && s.len() > s.find('.').map_or(0, |dot| dot + 3) {
        s.pop();
    }
    s
}

/// Counts in K, M, B (10⁹) and T with one decimal: `1_234_567` → `1.2M`; below 1000 as is.
pub fn human_count(n: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")];
    let x = n as f64;
    for (i, (scale, unit)) in UNITS.iter().enumerate() {
        if x >= *scale {
            let value = format!("{:.1}", x / scale);
            // 999_960 is 1000.0K once rounded: say 1.0M.
            if value == "1000.0" && i > 0 {
                return format!("1.0{}", UNITS[i - 1].1);
            }
            return format!("{value}{unit}");
        }
    }
    n.to_string()
}

/// RoPE θ as written in a job file (`10000`, `100000`); 0 means the model's own.
pub(super) fn format_theta(theta: f64) -> String {
    if theta == 0.0 {
        "model's".to_owned()
    } else {
        format!("{theta}")
    }
}

pub(super) fn format_lr(lr: f64) -> String {
    if lr == 0.0 {
        "0".to_owned()
    } else {
        format!("{lr:.2e}")
    }
}

/// A time to come: `in 52s`, `in 3m12s`, `in 2h05m`, `in 3d04h`.
fn format_eta(secs: f64) -> String {
    let s = secs.round() as u64;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("in {s}s"),
        (0, 0, _) => format!("in {m}m{s:02}s"),
        (0, _, _) => format!("in {h}h{m:02}m"),
        _ => format!("in {d}d{h:02}h"),
    }
}

/// `3725` → `1h 02m 05s`.
fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m {s:02}s"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Align {
    Left,
    Right,
}

/// A plain text table: a header row, columns two spaces apart, widths in characters.
pub(super) struct Table {
    header: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[(&str, Align)]) -> Table {
        Table {
            header: header.iter().map(|(h, a)| ((*h).to_owned(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(super) fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for ((cell, w), (_, align)) in cells.zip(&widths).zip(&self.header) {
                if !out.is_empty() {
                    out += "  ";
                }
                let pad = " ".repeat(w.saturating_sub(width(cell)));
                match align {
                    Align::Left => out += &format!("{cell}{pad}"),
                    Align::Right => out += &format!("{pad}{cell}"),
                }
            }
            out.trim_end().to_owned()
        };
        let mut lines = vec![line(&mut self.header.iter().map(|(h, _)| h.as_str()))];
        for row in &self.rows {
            lines.push(line(&mut row.iter().map(String::as_str)));
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagecoach_proto::v1::{Evaluation, NextTransition, SourceLoss, SourceTokens, Transition};

    #[test]
    fn uptime_is_readable() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(59), "59s");
        assert_eq!(format_uptime(65), "1m 05s");
        assert_eq!(format_uptime(3_725), "1h 02m 05s");
        assert_eq!(format_uptime(2 * 86_400 + 61), "2d 00h 01m 01s");
    }

    #[test]
    fn counts_etas_and_weights_are_readable() {
        assert_eq!(human_count(0), "0");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(4_096), "4.1K");
        assert_eq!(human_count(1_228_800), "1.2M");
        assert_eq!(human_count(999_999), "1.0M");
        assert_eq!(human_count(1_700_000_000), "1.7B");
        assert_eq!(human_count(6_000_000_000_000), "6.0T");
        assert_eq!(human_count(11_000_000_000_000), "11.0T");

        assert_eq!(format_eta(0.0), "in 0s");
        assert_eq!(format_eta(51.6), "in 52s");
        assert_eq!(format_eta(192.0), "in 3m12s");
        assert_eq!(format_eta(7_500.0), "in 2h05m");
        assert_eq!(format_eta(3.0 * 86_400.0 + 4.0 * 3_600.0), "in 3d04h");

        assert_eq!(format_weight(0.2), "0.20");
        assert_eq!(format_weight(0.75), "0.75");
        assert_eq!(format_weight(0.125), "0.125");
        assert_eq!(format_weight(1.0), "1.00");
        assert_eq!(format_weight(1.0 / 3.0), "0.3333");
        assert_eq!(format_theta(10_000.0), "10000");
        assert_eq!(format_theta(0.0), "model's");
        assert_eq!(format_lr(3e-3), "3.00e-3");
        assert_eq!(format_lr(0.0), "0");
    }

    #[test]
    fn renders_status_as_text_and_json() {
        let status = GetStatusResponse {
            job: "llama".into(),
            state: JobState::Running.into(),
            coordinator_version: "0.1.0".into(),
            uptime_seconds: 65,
            ..Default::default()
        };
        // A coordinator without a job: no stage, step or workers lines.
        assert_eq!(
            render_status(&status, false),
            "job:      llama\nstate:    running\nversion:  0.1.0\nuptime:   1m 05s"
        );
        let json: serde_json::Value = serde_json::from_str(&render_status(&status, true)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "job": "llama", "state": "running", "version": "0.1.0", "uptime_seconds": 65,
                "generation": 0, "step": 0, "total_steps": 0, "loss": 0.0, "workers_alive": 0,
                "world_size": 0, "detail": "", "stage": "", "stage_index": 0, "stages": 0,
                "tokens": 0, "total_tokens": 0, "seq_len": 0, "rope_theta": 0.0, "lr": 0.0,
                "steps_per_second": 0.0, "next_transition": null, "last_failure": null,
                "pending_writes": 0, "leader": null, "standbys": []
            })
        );
        assert_eq!(state_name(42), "unknown (42)");
        // Replicas (`--ha`): the leader and the standbys get their lines.
        let replicated = GetStatusResponse {
            leader: "http://a:7070".into(),
            standbys: vec!["http://b:7070".into(), "http://c:7070".into()],
            ..status.clone()
        };
        let text = render_status(&replicated, false);
        assert!(text.contains("\nleader:   http://a:7070\n"), "{text}");
        assert!(
            text.ends_with("standbys: http://b:7070, http://c:7070"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_status(&replicated, true)).unwrap();
        assert_eq!(json["leader"], "http://a:7070");
        assert_eq!(
            json["standbys"],
            serde_json::json!(["http://b:7070", "http://c:7070"])
        );
        // A failure and a store outage each get their line.
        let failing = GetStatusResponse {
            state: JobState::Paused.into(),
            last_failure: Some(stagecoach_proto::v1::Failure {
                worker: "w2-00ff".into(),
                kind: stagecoach_proto::v1::FailureKind::Data.into(),
                step: 35,
                reason: "shard a.ds: token id 60000 is not below 49152".into(),
                attempts: 3,
                recovery: "paused: fix the cause, then `stagecoach resume`".into(),
                ..Default::default()
            }),
            pending_writes: 2,
            ..status
        };
        let text = render_status(&failing, false);
        assert!(
            text.contains("failure:  worker w2-00ff (data failure 3 at step 35): shard a.ds: token id 60000 is not below 49152; paused: fix the cause, then `stagecoach resume`"),
            "{text}"
        );
        assert!(text.contains("store:    2 writes waiting"), "{text}");
    }

    fn training_status() -> GetStatusResponse {
        GetStatusResponse {
            job: "demo".into(),
            state: JobState::Running.into(),
            coordinator_version: "0.1.0".into(),
            uptime_seconds: 65,
            generation: 4,
            step: 130,
            total_steps: 300,
            loss: 2.5,
            workers_alive: 3,
            world_size: 2,
            detail: "a worker is a spare".into(),
            stage: "stable-2".into(),
            stage_index: 1,
            stages: 4,
            tokens: 532_480,
            total_tokens: 1_228_800,
            next_transition: Some(NextTransition {
                to: "decay".into(),
                at_step: 240,
                at_tokens: 983_040,
                eta_seconds: 192.2,
            }),
            seq_len: 512,
            rope_theta: 10_000.0,
            lr: 3e-3,
            steps_per_second: 0.5729,
            ..Default::default()
        }
    }

    #[test]
    fn renders_the_status_of_a_curriculum() {
        let status = training_status();
        assert_eq!(
            render_status(&status, false),
            "job:      demo\n\
             state:    running\n\
             version:  0.1.0\n\
             uptime:   1m 05s\n\
             stage:    stable-2 (2/4)\n\
             step:     130 / 300\n\
             tokens:   532.5K / 1.2M\n\
             loss:     2.5000\n\
             workers:  3 alive, 2 in generation 4\n\
             seq_len:  512\n\
             rope θ:   10000\n\
             lr:       3.00e-3\n\
             speed:    0.57 steps/s\n\
             next:     decay at step 240 (983.0K tokens), in 3m12s\n\
             detail:   a worker is a spare"
        );
        let json: serde_json::Value = serde_json::from_str(&render_status(&status, true)).unwrap();
        assert_eq!(json["stage"], "stable-2");
        assert_eq!(json["stage_index"], 1);
        assert_eq!(json["tokens"], 532_480);
        assert_eq!(
            json["next_transition"],
            serde_json::json!({"to": "decay", "at_step": 240, "at_tokens": 983_040,
                               "eta_seconds": 192.2})
        );

        // Paused: no rate, so no ETA; the last stage has no next transition.
        let mut paused = training_status();
        paused.state = JobState::Paused.into();
        paused.steps_per_second = 0.0;
        paused.next_transition.as_mut().unwrap().eta_seconds = -1.0;
        let text = render_status(&paused, false);
        assert!(
            text.contains("\nnext:     decay at step 240 (983.0K tokens), eta unknown\n"),
            "{text}"
        );
        assert!(!text.contains("speed:"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render_status(&paused, true)).unwrap();
        assert_eq!(json["state"], "paused");
        assert_eq!(
            json["next_transition"]["eta_seconds"],
            serde_json::Value::Null
        );

        let mut last = training_status();
        last.next_transition = None;
        last.loss = f64::NAN;
        let text = render_status(&last, false);
        assert!(
            text.contains("\nnext:     none: this is the last stage\n"),
            "{text}"
        );
        assert!(text.contains("\nloss:     -\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render_status(&last, true)).unwrap();
        assert_eq!(json["loss"], serde_json::Value::Null);

        // Waiting for workers: nothing dispatched yet, so no learning rate either.
        let waiting = GetStatusResponse {
            state: JobState::Waiting.into(),
            step: 0,
            lr: 0.0,
            ..training_status()
        };
        let text = render_status(&waiting, false);
        assert!(text.contains("\nlr:       -\n"), "{text}");
        assert_eq!(json["next_transition"], serde_json::Value::Null);
    }

    fn weight(source: &str, weight: f64) -> SourceWeight {
        SourceWeight {
            source: source.into(),
            weight,
        }
    }

    fn stage(index: u32, name: &str, until_step: u64, seq_len: u32) -> StageInfo {
        StageInfo {
            index,
            name: name.into(),
            until_step,
            until_tokens: until_step * 4_096,
            seq_len,
            rope_theta: 10_000.0,
            global_batch: 4_096 / seq_len,
            micro_batch_size: 2_048 / seq_len,
            ..Default::default()
        }
    }

    fn tokens(source: &str, tokens: u64) -> SourceTokens {
        SourceTokens {
            source: source.into(),
            tokens,
        }
    }

    fn loss(source: &str, loss: f64) -> SourceLoss {
        SourceLoss {
            source: source.into(),
            loss,
            samples: 16,
        }
    }

    /// Four stages: the first done, the second current (its mixture edited), two planned.
    fn stages_list() -> ListStagesResponse {
        let mut s1 = stage(0, "stable-1", 120, 256);
        s1.mix = vec![
            weight("prose", 0.9),
            weight("code", 0.1),
            weight("math", 0.0),
        ];
        s1.started = true;
        s1.ended = true;
        s1.end_step = 120;
        s1.tokens = vec![
            tokens("prose", 442_368),
            tokens("code", 49_152),
            tokens("math", 0),
        ];
        let mut s2 = stage(1, "stable-2", 240, 512);
        s2.mix = vec![
            weight("prose", 0.75),
            weight("code", 0.2),
            weight("math", 0.05),
        ];
        s2.started = true;
        s2.start_step = 120;
        s2.tokens = vec![
            tokens("prose", 30_720),
            tokens("code", 8_192),
            tokens("math", 2_048),
        ];
        let mut s3 = stage(2, "decay", 280, 512);
        s3.lr_phase = LrPhase::Decay.into();
        s3.mix = vec![
            weight("prose", 0.5),
            weight("code", 0.25),
            weight("math", 0.25),
        ];
        let mut s4 = stage(3, "long", 300, 1_024);
        s4.rope_theta = 100_000.0;
        s4.lr_phase = LrPhase::Stable.into();
        s4.mix = vec![weight("prose", 1.0)];
        let transition =
            |step, from: &str, to: &str, cause: TransitionCause, by: &str| Transition {
                step,
                tokens: step * 4_096,
                from: from.into(),
                to: to.into(),
                cause: cause.into(),
                requested_by: by.into(),
                unix_ms: 1_700_000_000_000 + step,
                detail: String::new(),
                from_tokens: vec![],
            };
        let mut budget = transition(
            120,
            "stable-1",
            "stable-2",
            TransitionCause::Budget,
            "coordinator",
        );
        budget.detail = "code: 256 tokens skipped to realign".into();
        ListStagesResponse {
            stages: vec![s1, s2, s3, s4],
            transitions: vec![
                transition(0, "", "stable-1", TransitionCause::Start, "coordinator"),
                budget,
                transition(
                    130,
                    "stable-2",
                    "stable-2",
                    TransitionCause::MixChange,
                    "ana@gpu-07",
                ),
            ],
            evaluations: vec![
                Evaluation {
                    step: 120,
                    stage: "stable-1".into(),
                    trigger: "stage end".into(),
                    seq_len: 256,
                    losses: vec![
                        loss("prose", 2.345_67),
                        loss("code", 3.1),
                        loss("math", 2.9),
                    ],
                    unix_ms: 1,
                },
                Evaluation {
                    step: 130,
                    stage: "stable-2".into(),
                    trigger: "on demand".into(),
                    seq_len: 256,
                    losses: vec![loss("prose", 2.2), loss("math", 2.8)],
                    unix_ms: 2,
                },
            ],
            current: 1,
            step: 130,
        }
    }

    #[test]
    fn renders_the_stages_as_text() {
        let text = render_stages(&stages_list(), false);
        let expected = "\
step 130, stage 2/4 (stable-2)

#  stage     until step  until tokens  seq_len  rope θ  lr        samples/step  mix                             status
1  stable-1         120        491.5K      256   10000  schedule            16  prose=0.90 code=0.10            done (0..120)
2  stable-2         240        983.0K      512   10000  schedule             8  prose=0.75 code=0.20 math=0.05  current (since step 120)
3  decay            280          1.1M      512   10000  decay                8  prose=0.50 code=0.25 math=0.25  planned
4  long             300          1.2M     1024  100000  stable               4  prose=1.00                      planned

tokens trained per source
#  stage      prose   code  math
1  stable-1  442.4K  49.2K     0
2  stable-2   30.7K   8.2K  2.0K
3  decay          -      -     -
4  long           -      -     -

transitions
step  tokens  from → to            cause       requested by  detail
   0       0  - → stable-1         start       coordinator
 120  491.5K  stable-1 → stable-2  budget      coordinator   code: 256 tokens skipped to realign
 130  532.5K  stable-2 → stable-2  mix_change  ana@gpu-07

evaluations (validation loss per source)
stage     step  trigger     prose    code    math
stable-1   120  stage end  2.3457  3.1000  2.9000
stable-2   130  on demand  2.2000       -  2.8000";
        assert_eq!(text, expected, "\n{text}");

        // A stage jumped over by `stage set` is neither done nor planned.
        let mut list = stages_list();
        list.current = 2;
        list.stages[1].ended = true;
        list.stages[1].end_step = 140;
        list.stages[2].started = false;
        list.stages.swap(1, 2);
        list.current = 3;
        list.stages[3].started = true;
        list.stages[3].start_step = 140;
        let statuses: Vec<&str> = list
            .stages
            .iter()
            .map(|s| stage_status(s, list.current))
            .collect();
        assert_eq!(statuses, ["done", "skipped", "done", "current"]);
    }

    #[test]
    fn renders_the_stages_as_json() {
        let json: serde_json::Value =
            serde_json::from_str(&render_stages(&stages_list(), true)).unwrap();
        assert_eq!(json["step"], 130);
        assert_eq!(json["current"], 1);
        let stages = json["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 4);
        assert_eq!(
            stages[0],
            serde_json::json!({
                "index": 0, "name": "stable-1", "until_step": 120, "until_tokens": 491_520,
                "seq_len": 256, "rope_theta": 10_000.0, "lr_phase": "schedule",
                "samples_per_step": 16, "micro_batch_size": 8,
                "mix": [{"source": "prose", "weight": 0.9}, {"source": "code", "weight": 0.1},
                        {"source": "math", "weight": 0.0}],
                "status": "done", "start_step": 0, "end_step": 120,
                "tokens": [{"source": "prose", "tokens": 442_368},
                           {"source": "code", "tokens": 49_152},
                           {"source": "math", "tokens": 0}]
            })
        );
        assert_eq!(stages[1]["status"], "current");
        assert_eq!(stages[1]["end_step"], serde_json::Value::Null);
        assert_eq!(stages[2]["lr_phase"], "decay");
        assert_eq!(stages[2]["start_step"], serde_json::Value::Null);
        assert_eq!(json["transitions"][0]["cause"], "start");
        assert_eq!(json["transitions"][2]["cause"], "mix_change");
        assert_eq!(json["transitions"][2]["requested_by"], "ana@gpu-07");
        assert_eq!(json["evaluations"][1]["trigger"], "on demand");
        assert_eq!(
            json["evaluations"][1]["losses"][1],
            serde_json::json!({"source": "math", "loss": 2.8, "samples": 16})
        );
    }

    #[test]
    fn renders_stages_before_anything_happened() {
        let list = ListStagesResponse {
            stages: vec![stage(0, "only", 10, 128)],
            ..Default::default()
        };
        let text = render_stages(&list, false);
        assert!(
            text.ends_with("transitions: none yet\n\nevaluations: none yet"),
            "{text}"
        );
        assert!(text.contains("1  only           10         41.0K      128   10000  schedule            32  -    planned"), "{text}");
    }

    #[test]
    fn tables_align_by_characters() {
        let mut t = Table::new(&[("from → to", Align::Left), ("n", Align::Right)]);
        t.row(vec!["a → b".into(), "7".into()]);
        t.row(vec!["θ".into(), "1000".into()]);
        assert_eq!(
            t.render(),
            "from → to     n\na → b         7\nθ          1000"
        );
    }
}
