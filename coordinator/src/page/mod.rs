//! The status page: one server-rendered HTML page (inline SVG charts, inline CSS, no script,
//! no asset from anywhere) that a person can read at a glance: the job's state and why, the
//! stages done, current and planned with their budgets, the loss with stage boundaries and
//! rollbacks, the validation loss per source, tokens per source, the workers and generation,
//! checkpoints, and spike, failure and control events. It refreshes itself every few seconds
//! (`<meta http-equiv="refresh">`).
//!
//! - [`Report`] is what the page (and `stagecoach plot`) draws: filled by [`gather`] from a
//!   running driver (its snapshot and view, and the answers it gives the control API's
//!   ListStages, ListCheckpoints and ListEvents), or from a finished run's ledger by
//!   `cli/plot.rs`.
//! - [`svg`] draws the charts; [`render`] lays out the page around them.
//!
//! Everything that comes from the job file or from a client (stage, source and worker names,
//! details, paths, identities) is escaped with [`escape`].

pub mod svg;

use std::fmt::Write;
use std::time::Duration;

use stagecoach_proto::v1;
use tokio::sync::watch;

use crate::driver::history::{LossHistory, View, WorkerView};
use crate::driver::{ControlReply, ControlRequest, Event};
use crate::status::Snapshot;

/// Seconds between the page's refreshes.
pub const REFRESH_SECONDS: u32 = 5;

/// How long the page waits for each answer of the driver before it renders without it.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Events and checkpoints listed on the page (the newest).
const EVENTS_SHOWN: usize = 40;
const CHECKPOINTS_SHOWN: usize = 20;

/// What the page and the plots draw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub job: String,
    /// The driver's snapshot (none for plots of a finished run, read from its ledger).
    pub status: Option<Snapshot>,
    /// Stages (done, current, planned), transitions and evaluations.
    pub stages: v1::ListStagesResponse,
    pub checkpoints: Vec<v1::CheckpointRecord>,
    pub events: Vec<v1::SpikeEvent>,
    pub loss: LossHistory,
    pub workers: Vec<WorkerView>,
    /// Committed steps, and the job's total.
    pub step: u64,
    pub total_steps: u64,
    pub tokens_per_step: u64,
    /// What could not be read (the driver did not answer in time), for the page to say.
    pub missing: Vec<String>,
}

impl Report {
    /// The job's sources, in the order of the job file.
    pub fn sources(&self) -> Vec<String> {
        match self.stages.stages.first() {
            Some(s) => s.mix.iter().map(|m| m.source.clone()).collect(),
            None => {
                let mut names: Vec<String> = vec![];
                for l in self.stages.evaluations.iter().flat_map(|e| &e.losses) {
                    if !names.contains(&l.source) {
                        names.push(l.source.clone());
                    }
                }
                names
            }
        }
    }
}

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Done,
    Current,
    Planned,
    /// Never trained: a `stage set` went past it.
    Skipped,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Done => "done",
            Phase::Current => "current",
            Phase::Planned => "planned",
            Phase::Skipped => "skipped",
        }
    }
}

/// A stage on the step axis: where it began and ended, or, ahead, where the plan puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub name: String,
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub phase: Phase,
}

/// The stages of `r` on the step axis.
pub fn spans(r: &Report) -> Vec<Span> {
    let stages = &r.stages.stages;
    let finished = r.total_steps > 0 && r.step >= r.total_steps;
    let mut out: Vec<Span> = Vec::with_capacity(stages.len());
    let mut prev_end = 0u64;
    for (i, s) in stages.iter().enumerate() {
        let later_started = stages[i + 1..].iter().any(|t| t.started);
        let span = if s.started {
            let end = if s.ended {
                s.end_step
            } else if finished {
                r.step
            } else {
                s.until_step.max(r.step)
            };
            let phase = if s.ended || finished {
                Phase::Done
            } else {
                Phase::Current
            };
            Span {
                name: s.name.clone(),
                start: s.start_step,
                end: end.max(s.start_step),
                phase,
            }
        } else if later_started {
            Span {
                name: s.name.clone(),
                start: prev_end,
                end: prev_end,
                phase: Phase::Skipped,
            }
        } else {
            Span {
                name: s.name.clone(),
                start: prev_end,
                end: s.until_step.max(prev_end),
                phase: Phase::Planned,
            }
        };
        prev_end = span.end;
        out.push(span);
    }
    out
}

