//! `stagecoach plot --job FILE --state URL --out DIR`, offline: the status page's charts of a
//! run, drawn from what its state store holds, written as SVG files (and, with `--png`, as PNG
//! pictures through headless Chromium) for a report.
//!
//! The charts are the page's own ([`crate::page::svg`]); only the [`Report`] differs. The
//! page's comes from a running driver, whose loss history starts where that coordinator picked
//! the job up; this one is rebuilt from the ledger, so it covers the whole run: every committed
//! step's loss (at an even resolution, [`BUCKETS`] points at most), the steps rollbacks set
//! aside (each under the event that set it aside), the stages as the ledger's steps trained
//! them (and, ahead, as the job file plans them), the tokens per source of the committed steps,
//! the evaluations and transitions of the curriculum's record, the checkpoint index and the
//! events. The job file gives the job's name (the store's keys), its stages and budgets.
//!
//! The embedded store is locked while its coordinator runs: plot a running job from the
//! coordinator's `/loss.svg` (the status page), or plot its store in etcd.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use stagecoach_core::spec::JobFile;
use stagecoach_proto::v1;

use crate::driver::history::{LossHistory, LossPoint};
use crate::keys;
use crate::ledger::StoreLedger;
use crate::page::{svg, Report};
use crate::store::{StateStore, StoreError};
use crate::Error;

/// Points of the loss curve at most (steps merge into buckets of a power of two beyond).
pub const BUCKETS: usize = 2000;

/// The charts written, by file stem.
const CHARTS: [&str; 4] = ["loss", "validation", "tokens", "timeline"];

/// What `stagecoach plot` is asked.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// The job file the run was started with (its name, stages and budgets).
    #[arg(long, value_name = "FILE")]
    pub job: PathBuf,
    /// The run's state store, as the coordinator's --state gave it: a folder (the embedded
    /// store, which must not be open in a running coordinator) or etcd://host:port[/prefix].
    #[arg(long, value_name = "URL")]
    pub state: String,
    /// Where to write loss.svg, validation.svg, tokens.svg and timeline.svg (created if
    /// missing; files of those names are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Also write each chart as a PNG, rendered by headless Chromium.
    #[arg(long)]
    pub png: bool,
    /// The Chromium (or Chrome) binary for --png.
    #[arg(
        long,
        value_name = "FILE",
        env = "STAGECOACH_CHROMIUM",
        default_value = "chromium"
    )]
    pub chromium: PathBuf,
}

/// Writes the charts of the run `args` names; returns what it wrote, for people.
pub async fn plot(args: &PlotArgs) -> Result<String, Error> {
    let job = JobFile::load(&args.job)
        .map_err(|e| Error::InvalidArgument(format!("--job {}: {e}", args.job.display())))?;
    let spec = job.to_proto();
    let store = open_existing(&args.state).await?;
    let report = report(store, &spec).await.map_err(|e| match e {
        Error::Store(StoreError::Locked { .. }) => Error::FailedPrecondition(format!(
            "{}: {e}; a running coordinator holds it: plot after the run, or read its status page's /loss.svg",
            args.state
        )),
        e => e,
    })?;
    fs::create_dir_all(&args.out).map_err(|e| destination(&args.out, e))?;
    let mut lines = vec![format!(
        "job {}: {} committed steps of {}, {} rollback(s), {} evaluation(s), {} checkpoint(s)",
        report.job,
        report.step,
        report.total_steps,
        report.loss.abandoned().count(),
        report.stages.evaluations.len(),
        report.checkpoints.len()
    )];
    for name in CHARTS {
        let text = chart(&report, name);
        let path = args.out.join(format!("{name}.svg"));
        fs::write(&path, &text).map_err(|e| destination(&path, e))?;
        lines.push(format!("wrote {}", path.display()));
        if args.png {
            let (w, h) = size(&text).unwrap_or((1000, 420));
            let png = args.out.join(format!("{name}.png"));
            screenshot(&args.chromium, &path, &png, w, h)?;
            lines.push(format!("wrote {}", png.display()));
        }
    }
    Ok(lines.join("\n"))
}

/// The chart `name` of [`CHARTS`].
fn chart(r: &Report, name: &str) -> String {
    match name {
        "loss" => svg::loss_chart(r),
        "validation" => svg::validation_chart(r),
        "tokens" => svg::tokens_chart(r),
        _ => svg::timeline_chart(r),
    }
}

