//! The Grafana dashboard `deploy/grafana/stagecoach.json` against a real Prometheus scraping a
//! real job: every panel's and annotation's PromQL, its template variables substituted (the
//! query variables resolved through Prometheus as Grafana would), is run as a range query and
//! must parse and return data. The job passes through what the panels show: two stages (a
//! transition, an evaluation per source), checkpoints, a poisoned step whose update the ranks
//! drop, and the alert rules firing. The provisioning files are checked as YAML.
//!
//! Exempt from "returns data" (they must still parse): the GPU panels, whose series come from
//! NVIDIA's dcgm-exporter, which needs a GPU and its driver; there is none here to scrape.

mod prom;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use prom::{free_port, now, poison_step, rules_dir, spikes, target, Prometheus};
use stagecoach_e2e::{
    coordinator_with_metrics, demo_corpus, join_worker, workspace_dir, JobBuilder, MIX,
};

/// One PromQL query of the dashboard: where it is, and its text.
struct Query {
    place: String,
    expr: String,
}

fn dashboard() -> serde_json::Value {
    let path = workspace_dir().join("deploy/grafana/stagecoach.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel (rows' nested panels included) and every annotation query.
fn queries(d: &serde_json::Value) -> Vec<Query> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<Query>, ids: &mut Vec<u64>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            ids.push(
                p["id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("panel {title} has no id")),
            );
            assert!(p["gridPos"].is_object(), "panel {title} has no gridPos");
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "panel {title}: its datasource is not the variable"
                );
                let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}"));
                assert!(!targets.is_empty(), "panel {title} has no query");
                for t in targets {
                    let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: {t}"));
                    out.push(Query {
                        place: format!("panel {title:?} {}", t["refId"].as_str().unwrap_or("?")),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(&p["panels"], out, ids);
        }
    }
    let mut out = vec![];
    let mut ids = vec![];
    walk(&d["panels"], &mut out, &mut ids);
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "panel ids repeat: {ids:?}");
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(expr) = a["expr"].as_str() {
            assert_eq!(a["datasource"]["uid"], "${datasource}", "{a}");
            out.push(Query {
                place: format!("annotation {:?}", a["name"].as_str().unwrap_or("?")),
                expr: expr.to_owned(),
            });
        }
    }
    out
}