/// Text made safe for HTML and SVG, in content and in quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1_500_000` → `1.5M`, `20_000` → `20K`, `950` → `950`.
pub fn fmt_count(n: u64) -> String {
    let s = crate::cli::human_count(n);
    match s.strip_suffix(|c: char| c.is_ascii_alphabetic()) {
        Some(num) if num.ends_with(".0") => {
            format!("{}{}", &num[..num.len() - 2], &s[s.len() - 1..])
        }
        _ => s,
    }
}

/// A time as `2025-06-01 03:12:09 UTC`.
pub fn fmt_time(unix_ms: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp((unix_ms / 1000) as i64) else {
        return "-".into();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How long ago: `42 s ago`, `3 min ago`, `5 h ago`, `2 d ago`.
fn ago(unix_ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(unix_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7_199 => format!("{} min ago", s / 60),
        7_200..=172_799 => format!("{} h ago", s / 3_600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// How the page reaches a running job.
#[derive(Debug, Clone)]
pub struct PageSource {
    pub job: String,
    pub driver: crate::server::DriverHandle,
    pub view: watch::Receiver<View>,
}

/// A control request's answer, or why there is none (the driver is busy or gone).
async fn ask(source: &PageSource, request: ControlRequest) -> Result<ControlReply, String> {
    let what = format!("{request:?}");
    let answer = tokio::time::timeout(
        ASK_TIMEOUT,
        crate::workers::ask(&source.driver.events, |reply| Event::Control {
            request,
            reply,
        }),
    )
    .await;
    match answer {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(status)) => Err(format!("{what}: {}", status.message())),
        Err(_) => Err(format!(
            "{what}: the driver did not answer within {} s (busy with a slow store write?)",
            ASK_TIMEOUT.as_secs()
        )),
    }
}

/// The report of a running job: its snapshot and view, and what the driver answers.
pub async fn gather(source: &PageSource) -> Report {
    let status = source.driver.snapshot.borrow().clone();
    let view = source.view.borrow().clone();
    let (stages, checkpoints, events) = tokio::join!(
        ask(source, ControlRequest::ListStages),
        ask(source, ControlRequest::ListCheckpoints),
        ask(source, ControlRequest::ListEvents),
    );
    let mut missing = vec![];
    let stages = match stages {
        Ok(ControlReply::Stages(s)) => s,
        Ok(other) => {
            missing.push(format!("stages: unexpected answer {other:?}"));
            Default::default()
        }
        Err(e) => {
            missing.push(e);
            Default::default()
        }
    };
    let checkpoints = match checkpoints {
        Ok(ControlReply::Checkpoints(c)) => c.checkpoints,
        Ok(_) => vec![],
        Err(e) => {
            missing.push(e);
            vec![]
        }
    };
    let events = match events {
        Ok(ControlReply::Events(e)) => e.events,
        Ok(_) => vec![],
        Err(e) => {
            missing.push(e);
            vec![]
        }
    };
    Report {
        job: source.job.clone(),
        step: status.step,
        total_steps: status.total_steps,
        tokens_per_step: status.total_tokens / status.total_steps.max(1),
        status: Some(status),
        stages,
        checkpoints,
        events,
        loss: view.loss,
        workers: view.workers,
        missing,
    }
}

/// `JOB_STATE_RUNNING` → `running`.
pub fn state_name(state: i32) -> &'static str {
    match v1::JobState::try_from(state) {
        Ok(v1::JobState::Waiting) => "waiting",
        Ok(v1::JobState::Running) => "running",
        Ok(v1::JobState::Paused) => "paused",
        Ok(v1::JobState::Finished) => "finished",
        Ok(v1::JobState::Failed) => "failed",
        _ => "unknown",
    }
}

fn action_name(action: v1::SpikeAction) -> &'static str {
    match action {
        v1::SpikeAction::Unspecified => "spike",
        v1::SpikeAction::SkipStep => "update dropped",
        v1::SpikeAction::Rollback => "rollback",
        v1::SpikeAction::Pause => "paused (rollbacks)",
        v1::SpikeAction::ManualRollback => "manual rollback",
        v1::SpikeAction::FailurePause => "paused (failures)",
        v1::SpikeAction::FailureStop => "failed",
        v1::SpikeAction::CheckpointFallback => "checkpoint fallback",
        v1::SpikeAction::Control => "control",
    }
}

fn failure_kind(kind: i32) -> &'static str {
    match v1::FailureKind::try_from(kind) {
        Ok(v1::FailureKind::Transient) => "transient",
        Ok(v1::FailureKind::Data) => "data",
        Ok(v1::FailureKind::Checkpoint) => "checkpoint",
        Ok(v1::FailureKind::Config) => "configuration",
        Ok(v1::FailureKind::Resource) => "resource",
        Ok(v1::FailureKind::State) => "state",
        _ => "unspecified",
    }
}

const STYLE: &str = r##"
:root { color-scheme: light; }
body { font-family: "DejaVu Sans", Verdana, Arial, sans-serif; margin: 0; background: #f3f4f6; color: #1f2328; font-size: 15px; }
header { padding: 14px 22px; color: #fff; display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 18px; }
header h1 { margin: 0; font-size: 26px; }
header .badge { font-size: 20px; font-weight: bold; letter-spacing: .06em; text-transform: uppercase; background: rgba(0,0,0,.22); padding: 2px 10px; border-radius: 4px; }
header .detail { flex-basis: 100%; margin: 0; font-size: 17px; }
.state-running { background: #1a7f37; } .state-waiting { background: #57606a; } .state-paused { background: #9a6700; }
.state-finished { background: #0969da; } .state-failed { background: #cf222e; } .state-unknown { background: #57606a; }
main { padding: 12px 22px 30px; max-width: 1240px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 8px; margin: 6px 0 14px; }
.fact { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; }
.fact .k { font-size: 12.5px; color: #57606a; text-transform: uppercase; letter-spacing: .04em; }
.fact .v { font-size: 21px; font-weight: bold; margin-top: 2px; }
.fact .s { font-size: 13px; color: #57606a; }
.alert { background: #ffebe9; border: 2px solid #cf222e; border-radius: 6px; padding: 10px 14px; margin: 10px 0; font-size: 16px; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 14px; margin: 10px 0; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
section h2 { font-size: 19px; margin: 2px 0 8px; }
svg.chart { width: 100%; height: auto; max-width: 1000px; display: block; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { background: #f6f8fa; font-weight: bold; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.current td { background: #fff4d6; font-weight: bold; }
tr.planned td { color: #57606a; }
tr.bad td { background: #ffebe9; }
.muted { color: #57606a; }
code { font-size: 13px; }
footer { color: #57606a; font-size: 13px; padding: 0 22px 20px; }
"##;

/// The page for `r`, as of `now_ms`.
pub fn render(r: &Report, now_ms: u64) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let state = r.status.as_ref().map_or("unknown", |s| state_name(s.state));
    let _ = write!(
        o,
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{} · {} · step {} of {} · stagecoach</title><style>{STYLE}</style></head><body>"##,
        escape(&r.job),
        state.to_uppercase(),
        r.step,
        r.total_steps
    );
    let detail = r.status.as_ref().map_or("", |s| s.detail.as_str());
    let _ = write!(
        o,
        r##"<header class="state-{state}"><h1 id="job">{}</h1><span class="badge" id="state">{state}</span><p class="detail" id="detail">{}</p></header><main>"##,
        escape(&r.job),
        escape(if detail.is_empty() { "-" } else { detail })
    );
    if let Some(s) = &r.status {
        facts(&mut o, r, s);
        if let Some(f) = &s.last_failure {
            let _ = write!(
                o,
                r##"<div class="alert" id="last-failure"><b>Last failure</b> ({} ago, {}): {} failure of worker <code>{}</code> at step {} (attempt {}): {}<br><b>Recovery:</b> {}</div>"##,
                ago(f.unix_ms, now_ms).trim_end_matches(" ago"),
                fmt_time(f.unix_ms),
                failure_kind(f.kind),
                escape(&f.worker),
                f.step,
                f.attempts,
                escape(&f.reason),
                escape(&f.recovery)
            );
        }
        if s.pending_writes > 0 {
            let _ = write!(
                o,
                r##"<div class="alert">{} write(s) wait for the state store: no step is dispatched until it answers.</div>"##,
                s.pending_writes
            );
        }
    }
    if !r.missing.is_empty() {
        o.push_str(r##"<div class="warn"><b>Part of this page is missing:</b><ul>"##);
        for m in &r.missing {
            let _ = write!(o, "<li>{}</li>", escape(m));
        }
        o.push_str("</ul></div>");
    }
    stages_section(&mut o, r);
    let _ = write!(
        o,
        r##"<section id="loss"><h2>Loss</h2>{}</section>"##,
        svg::loss_chart(r)
    );
    validation_section(&mut o, r);
    let _ = write!(
        o,
        r##"<section id="tokens"><h2>Tokens per source</h2>{}</section>"##,
        svg::tokens_chart(r)
    );
    workers_section(&mut o, r);
    checkpoints_section(&mut o, r, now_ms);
    events_section(&mut o, r, now_ms);
    let _ = write!(
        o,
        r##"</main><footer>Generated {} by stagecoach-coordinator {}; refreshes every {REFRESH_SECONDS} s. The same numbers: <a href="/metrics">/metrics</a>; the charts as files: <a href="/loss.svg">loss.svg</a>, <a href="/validation.svg">validation.svg</a>, <a href="/tokens.svg">tokens.svg</a>.</footer></body></html>"##,
        fmt_time(now_ms),
        crate::VERSION
    );
    o
}

fn fact(o: &mut String, key: &str, value: &str, sub: &str) {
    let _ = write!(
        o,
        r##"<div class="fact"><div class="k">{}</div><div class="v">{}</div><div class="s">{}</div></div>"##,
        escape(key),
        escape(value),
        escape(sub)
    );
}

fn facts(o: &mut String, r: &Report, s: &Snapshot) {
    o.push_str(r##"<div class="facts" id="facts">"##);
    let pct = 100.0 * s.step as f64 / s.total_steps.max(1) as f64;
    fact(
        o,
        "step",
        &format!("{} / {}", s.step, s.total_steps),
        &format!("{pct:.1}% of the job"),
    );
    fact(
        o,
        "stage",
        &s.stage,
        &format!(
            "{} of {} · seq_len {} · RoPE θ {}",
            s.stage_index + 1,
            s.stages,
            s.seq_len,
            s.rope_theta
        ),
    );
    fact(
        o,
        "loss",
        &s.loss.map_or("-".into(), |l| format!("{l:.4}")),
        "last committed step, nats/token",
    );
    fact(
        o,
        "tokens",
        &fmt_count(s.tokens),
        &format!("of {}", fmt_count(s.total_tokens)),
    );
    fact(
        o,
        "learning rate",
        &if s.lr == 0.0 {
            "0".into()
        } else {
            format!("{:.2e}", s.lr)
        },
        "last dispatched step",
    );
    fact(
        o,
        "speed",
        &s.steps_per_second
            .map_or("-".into(), |r| format!("{r:.2} steps/s")),
        &s.steps_per_second.map_or(String::new(), |rate| {
            format!(
                "{}/s tokens",
                fmt_count((rate * r.tokens_per_step as f64) as u64)
            )
        }),
    );
    let next = match &s.next_transition {
        Some((to, at)) => {
            let eta = match s.steps_per_second {
                Some(rate) if rate > 0.0 && s.state == v1::JobState::Running as i32 => {
                    let secs = at.saturating_sub(s.step) as f64 / rate;
                    format!(" · in {}", fmt_duration(secs))
                }
                _ => String::new(),
            };
            (to.clone(), format!("at step {at}{eta}"))
        }
        None => ("-".into(), "the last stage".into()),
    };
    fact(o, "next stage", &next.0, &next.1);
    fact(
        o,
        "workers",
        &format!("{} in the world", s.world_size),
        &format!("{} alive · generation {}", s.workers_alive, s.generation),
    );
    o.push_str("</div>");
}

/// `42 s`, `3 min 12 s`, `2 h 05 min`.
fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3_599 => format!("{} min {:02} s", s / 60, s % 60),
        3_600..=172_799 => format!("{} h {:02} min", s / 3_600, s / 60 % 60),
        _ => format!("{} d {:02} h", s / 86_400, s / 3_600 % 24),
    }
}

fn stages_section(o: &mut String, r: &Report) {
    let spans = spans(r);
    let _ = write!(
        o,
        r##"<section id="stages"><h2>Stages</h2>{}<table><thead><tr><th>#</th><th>stage</th><th>status</th><th>steps</th><th class="num">budget</th><th class="num">seq_len</th><th class="num">RoPE θ</th><th>mixture</th><th class="num">tokens trained</th></tr></thead><tbody>"##,
        svg::timeline_chart(r)
    );
    for (i, (s, span)) in r.stages.stages.iter().zip(&spans).enumerate() {
        let trained: u64 = s.tokens.iter().map(|t| t.tokens).sum();
        let steps = match span.phase {
            Phase::Done => format!("{} – {}", span.start, span.end),
            Phase::Current => format!("{} – {} (ends before {})", span.start, r.step, span.end),
            Phase::Planned => format!("{} – {} (planned)", span.start, span.end),
            Phase::Skipped => "skipped".into(),
        };
        let budget = span.end.saturating_sub(span.start);
        let _ = write!(
            o,
            r##"<tr class="stage-row {}" data-stage="{}"><td>{}</td><td><b>{}</b></td><td>{}</td><td>{}</td><td class="num">{} steps<br><span class="muted">{} tokens</span></td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td class="num">{}</td></tr>"##,
            span.phase.name(),
            escape(&s.name),
            i + 1,
            escape(&s.name),
            span.phase.name(),
            steps,
            budget,
            fmt_count(budget * r.tokens_per_step),
            s.seq_len,
            if s.rope_theta == 0.0 {
                "model's".to_owned()
            } else {
                format!("{}", s.rope_theta)
            },
            escape(&crate::cli::format_mix(&s.mix)),
            fmt_count(trained)
        );
    }
    o.push_str("</tbody></table>");
    let transitions: Vec<&v1::Transition> = r
        .stages
        .transitions
        .iter()
        .filter(|t| t.cause() != v1::TransitionCause::Start)
        .collect();
    if !transitions.is_empty() {
        o.push_str(r##"<p class="muted">Transitions: "##);
        let list: Vec<String> = transitions
            .iter()
            .map(|t| {
                format!(
                    "{} → {} at step {} ({}, by {})",
                    escape(&t.from),
                    escape(&t.to),
                    t.step,
                    crate::metrics::cause_label(t.cause()),
                    escape(&t.requested_by)
                )
            })
            .collect();
        o.push_str(&list.join("; "));
        o.push_str("</p>");
    }
    o.push_str("</section>");
}

fn validation_section(o: &mut String, r: &Report) {
    let _ = write!(
        o,
        r##"<section id="validation"><h2>Validation loss per source</h2>{}"##,
        svg::validation_chart(r)
    );
    let sources = r.sources();
    if !r.stages.evaluations.is_empty() {
        o.push_str("<table><thead><tr><th>step</th><th>stage</th><th>why</th>");
        for s in &sources {
            let _ = write!(o, r##"<th class="num">{}</th>"##, escape(s));
        }
        o.push_str("</tr></thead><tbody>");
        for e in &r.stages.evaluations {
            let _ = write!(
                o,
                r##"<tr class="evaluation"><td>{}</td><td>{}</td><td>{}</td>"##,
                e.step,
                escape(&e.stage),
                escape(&e.trigger)
            );
            for s in &sources {
                let cell = e
                    .losses
                    .iter()
                    .find(|l| &l.source == s)
                    .map_or("-".into(), |l| format!("{:.4}", l.loss));
                let _ = write!(o, r##"<td class="num">{cell}</td>"##);
            }
            o.push_str("</tr>");
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

fn workers_section(o: &mut String, r: &Report) {
    let generation = r.status.as_ref().map_or(0, |s| s.generation);
    let _ = write!(
        o,
        r##"<section id="workers"><h2>Workers · generation {generation}</h2>"##
    );
    if r.workers.is_empty() {
        o.push_str(r##"<p class="muted">No worker is registered: start <code>stagecoach-worker join --coordinator URL</code>.</p>"##);
    } else {
        o.push_str("<table><thead><tr><th>rank</th><th>worker</th><th>session</th><th>ring address</th><th>registered by</th></tr></thead><tbody>");
        for w in &r.workers {
            let _ = write!(
                o,
                r##"<tr class="worker{}" data-rank="{}"><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"##,
                if w.connected { "" } else { " bad" },
                w.rank.map_or("-".into(), |r| r.to_string()),
                w.rank.map_or("spare".into(), |r| format!("rank {r}")),
                escape(&w.id),
                if w.connected {
                    "connected"
                } else {
                    "no session"
                },
                escape(&w.address),
                escape(&w.owner)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

fn checkpoints_section(o: &mut String, r: &Report, now_ms: u64) {
    o.push_str(r##"<section id="checkpoints"><h2>Checkpoints</h2>"##);
    if r.checkpoints.is_empty() {
        o.push_str(r##"<p class="muted">None yet.</p>"##);
    } else {
        o.push_str(r##"<table><thead><tr><th class="num">step</th><th>stage</th><th class="num">loss</th><th>known good</th><th>why</th><th>when</th><th class="num">size</th><th class="num">held training</th><th>folder</th></tr></thead><tbody>"##);
        for c in r.checkpoints.iter().rev().take(CHECKPOINTS_SHOWN) {
            let stage = r
                .stages
                .stages
                .get(c.stage as usize)
                .map_or(c.stage.to_string(), |s| s.name.clone());
            let _ = write!(
                o,
                r##"<tr class="checkpoint{}" data-step="{}"><td class="num">{}</td><td>{}</td><td class="num">{:.4}</td><td>{}{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{:.2} s</td><td><code>{}</code>{}</td></tr>"##,
                if c.unloadable.is_empty() { "" } else { " bad" },
                c.step,
                c.step,
                escape(&stage),
                c.loss,
                if c.known_good { "yes" } else { "no" },
                if c.pinned { ", pinned" } else { "" },
                escape(&c.trigger),
                ago(c.unix_ms, now_ms),
                fmt_count(c.bytes) + "B",
                c.blocking_seconds,
                escape(&c.path),
                if c.unloadable.is_empty() {
                    String::new()
                } else {
                    format!("<br>unloadable: {}", escape(&c.unloadable))
                }
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

fn events_section(o: &mut String, r: &Report, now_ms: u64) {
    o.push_str(r##"<section id="events"><h2>Spikes, failures and control actions</h2>"##);
    if r.events.is_empty() {
        o.push_str(r##"<p class="muted">None.</p>"##);
    } else {
        o.push_str(r##"<table><thead><tr><th>when</th><th class="num">step</th><th>what</th><th>details</th><th>by</th></tr></thead><tbody>"##);
        for e in r.events.iter().rev().take(EVENTS_SHOWN) {
            let action = e.action();
            let mut details = vec![];
            if e.loss != 0.0 || !e.rule.is_empty() {
                details.push(format!(
                    "loss {:.4} (mean {:.4}, std {:.4}) {}",
                    e.loss, e.mean, e.std, e.rule
                ));
            }
            if !e.rolled_back_to.is_empty() {
                details.push(format!(
                    "back to step {} ({})",
                    e.resumed_at_step, e.rolled_back_to
                ));
            }
            if e.skipped_samples > 0 {
                details.push(format!(
                    "skipped {} samples ({} steps from step {})",
                    e.skipped_samples, e.skipped_steps, e.skipped_from_step
                ));
            }
            if !e.detail.is_empty() {
                details.push(e.detail.clone());
            }
            let bad = matches!(
                action,
                v1::SpikeAction::Rollback
                    | v1::SpikeAction::Pause
                    | v1::SpikeAction::FailurePause
                    | v1::SpikeAction::FailureStop
                    | v1::SpikeAction::CheckpointFallback
            );
            let _ = write!(
                o,
                r##"<tr class="event{}" data-action="{}"><td>{}<br><span class="muted">{}</span></td><td class="num">{}</td><td><b>{}</b></td><td>{}</td><td>{}</td></tr>"##,
                if bad { " bad" } else { "" },
                action_name(action),
                ago(e.unix_ms, now_ms),
                fmt_time(e.unix_ms),
                e.detected_at,
                action_name(action),
                escape(&details.join("; ")),
                escape(&e.requested_by)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

/// The page that says this coordinator runs no job.
pub fn render_no_job() -> String {
    format!(
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>stagecoach · no job</title><style>{STYLE}</style></head><body><header class="state-unknown"><h1>No job</h1><p class="detail">This coordinator runs no job: start it with <code>--job FILE</code>.</p></header></body></html>"##
    )
}

/// The page a caller without the viewer's credentials gets (it says nothing about the job).
pub fn render_refused(status: u16, message: &str) -> String {
    format!(
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>stagecoach · {status}</title><style>{STYLE}</style></head><body><header class="state-failed"><h1 id="refused">{status}: {}</h1><p class="detail">The status page needs a viewer's (or an operator's) credentials: a client certificate whose Common Name is <code>viewer:NAME</code>, or a bearer token. A browser sends no token: see docs/status-page.md.</p></header></body></html>"##,
        escape(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, until: u64, started: Option<u64>, ended: Option<u64>) -> v1::StageInfo {
        v1::StageInfo {
            name: name.into(),
            until_step: until,
            started: started.is_some(),
            start_step: started.unwrap_or(0),
            ended: ended.is_some(),
            end_step: ended.unwrap_or(0),
            mix: vec![v1::SourceWeight {
                source: "web<script>".into(),
                weight: 1.0,
            }],
            ..Default::default()
        }
    }

    fn report() -> Report {
        let mut loss = LossHistory::default();
        for s in 0..45 {
            loss.record(s, 3.0 - s as f64 * 0.01, false);
        }
        Report {
            job: "j<b>&\"".into(),
            status: Some(Snapshot {
                state: v1::JobState::Running as i32,
                step: 45,
                total_steps: 100,
                detail: "<img src=x onerror=alert(1)>".into(),
                ..Default::default()
            }),
            stages: v1::ListStagesResponse {
                stages: vec![
                    stage("one", 30, Some(0), Some(30)),
                    stage("two\"><svg onload=x>", 60, Some(30), None),
                    stage("three", 100, None, None),
                ],
                ..Default::default()
            },
            events: vec![v1::SpikeEvent {
                detected_at: 35,
                resumed_at_step: 30,
                action: v1::SpikeAction::Rollback.into(),
                detail: "<b>boom</b>".into(),
                ..Default::default()
            }],
            loss,
            workers: vec![WorkerView {
                id: "w1-<x>".into(),
                rank: Some(0),
                address: "127.0.0.1:1".into(),
                owner: "anonymous".into(),
                connected: true,
            }],
            step: 45,
            total_steps: 100,
            tokens_per_step: 512,
            ..Default::default()
        }
    }

    #[test]
    fn spans_cover_done_current_and_planned_stages() {
        let r = report();
        let s = spans(&r);
        assert_eq!(
            s.iter()
                .map(|s| (s.start, s.end, s.phase))
                .collect::<Vec<_>>(),
            vec![
                (0, 30, Phase::Done),
                (30, 60, Phase::Current),
                (60, 100, Phase::Planned)
            ]
        );
    }

    #[test]
    fn everything_from_the_job_or_a_client_is_escaped() {
        let page = render(&report(), 0);
        for raw in [
            "<script>",
            "<img",
            "<svg onload",
            "<b>boom",
            "w1-<x>",
            "j<b>",
        ] {
            assert!(!page.contains(raw), "{raw} reached the page unescaped");
        }
        assert!(page.contains("j&lt;b&gt;&amp;&quot;"));
        assert!(page.contains("two&quot;&gt;&lt;svg onload=x&gt;"));
        // Nothing is fetched from anywhere, and nothing runs.
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        assert!(!page.contains("@import"));
        assert!(page.contains(r##"class="rollback" data-from="35" data-to="30""##));
        assert!(page.contains(r##"class="stage-boundary" data-step="30""##));
        assert!(page.contains(r##"class="stage-boundary planned" data-step="60""##));
    }

    #[test]
    fn counts_read_short() {
        assert_eq!(fmt_count(950), "950");
        assert_eq!(fmt_count(20_000), "20K");
        assert_eq!(fmt_count(1_540_000), "1.5M");
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
    }
}
