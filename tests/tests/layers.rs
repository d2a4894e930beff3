//! The layer rule of ARCHITECTURE.md, checked on the real dependency graph (`cargo metadata`):
//! `stagecoach-proto` ← `stagecoach-core` ← {`stagecoach-coordinator`, `stagecoach-worker`}.
//! The worker never depends on the coordinator (the data plane does not link the control
//! plane's etcd client and servers), the coordinator never links libtorch, and the core depends
//! on neither side, has no server unless asked for (`http`), and no etcd client.
//! And a rule of the build: a target built without a test harness has no tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `cargo metadata` of the workspace.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(stagecoach_e2e::workspace_dir())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// The normal (non-dev, non-build) dependency names of every package in the resolved graph,
/// by package name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let meta = metadata();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let name = name_of[node["id"].as_str().unwrap()].to_owned();
        let deps: BTreeSet<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned())
            .collect();
        graph.entry(name).or_insert_with(BTreeSet::new).extend(deps);
    }
    graph
}

/// Every package `root` depends on through normal dependencies, itself excluded.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        for d in graph.get(&p).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_layers_hold_in_the_dependency_graph() {
    let g = graph();
    let direct = |p: &str| g.get(p).cloned().unwrap_or_default();
    let all = |p: &str| closure(&g, p);

    // The worker is the data plane: the core and the protocol, never the control plane.
    let worker = direct("stagecoach-worker");
    assert!(worker.contains("stagecoach-core"), "{worker:?}");
    assert!(!all("stagecoach-worker").contains("stagecoach-coordinator"));
    assert!(!all("stagecoach-worker").contains("etcd-client"));

    // The coordinator never links libtorch.
    let coordinator = all("stagecoach-coordinator");
    assert!(coordinator.contains("stagecoach-core"));
    for torch in ["tch", "torch-sys", "cudarc"] {
        assert!(
            !coordinator.contains(torch),
            "the coordinator depends on {torch}"
        );
    }

    // The core knows neither side, nor etcd, nor gRPC servers.
    let core = all("stagecoach-core");
    for forbidden in [
        "stagecoach-coordinator",
        "stagecoach-worker",
        "etcd-client",
        "tch",
        "torch-sys",
    ] {
        assert!(
            !core.contains(forbidden),
            "stagecoach-core depends on {forbidden}"
        );
    }
    assert!(direct("stagecoach-core").contains("stagecoach-proto"));
    // The protocol is the bottom layer.
    let proto = all("stagecoach-proto");
    assert!(
        !proto.iter().any(|p| p.starts_with("stagecoach-")),
        "stagecoach-proto depends on {proto:?}"
    );
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)
        .expect("read a source folder")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `test = false` in a Cargo.toml spares `cargo test` compiling a target a second time as a test
/// harness (the binaries, the protocol, the end-to-end helpers: none has tests of its own). A
/// test written in such a target would never run; this fails instead, naming it.
#[test]
fn no_test_is_written_in_a_target_built_without_a_test_harness() {
    let meta = metadata();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut checked = Vec::new();
    let mut offenders = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        if !members.contains(package["id"].as_str().unwrap()) {
            continue;
        }
        for target in package["targets"].as_array().unwrap() {
            if target["test"].as_bool() != Some(false) {
                continue;
            }
            let src = PathBuf::from(target["src_path"].as_str().unwrap());
            let kinds: Vec<&str> = target["kind"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect();
            // A library's tests may be in any of its modules; the binaries here are one file.
            let files = if kinds.contains(&"lib") {
                rust_files(src.parent().unwrap())
            } else {
                vec![src.clone()]
            };
            for file in files {
                let text = std::fs::read_to_string(&file).expect("read a source file");
                if text.contains("#[test]") || text.contains("#[tokio::test") {
                    offenders.push(format!(
                        "{} (target {} of {})",
                        file.display(),
                        target["name"].as_str().unwrap(),
                        package["name"].as_str().unwrap()
                    ));
                }
            }
            checked.push(target["name"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        offenders.is_empty(),
        "tests in targets that `cargo test` does not build as tests (remove `test = false` from \
         their Cargo.toml): {offenders:?}"
    );
    // The targets spared a test build, so that this cannot pass by finding none.
    for expected in ["stagecoach-coordinator", "stagecoach", "stagecoach-worker"] {
        assert!(checked.iter().any(|c| c == expected), "{checked:?}");
    }
    println!("built without a test harness, no test in them: {checked:?}");
}