/// Replaces `$name` and `${name}` in `expr` by `vars[name]`; panics on a variable the
/// dashboard does not define.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("a closing brace");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = vars
            .get(name)
            .unwrap_or_else(|| panic!("{expr}: no variable {name:?}"));
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The variables' values: Grafana's built-ins as it would compute them for this scrape
/// interval, the textboxes' defaults, and each `label_values(SELECTOR, LABEL)` query resolved
/// through Prometheus into a regex of its values (none found: the variable's `allValue`).
fn variables(d: &serde_json::Value, p: &Prometheus) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = [
        ("__rate_interval", "10s"),
        ("__interval", "5s"),
        ("__range", "1m"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for v in d["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_owned();
        let value = match v["type"].as_str().unwrap() {
            "datasource" => {
                assert_eq!(v["query"], "prometheus", "{v}");
                "prometheus".to_owned()
            }
            "textbox" | "constant" => v["query"].as_str().unwrap().to_owned(),
            "query" => {
                let q = v["query"]["query"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"));
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|s| s.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("{name}: not label_values(...): {q}"));
                let (selector, label) = inner.rsplit_once(',').unwrap();
                let selector = substitute(selector.trim(), &vars);
                let found = p
                    .query(&format!("group by ({}) ({selector})", label.trim()))
                    .unwrap_or_else(|e| panic!("variable {name}: {e}"));
                let values: Vec<&str> = found
                    .iter()
                    .filter_map(|(l, _)| l.get(label.trim()).map(String::as_str))
                    .collect();
                if values.is_empty() {
                    // As Grafana's "All" of no values: the variable's allValue.
                    v["allValue"].as_str().unwrap_or(".*").to_owned()
                } else {
                    format!("({})", values.join("|"))
                }
            }
            other => panic!("variable {name}: type {other}"),
        };
        vars.insert(name, value);
    }
    vars
}

/// Loads the provisioning files (and the compose file) as YAML with the venv's Python.
fn yaml(files: &[&str]) -> Vec<serde_json::Value> {
    let python = std::env::var("STAGECOACH_PYTHON").unwrap_or_else(|_| {
        workspace_dir()
            .join(".venv/bin/python")
            .display()
            .to_string()
    });
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps([yaml.safe_load(open(f)) for f in sys.argv[1:]]))",
        ])
        .args(files)
        .current_dir(workspace_dir().join("deploy/grafana"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run `make setup`"));
    assert!(
        out.status.success(),
        "not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_provisioning_files_load_the_dashboard_and_the_datasource() {
    let docs = yaml(&[
        "provisioning/datasources/stagecoach.yml",
        "provisioning/dashboards/stagecoach.yml",
        "compose.yml",
    ]);
    let ds = &docs[0]["datasources"][0];
    assert_eq!(docs[0]["apiVersion"], 1);
    assert_eq!(ds["type"], "prometheus", "{ds}");
    assert!(ds["url"].as_str().unwrap().starts_with("http"), "{ds}");
    let provider = &docs[1]["providers"][0];
    assert_eq!(docs[1]["apiVersion"], 1);
    assert_eq!(provider["type"], "file", "{provider}");
    let path = provider["options"]["path"].as_str().unwrap();
    // The compose file mounts this folder (the dashboard's) where the provider reads.
    let mounts = docs[2]["services"]["grafana"]["volumes"].to_string();
    assert!(mounts.contains(&format!("./:{path}")), "{mounts}");
    assert!(
        mounts.contains("./provisioning:/etc/grafana/provisioning"),
        "{mounts}"
    );
    let d = dashboard();
    assert_eq!(d["uid"], "stagecoach");
    println!(
        "datasource {} at {}, dashboards from {path}, {} queries",
        ds["name"],
        ds["url"],
        queries(&d).len()
    );
}

#[test]
fn every_panel_query_parses_and_returns_data_from_a_real_run() {
    let d = dashboard();
    let all = queries(&d);
    // The panels whose series only dcgm-exporter (a GPU's) gives.
    let exempt = |q: &Query| q.expr.contains("DCGM_FI_");
    let gpu: Vec<&str> = all
        .iter()
        .filter(|q| exempt(q))
        .map(|q| q.place.as_str())
        .collect();
    assert!(gpu.len() >= 4, "GPU panels: {gpu:?}");

    let dir = tempfile::tempdir().unwrap();
    let dd = dir.path();
    let data = demo_corpus(dd);
    // Two stages (the first short, evaluated at its end), checkpoints every 10 steps, exactly
    // two workers, the spike guard armed and one step poisoned.
    let path = spikes(
        JobBuilder::new("dash")
            .demo_sources(&data, true)
            .workers(2, 4000),
    )
    .stage("warm", 40, 64, MIX)
    .stage("main", 100_000, 64, MIX)
    .set("data.eval_samples", 4)
    .set("data.seed", 5)
    .set("train.log_every", 5)
    .set(
        "checkpoints.dir",
        dd.join("checkpoints").to_string_lossy().into_owned(),
    )
    .set("checkpoints.every_steps", 10)
    .write(dd.join("dash.toml"));
    let poison = poison_step(&path, 25);

    let (_coord, url, metrics) =
        coordinator_with_metrics(&path, &dd.join("state"), &dd.join("coordinator.log"));
    let ports = [free_port(), free_port()];
    std::fs::copy(rules_dir().join("alerts.yml"), dd.join("alerts.yml")).unwrap();
    let config = dd.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n\
             \x20 - job_name: stagecoach-coordinator\n    static_configs:\n      - targets: ['{}']\n\
             \x20 - job_name: stagecoach-worker\n    static_configs:\n      - targets: ['127.0.0.1:{}', '127.0.0.1:{}']\n",
            target(&metrics),
            ports[0],
            ports[1]
        ),
    )
    .unwrap();
    let t0 = now();
    let mut p = Prometheus::start(dd, &config);
    // Counters are seen at zero before the job trains, so that `increase()` sees them rise.
    p.wait_for(Duration::from_secs(60), "a first scrape", |p| {
        let step = p.query(r#"stagecoach_job_step{job="stagecoach-coordinator"}"#)?;
        (step.len() == 1).then_some(()).ok_or(format!("{step:?}"))
    });
    let start = Instant::now();
    let _workers: Vec<_> = (0..2)
        .map(|i| {
            let mut a = poison.clone();
            a.extend(["--metrics-listen".into(), format!("127.0.0.1:{}", ports[i])]);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            join_worker(&url, dd, &format!("worker-{i}"), &a)
        })
        .collect();

    let mut vars = BTreeMap::new();
    let (counts, seen_at) = p.wait_for(
        Duration::from_secs(90),
        "every panel's data",
        |p| -> Result<(Vec<(String, usize)>, Duration), String> {
            vars = variables(&d, p);
            for v in ["job", "instance", "worker_job"] {
                if !vars[v].starts_with('(') {
                    return Err(format!("variable {v} has no value yet"));
                }
            }
            let mut counts = vec![];
            let mut empty = vec![];
            for q in &all {
                let expr = substitute(&q.expr, &vars);
                // A query that does not parse fails at once; one without data is waited for.
                let found = match p.query_range(&expr, t0, now(), 1) {
                    Ok(found) => found,
                    Err(e) => panic!("{}: {expr}: {e}", q.place),
                };
                if found.is_empty() && !exempt(q) {
                    empty.push(format!("{}: {expr}", q.place));
                }
                counts.push((q.place.clone(), found.len()));
            }
            if empty.is_empty() {
                Ok((counts, start.elapsed()))
            } else {
                Err(format!("no data yet for:\n  {}", empty.join("\n  ")))
            }
        },
    );
    for (place, n) in &counts {
        println!("{n:>3} series  {place}");
    }
    println!(
        "{} queries parse; {} return data ({:.1} s after the workers started); exempt (no GPU, \
         no dcgm-exporter): {gpu:?}; variables {vars:?}",
        counts.len(),
        counts.iter().filter(|c| c.1 > 0).count(),
        seen_at.as_secs_f64()
    );
}