fn destination(path: &Path, e: std::io::Error) -> Error {
    Error::Destination {
        path: path.display().to_string(),
        reason: format!("cannot write: {e}"),
    }
}

/// Opens a store that exists: unlike the coordinator, a plot never creates an empty one.
async fn open_existing(url: &str) -> Result<Arc<dyn StateStore>, Error> {
    if crate::store::etcd_url(url).is_none() {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !Path::new(path).is_dir() {
            return Err(Error::NotFound(format!(
                "--state {url}: no such folder; give the folder the coordinator's --state named"
            )));
        }
    }
    Ok(crate::store::open(url).await?)
}

/// The report of the run of `spec` in `store`.
pub async fn report(store: Arc<dyn StateStore>, spec: &v1::JobSpec) -> Result<Report, Error> {
    let ledger = StoreLedger::new(store.clone(), spec.name.clone());
    let steps = ledger.steps().await?;
    if steps.is_empty() {
        return Err(Error::NotFound(format!(
            "the state store holds no committed step of job {:?}: is it the store of that job (its name is the job file's)?",
            spec.name
        )));
    }
    let record = ledger.curriculum().await?;
    let checkpoints = ledger.checkpoints().await?;
    let events = ledger.events().await?;
    let set_aside = rolled_back(store.as_ref(), &spec.name).await?;

    let mut loss = LossHistory::new(0, BUCKETS);
    for s in &steps {
        loss.record(s.step, s.loss, s.skipped);
    }
    for (resumed_at, points) in set_aside {
        loss.add_abandoned(resumed_at, points);
    }
    let last = steps.last().map_or(0, |s| s.step + 1);
    let total_steps = spec.stages.last().map_or(0, |s| s.until_step);
    Ok(Report {
        job: spec.name.clone(),
        status: None,
        stages: stages(spec, &steps, record.as_ref(), last),
        checkpoints,
        events,
        loss,
        workers: vec![],
        step: last,
        total_steps,
        tokens_per_step: spec.global_batch_tokens,
        missing: vec![],
    })
}

/// The committed steps rollbacks set aside, per rollback: the step training went back to,
/// and the losses of the steps from there.
async fn rolled_back(
    store: &dyn StateStore,
    job: &str,
) -> Result<Vec<(u64, Vec<LossPoint>)>, Error> {
    // `jobs/{job}/ledger/rolled_back/{event}/{step}`: the prefix without the last two parts.
    let key = keys::rolled_back_step(job, 0, 0);
    let prefix = key
        .rsplitn(3, '/')
        .nth(2)
        .map(|p| format!("{p}/"))
        .unwrap_or(key);
    let mut by_event: BTreeMap<String, Vec<v1::LedgerStep>> = BTreeMap::new();
    for (k, v) in store.range(&prefix).await? {
        let step = crate::ledger::decode_step(&k, &v.value)?;
        let event = k[prefix.len()..].split('/').next().unwrap_or("").to_owned();
        by_event.entry(event).or_default().push(step);
    }
    Ok(by_event
        .into_values()
        .filter_map(|mut steps| {
            steps.sort_by_key(|s| s.step);
            let resumed_at = steps.first()?.step;
            let points = steps
                .iter()
                .map(|s| LossPoint::step(s.step, s.loss, s.skipped))
                .collect();
            Some((resumed_at, points))
        })
        .collect())
}

