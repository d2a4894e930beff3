//! The status page as a person sees it, and `stagecoach plot` on the finished run.
//!
//! A real three-stage run (micro preset, two workers) with a poisoned step that the spike
//! detector rolls back: paused in its last stage, its page is loaded by headless Chromium
//! (Debian's `chromium`), whose DOM must hold the job state, every stage of the timeline, the
//! loss chart with its stage boundaries, the rollback and the lineage it abandoned, the
//! workers and the checkpoints, with nothing fetched from anywhere; a screenshot is saved
//! under the run folder. Resumed, the run finishes, and `stagecoach plot` draws it from its
//! state store: SVG files that parse (Python's XML parser) and hold the run's steps.
//!
//! A coordinator with tokens refuses the page (401) without one and to a worker's (403), and
//! serves it to a viewer's; Chromium cannot send a bearer header, so that is an HTTP client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stagecoach_core::curriculum::Curriculum;
use stagecoach_core::spec::JobFile;
use stagecoach_e2e::{
    bin, cli, coordinator_with_args, demo_corpus, finish, http_get as get, join_worker, python,
    read_store, source_tokens, status, wait_for, wait_for_step, JobBuilder, Proc, MIX,
};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The step whose samples are poisoned: in the second stage, after the checkpoint at 30.
const POISONED: u64 = 35;
/// A stage: its name, the step it ends before, its mixture.
type Stage = (&'static str, u64, &'static [(&'static str, f64)]);

const STAGES: [Stage; 3] = [
    ("broad", 20, MIX),
    (
        "math-heavy",
        40,
        &[("prose", 0.4), ("math", 0.4), ("code", 0.2)],
    ),
    (
        "code-heavy",
        56,
        &[("prose", 0.4), ("math", 0.2), ("code", 0.4)],
    ),
];

/// A folder that outlives the test (under cargo's target/tmp), emptied first.
fn run_folder(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chromium() -> &'static str {
    assert!(
        Path::new(CHROMIUM).exists(),
        "no {CHROMIUM}: `make setup` installs Debian's chromium"
    );
    CHROMIUM
}

/// Chromium's common flags: headless, no sandbox (root in CI), a profile of its own, no
/// network but the page's own host.
fn chromium_cmd(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-extensions",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The DOM Chromium builds from `url`.
fn dump_dom(url: &str, profile: &Path) -> String {
    let out = chromium_cmd(profile)
        .args(["--virtual-time-budget=3000", "--dump-dom", url])
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium --dump-dom {url} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// A screenshot of `url` at 1280 × `height` into `png`.
fn screenshot(url: &str, profile: &Path, png: &Path, height: u32) {
    let out = chromium_cmd(profile)
        .arg(format!("--window-size=1280,{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success() && png.is_file(),
        "chromium --screenshot failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `http://` or `https://` in `page` is the SVG namespace (a name, never fetched), and
/// nothing is loaded from elsewhere: no script, no stylesheet link, no import, no source.
fn assert_offline(page: &str) {
    let urls: Vec<&str> = page
        .match_indices("http")
        .map(|(i, _)| &page[i..(i + 40).min(page.len())])
        .filter(|s| s.starts_with("http://") || s.starts_with("https://"))
        .filter(|s| !s.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(urls.is_empty(), "external URLs in the page: {urls:?}");
    for bad in ["<script", "<link", "@import", " src=", "<iframe", "<img"] {
        assert!(!page.contains(bad), "the page holds {bad:?}");
    }
    assert!(
        page.contains(r#"<meta http-equiv="refresh" content="5">"#),
        "no meta refresh"
    );
}

/// The number of elements of `dom` whose opening tag holds `needle`.
fn count(dom: &str, needle: &str) -> usize {
    dom.matches(needle).count()
}

/// The job file: three stages, spikes judged tightly (a poisoned step is a rollback to the
/// checkpoint before it), checkpoints every 10 steps, held-out data for evaluations.
fn job_file(d: &Path, data: &Path) -> PathBuf {
    let mut b = JobBuilder::new("watched")
        .demo_sources(data, true)
        .workers(2, 5000);
    for (name, until, mix) in STAGES {
        b = b.stage(name, until, 64, mix);
    }
    b.set("schedule.warmup_steps", 5)
        .set("data.seed", 11)
        .set("train.log_every", 5)
        .set("workers.rendezvous_ms", 1000)
        .set(
            "checkpoints.dir",
            d.join("checkpoints").to_string_lossy().into_owned(),
        )
        .set("checkpoints.every_steps", 10)
        .set("checkpoints.keep", 10)
        .set("spikes.window", 20)
        .set("spikes.min_steps", 10)
        .set("spikes.zscore", 5.0)
        .set("spikes.ratio", 1.5)
        .set("spikes.consecutive", 1)
        .set("spikes.ladder", vec!["rollback"])
        .set("spikes.skip_before", 0)
        .set("spikes.skip_after", 1)
        .write(d.join("watched.toml"))
}

/// `--poison` arguments for the samples of step `step` as the plan gives them.
fn poison_args(job: &Path, step: u64) -> Vec<String> {
    let spec = JobFile::load(job).unwrap().to_proto();
    let mut replay = Curriculum::new(&spec, &source_tokens(&spec)).unwrap();
    let plan = (0..=step)
        .map(|_| replay.next_step().unwrap())
        .last()
        .unwrap();
    plan.samples
        .iter()
        .flat_map(|s| {
            [
                "--poison".to_owned(),
                format!("{}:{}..{}", s.source, s.index, s.index + 1),
            ]
        })
        .collect()
}

/// What Python's XML parser finds in an SVG file: the root's tag, and per class the elements
/// carrying it with their `data-` attributes and the points of their polylines.
fn parse_svg(file: &Path) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
out = {"tag": root.tag, "width": root.get("width"), "classes": {}, "texts": []}
for e in root.iter():
    if e.text and e.text.strip():
        out["texts"].append(e.text.strip())
    for c in (e.get("class") or "").split():
        item = {k: v for k, v in e.attrib.items() if k.startswith("data-")}
        lines = [p for p in e.iter("{http://www.w3.org/2000/svg}polyline")]
        item["polyline_points"] = [len(p.get("points").split()) for p in lines]
        item["circles"] = len(list(e.iter("{http://www.w3.org/2000/svg}circle")))
        if e.get("points"):
            item["points"] = len(e.get("points").split())
        out["classes"].setdefault(c, []).append(item)
print(json.dumps(out))
"#;
    let out = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(file)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{} is not valid XML: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn class<'a>(svg: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    svg["classes"][name]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn data_steps(svg: &serde_json::Value, name: &str) -> Vec<u64> {
    class(svg, name)
        .iter()
        .filter_map(|e| e["data-step"].as_str()?.parse().ok())
        .collect()
}

#[test]
fn a_run_s_page_in_chromium_and_its_plots_show_stages_loss_rollback_workers_checkpoints() {
    let started = Instant::now();
    let d = &run_folder("status-page");
    let data = demo_corpus(d);
    let job = job_file(d, &data);
    let poison = poison_args(&job, POISONED);
    let poison: Vec<&str> = poison.iter().map(String::as_str).collect();
    let state = d.join("state");
    let (mut coord, url, metrics) =
        coordinator_with_args(&job, &state, &d.join("coordinator.log"), &[]);
    let page_url = metrics.trim_end_matches("/metrics").to_owned() + "/";
    println!("status page: {page_url}");
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| join_worker(&url, d, &format!("worker-{i}"), &poison))
        .collect();

    // Into the last stage, past the rollback; then held there while Chromium looks.
    wait_for_step(&url, STAGES[1].1 + 4);
    cli(&url, &["pause"]);
    let s = wait_for(&url, Duration::from_secs(120), "the pause", |s| {
        s["state"] == "paused"
    });
    let step = s["step"].as_u64().unwrap();
    println!(
        "paused at step {step} after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let profile = d.join("chromium-profile");
    let t = Instant::now();
    let dom = dump_dom(&page_url, &profile);
    println!(
        "chromium --dump-dom: {} bytes in {:.1} s",
        dom.len(),
        t.elapsed().as_secs_f64()
    );
    std::fs::write(d.join("status-page.dom.html"), &dom).unwrap();
    // The job state, and every stage of the timeline: done, done, current.
    assert!(
        dom.contains(r#"<span class="badge" id="state">paused</span>"#),
        "no paused state in the DOM"
    );
    assert!(dom.contains(r#"<h1 id="job">watched</h1>"#));
    for (i, (name, _, _)) in STAGES.iter().enumerate() {
        let phase = if i < 2 { "done" } else { "current" };
        assert!(
            dom.contains(&format!(r#"class="stage-row {phase}" data-stage="{name}""#)),
            "stage {name} ({phase}) not in the stage table"
        );
        assert!(
            dom.contains(&format!(
                r#"class="timeline-stage" data-stage="{name}" data-phase="{phase}""#
            )),
            "stage {name} ({phase}) not on the timeline"
        );
    }
    // The loss chart: its boundaries, the rollback, the lineage it abandoned.
    let loss_at = dom
        .find(r#"id="loss-chart""#)
        .expect("the loss chart's SVG");
    let loss_svg = &dom[loss_at..loss_at + dom[loss_at..].find("</svg>").unwrap()];
    for boundary in [STAGES[0].1, STAGES[1].1] {
        assert!(
            loss_svg.contains(&format!(r#"class="stage-boundary" data-step="{boundary}""#)),
            "no stage boundary at {boundary} on the loss chart"
        );
    }
    let rollback = format!(r#"class="rollback" data-from="{POISONED}" data-to="30""#);
    assert!(loss_svg.contains(&rollback), "no rollback mark {rollback}");
    assert!(loss_svg.contains(r#"class="abandoned" data-resumed-at="30""#));
    assert!(loss_svg.contains("training loss (nats per token)"));
    assert!(loss_svg.contains("optimizer step"));
    // Workers, checkpoints, the rollback event.
    assert_eq!(
        count(&dom, r#"<tr class="worker" data-rank="#),
        2,
        "two workers"
    );
    let shown_checkpoints = count(&dom, r#"<tr class="checkpoint" data-step="#);
    assert!(shown_checkpoints >= 4, "{shown_checkpoints} checkpoints");
    assert!(dom.contains(r#"data-action="rollback""#));
    assert!(
        count(&dom, r#"<tr class="evaluation">"#) >= 2,
        "stage-end evaluations"
    );
    assert_offline(&dom);

    let png = d.join("status-page.png");
    let t = Instant::now();
    screenshot(&page_url, &profile, &png, 2000);
    // The whole page, workers, checkpoints and events included.
    screenshot(&page_url, &profile, &d.join("status-page-full.png"), 2700);
    println!(
        "screenshot: {} ({} bytes, {:.1} s)",
        png.display(),
        std::fs::metadata(&png).unwrap().len(),
        t.elapsed().as_secs_f64()
    );

    // The page as served, and its charts as files.
    let addr = page_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (code, head, body) = get(&addr, "/", None);
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert_offline(&body);
    let (code, head, svg) = get(&addr, "/loss.svg", None);
    assert_eq!(code, 200);
    assert!(head.contains("content-type: image/svg+xml"), "{head}");
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));

    cli(&url, &["resume"]);
    finish(&mut coord, &mut workers, d, "coordinator.log");
    println!(
        "run finished after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let stored = read_store(state.to_str().unwrap(), "watched");
    let total = STAGES[2].1;
    assert_eq!(stored.steps.len() as u64, total);
    let set_aside: Vec<u64> = stored.rolled_back.iter().map(|s| s.step).collect();
    assert_eq!(set_aside, (30..=POISONED).collect::<Vec<_>>());

    // `stagecoach plot` on the finished run.
    let plots = d.join("plots");
    let t = Instant::now();
    let out = Command::new(bin("stagecoach"))
        .args(["plot", "--png", "--chromium", chromium(), "--job"])
        .arg(&job)
        .arg("--state")
        .arg(&state)
        .arg("--out")
        .arg(&plots)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stagecoach plot failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "stagecoach plot ({:.1} s):\n{text}",
        t.elapsed().as_secs_f64()
    );
    for name in ["loss", "validation", "tokens", "timeline"] {
        let png = plots.join(format!("{name}.png"));
        assert!(
            std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000),
            "{} missing or empty",
            png.display()
        );
    }
    let loss = parse_svg(&plots.join("loss.svg"));
    assert_eq!(loss["tag"], "{http://www.w3.org/2000/svg}svg");
    // Every committed step is a point of the line (one per step at this length).
    let lines = class(&loss, "loss-line");
    let drawn: u64 = lines.iter().map(|l| l["points"].as_u64().unwrap()).sum();
    assert_eq!(drawn, total, "points of the loss line");
    assert!(loss["texts"].as_array().unwrap().iter().any(|t| t
        .as_str()
        .unwrap()
        .starts_with(&format!("{total} steps drawn"))));
    let abandoned = class(&loss, "abandoned");
    assert_eq!(abandoned.len(), 1);
    assert_eq!(abandoned[0]["data-resumed-at"], "30");
    assert_eq!(abandoned[0]["circles"], set_aside.len() as u64);
    let rollbacks = class(&loss, "rollback");
    assert_eq!(rollbacks.len(), 1);
    assert_eq!(rollbacks[0]["data-from"], POISONED.to_string());
    assert_eq!(
        data_steps(&loss, "stage-boundary"),
        vec![STAGES[0].1, STAGES[1].1]
    );
    let mut want: Vec<u64> = stored.checkpoints.iter().map(|c| c.step).collect();
    let mut got = data_steps(&loss, "checkpoint");
    want.sort();
    got.sort();
    assert_eq!(got, want, "checkpoints on the loss chart");
    let timeline = parse_svg(&plots.join("timeline.svg"));
    let phases: Vec<(&str, &str)> = class(&timeline, "timeline-stage")
        .iter()
        .map(|e| {
            (
                e["data-stage"].as_str().unwrap(),
                e["data-phase"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        phases,
        STAGES.iter().map(|s| (s.0, "done")).collect::<Vec<_>>()
    );
    let tokens = parse_svg(&plots.join("tokens.svg"));
    let per_source: u64 = class(&tokens, "tokens-source")
        .iter()
        .map(|e| e["data-tokens"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    let trained: u64 = stored
        .steps
        .iter()
        .map(|s| s.samples.len() as u64 * u64::from(s.seq_len))
        .sum();
    assert_eq!(per_source, trained, "tokens per source against the ledger");
    let validation = parse_svg(&plots.join("validation.svg"));
    let sources = class(&validation, "eval-source");
    assert_eq!(sources.len(), 3, "a line per source");
    assert!(sources.iter().all(|s| s["circles"].as_u64().unwrap() >= 3));
    println!(
        "plots: {} loss points, {} abandoned, {} checkpoints, {} tokens; {:.1} s in all",
        drawn,
        set_aside.len(),
        got.len(),
        per_source,
        started.elapsed().as_secs_f64()
    );

    // A plot that cannot be made says why.
    let out = Command::new(bin("stagecoach"))
        .args(["plot", "--job"])
        .arg(&job)
        .args(["--state", "/nonexistent/state", "--out"])
        .arg(d.join("nowhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no such folder"), "{err}");
}

#[test]
fn the_page_needs_a_viewer_s_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let out = Command::new(bin("stagecoach"))
        .args(["certs", "init"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = demo_corpus(d);
    let job = job_file(d, &data);
    let auth = certs.join("auth.toml").into_os_string();
    // Tokens without TLS (on loopback): no worker joins, the job waits for them.
    let (_coord, url, metrics) = coordinator_with_args(
        &job,
        &d.join("state"),
        &d.join("coordinator.log"),
        &["--auth".as_ref(), auth.as_os_str()],
    );
    let addr = metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let token = |role: &str| {
        std::fs::read_to_string(certs.join(format!("{role}.token")))
            .unwrap()
            .trim()
            .to_owned()
    };

    for path in [
        "/",
        "/status",
        "/loss.svg",
        "/validation.svg",
        "/tokens.svg",
    ] {
        let (code, head, body) = get(&addr, path, None);
        assert_eq!(code, 401, "{path} without a token: {body}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(
            !body.contains("watched"),
            "{path}: the refusal names the job"
        );
        let (code, _, _) = get(&addr, path, Some(&token("worker")));
        assert_eq!(code, 403, "{path} with a worker's token");
        let (code, _, _) = get(&addr, path, Some("not-a-token"));
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    let (code, _, refused) = get(&addr, "/", None);
    assert_eq!(code, 401);
    assert!(refused.contains(r#"id="refused""#), "{refused}");
    assert_offline_refusal(&refused);
    let (code, _, _) = get(&addr, "/healthz", None);
    assert_eq!(code, 200);

    for role in ["viewer", "operator"] {
        let (code, head, page) = get(&addr, "/", Some(&token(role)));
        assert_eq!(code, 200, "the page with the {role}'s token: {page}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        assert!(page.contains(r#"<h1 id="job">watched</h1>"#));
        assert!(
            page.contains(r#"id="state">waiting</span>"#),
            "a job without workers waits"
        );
        for (name, _, _) in STAGES {
            assert!(
                page.contains(&format!(r#"class="stage-row planned" data-stage="{name}""#)),
                "stage {name} planned"
            );
        }
        assert_offline(&page);
    }
    let (code, _, svg) = get(&addr, "/loss.svg", Some(&token("viewer")));
    assert_eq!(code, 200);
    assert!(svg.contains("no step committed yet"));
    // The control API is held to the same tokens.
    let status_without = status(&url);
    assert!(
        status_without.is_null(),
        "status without a token: {status_without}"
    );
}

/// The refusal page loads nothing either.
fn assert_offline_refusal(page: &str) {
    for bad in [
        "<script", "<link", "@import", " src=", "http://", "https://",
    ] {
        assert!(!page.contains(bad), "the refusal holds {bad:?}");
    }
}
