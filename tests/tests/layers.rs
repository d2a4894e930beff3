//! The layer rule of ARCHITECTURE.md, checked on the real dependency graph (`cargo metadata`):
//! `stagecoach-proto` ← `stagecoach-core` ← {`stagecoach-coordinator`, `stagecoach-worker`}.
//! The worker never depends on the coordinator (the data plane does not link the control
//! plane's etcd client and servers), the coordinator never links libtorch, and the core depends
//! on neither side, has no server unless asked for (`http`), and no etcd client.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// The normal (non-dev, non-build) dependency names of every package in the resolved graph,
/// by package name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
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
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
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
