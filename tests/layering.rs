//! Architecture invariants, checked on the crate graph that `cargo metadata` resolves (as
//! rust-analyzer checks its layers), so that a dependency added in the wrong place fails CI
//! instead of waiting for a reviewer. docs/ARCHITECTURE.md, "Architecture invariants", says
//! the same in prose; keep the two together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The pure crates: plain computation over plain data, no I/O runtime, no sockets, no burn.
const PURE: &[&str] = &["fedge-core", "fedge-engine", "fedge-kernels", "fedge-secagg"];

/// What a pure crate may not depend on, even transitively (`tokio-util`, `quinn-proto`,
/// `burn-core`, ... count as their family).
const NOT_BELOW_PURE: &[&str] = &["tokio", "quinn", "rustls", "burn"];

/// The crates that may name quinn directly, each with its reason. Everyone else goes through
/// fedge-net.
const QUINN_ALLOWED: &[(&str, &str)] = &[
    ("fedge-net", "the transport crate: QUIC and TLS configuration, the client, framing"),
    (
        "fedge-coordinator",
        "transport.rs binds the server's quinn::Endpoint, accepts connections and reads the peer's \
         certificate (rustls) from each quinn::Connection",
    ),
    ("fedge-edge", "transport.rs keeps the device's quinn::Connection open across requests"),
];

/// The one crate that may name burn directly: everything else sees `ModelParams` and
/// fedge-learn's API.
const BURN_ALLOWED: &[&str] = &["fedge-learn"];

/// The resolved workspace: package names by id, and each package's normal (not dev, not
/// build) dependencies.
struct Graph {
    names: BTreeMap<String, String>,
    normal: BTreeMap<String, Vec<String>>,
    /// Workspace members: name -> names of direct dependencies of any kind.
    direct: BTreeMap<String, BTreeSet<String>>,
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

fn graph() -> Graph {
    let meta = metadata();
    let str_of = |v: &Value| v.as_str().expect("a string").to_string();
    let names = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (str_of(&p["id"]), str_of(&p["name"])))
        .collect::<BTreeMap<_, _>>();
    let members: BTreeSet<String> = meta["workspace_members"].as_array().expect("members").iter().map(str_of).collect();
    let direct = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| members.contains(&str_of(&p["id"])))
        .map(|p| {
            let deps = p["dependencies"].as_array().expect("dependencies").iter().map(|d| str_of(&d["name"]));
            (str_of(&p["name"]), deps.collect())
        })
        .collect();
    let normal = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve graph")
        .iter()
        .map(|node| {
            let deps = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| d["dep_kinds"].as_array().expect("dep_kinds").iter().any(|k| k["kind"].is_null()))
                .map(|d| str_of(&d["pkg"]));
            (str_of(&node["id"]), deps.collect())
        })
        .collect();
    Graph { names, normal, direct }
}

impl Graph {
    fn id_of(&self, name: &str) -> &str {
        let ids: Vec<&String> = self.names.iter().filter(|(_, n)| *n == name).map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 1, "one package named {name}");
        ids[0]
    }

    /// Every package `name` needs to build and run (normal dependencies, transitively), each
    /// with the path that reaches it. Walked by package id, so two versions of one crate are
    /// both followed.
    fn closure(&self, name: &str) -> BTreeMap<String, Vec<String>> {
        let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut stack = vec![(self.id_of(name), vec![name.to_string()])];
        while let Some((id, path)) = stack.pop() {
            for dep in self.normal.get(id).into_iter().flatten() {
                if let std::collections::btree_map::Entry::Vacant(slot) = seen.entry(dep.as_str()) {
                    let mut p = path.clone();
                    p.push(self.names[dep].clone());
                    slot.insert(p.clone());
                    stack.push((dep.as_str(), p));
                }
            }
        }
        seen.into_values().map(|p| (p.last().expect("a path ends in its crate").clone(), p)).collect()
    }
}

fn in_family(name: &str, family: &str) -> bool {
    name == family || name.strip_prefix(family).is_some_and(|rest| rest.starts_with('-'))
}

#[test]
fn pure_crates_never_reach_an_io_runtime_the_network_or_burn() {
    let g = graph();
    let mut violations = Vec::new();
    for pure in PURE {
        for (dep, path) in g.closure(pure) {
            if NOT_BELOW_PURE.iter().any(|f| in_family(&dep, f)) {
                violations.push(path.join(" -> "));
            }
        }
    }
    assert!(violations.is_empty(), "pure crates depend on what they must not:\n{}", violations.join("\n"));
}

#[test]
fn only_the_transport_crates_name_quinn() {
    let g = graph();
    let allowed: BTreeSet<&str> = QUINN_ALLOWED.iter().map(|(name, _)| *name).collect();
    let offenders: Vec<&String> = g
        .direct
        .iter()
        .filter(|(name, deps)| deps.iter().any(|d| in_family(d, "quinn")) && !allowed.contains(name.as_str()))
        .map(|(name, _)| name)
        .collect();
    assert!(
        offenders.is_empty(),
        "{offenders:?} depend on quinn directly; go through fedge-net or add the crate to QUINN_ALLOWED with a reason"
    );
    for name in allowed {
        assert!(g.direct.contains_key(name), "QUINN_ALLOWED names {name}, which is not a workspace member");
    }
}

#[test]
fn only_fedge_learn_names_burn() {
    let g = graph();
    let offenders: Vec<&String> = g
        .direct
        .iter()
        .filter(|(name, deps)| deps.iter().any(|d| in_family(d, "burn")) && !BURN_ALLOWED.contains(&name.as_str()))
        .map(|(name, _)| name)
        .collect();
    assert!(offenders.is_empty(), "{offenders:?} depend on burn directly; go through fedge-learn");
}

#[test]
fn the_pure_crates_and_the_transport_crates_exist() {
    // A renamed crate would make the checks above vacuous.
    let g = graph();
    for name in PURE {
        assert!(g.direct.contains_key(*name), "{name} is not a workspace member");
    }
    assert!(g.closure("fedge-net").keys().any(|d| d == "quinn"), "the graph sees fedge-net's quinn");
    assert!(g.direct["fedge-learn"].contains("burn"), "the graph sees fedge-learn's burn");
}
