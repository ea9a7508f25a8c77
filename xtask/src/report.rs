//! The conformance report: one table of backend × case, assembled from the
//! files each backend's conformance run writes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::process::root;

/// Where the conformance tests leave their results.
fn results_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("tmp/conformance")
}

/// Prints the table, if any backend reported.
pub fn conformance_table() {
    let Ok(entries) = std::fs::read_dir(results_dir()) else {
        return;
    };
    let mut backends: Vec<(String, BTreeMap<String, String>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "tsv"))
        .filter_map(|e| {
            let name = e.path().file_stem()?.to_string_lossy().into_owned();
            let text = std::fs::read_to_string(e.path()).ok()?;
            let cells = text
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .map(|(case, verdict)| (case.to_string(), short(verdict)))
                .collect();
            Some((name, cells))
        })
        .collect();
    if backends.is_empty() {
        return;
    }
    backends.sort_by_key(|(name, _)| order(name));
    let mut cases: Vec<String> = Vec::new();
    for (_, cells) in &backends {
        for case in cells.keys() {
            if !cases.contains(case) {
                cases.push(case.clone());
            }
        }
    }
    cases.sort();
    let width = cases.iter().map(String::len).max().unwrap_or(4);
    println!(
        "\nConformance (pass / n/a / FAIL per backend; reasons in each backend's test output)"
    );
    print!("{:width$}", "case");
    for (name, _) in &backends {
        print!(" {name:>13}");
    }
    println!();
    for case in &cases {
        print!("{case:width$}");
        for (_, cells) in &backends {
            print!(" {:>13}", cells.get(case).map_or("-", String::as_str));
        }
        println!();
    }
}

fn short(verdict: &str) -> String {
    if verdict.starts_with("pass") {
        "pass".into()
    } else if verdict.starts_with("n/a") {
        "n/a".into()
    } else {
        "FAIL".into()
    }
}

/// Embedded backends first, then the networked ones.
fn order(name: &str) -> usize {
    [
        "memory",
        "sqlite",
        "file",
        "redis-streams",
        "redis-pubsub",
        "nats",
        "jetstream",
    ]
    .iter()
    .position(|n| *n == name)
    .unwrap_or(usize::MAX)
}
