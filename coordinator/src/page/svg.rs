//! The charts, as SVG drawn from a [`Report`]: the training loss with the stages, rollbacks,
//! dropped updates and checkpoints; the validation loss per source; the tokens per source; the
//! stage timeline. The status page puts them inline, `stagecoach plot` writes them to files:
//! one renderer for both. Every chart is a standalone SVG document (its own `xmlns`, white
//! background, system fonts), with its axes labelled and units named, and with classes and
//! `data-` attributes on what it marks (`stage-boundary`, `rollback`, `checkpoint`), so a test
//! or a script can find them.

use std::fmt::Write;

use stagecoach_proto::v1;

use super::{escape, fmt_count, Phase, Report, Span};

/// Colour-blind safe colours (Okabe and Ito), for stages and sources in order.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999933", "#882255",
];
const LOSS: &str = "#0b3d91";
const ROLLBACK: &str = "#c0392b";
const CHECKPOINT: &str = "#009E73";
const DROPPED: &str = "#E69F00";
const INK: &str = "#222";
const GRID: &str = "#dddddd";

/// A colour of the palette by position.
pub fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Maps a data interval onto a pixel interval.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Scale {
    fn new(lo: f64, hi: f64, from: f64, to: f64) -> Scale {
        let hi = if hi > lo { hi } else { lo + 1.0 };
        Scale { lo, hi, from, to }
    }

    fn at(&self, v: f64) -> f64 {
        self.from + (v - self.lo) / (self.hi - self.lo) * (self.to - self.from)
    }
}

/// Round tick values covering `lo..=hi`, about `n` of them, and the spacing between them.
///
/// The spacing is the round number (1, 2, 2.5 or 5 times a power of ten) whose ticks inside
/// the range come nearest to `n` in count; between two as near, the wider one.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / n.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let count = |step: f64| {
        let first = (lo / step - 1e-9).ceil();
        let last = (hi / step + 1e-9).floor();
        (last - first + 1.0).max(0.0)
    };
    let mut step = magnitude;
    for scale in [0.1, 1.0, 10.0] {
        for m in [1.0, 2.0, 2.5, 5.0] {
            let s = m * magnitude * scale;
            let (d, best) = ((count(s) - n as f64).abs(), (count(step) - n as f64).abs());
            if d < best || (d == best && s > step) {
                step = s;
            }
        }
    }
    let first = (lo / step - 1e-9).ceil() * step;
    let mut out = vec![];
    let mut v = first;
    while v <= hi + step * 1e-9 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    (out, step)
}

/// A tick label with as many decimals as the spacing needs.
fn fmt_tick(v: f64, step: f64) -> String {
    if v.abs() >= 10_000.0 {
        return fmt_count(v.round() as u64);
    }
    // The fewest decimals that write the spacing exactly (0.5: 1, 0.25: 2).
    let decimals = (0..6)
        .find(|d| {
            let scaled = step * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    format!("{v:.decimals$}")
}

/// The opening of a chart: its document element, title for screen readers, background.
fn open(out: &mut String, id: &str, w: f64, h: f64, label: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{label}" font-family="DejaVu Sans, Verdana, Arial, sans-serif" font-size="13"><title>{label}</title><rect class="background" x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##,
        label = escape(label)
    );
}

/// The chart's title and a line under it.
fn heading(out: &mut String, title: &str, subtitle: &str) {
    let _ = write!(
        out,
        r##"<text x="12" y="22" font-size="17" font-weight="bold" fill="{INK}">{}</text><text x="12" y="41" font-size="12.5" fill="#555">{}</text>"##,
        escape(title),
        escape(subtitle)
    );
}

/// `text`, cut to about `px` pixels of 12-pixel text.
fn fit(text: &str, px: f64) -> Option<String> {
    let chars = (px / 7.0).floor() as usize;
    let n = text.chars().count();
    if chars < 3 {
        None
    } else if n <= chars {
        Some(text.to_owned())
    } else {
        Some(format!(
            "{}…",
            text.chars()
                .take(chars.saturating_sub(1))
                .collect::<String>()
        ))
    }
}

/// The plot area of a chart over steps.
struct Area {
    x: Scale,
    y: Scale,
    top: f64,
    bottom: f64,
    left: f64,
    right: f64,
}

/// Grid lines and labels of the loss axis.
fn y_axis(out: &mut String, a: &Area, title: &str) {
    let (values, step) = ticks(a.y.lo, a.y.hi, 6);
    for v in values {
        let y = a.y.at(v);
        let _ = write!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{GRID}"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{INK}">{}</text>"##,
            a.left,
            a.right,
            a.left - 6.0,
            y + 4.5,
            fmt_tick(v, step)
        );
    }
    let mid = (a.top + a.bottom) / 2.0;
    let _ = write!(
        out,
        r##"<text class="axis-title" x="16" y="{mid:.1}" transform="rotate(-90 16 {mid:.1})" text-anchor="middle" font-weight="bold" fill="{INK}">{}</text>"##,
        escape(title)
    );
}

