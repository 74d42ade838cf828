//! The floors of docs/ARCHITECTURE.md, checked against the workspace's own manifests
//! (`cargo metadata`), so the drawing cannot drift from the code: a crate that reaches up or
//! sideways, a test harness linked into `chorus`, or a dependency cycle through dev-dependencies
//! fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The floor of every workspace crate; a crate may depend (normally) only on lower floors.
/// The test harness stands just above the backbone; the binaries and the system tests are on
/// top.
const FLOORS: &[(&str, u32)] = &[
    ("chorus-keys", 0),
    ("chorus-identity", 1),
    ("chorus-runtime", 1),
    ("chorus-schemas", 2),
    ("chorus-backbone", 2),
    ("chorus-testkit", 3),
    ("chorus-platform", 3),
    ("chorus-rpc", 4),
    ("chorus-producers", 5),
    ("chorus-aaa", 5),
    ("chorus-consumers", 5),
    ("chorus-replicator", 5),
    ("chorus-broker", 5),
    ("chorus", 6),
    ("chorus-bench", 6),
    ("chorus-system-tests", 7),
];

/// Crates that may link the test harness as a normal dependency: the benchmarks start
/// private nats-servers through it. Everything else uses it as a dev-dependency only.
const HARNESS_USERS: &[&str] = &["chorus-bench"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

/// `crate → [(workspace dependency, kind)]`, kind being `normal`, `dev` or `build`.
fn workspace_graph() -> BTreeMap<String, Vec<(String, String)>> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(repo())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| names.contains(d["name"].as_str().unwrap()))
                .map(|d| {
                    let kind = d["kind"].as_str().unwrap_or("normal").to_string();
                    (d["name"].as_str().unwrap().to_string(), kind)
                })
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

fn floor(name: &str) -> u32 {
    FLOORS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("{name} has no floor: add it to FLOORS and docs/ARCHITECTURE.md"))
}

#[test]
fn every_crate_depends_only_on_floors_below_it() {
    let graph = workspace_graph();
    let mut wrong = Vec::new();
    for (name, deps) in &graph {
        for (dep, kind) in deps {
            if kind != "normal" {
                continue;
            }
            if dep == "chorus-testkit" && !HARNESS_USERS.contains(&name.as_str()) {
                wrong.push(format!("{name} links the test harness (a dev-dependency at most)"));
            } else if floor(dep) >= floor(name) {
                wrong.push(format!("{name} (floor {}) depends on {dep} (floor {})", floor(name), floor(dep)));
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies that do not point down:\n{}", wrong.join("\n"));
}

#[test]
fn no_dependency_cycle_even_through_dev_dependencies() {
    let graph = workspace_graph();
    let edges: BTreeMap<&str, Vec<&str>> =
        graph.iter().map(|(n, deps)| (n.as_str(), deps.iter().map(|(d, _)| d.as_str()).collect())).collect();
    // Depth-first search with colours: reaching a crate still on the stack is a cycle.
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        on_stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = on_stack.iter().position(|n| *n == node) {
            let mut cycle = on_stack[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        on_stack.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, on_stack, done) {
                return Some(cycle);
            }
        }
        on_stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, &edges, &mut Vec::new(), &mut done) {
            panic!("dependency cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_chorus_binary_does_not_link_the_test_harness() {
    let graph = workspace_graph();
    let mut seen = BTreeSet::new();
    let mut todo = vec!["chorus".to_string()];
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        for (dep, kind) in graph.get(&name).into_iter().flatten() {
            if kind == "normal" {
                todo.push(dep.clone());
            }
        }
    }
    assert!(!seen.contains("chorus-testkit"), "chorus links chorus-testkit through {seen:?}");
}

#[test]
fn consumers_do_not_use_producers() {
    fn scan(dir: &Path, hits: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scan(&path, hits);
            } else if std::fs::read_to_string(&path).is_ok_and(|text| text.contains("chorus_producers")) {
                hits.push(path.display().to_string());
            }
        }
    }
    let mut hits = Vec::new();
    scan(&repo().join("consumers"), &mut hits);
    assert!(hits.is_empty(), "consumers/ names chorus_producers in {hits:?}");
}
