//! clup: high availability and read/write splitting for PostgreSQL
//! streaming-replication clusters.
//!
//! One binary plays three programs, chosen by the name it is called by:
//! `clupserver` (the daemon and its HTTP interface, [`server`]), `clupadm`
//! (the operator's tool, [`cli`]) and `cstlb` (the read load balancer,
//! [`lb`]).
//!
//! The parts, from the bottom up; a part imports only from parts below it
//! (`tests::layering` checks this):
//! - [`util`]: logging, tables, URLs, signals: knows nothing of clusters;
//! - [`model`]: clup.conf, the cluster meta, the home, report rows;
//! - [`ha`]: the decisions, pure functions of the model and observations;
//! - [`exec`]: executors that touch hosts, databases and peers, and only act;
//! - [`store`]: the meta store (file, etcd);
//! - [`monitor`]: the probe loop by phase, tasks, operations, the leader lease;
//! - [`server`]: the daemon, its HTTP interface, /metrics and health;
//! - [`lb`] (cstlb) and [`cli`] (clupadm): faces that share only the lower parts.

pub mod cli;
pub mod exec;
pub mod ha;
pub mod lb;
pub mod model;
pub mod monitor;
pub mod server;
pub mod store;
pub mod util;

/// The version printed by `--version` and the start-up banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The first line of the log and of clupadm's output, as in the manual.
pub fn banner() -> String {
    format!("Clup v{VERSION}  Copyright (c) the clup authors. MIT OR Apache-2.0.")
}

/// Seconds since the epoch (the meta's lock and task times).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Each part and the parts it may import from; the crate root's own
    /// items (`crate::now_secs`, `crate::banner`) are open to all.
    const LAYERS: &[(&str, &[&str])] = &[
        ("util", &[]),
        ("model", &["util"]),
        ("ha", &["model", "util"]),
        ("exec", &["model", "util"]),
        ("store", &["model", "util"]),
        ("monitor", &["ha", "exec", "store", "model", "util"]),
        (
            "server",
            &["monitor", "ha", "exec", "store", "model", "util"],
        ),
        ("lb", &["model", "util"]),
        ("cli", &["store", "model", "util"]),
    ];
    const ROOT_ITEMS: &[&str] = &["now_secs", "banner", "VERSION"];

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The parts a file names through `crate::`, comments left out.
    fn parts_named(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
        out
    }

    /// No part imports from a part above it: the loop never takes the CLI's
    /// types, the balancer never takes the server's.
    #[test]
    fn layering() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut wrong = Vec::new();
        let mut seen_parts = BTreeSet::new();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let part = first.to_str().unwrap().trim_end_matches(".rs");
            if part == "lib" || part == "main" {
                continue;
            }
            let Some((_, allowed)) = LAYERS.iter().find(|(p, _)| *p == part) else {
                wrong.push(format!(
                    "{}: part '{part}' has no place in LAYERS",
                    rel.display()
                ));
                continue;
            };
            seen_parts.insert(part);
            let text = std::fs::read_to_string(f).unwrap();
            for named in parts_named(&text) {
                let ok = named == part
                    || allowed.contains(&named.as_str())
                    || ROOT_ITEMS.contains(&named.as_str());
                if !ok {
                    wrong.push(format!("{}: {part} imports crate::{named}", rel.display()));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "imports against the layering:\n{}",
            wrong.join("\n")
        );
        // The check must have looked at the tree it guards.
        assert_eq!(seen_parts.len(), LAYERS.len(), "parts seen: {seen_parts:?}");
    }

    #[test]
    fn layering_sees_an_upward_import() {
        let named = parts_named("use crate::cli::X; // crate::server\nlet a = crate::now_secs();");
        assert!(named.contains("cli"));
        assert!(!named.contains("server"), "comments are not imports");
        assert!(named.contains("now_secs"));
    }
}