/// The step axis along the bottom, with its title.
fn x_axis(out: &mut String, a: &Area, title: &str) {
    let (values, step) = ticks(a.x.lo, a.x.hi, 10);
    let _ = write!(
        out,
        r##"<line x1="{:.1}" y1="{b:.1}" x2="{:.1}" y2="{b:.1}" stroke="{INK}"/><line x1="{l:.1}" y1="{:.1}" x2="{l:.1}" y2="{b:.1}" stroke="{INK}"/>"##,
        a.left,
        a.right,
        a.top,
        b = a.bottom,
        l = a.left
    );
    for v in values {
        let x = a.x.at(v);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{INK}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="{INK}">{}</text>"##,
            a.bottom,
            a.bottom + 5.0,
            a.bottom + 19.0,
            fmt_tick(v, step)
        );
    }
    let _ = write!(
        out,
        r##"<text class="axis-title" x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold" fill="{INK}">{}</text>"##,
        (a.left + a.right) / 2.0,
        a.bottom + 38.0,
        escape(title)
    );
}

/// One legend entry per `(swatch, label)` in a row at `y`; a swatch is SVG drawn around (0, 0).
fn legend(out: &mut String, x0: f64, y: f64, items: &[(String, String)]) {
    let _ = write!(out, r##"<g class="legend">"##);
    let mut x = x0;
    for (swatch, label) in items {
        let _ = write!(
            out,
            r##"<g transform="translate({x:.1} {y:.1})">{swatch}<text x="16" y="4.5" fill="{INK}">{}</text></g>"##,
            escape(label)
        );
        x += 30.0 + 7.2 * label.chars().count() as f64;
    }
    out.push_str("</g>");
}

/// The steps a chart over steps spans: the whole plan, or further if training went past it.
fn step_range(r: &Report) -> f64 {
    let last = r.loss.last_step().map_or(0, |s| s + 1);
    r.total_steps.max(r.step).max(last).max(1) as f64
}

/// Stage bands behind a chart over steps, their names along the top of the plot area, and
/// the boundaries between them.
fn stage_bands(out: &mut String, a: &Area, spans: &[Span]) {
    out.push_str(r##"<defs><pattern id="planned-hatch" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="8" height="8" fill="#fafafa"/><line x1="0" y1="0" x2="0" y2="8" stroke="#e3e3e3" stroke-width="3"/></pattern><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0 0 L10 5 L0 10 z" fill="#c0392b"/></marker></defs>"##);
    for (i, s) in spans.iter().enumerate() {
        if s.end <= s.start {
            continue;
        }
        let (x0, x1) = (a.x.at(s.start as f64), a.x.at(s.end as f64).min(a.right));
        let fill = match s.phase {
            Phase::Planned => "url(#planned-hatch)",
            Phase::Current => "#fff4d6",
            _ if i % 2 == 0 => "#eef2f7",
            _ => "#f8fafc",
        };
        let _ = write!(
            out,
            r##"<g class="stage" data-stage="{}" data-phase="{}"><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"/>"##,
            escape(&s.name),
            s.phase.name(),
            a.top,
            (x1 - x0).max(0.0),
            a.bottom - a.top
        );
        let label = match s.phase {
            Phase::Planned => format!("{} (planned)", s.name),
            _ => s.name.clone(),
        };
        if let Some(text) = fit(&label, x1 - x0 - 6.0).or_else(|| fit(&s.name, x1 - x0 - 6.0)) {
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="{}">{}</text>"##,
                x0 + 4.0,
                a.top + 15.0,
                if s.phase == Phase::Planned {
                    "#777"
                } else {
                    "#333"
                },
                escape(&text)
            );
        }
        out.push_str("</g>");
    }
    for pair in spans.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        if to.phase == Phase::Skipped || to.start == 0 {
            continue;
        }
        let x = a.x.at(to.start as f64);
        let planned = to.phase == Phase::Planned;
        let _ = write!(
            out,
            r##"<g class="stage-boundary{}" data-step="{}" data-stage="{}"><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{}" stroke-width="{}"{}/><title>{} → {} at step {}{}</title></g>"##,
            if planned { " planned" } else { "" },
            to.start,
            escape(&to.name),
            a.top,
            a.bottom,
            if planned { "#999" } else { "#444" },
            if planned { "1" } else { "1.5" },
            if planned {
                r##" stroke-dasharray="4 3""##
            } else {
                ""
            },
            escape(&from.name),
            escape(&to.name),
            to.start,
            if planned { " (planned)" } else { "" }
        );
    }
}