/// The stages as the committed steps trained them: each stage the ledger's steps name starts
/// at its first such step and ends where the next one starts (the last one trained ends at the
/// last step when the job is over, or is current); stages not reached are planned after it.
/// Mixtures are the record's (edits included), tokens the committed steps' samples.
fn stages(
    spec: &v1::JobSpec,
    steps: &[v1::LedgerStep],
    record: Option<&v1::CurriculumRecord>,
    last: u64,
) -> v1::ListStagesResponse {
    let mut infos = stagecoach_core::curriculum::planned_stages(spec);
    let mut first: Vec<Option<u64>> = vec![None; infos.len()];
    for s in steps {
        let Some(info) = infos.get_mut(s.stage as usize) else {
            continue;
        };
        first[s.stage as usize].get_or_insert(s.step);
        for sample in &s.samples {
            if let Some(t) = info.tokens.get_mut(sample.source as usize) {
                t.tokens += u64::from(s.seq_len);
            }
        }
    }
    let total = spec.stages.last().map_or(0, |s| s.until_step);
    let trained: Vec<usize> = (0..infos.len()).filter(|i| first[*i].is_some()).collect();
    for (n, &i) in trained.iter().enumerate() {
        let info = &mut infos[i];
        info.started = true;
        info.start_step = first[i].unwrap_or(0);
        match trained.get(n + 1) {
            Some(&next) => {
                info.ended = true;
                info.end_step = first[next].unwrap_or(last);
            }
            None if last >= total => {
                info.ended = true;
                info.end_step = last;
            }
            None => {}
        }
    }
    if let Some(r) = record {
        for (info, w) in infos.iter_mut().zip(&r.weights) {
            if w.weights.len() == info.mix.len() {
                for (m, &weight) in info.mix.iter_mut().zip(&w.weights) {
                    m.weight = weight;
                }
            }
        }
    }
    let current = trained.last().copied().unwrap_or(0) as u32;
    v1::ListStagesResponse {
        stages: infos,
        transitions: record.map(|r| r.transitions.clone()).unwrap_or_default(),
        evaluations: record.map(|r| r.evaluations.clone()).unwrap_or_default(),
        current,
        step: last,
    }
}

/// The `width` and `height` attributes of an SVG document's root.
fn size(svg: &str) -> Option<(u32, u32)> {
    let root = &svg[..svg.find('>')?];
    let attr = |name: &str| -> Option<u32> {
        let at = root.find(&format!(" {name}=\""))? + name.len() + 3;
        let end = root[at..].find('"')? + at;
        root[at..end].parse::<f64>().ok().map(|v| v.ceil() as u32)
    };
    Some((attr("width")?, attr("height")?))
}

/// Renders the SVG file `svg` to the PNG `png` (`w` × `h` pixels) with headless Chromium.
fn screenshot(chromium: &Path, svg: &Path, png: &Path, w: u32, h: u32) -> Result<(), Error> {
    let svg = fs::canonicalize(svg).map_err(|e| destination(svg, e))?;
    let _ = fs::remove_file(png);
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--window-size={w},{h}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", svg.display()))
        .output()
        .map_err(|e| {
            Error::FailedPrecondition(format!(
                "--png: cannot run {} ({e}); install Chromium (Debian: apt-get install chromium) or name it with --chromium",
                chromium.display()
            ))
        })?;
    if !out.status.success() || !png.is_file() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(Error::FailedPrecondition(format!(
            "--png: {} did not write {} ({}): {}",
            chromium.display(),
            png.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_read_from_the_root_element() {
        let text = svg::timeline_chart(&Report::default());
        assert_eq!(size(&text), Some((1000, 108)));
        assert_eq!(size("<svg>"), None);
    }

    #[test]
    fn stages_follow_the_ledger_and_plan_the_rest() {
        let spec = v1::JobSpec {
            name: "j".into(),
            global_batch_tokens: 128,
            sources: vec![v1::SourceSpec {
                name: "web".into(),
                ..Default::default()
            }],
            stages: ["a", "b", "c"]
                .iter()
                .zip([10u64, 20, 30])
                .map(|(n, until)| v1::StageSpec {
                    name: (*n).into(),
                    until_step: until,
                    seq_len: 64,
                    weights: vec![1.0],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let steps: Vec<v1::LedgerStep> = (0..15)
            .map(|s| v1::LedgerStep {
                step: s,
                stage: u32::from(s >= 10),
                seq_len: 64,
                samples: vec![v1::SampleRef::default(); 2],
                ..Default::default()
            })
            .collect();
        let r = stages(&spec, &steps, None, 15);
        let got: Vec<(bool, u64, bool, u64, u64)> = r
            .stages
            .iter()
            .map(|s| {
                (
                    s.started,
                    s.start_step,
                    s.ended,
                    s.end_step,
                    s.tokens[0].tokens,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (true, 0, true, 10, 10 * 128),
                (true, 10, false, 0, 5 * 128),
                (false, 0, false, 0, 0)
            ]
        );
        assert_eq!(r.current, 1);
    }
}