/// The "now" line at the committed step, while the job has not reached its end.
fn now_line(out: &mut String, a: &Area, r: &Report) {
    if r.status.is_none() || r.step >= r.total_steps {
        return;
    }
    let x = a.x.at(r.step as f64);
    let _ = write!(
        out,
        r##"<g class="now" data-step="{}"><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" font-size="12" fill="#333">now</text></g>"##,
        r.step,
        a.top + 20.0,
        a.bottom,
        x + 3.0,
        a.top + 32.0
    );
}

/// A rollback's from and to steps, when the event is one.
fn rollback_of(e: &v1::SpikeEvent) -> Option<(u64, u64)> {
    match e.action() {
        v1::SpikeAction::Rollback
        | v1::SpikeAction::ManualRollback
        | v1::SpikeAction::CheckpointFallback => Some((e.detected_at, e.resumed_at_step)),
        _ => None,
    }
}

/// The x of a point: the middle of the steps it covers.
fn mid(p: &crate::driver::history::LossPoint) -> f64 {
    (p.first as f64 + p.last as f64) / 2.0
}

/// The loss chart: the committed steps' loss (a line through the means, the least and
/// greatest loss of each coarse bucket as a band), lineages rollbacks abandoned (dashed),
/// rollbacks (an arrow back to the step training resumed at), updates the guard dropped, the
/// stages (done, current, planned) and their boundaries, checkpoints on the step axis.
pub fn loss_chart(r: &Report) -> String {
    let (w, h) = (1000.0, 420.0);
    let spans = super::spans(r);
    let points: Vec<_> = r.loss.points().collect();
    let abandoned: Vec<_> = r.loss.abandoned().collect();
    let mut values: Vec<f64> = points.iter().filter_map(|p| p.mean()).collect();
    values.sort_by(f64::total_cmp);
    let drawn = || {
        points
            .iter()
            .copied()
            .chain(abandoned.iter().flat_map(|a| a.points.iter()))
            .filter(|p| p.finite > 0)
    };
    let mut lo = drawn().map(|p| p.min).fold(f64::INFINITY, f64::min);
    let mut hi = drawn().map(|p| p.max).fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    // A huge spike would flatten everything else: the axis stops at twice the 98th
    // percentile of the committed means, and what lies above is drawn on its top edge.
    if let Some(q) = values.get(values.len() * 98 / 100) {
        hi = hi.min((2.0 * q).max(lo + 1e-3));
    }
    let pad = (hi - lo).max(0.05) * 0.06;
    let area = Area {
        left: 72.0,
        right: w - 24.0,
        top: 70.0,
        bottom: h - 86.0,
        x: Scale::new(0.0, step_range(r), 72.0, w - 24.0),
        y: Scale::new((lo - pad).max(0.0), hi + pad, h - 86.0, 70.0),
    };
    let top_y = area.top;
    let y_of = |v: f64| area.y.at(v.min(area.y.hi)).max(top_y);
    let mut out = String::new();
    open(&mut out, "loss-chart", w, h, "Training loss");
    let committed = points.iter().map(|p| p.steps()).sum::<u64>();
    let subtitle = match (points.last(), r.loss.since()) {
        (None, _) => "no step committed yet".to_owned(),
        (Some(p), since) => format!(
            "{} steps drawn{}; last loss {} at step {}{}",
            fmt_count(committed),
            match since {
                Some(s) if s > 0 =>
                    format!(" (from step {s}, where this coordinator took the job over)"),
                _ => String::new(),
            },
            p.mean().map_or("not finite".into(), |m| format!("{m:.4}")),
            p.last,
            if r.loss.bucket_width() > 1 {
                format!(
                    "; older steps in buckets of {} (line: mean, band: min to max)",
                    r.loss.bucket_width()
                )
            } else {
                String::new()
            }
        ),
    };
    heading(&mut out, "Training loss", &subtitle);
    stage_bands(&mut out, &area, &spans);
    y_axis(&mut out, &area, "training loss (nats per token)");
    x_axis(
        &mut out,
        &area,
        &format!(
            "optimizer step ({} tokens each)",
            fmt_count(r.tokens_per_step)
        ),
    );
    now_line(&mut out, &area, r);

    // Runs of contiguous points with a finite mean: lines break at gaps.
    let runs = |pts: &[&crate::driver::history::LossPoint]| {
        let mut runs: Vec<Vec<crate::driver::history::LossPoint>> = vec![];
        let mut prev: Option<u64> = None;
        for p in pts {
            let contiguous = prev.is_some_and(|l| p.first == l + 1);
            if p.mean().is_none() {
                prev = None;
                continue;
            }
            if !contiguous || runs.is_empty() {
                runs.push(vec![]);
            }
            runs.last_mut().expect("pushed").push(**p);
            prev = Some(p.last);
        }
        runs
    };
    for run in runs(&points) {
        if run.iter().any(|p| p.steps() > 1) {
            let upper: Vec<String> = run
                .iter()
                .map(|p| format!("{:.1},{:.1}", area.x.at(mid(p)), y_of(p.max)))
                .collect();
            let lower: Vec<String> = run
                .iter()
                .rev()
                .map(|p| format!("{:.1},{:.1}", area.x.at(mid(p)), y_of(p.min)))
                .collect();
            let _ = write!(
                out,
                r##"<polygon class="loss-band" points="{} {}" fill="{LOSS}" fill-opacity="0.18" stroke="none"/>"##,
                upper.join(" "),
                lower.join(" ")
            );
        }
        let line: Vec<String> = run
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    area.x.at(mid(p)),
                    y_of(p.mean().expect("finite"))
                )
            })
            .collect();
        if let [p] = run.as_slice() {
            let _ = write!(
                out,
                r##"<circle class="loss-point" cx="{:.1}" cy="{:.1}" r="2.5" fill="{LOSS}"/>"##,
                area.x.at(mid(p)),
                y_of(p.mean().expect("finite"))
            );
        } else {
            let _ = write!(
                out,
                r##"<polyline class="loss-line" points="{}" fill="none" stroke="{LOSS}" stroke-width="1.7" stroke-linejoin="round"/>"##,
                line.join(" ")
            );
        }
    }
    for a in &abandoned {
        let pts: Vec<&crate::driver::history::LossPoint> = a.points.iter().collect();
        for run in runs(&pts) {
            let line: Vec<String> = run
                .iter()
                .map(|p| {
                    format!(
                        "{:.1},{:.1}",
                        area.x.at(mid(p)),
                        y_of(p.mean().expect("finite"))
                    )
                })
                .collect();
            let _ = write!(
                out,
                r##"<g class="abandoned" data-resumed-at="{}"><polyline points="{}" fill="none" stroke="{ROLLBACK}" stroke-width="1.5" stroke-dasharray="5 3"/>"##,
                a.resumed_at,
                line.join(" ")
            );
            for p in &run {
                let _ = write!(
                    out,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{ROLLBACK}"><title>step {}: loss {:.4} (abandoned: training went back to step {})</title></circle>"##,
                    area.x.at(mid(p)),
                    y_of(p.max),
                    p.first,
                    p.max,
                    a.resumed_at
                );
            }
            out.push_str("</g>");
        }
    }
    // Updates the guard dropped, and losses above the axis or not finite.
    for p in points
        .iter()
        .copied()
        .chain(abandoned.iter().flat_map(|a| a.points.iter()))
    {
        let x = area.x.at(mid(p));
        if p.skipped > 0 || p.nonfinite > 0 {
            let y = p.mean().map_or(area.top + 6.0, y_of);
            let _ = write!(
                out,
                r##"<g class="dropped-update" data-step="{}"><path d="M{:.1} {:.1} l8 8 m0 -8 l-8 8" stroke="{DROPPED}" stroke-width="2.5"/><title>step {}{}: {} update(s) dropped by the step guard, {} loss(es) not finite</title></g>"##,
                p.first,
                x - 4.0,
                y - 4.0,
                p.first,
                if p.last > p.first {
                    format!("–{}", p.last)
                } else {
                    String::new()
                },
                p.skipped,
                p.nonfinite
            );
        }
        if p.finite > 0 && p.max > area.y.hi {
            let _ = write!(
                out,
                r##"<g class="off-scale"><path d="M{:.1} {:.1} l5 9 h-10 z" fill="{ROLLBACK}"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{ROLLBACK}">{:.2}</text></g>"##,
                x,
                area.top - 1.0,
                x + 6.0,
                area.top + 8.0,
                p.max
            );
        }
    }
    // Rollbacks: a line where the spike was detected, an arrow back to where training
    // resumed, above the plot area.
    for (i, (from, to)) in r.events.iter().filter_map(rollback_of).enumerate() {
        let (xf, xt) = (area.x.at(from as f64), area.x.at(to as f64));
        let y = area.top - 8.0 - 12.0 * (i % 2) as f64;
        let label = format!("rollback {from}→{to}");
        // The label reads right of the line, or left of the arrow near the right edge.
        let (lx, anchor) = if xf + 10.0 + 7.5 * label.chars().count() as f64 > w {
            (xt.min(xf - 8.0) - 4.0, "end")
        } else {
            (xf + 5.0, "start")
        };
        let _ = write!(
            out,
            r##"<g class="rollback" data-from="{from}" data-to="{to}"><line x1="{xf:.1}" y1="{:.1}" x2="{xf:.1}" y2="{:.1}" stroke="{ROLLBACK}" stroke-width="1.5" stroke-dasharray="3 2"/><line x1="{xf:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{ROLLBACK}" stroke-width="2" marker-end="url(#arrow)"/><text x="{lx:.1}" y="{:.1}" text-anchor="{anchor}" font-size="12" font-weight="bold" fill="{ROLLBACK}">{label}</text><title>rollback: detected at step {from}, training resumed at step {to}</title></g>"##,
            y,
            area.bottom,
            xt.min(xf - 8.0),
            y + 4.0
        );
    }
    for c in &r.checkpoints {
        let x = area.x.at(c.step as f64);
        let b = area.bottom;
        let _ = write!(
            out,
            r##"<g class="checkpoint" data-step="{}"><path d="M{x:.1} {:.1} l5 6 l-5 6 l-5 -6 z" fill="{CHECKPOINT}" stroke="#fff"/><title>checkpoint at step {} ({}), loss {:.4}</title></g>"##,
            c.step,
            b - 6.0,
            c.step,
            escape(&c.trigger),
            c.loss
        );
    }
    let line = |stroke: &str, dash: &str| {
        format!(
            r##"<line x1="0" y1="0" x2="12" y2="0" stroke="{stroke}" stroke-width="2"{dash}/>"##
        )
    };
    let mut items = vec![
        (line(LOSS, ""), "loss".to_owned()),
        (
            line(ROLLBACK, r##" stroke-dasharray="4 2""##),
            "abandoned by a rollback".to_owned(),
        ),
        (
            format!(
                r##"<line x1="0" y1="0" x2="11" y2="0" stroke="{ROLLBACK}" stroke-width="2" marker-end="url(#arrow)"/>"##
            ),
            "rollback".to_owned(),
        ),
        (
            r##"<line x1="6" y1="-7" x2="6" y2="7" stroke="#444" stroke-width="1.5"/>"##.to_owned(),
            "stage boundary".to_owned(),
        ),
        (
            format!(r##"<path d="M6 -6 l5 6 l-5 6 l-5 -6 z" fill="{CHECKPOINT}"/>"##),
            "checkpoint".to_owned(),
        ),
        (
            format!(
                r##"<path d="M2 -4 l8 8 m0 -8 l-8 8" stroke="{DROPPED}" stroke-width="2.5"/>"##
            ),
            "update dropped".to_owned(),
        ),
    ];
    if r.loss.bucket_width() > 1 {
        items.insert(
            1,
            (
                format!(r##"<rect x="0" y="-6" width="12" height="12" fill="{LOSS}" fill-opacity="0.18"/>"##),
                "min–max".to_owned(),
            ),
        );
    }
    legend(&mut out, area.left, h - 20.0, &items);
    out.push_str("</svg>");
    out
}

/// The validation loss of each source at each evaluation (every stage's end, and on demand),
/// over the steps, with the stages behind.
pub fn validation_chart(r: &Report) -> String {
    let (w, h) = (1000.0, 360.0);
    let spans = super::spans(r);
    let sources = r.sources();
    let evals = &r.stages.evaluations;
    let all: Vec<f64> = evals
        .iter()
        .flat_map(|e| e.losses.iter().map(|l| l.loss))
        .filter(|l| l.is_finite())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo).max(0.05) * 0.1;
    let area = Area {
        left: 72.0,
        right: w - 110.0,
        top: 58.0,
        bottom: h - 86.0,
        x: Scale::new(0.0, step_range(r), 72.0, w - 110.0),
        y: Scale::new((lo - pad).max(0.0), hi + pad, h - 86.0, 58.0),
    };
    let mut out = String::new();
    open(
        &mut out,
        "validation-chart",
        w,
        h,
        "Validation loss per source",
    );
    let subtitle = if evals.is_empty() {
        "no evaluation yet: every stage's end is evaluated on the held-out data (and `stagecoach eval` on demand)".to_owned()
    } else {
        format!(
            "{} evaluation(s) on held-out samples; the last at step {}",
            evals.len(),
            evals.last().map_or(0, |e| e.step)
        )
    };
    heading(&mut out, "Validation loss per source", &subtitle);
    stage_bands(&mut out, &area, &spans);
    y_axis(&mut out, &area, "held-out loss (nats per token)");
    x_axis(&mut out, &area, "optimizer step");
    let mut items = vec![];
    for (i, source) in sources.iter().enumerate() {
        let mut pts: Vec<(u64, f64, &v1::Evaluation)> = evals
            .iter()
            .filter_map(|e| {
                e.losses
                    .iter()
                    .find(|l| &l.source == source && l.loss.is_finite())
                    .map(|l| (e.step, l.loss, e))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        pts.sort_by_key(|p| p.0);
        let c = colour(i);
        let line: Vec<String> = pts
            .iter()
            .map(|(s, l, _)| format!("{:.1},{:.1}", area.x.at(*s as f64), area.y.at(*l)))
            .collect();
        let _ = write!(
            out,
            r##"<g class="eval-source" data-source="{}"><polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"##,
            escape(source),
            line.join(" ")
        );
        for (s, l, e) in &pts {
            let _ = write!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{c}" stroke="#fff"><title>{} at step {} ({}, {}): {l:.4}</title></circle>"##,
                area.x.at(*s as f64),
                area.y.at(*l),
                escape(source),
                s,
                escape(&e.stage),
                escape(&e.trigger)
            );
        }
        let (s, l, _) = pts.last().expect("not empty");
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="{c}" font-weight="bold">{} {l:.3}</text></g>"##,
            area.x.at(*s as f64) + 7.0,
            area.y.at(*l) + 4.0,
            escape(&fit(source, 70.0).unwrap_or_default())
        );
        items.push((
            format!(r##"<circle cx="6" cy="0" r="5" fill="{c}"/>"##),
            source.clone(),
        ));
    }
    legend(&mut out, area.left, h - 20.0, &items);
    out.push_str("</svg>");
    out
}

/// Tokens trained per source, split by stage, against what the plan gives each source over
/// the whole job (the outlined bar).
pub fn tokens_chart(r: &Report) -> String {
    let spans = super::spans(r);
    let sources = r.sources();
    let rows = sources.len().max(1) as f64;
    let (w, bar, gap) = (1000.0, 24.0, 14.0);
    let top = 58.0;
    let h = top + rows * (bar + gap) + 80.0;
    // Trained, per source and stage; planned, per source.
    let trained: Vec<Vec<u64>> = sources
        .iter()
        .map(|src| {
            r.stages
                .stages
                .iter()
                .map(|st| {
                    st.tokens
                        .iter()
                        .find(|t| &t.source == src)
                        .map_or(0, |t| t.tokens)
                })
                .collect()
        })
        .collect();
    let planned: Vec<f64> = sources
        .iter()
        .map(|src| {
            r.stages
                .stages
                .iter()
                .zip(&spans)
                .map(|(st, span)| {
                    let weight = st
                        .mix
                        .iter()
                        .find(|m| &m.source == src)
                        .map_or(0.0, |m| m.weight);
                    span.end.saturating_sub(span.start) as f64 * r.tokens_per_step as f64 * weight
                })
                .sum()
        })
        .collect();
    let max = trained
        .iter()
        .map(|t| t.iter().sum::<u64>() as f64)
        .chain(planned.iter().copied())
        .fold(1.0, f64::max);
    let label_w = 12.0
        + 7.5
            * sources
                .iter()
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(4)
                .min(24) as f64;
    let left = label_w.max(80.0);
    let right = w - 190.0;
    let x = Scale::new(0.0, max, left, right);
    let mut out = String::new();
    open(&mut out, "tokens-chart", w, h, "Tokens per source");
    let total: u64 = trained.iter().flatten().sum();
    heading(
        &mut out,
        "Tokens per source",
        &format!(
            "{} tokens trained in committed steps; the outline is what the plan gives each source over the whole job",
            fmt_count(total)
        ),
    );
    let bottom = top + rows * (bar + gap);
    let (values, _) = ticks(0.0, max, 8);
    for v in values {
        let xv = x.at(v);
        let _ = write!(
            out,
            r##"<line x1="{xv:.1}" y1="{top:.1}" x2="{xv:.1}" y2="{bottom:.1}" stroke="{GRID}"/><text x="{xv:.1}" y="{:.1}" text-anchor="middle" fill="{INK}">{}</text>"##,
            bottom + 18.0,
            fmt_count(v.round() as u64)
        );
    }
    let _ = write!(
        out,
        r##"<text class="axis-title" x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold" fill="{INK}">tokens (trained in committed steps)</text>"##,
        (left + right) / 2.0,
        bottom + 38.0
    );
    for (i, src) in sources.iter().enumerate() {
        let y = top + i as f64 * (bar + gap) + gap / 2.0;
        let sum: u64 = trained[i].iter().sum();
        let _ = write!(
            out,
            r##"<g class="tokens-source" data-source="{}" data-tokens="{sum}"><text x="{:.1}" y="{:.1}" text-anchor="end" font-weight="bold" fill="{INK}">{}</text>"##,
            escape(src),
            left - 8.0,
            y + bar / 2.0 + 4.5,
            escape(&fit(src, left - 12.0).unwrap_or_default())
        );
        let mut x0 = left;
        for (stage, tokens) in trained[i].iter().enumerate() {
            if *tokens == 0 {
                continue;
            }
            let x1 = x.at(x0_value(&trained[i], stage) + *tokens as f64);
            let name = r.stages.stages.get(stage).map_or("", |s| s.name.as_str());
            let _ = write!(
                out,
                r##"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{bar}" fill="{}"><title>{}: {} tokens in stage {}</title></rect>"##,
                (x1 - x0).max(0.5),
                colour(stage),
                escape(src),
                fmt_count(*tokens),
                escape(name)
            );
            x0 = x1;
        }
        let xp = x.at(planned[i]);
        if planned[i] > 0.0 {
            let _ = write!(
                out,
                r##"<rect class="planned" x="{left:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#555" stroke-dasharray="4 3"/>"##,
                y - 2.0,
                xp - left,
                bar + 4.0
            );
        }
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="{INK}">{} of {} planned</text></g>"##,
            xp.max(x.at(sum as f64)) + 8.0,
            y + bar / 2.0 + 4.5,
            fmt_count(sum),
            fmt_count(planned[i].round() as u64)
        );
    }
    let items: Vec<(String, String)> = r
        .stages
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!(
                    r##"<rect x="0" y="-6" width="12" height="12" fill="{}"/>"##,
                    colour(i)
                ),
                s.name.clone(),
            )
        })
        .collect();
    legend(&mut out, left, h - 16.0, &items);
    out.push_str("</svg>");
    out
}

/// Tokens of the stages before `stage`, in a row of per-stage counts.
fn x0_value(row: &[u64], stage: usize) -> f64 {
    row[..stage].iter().sum::<u64>() as f64
}

/// The stage timeline: every stage as a bar as long as its budget in steps, filled as far as
/// it has trained, with its name and budget under it.
pub fn timeline_chart(r: &Report) -> String {
    let spans = super::spans(r);
    let (w, h) = (1000.0, 108.0);
    let (left, right, y, bar) = (12.0, w - 12.0, 14.0, 30.0);
    let x = Scale::new(0.0, step_range(r), left, right);
    let mut out = String::new();
    open(&mut out, "timeline-chart", w, h, "Stage timeline");
    out.push_str(r##"<defs><pattern id="timeline-hatch" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="8" height="8" fill="#ffffff"/><line x1="0" y1="0" x2="0" y2="8" stroke="#e6e6e6" stroke-width="3"/></pattern></defs>"##);
    for (i, s) in spans.iter().enumerate() {
        if s.end <= s.start {
            continue;
        }
        let (x0, x1) = (x.at(s.start as f64), x.at(s.end as f64));
        let c = colour(i);
        let _ = write!(
            out,
            r##"<g class="timeline-stage" data-stage="{}" data-phase="{}"><rect x="{x0:.1}" y="{y}" width="{:.1}" height="{bar}" fill="url(#timeline-hatch)" stroke="{c}" stroke-width="1.5"/>"##,
            escape(&s.name),
            s.phase.name(),
            x1 - x0
        );
        let done_to = match s.phase {
            Phase::Done => x1,
            Phase::Current => x.at(r.step.clamp(s.start, s.end) as f64),
            _ => x0,
        };
        if done_to > x0 {
            let _ = write!(
                out,
                r##"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{bar}" fill="{c}" fill-opacity="0.85"/>"##,
                done_to - x0
            );
        }
        let mark = match s.phase {
            Phase::Done => "✓ ",
            Phase::Current => "▶ ",
            _ => "",
        };
        if let Some(text) = fit(&format!("{mark}{}", s.name), x1 - x0 - 4.0) {
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold" fill="{INK}">{}</text>"##,
                x0 + 3.0,
                y + bar + 17.0,
                escape(&text)
            );
        }
        let budget = format!(
            "{}–{} · {} tok",
            s.start,
            s.end,
            fmt_count((s.end - s.start) * r.tokens_per_step)
        );
        if let Some(text) = fit(&budget, x1 - x0 - 4.0) {
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#555">{}</text>"##,
                x0 + 3.0,
                y + bar + 33.0,
                escape(&text)
            );
        }
        let _ = write!(
            out,
            "<title>{} ({}): steps {} to {}, {} tokens</title></g>",
            escape(&s.name),
            s.phase.name(),
            s.start,
            s.end,
            fmt_count((s.end - s.start) * r.tokens_per_step)
        );
    }
    if r.status.is_some() && r.step < r.total_steps {
        let xn = x.at(r.step as f64);
        let _ = write!(
            out,
            r##"<path class="now" d="M{xn:.1} {:.1} l-6 -9 h12 z" fill="{INK}"><title>now: step {}</title></path>"##,
            y - 1.0,
            r.step
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, step) = ticks(0.0, 300.0, 10);
        assert_eq!(step, 50.0);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(t.last(), Some(&300.0));
        let (t, step) = ticks(2.13, 5.61, 6);
        assert_eq!(step, 0.5);
        assert_eq!(t.first(), Some(&2.5));
        assert_eq!(fmt_tick(2.5, step), "2.5");
        assert_eq!(fmt_tick(3.0, 0.25), "3.00");
        assert_eq!(fmt_tick(1_500_000.0, 500_000.0), "1.5M");
    }

    #[test]
    fn long_names_are_cut_to_fit() {
        assert_eq!(fit("stable-1", 100.0).as_deref(), Some("stable-1"));
        assert_eq!(
            fit("a-very-long-stage-name", 56.0).as_deref(),
            Some("a-very-…")
        );
        assert_eq!(fit("x", 10.0), None);
    }
}
